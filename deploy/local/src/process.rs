//! One supervised child process: output to a log file, its own process group,
//! and stopped (with all its descendants) when the handle is dropped.
//!
//! Each child leads a new process group, so a stop or kill reaches the
//! processes it forked too (postgres backends, for instance). The child also
//! asks the kernel for SIGKILL if the thread that spawned it dies, so even a
//! test process killed by its runner leaves nothing behind. That signal is tied
//! to the spawning *thread*: spawn from a thread that outlives the child (the
//! test's or `main`'s), never from a short-lived pool thread.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::{Error, RunAs};

/// How a child is asked to stop gracefully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM: etcd, agents, proxies.
    Term,
    /// SIGINT: postgres "fast" shutdown (roll back sessions, checkpoint).
    Int,
}

impl StopSignal {
    fn signal(self) -> Signal {
        match self {
            StopSignal::Term => Signal::SIGTERM,
            StopSignal::Int => Signal::SIGINT,
        }
    }
}

/// A running child process owned by the harness.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stop_signal: StopSignal,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log`, as `run_as`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        log: &Path,
        run_as: Option<&RunAs>,
        stop_signal: StopSignal,
    ) -> Result<Proc, Error> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(Error::io(format!("open log {log:?}")))?;
        let err = out.try_clone().map_err(Error::io("dup log fd"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if let Some(u) = run_as {
            u.apply(&mut cmd);
        }
        // The test runner asks for backtraces; a service's log should show its error.
        cmd.env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(Error::io(format!("spawn {name} ({:?})", cmd.get_program())))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            stop_signal,
            exited: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn group(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `sig` to the child only (not its descendants).
    pub fn signal(&self, sig: Signal) -> Result<(), Error> {
        nix::sys::signal::kill(self.group(), sig).map_err(|e| Error::Command {
            what: format!("send {sig} to {}", self.name),
            detail: e.to_string(),
        })
    }

    /// Sends `sig` to the child and everything it forked.
    pub fn signal_group(&self, sig: Signal) -> Result<(), Error> {
        killpg(self.group(), sig).map_err(|e| Error::Command {
            what: format!("send {sig} to group of {}", self.name),
            detail: e.to_string(),
        })
    }

    /// Freezes the whole process group (SIGSTOP), as a hung machine would.
    ///
    /// Returns once every thread of the group has stopped: the kernel wakes
    /// one thread to start a group stop and the others keep running (and
    /// may answer a request) until that thread gets a CPU, which on a busy
    /// machine takes a while.
    pub fn pause(&self) -> Result<(), Error> {
        self.signal_group(Signal::SIGSTOP)?;
        let group = self.group().as_raw();
        crate::wait_until(
            &format!("{} to stop", self.name),
            Duration::from_secs(10),
            || {
                let running = running_in_group(group);
                if running.is_empty() {
                    return Ok(Some(()));
                }
                Err(format!("still running (pid, tid, state): {running:?}").into())
            },
        )
    }

    /// Thaws a paused process group.
    pub fn resume(&self) -> Result<(), Error> {
        self.signal_group(Signal::SIGCONT)
    }

    /// The exit status if the child has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        crate::wait_until(&format!("{} to exit", self.name), timeout, || {
            Ok(self.try_exit())
        })
    }

    /// SIGKILL to the child and its descendants, then reap it.
    pub fn kill(&mut self) -> Result<ExitStatus, Error> {
        let _ = self.signal_group(Signal::SIGCONT);
        let _ = self.signal_group(Signal::SIGKILL);
        let status = self.wait_exit(Duration::from_secs(10));
        self.wait_group_gone();
        status
    }

    /// SIGKILL to what is left of the group, and waits (10 s at most)
    /// until none of it runs: a killed process takes a moment to exit, and
    /// orphaned postgres backends still attached to their shared memory
    /// make the next postmaster on that data directory refuse to start
    /// ("pre-existing shared memory block is still in use").
    fn wait_group_gone(&self) {
        let group = self.group().as_raw();
        let _ = self.signal_group(Signal::SIGKILL);
        let _ = crate::wait_until("the process group to exit", Duration::from_secs(10), || {
            Ok(live_in_group(group).is_empty().then_some(()))
        });
    }

    /// Asks the child to stop, waits up to `grace`, then kills what is left.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, Error> {
        if let Some(s) = self.try_exit() {
            self.wait_group_gone();
            return Ok(s);
        }
        let _ = self.signal_group(Signal::SIGCONT);
        let _ = self.signal(self.stop_signal.signal());
        let status = match self.wait_exit(grace) {
            Ok(s) => s,
            Err(_) => return self.kill(),
        };
        // Descendants that outlived the leader (e.g. orphaned backends).
        self.wait_group_gone();
        Ok(status)
    }

    /// An error describing why the child is gone, with its log tail.
    pub fn exited_error(&mut self) -> Option<Error> {
        let status = self.try_exit()?;
        Some(Error::Exited {
            what: self.name.clone(),
            status: status.to_string(),
            log: self.log.clone(),
            tail: tail(&self.log, 30),
        })
    }

    /// The last `lines` lines of the child's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of {} ({}) ----\n{}\n---- end of {} ----",
                self.name,
                self.log.display(),
                self.log_tail(40),
                self.name
            );
        }
        let _ = self.stop(Duration::from_secs(10));
    }
}

