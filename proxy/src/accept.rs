//! What a listener does when accepting fails.
//!
//! An error that concerns one connection (reset or refused by a firewall
//! before it was accepted: the network errors accept(2) passes on) is
//! skipped and the next one accepted at once. Any other error would come
//! back at once: running out of file descriptors or kernel memory
//! (EMFILE, ENFILE, ENOBUFS, ENOMEM) fails every accept while the pending
//! connection keeps the listener readable, so retrying at once would spin
//! a core and starve every session on the event loop (the one way out, a
//! client leaving, could not run). The listener pauses for [`PAUSE`]
//! instead, and clients wait in the kernel's backlog until descriptors are
//! freed, as PgBouncer does. One warning per episode; every failure counts
//! in `pgha_proxy_errors_total{kind="accept"}`. A per-connection error
//! that keeps coming with no client accepted in between ([`MAX_SKIPS`] in
//! a row: EPERM from a security module that refuses every connection, say)
//! is no longer one connection's: it pauses too.
//! May call: `metrics`.

use std::time::Duration;

use crate::metrics::{ErrorKind, Metrics};

/// How long a listener rests after running out of descriptors or memory.
pub const PAUSE: Duration = Duration::from_millis(100);

/// Per-connection errors in a row, with no client accepted, that are
/// skipped at once; the next ones pause.
pub const MAX_SKIPS: u32 = 64;

/// One listener's failures to accept.
#[derive(Debug, Default)]
pub struct Failures {
    /// Accepting fails for want of resources since the last success.
    exhausted: bool,
    /// Per-connection errors skipped since the last success.
    skipped: u32,
}

impl Failures {
    /// After a client was accepted.
    pub fn accepted(&mut self, listener: &str) {
        self.skipped = 0;
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
        let code = e.raw_os_error().unwrap_or_default();
        let one_connection = [
            libc::ECONNABORTED,
            libc::EINTR,
            libc::EPROTO,
            libc::ENOPROTOOPT,
            libc::ENETDOWN,
            libc::EHOSTDOWN,
            libc::ENONET,
            libc::EHOSTUNREACH,
            libc::EOPNOTSUPP,
            libc::ENETUNREACH,
            libc::ETIMEDOUT,
            libc::EPERM,
        ];
        if one_connection.contains(&code) && self.skipped < MAX_SKIPS {
            self.skipped += 1;
            tracing::debug!(listener, error = %e, "a connection was lost before it was accepted");
            return None;
        }
        metrics.error(ErrorKind::Accept);
        if !self.exhausted {
            self.exhausted = true;
            if [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].contains(&code) {
                tracing::warn!(
                    listener,
                    error = %e,
                    "cannot accept clients: out of file descriptors or memory; new clients wait in the listen backlog, retried every {PAUSE:?} (raise the open-file limit: LimitNOFILE=, ulimit -n)"
                );
            } else {
                tracing::warn!(listener, error = %e, "cannot accept clients; retried every {PAUSE:?}");
            }
        }
        Some(PAUSE)
    }
}

/// Raises this process's soft open-file limit to its hard limit (what
/// Go programs do at start; a shell's soft limit is often 1024), or to
/// the kernel's `nr_open` when the hard limit is infinite, and warns when
/// it stays below `needed`. Returns the limit in force.
pub fn raise_nofile_limit(needed: u64) -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    let ceiling = if hard == libc::RLIM_INFINITY {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok();
        nr_open.and_then(|n| n.trim().parse().ok()).unwrap_or(soft)
    } else {
        hard
    };
    let limit = if soft < ceiling && setrlimit(Resource::RLIMIT_NOFILE, ceiling, hard).is_ok() {
        ceiling
    } else {
        soft
    };
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below max_client_conn plus room for server connections (needed is a floor: each pool may open pool_size): clients beyond it wait in the listen backlog (raise LimitNOFILE= or ulimit -n)"
        );
    }
    Some(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_of_one_connection_are_skipped_at_once_the_rest_pause() {
        let metrics = Metrics::new();
        let mut f = Failures::default();
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(f.failed(&aborted, "rw", &metrics), None);
        assert!(!f.exhausted);
        // Anything else would come back at once too.
        let einval = std::io::Error::from_raw_os_error(libc::EINVAL);
        assert_eq!(f.failed(&einval, "rw", &metrics), Some(PAUSE));
        f.accepted("rw");
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(f.failed(&emfile, "rw", &metrics), Some(PAUSE));
        assert!(f.exhausted);
        assert_eq!(f.failed(&emfile, "rw", &metrics), Some(PAUSE));
        f.accepted("rw");
        assert!(!f.exhausted);
    }

    #[test]
    fn a_per_connection_error_that_keeps_coming_pauses() {
        let metrics = Metrics::new();
        let mut f = Failures::default();
        let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
        for _ in 0..MAX_SKIPS {
            assert_eq!(f.failed(&eperm, "rw", &metrics), None);
        }
        assert_eq!(f.failed(&eperm, "rw", &metrics), Some(PAUSE));
        assert!(f.exhausted);
        assert_eq!(f.failed(&eperm, "rw", &metrics), Some(PAUSE));
        // A client got in: the next such error is one connection's again.
        f.accepted("rw");
        assert_eq!(f.failed(&eperm, "rw", &metrics), None);
    }
}
