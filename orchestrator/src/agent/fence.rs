//! The fencing watchdog: a writable postgres is stopped the moment the lease
//! has gone unrenewed for `loop_wait + retry_timeout` (less if the lease
//! granted is shorter than that allows, see `lease::fencing`), whatever the HA loop
//! is doing at that instant (it may be blocked for a while on an etcd request
//! that will time out). Invariant 2 must not wait behind anything.
//!
//! It reads only files: `postmaster.pid` (is postgres running?) and
//! `standby.signal` (is it a standby?), and sends the postmaster SIGQUIT
//! (immediate shutdown: every session ends at once). The HA loop sees the
//! exit and decides what comes next. Each move of the deadline is also
//! sent to the fencing keeper (`keeper`), which acts if the whole agent
//! stalls, watchdog included.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use super::keeper::Keeper;
use super::{lease, Shared};
use crate::postgres::postmaster_pid;

/// The running postmaster of `data_dir` if it runs as a primary.
fn running_primary(data_dir: &Path) -> Option<i32> {
    if data_dir.join("standby.signal").exists() {
        return None;
    }
    postmaster_pid(data_dir)
}

/// Stops the postgres of `data_dir` at once (SIGQUIT: immediate shutdown)
/// if it runs as a primary; returns its pid if it did. The watchdog and
/// the keeper both fence with it.
pub(super) fn stop_primary(data_dir: &Path) -> Option<i32> {
    let pid = running_primary(data_dir)?;
    let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    Some(pid)
}

/// Watches the lease until `shutdown`.
pub(super) async fn watchdog(
    shared: Arc<Shared>,
    data_dir: PathBuf,
    mut keeper: Keeper,
    shutdown: CancellationToken,
) {
    loop {
        let (deadline, margin) = lease::fence_deadline(&shared);
        keeper.tell(deadline, margin);
        let wait = match deadline {
            // No lease yet: we cannot have been leader.
            None => Duration::from_millis(200),
            Some(d) => d.saturating_duration_since(Instant::now()),
        };
        if deadline.is_some() && wait.is_zero() {
            if let Some(pid) = stop_primary(&data_dir) {
                tracing::warn!(
                    pid,
                    "fencing: lease not renewed within loop_wait + retry_timeout (or the lease's life), stopped postgres"
                );
                shared.wake.notify_one();
            }
        }
        tokio::select! {
            // Re-check at least every 200ms: a renewal moves the deadline.
            _ = tokio::time::sleep(wait.clamp(Duration::from_millis(20), Duration::from_millis(200))) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_postmaster_without_standby_signal_is_a_primary() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(running_primary(dir.path()), None, "no postmaster.pid");
        let me = std::process::id() as i32;
        std::fs::write(dir.path().join("postmaster.pid"), format!("{me}\n/data\n")).unwrap();
        assert_eq!(running_primary(dir.path()), Some(me));
        std::fs::write(dir.path().join("standby.signal"), "").unwrap();
        assert_eq!(running_primary(dir.path()), None, "a standby");
        std::fs::remove_file(dir.path().join("standby.signal")).unwrap();
        std::fs::write(dir.path().join("postmaster.pid"), "999999999\n").unwrap();
        assert_eq!(running_primary(dir.path()), None, "a stale pid file");
    }
}
