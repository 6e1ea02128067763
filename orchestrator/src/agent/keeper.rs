//! The fencing keeper: a process of its own that stops a writable postgres
//! when the agent stops telling it that the lease is being renewed.
//!
//! The watchdog in `fence` runs inside the agent, so it stalls with it: a
//! stopped agent (SIGSTOP, a debugger, a frozen cgroup, a process stuck in
//! the kernel) would leave its postgres accepting writes after the lease
//! expired and another member was promoted. The keeper is the backstop,
//! as Patroni's watchdog device is for Patroni. The agent writes to the
//! keeper's stdin, each time its fencing deadline moves, that deadline
//! plus a margin (half a `retry_timeout`, see `lease::fencing`) as a time
//! of `CLOCK_MONOTONIC` (`none` without a lease): the keeper fences after
//! the agent's own watchdog had its chance, still before the lease can
//! expire, and stays armed until a newer deadline comes. It fences by SIGQUIT to the
//! postmaster (immediate shutdown), exactly as the watchdog does, and
//! exits when the pipe closes: the agent is gone, and its postgres with it
//! (see `die_with_agent`).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};

use super::fence::stop_primary;
use crate::config::LogFormat;
use crate::metrics;

/// The first argument that makes `pgha-agent` a keeper.
pub const KEEPER_ARG: &str = "--fence-keeper";

/// Now on `CLOCK_MONOTONIC`, the clock both processes share (the one
/// `Instant` reads): deadlines cross the pipe as absolute times, so a
/// message read late (a keeper descheduled, or stopped and resumed) does
/// not move the deadline later.
fn monotonic_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(Duration::from)
        .unwrap_or_default()
}

/// What the agent tells the keeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deadline {
    /// Fence at this time of `CLOCK_MONOTONIC` unless a newer message
    /// came first.
    At(Duration),
    /// No lease: nothing to fence on time.
    None,
}

impl Deadline {
    fn encode(self) -> String {
        match self {
            Deadline::At(t) => format!("{}\n", t.as_nanos()),
            Deadline::None => "none\n".into(),
        }
    }

    fn decode(line: &str) -> Option<Deadline> {
        match line.trim() {
            "none" => Some(Deadline::None),
            ns => ns
                .parse()
                .ok()
                .map(|ns| Deadline::At(Duration::from_nanos(ns))),
        }
    }
}

/// How long the agent waits before trying again to start a keeper that
/// could not start.
const RESPAWN_AFTER: Duration = Duration::from_secs(5);
/// How long after a keeper died another is started.
const RESTART_AFTER_DEATH: Duration = Duration::from_secs(1);

/// A running keeper process and the pipe to it.
struct Process {
    child: Child,
    stdin: ChildStdin,
}

