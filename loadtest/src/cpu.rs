//! CPU time a process has used, from /proc: how the benchmarks charge a
//! pooler for each transaction it forwarded.

use std::time::Duration;

/// CPU time of a process (all its threads) so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTime {
    /// In the process's own code (what a pooler's design decides).
    pub user: Duration,
    /// In the kernel on its behalf (system calls, network stack).
    pub system: Duration,
}

impl CpuTime {
    pub fn total(&self) -> Duration {
        self.user + self.system
    }
}

/// User and system CPU time of `pid` (all its threads) so far.
pub fn cpu_time(pid: u32) -> Result<CpuTime, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    parse_stat(&stat, clock_ticks())
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// utime and stime (fields 14 and 15) of a /proc/<pid>/stat line.
fn parse_stat(stat: &str, ticks_per_sec: u64) -> Result<CpuTime, String> {
    // The command name (field 2) may contain spaces: count from its ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("malformed stat: {stat:?}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, index 11 here.
    let field = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("malformed stat field {}: {stat:?}", i + 3))
    };
    let time = |ticks: u64| Duration::from_micros(ticks * 1_000_000 / ticks_per_sec);
    Ok(CpuTime {
        user: time(field(11)?),
        system: time(field(12)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utime_and_stime_even_with_spaces_in_the_name() {
        let stat =
            "1234 (pgha proxy) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 0 0";
        let t = parse_stat(stat, 100).unwrap();
        assert_eq!(t.user, Duration::from_millis(2500));
        assert_eq!(t.system, Duration::from_millis(500));
        assert_eq!(t.total(), Duration::from_secs(3));
    }

    #[test]
    fn own_process_cpu_time_grows_with_busy_work() {
        let before = cpu_time(std::process::id()).unwrap();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after = cpu_time(std::process::id()).unwrap();
        // Clock ticks are 10 ms: 100 ms of spinning must register.
        assert!(after.total() > before.total(), "{before:?} -> {after:?}");
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_stat("nonsense", 100).is_err());
        assert!(parse_stat("1 (x) S 1", 100).is_err());
    }
}
