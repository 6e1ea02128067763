//! Runs pgbench and reads back what it measured.
//!
//! TPS and mean latency come from pgbench's summary; the p99 comes from its
//! per-transaction log (`-l`), since pgbench prints no percentiles itself.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::LatencyHistogram;

/// One pgbench run's figures.
#[derive(Debug, Clone)]
pub struct PgbenchResult {
    pub transactions: u64,
    pub failed: u64,
    pub tps: f64,
    pub latency_avg: Duration,
    pub latency_p99: Duration,
}

/// Runs `pgbench <args> <conn_str>` with a per-transaction log in `log_dir`.
pub fn run(conn_str: &str, args: &[String], log_dir: &Path) -> Result<PgbenchResult, String> {
    let _ = std::fs::remove_dir_all(log_dir);
    std::fs::create_dir_all(log_dir).map_err(|e| format!("create {log_dir:?}: {e}"))?;
    let prefix = log_dir.join("pgbench_log");
    let out = Command::new("pgbench")
        .args(args)
        .arg("-l")
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg(conn_str)
        .output()
        .map_err(|e| format!("run pgbench: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr
            .lines()
            .find(|l| l.contains("error") || l.contains("ERROR") || l.contains("FATAL"))
            .unwrap_or_else(|| stderr.lines().last().unwrap_or(""));
        return Err(format!("pgbench failed ({}): {}", out.status, first.trim()));
    }
    let mut result = parse_summary(&stdout)?;
    result.latency_p99 = p99_from_logs(log_dir)?;
    Ok(result)
}

fn number_after<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
}

/// Reads transactions, failures, tps and the latency average from pgbench's output.
pub fn parse_summary(stdout: &str) -> Result<PgbenchResult, String> {
    let missing = |what: &str| format!("pgbench output has no {what}: {stdout}");
    let transactions = number_after(stdout, "number of transactions actually processed:")
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| missing("transaction count"))?;
    let failed = number_after(stdout, "number of failed transactions:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let tps = number_after(stdout, "tps =")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| missing("tps"))?;
    let avg_ms: f64 = number_after(stdout, "latency average =")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| missing("latency average"))?;
    Ok(PgbenchResult {
        transactions,
        failed,
        tps,
        latency_avg: Duration::from_secs_f64(avg_ms / 1000.0),
        latency_p99: Duration::ZERO,
    })
}

/// p99 of the per-transaction latencies (third column, µs) in every log file.
fn p99_from_logs(dir: &Path) -> Result<Duration, String> {
    let mut h = LatencyHistogram::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("read {dir:?}: {e}"))?;
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).map_err(|e| e.to_string())?;
        for line in text.lines() {
            if let Some(us) = line.split_whitespace().nth(2).and_then(|v| v.parse().ok()) {
                h.record(Duration::from_micros(us));
            }
        }
    }
    let s = h.summary();
    if s.count == 0 {
        return Err(format!("no transactions in pgbench logs under {dir:?}"));
    }
    Ok(s.p99)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: prepared
number of clients: 32
number of threads: 2
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 123456
number of failed transactions: 0 (0.000%)
latency average = 1.296 ms
initial connection time = 40.123 ms
tps = 24691.200000 (without initial connection time)
";

    #[test]
    fn reads_the_summary() {
        let r = parse_summary(OUTPUT).unwrap();
        assert_eq!(r.transactions, 123456);
        assert_eq!(r.failed, 0);
        assert!((r.tps - 24691.2).abs() < 1e-6);
        assert_eq!(r.latency_avg, Duration::from_micros(1296));
    }

    #[test]
    fn output_without_figures_is_an_error() {
        assert!(parse_summary("pgbench: error: connection refused").is_err());
    }

    #[test]
    fn p99_comes_from_the_transaction_log() {
        let dir = std::env::temp_dir().join(format!("pgha-p99-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut log = String::new();
        for i in 1..=100 {
            log.push_str(&format!("0 {i} {} 0 1700000000 0\n", i * 100));
        }
        std::fs::write(dir.join("pgbench_log.1"), log).unwrap();
        let p99 = p99_from_logs(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(p99.as_micros().abs_diff(9900) <= 10, "{p99:?}");
    }
}