/// Live processes whose command line mentions `path`, as (pid, command
/// line): how a test checks that nothing it started in a directory is left.
pub fn processes_under(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    processes()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(pid, dir)| {
            let cmdline = std::fs::read(dir.join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}

/// Every process now, as (pid, its `/proc` directory); `None` if `/proc`
/// cannot be read.
fn processes() -> Option<Vec<(u32, PathBuf)>> {
    let entries = std::fs::read_dir("/proc").ok()?;
    Some(
        entries
            .flatten()
            .filter_map(|e| Some((e.file_name().to_string_lossy().parse().ok()?, e.path())))
            .collect(),
    )
}

/// Fields 3 (state) and 5 (process group) of a `/proc/.../stat` file.
fn stat_state_and_group(path: &Path) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces and parentheses.
    let mut rest = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let group = rest.nth(1)?.parse().ok()?;
    Some((state, group))
}

/// Processes of `group` that have not exited (zombies have: they hold
/// no memory, only an exit status for their reaper).
fn live_in_group(group: i32) -> Vec<u32> {
    processes()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(pid, dir)| {
            let (state, g) = stat_state_and_group(&dir.join("stat"))?;
            (g == group && !matches!(state, 'Z' | 'X')).then_some(pid)
        })
        .collect()
}

/// Threads of processes in `group` that may still run user code, i.e. not
/// stopped, gone, or blocked in the kernel: (pid, tid, state).
fn running_in_group(group: i32) -> Vec<(String, String, char)> {
    let Some(procs) = processes() else {
        return vec![("?".into(), "?".into(), '?')];
    };
    let mut out = Vec::new();
    for (pid, dir) in procs {
        if stat_state_and_group(&dir.join("stat")).is_none_or(|(_, g)| g != group) {
            continue;
        }
        let pid = pid.to_string();
        let Ok(tasks) = std::fs::read_dir(dir.join("task")) else {
            continue; // exited meanwhile
        };
        for t in tasks.flatten() {
            if let Some((state, _)) = stat_state_and_group(&t.path().join("stat")) {
                // D: blocked in the kernel (a shell waiting for a vfork
                // child that got the SIGSTOP first, say): it runs no user
                // code before the pending stop takes it.
                if !matches!(state, 'T' | 't' | 'Z' | 'X' | 'D') {
                    out.push((
                        pid.clone(),
                        t.file_name().to_string_lossy().into_owned(),
                        state,
                    ));
                }
            }
        }
    }
    out
}

/// Whether every thread of every process in `group` is stopped (or gone).
#[cfg(test)]
fn group_is_stopped(group: i32) -> bool {
    running_in_group(group).is_empty()
}

/// The last `lines` lines of a file (reads at most its last 64 KiB).
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::from("<no log>");
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// New process group, and SIGKILL when the spawning thread dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Runs `cmd` to completion as `run_as`, failing with its output on a non-zero exit.
pub(crate) fn run(what: &str, mut cmd: Command, run_as: Option<&RunAs>) -> Result<String, Error> {
    if let Some(u) = run_as {
        u.apply(&mut cmd);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io(format!("run {what} ({:?})", cmd.get_program())))?;
    if !out.status.success() {
        return Err(Error::Command {
            what: what.to_owned(),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(dir: &Path) -> Proc {
        let mut cmd = Command::new("sh");
        // A child that forks a grandchild, like postgres does.
        cmd.args(["-c", "sleep 600 & echo grandchild $!; sleep 600"]);
        Proc::spawn("sleeper", cmd, &dir.join("s.log"), None, StopSignal::Term).unwrap()
    }

    /// Running, as opposed to gone or a zombie awaiting its reaper.
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                let state = s.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            })
            .unwrap_or(false)
    }

    #[test]
    fn pause_returns_once_the_whole_group_is_stopped_and_resume_thaws_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = sleeper(dir.path());
        let group = p.pid() as i32;
        // Both sleeps started: every process of the group sleeps in `S`.
        crate::wait_until("both sleeps running", Duration::from_secs(5), || {
            let started = p.log_tail(5).starts_with("grandchild ");
            Ok((started && !group_is_stopped(group)).then_some(()))
        })
        .unwrap();
        p.pause().unwrap();
        assert!(
            group_is_stopped(group),
            "pause returned before the group stopped"
        );
        p.resume().unwrap();
        crate::wait_until("group running", Duration::from_secs(5), || {
            Ok((!group_is_stopped(group)).then_some(()))
        })
        .unwrap();
    }

    #[test]
    fn drop_stops_the_child_and_its_descendants() {
        let dir = tempfile::tempdir().unwrap();
        let p = sleeper(dir.path());
        let pid = p.pid() as i32;
        let grandchild: i32 = crate::wait_until("child output", Duration::from_secs(5), || {
            Ok(p.log_tail(5)
                .strip_prefix("grandchild ")
                .and_then(|n| n.trim().parse().ok()))
        })
        .unwrap();
        assert!(alive(pid) && alive(grandchild));
        drop(p);
        assert!(!alive(pid), "child survived");
        // Gone by the time drop returns, not some moment later.
        assert!(!alive(grandchild), "grandchild survived");
    }

    #[test]
    fn kill_is_seen_as_a_signal_exit() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper(dir.path());
        let status = p.kill().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(p.exited_error().unwrap().to_string().contains("sleeper"));
    }

    #[test]
    fn run_reports_the_failing_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo boom >&2; exit 3"]);
        let e = run("failing step", cmd, None).unwrap_err().to_string();
        assert!(e.contains("failing step") && e.contains("boom"), "{e}");
    }
}
