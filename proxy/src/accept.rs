//! What a listener does when accepting fails.
//!
//! A connection reset before it was accepted (ECONNABORTED) concerns only
//! that client: the next one is accepted at once. Running out of file
//! descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
//! different: the pending connection keeps the listener readable, so
//! retrying at once would spin a core and starve every session on the
//! event loop (the one way out, a client leaving, could not run). The
//! listener pauses for [`PAUSE`] instead, and clients wait in the kernel's
//! backlog until descriptors are freed, as PgBouncer does. One warning per
//! episode; every failure counts in `pgha_proxy_errors_total{kind="accept"}`.
//! May call: `metrics`.

use std::time::Duration;

use crate::metrics::{ErrorKind, Metrics};

/// How long a listener rests after running out of descriptors or memory.
pub const PAUSE: Duration = Duration::from_millis(100);

/// One listener's failures to accept.
#[derive(Debug, Default)]
pub struct Failures {
    /// Accepting fails for want of resources since the last success.
    exhausted: bool,
}

impl Failures {
    /// After a client was accepted.
    pub fn accepted(&mut self, listener: &str) {
        if self.exhausted {
            self.exhausted = false;
            tracing::info!(listener, "accepting clients again");
        }
    }

    /// After accepting failed with `e`: how long to pause, if at all.
    pub fn failed(
        &mut self,
        e: &std::io::Error,
        listener: &str,
        metrics: &Metrics,
    ) -> Option<Duration> {
        let exhausted = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !exhausted {
            tracing::debug!(listener, error = %e, "a connection was lost before it was accepted");
            return None;
        }
        metrics.error(ErrorKind::Accept);
        if !self.exhausted {
            self.exhausted = true;
            tracing::warn!(
                listener,
                error = %e,
                "cannot accept clients: out of file descriptors or memory; new clients wait in the listen backlog, retried every {PAUSE:?} (raise the open-file limit: LimitNOFILE=, ulimit -n)"
            );
        }
        Some(PAUSE)
    }
}

/// Raises this process's soft open-file limit to its hard limit (what
/// Go programs do at start; a shell's soft limit is often 1024) and warns
/// when it stays below `needed`. Returns the limit in force.
pub fn raise_nofile_limit(needed: u64) -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below max_client_conn plus room for server connections: clients beyond it wait in the listen backlog (raise LimitNOFILE= or ulimit -n)"
        );
    }
    Some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_running_out_of_resources_pauses_and_warns_once_per_episode() {
        let metrics = Metrics::new();
        let mut f = Failures::default();
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(f.failed(&aborted, "rw", &metrics), None);
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(f.failed(&emfile, "rw", &metrics), Some(PAUSE));
        assert!(f.exhausted);
        assert_eq!(f.failed(&emfile, "rw", &metrics), Some(PAUSE));
        f.accepted("rw");
        assert!(!f.exhausted);
    }
}