impl Process {
    /// Starts a keeper for `data_dir` from the agent's own executable.
    fn spawn(data_dir: &Path, log_format: LogFormat) -> std::io::Result<Process> {
        let exe = std::env::current_exe()?;
        // A process group of its own: a stop sent to the agent's group
        // (Ctrl-Z, `kill -STOP -PGID`) must not stop the keeper too, while
        // postgres, in a group of its own as well, runs on.
        let mut child = Command::new(exe)
            .arg(KEEPER_ARG)
            .arg(data_dir)
            .arg(log_format.name())
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()?;
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("no pipe to the keeper"));
        };
        // Never block the agent on a keeper that stopped reading.
        let flags = nix::fcntl::fcntl(stdin.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(stdin.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Process { child, stdin })
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Ends it (closing the pipe would too) and reaps it: no zombie.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's end: the keeper of one data directory, started again when
/// it dies (`pgha_agent_fence_keeper_up` tells whether one runs).
pub struct Keeper {
    data_dir: PathBuf,
    log_format: LogFormat,
    process: Option<Process>,
    /// When to try starting one again, if none runs.
    retry_at: Instant,
    /// The deadline last sent, as an instant of the agent's clock.
    sent: Option<Option<Instant>>,
}

impl Keeper {
    /// A keeper for the postgres in `data_dir`, started at the first
    /// [`Keeper::tell`]. It logs in the agent's `log_format`.
    pub fn new(data_dir: &Path, log_format: LogFormat) -> Keeper {
        Keeper {
            data_dir: data_dir.to_owned(),
            log_format,
            process: None,
            retry_at: Instant::now(),
            sent: None,
        }
    }

    /// Tells the keeper the fencing deadline (`None`: no lease), plus
    /// `margin`, if it moved since the last time (or the keeper is new).
    pub fn tell(&mut self, deadline: Option<Instant>, margin: Duration) {
        if self.process.is_none() {
            if Instant::now() < self.retry_at {
                return;
            }
            match Process::spawn(&self.data_dir, self.log_format) {
                Ok(p) => {
                    tracing::info!(pid = p.child.id(), "fencing keeper started");
                    self.process = Some(p);
                    self.sent = None;
                    metrics::fence_keeper_up(true);
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not start the fencing keeper: only the in-process watchdog fences a stalled agent's postgres");
                    self.retry_at = Instant::now() + RESPAWN_AFTER;
                    metrics::fence_keeper_up(false);
                    return;
                }
            }
        }
        if self.sent == Some(deadline) {
            return;
        }
        let msg = match deadline {
            Some(d) => {
                // The same instant on the shared clock (an Instant cannot
                // be read as one directly).
                let (now, on_clock) = (Instant::now(), monotonic_now());
                let at = match d.checked_duration_since(now) {
                    Some(left) => on_clock + left,
                    None => on_clock.saturating_sub(now - d),
                };
                Deadline::At(at + margin)
            }
            None => Deadline::None,
        };
        let Some(p) = self.process.as_mut() else {
            return;
        };
        match p.stdin.write_all(msg.encode().as_bytes()) {
            Ok(()) => self.sent = Some(deadline),
            // A full pipe: the keeper is not reading (stopped too); the
            // next change is sent again.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                let status = p.child.try_wait().ok().flatten();
                tracing::error!(error = %e, ?status, "the fencing keeper died: starting another");
                self.process = None;
                self.retry_at = Instant::now() + RESTART_AFTER_DEATH;
                metrics::fence_keeper_up(false);
            }
        }
    }
}

/// The keeper's own loop (the process `pgha-agent --fence-keeper DIR
/// FORMAT`, logging set up by its `main`):
/// returns when the agent closes the pipe.
pub fn run(data_dir: &Path) -> std::io::Result<()> {
    // A SIGINT or SIGTERM for every process (systemd stops a whole cgroup)
    // is not the keeper's to act on: it goes when the agent closes the
    // pipe (the agent ends it when its watchdog stops).
    let mut quiet = SigSet::empty();
    quiet.add(Signal::SIGINT);
    quiet.add(Signal::SIGTERM);
    quiet.thread_block()?;
    // Unbuffered: each poll must see every byte not read yet.
    let mut stdin = std::fs::File::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    let mut deadline: Option<Duration> = None;
    let mut pending = String::new();
    let mut buf = [0u8; 512];
    loop {
        let timeout = match deadline {
            // Past the deadline it stays armed, looking again every 100 ms
            // (a postmaster may appear, or lose its standby.signal), until
            // the agent sends a newer deadline.
            Some(d) => d
                .saturating_sub(monotonic_now())
                .clamp(Duration::from_millis(1), Duration::from_millis(100)),
            None => Duration::from_secs(60),
        };
        let timeout = PollTimeout::try_from(timeout.as_millis() as u32).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let readable = fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP));
        if readable {
            let n = stdin.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                match Deadline::decode(&line) {
                    Some(Deadline::At(t)) => deadline = Some(t),
                    Some(Deadline::None) => deadline = None,
                    None => tracing::warn!("fence keeper: ignoring {line:?}"),
                }
            }
        }
        if deadline.is_some_and(|d| monotonic_now() >= d) {
            if let Some(pid) = stop_primary(data_dir) {
                tracing::warn!(
                    pid,
                    "fence keeper: the agent has not renewed its lease in time (stalled?): stopped postgres"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_survive_the_pipe() {
        for d in [
            Deadline::At(monotonic_now() + Duration::from_millis(4500)),
            Deadline::None,
        ] {
            assert_eq!(Deadline::decode(&d.encode()), Some(d));
        }
        assert_eq!(Deadline::decode("soon\n"), None);
    }
}
