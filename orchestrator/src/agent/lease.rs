//! The agent's etcd lease: granted once, renewed every `loop_wait` by its own
//! task, replaced if it ever expires. The member record and the leader key
//! live on it, so an agent that dies loses both within `ttl`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use pgha_cluster::ClusterConfig;

use super::Shared;
use crate::dcs::DcsError;
use crate::metrics;

/// The current lease and when it was last renewed.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeaseState {
    pub id: Option<i64>,
    pub renewed_at: Option<Instant>,
    /// The TTL etcd granted it: the config's `ttl` may have changed since.
    pub ttl: Option<Duration>,
}

pub(super) fn current(shared: &Shared) -> Option<i64> {
    shared.lease.lock().ok().and_then(|l| l.id)
}

pub(super) fn renewed_at(shared: &Shared) -> Option<Instant> {
    shared.lease.lock().ok().and_then(|l| l.renewed_at)
}

/// When to fence, counted from the last renewal, and the fencing keeper's
/// margin after that: `loop_wait + retry_timeout` and half a
/// `retry_timeout` as configured, but always inside the lease actually
/// granted (`granted`, if known): the keeper acts at least a `margin`
/// before the lease can expire, even after an `edit-config` changed `ttl`
/// or `retry_timeout` under a lease granted with the old `ttl`. The limit
/// stays at least half the lease, above the renewal period (a third).
pub(super) fn fencing(config: &ClusterConfig, granted: Option<Duration>) -> (Duration, Duration) {
    let ttl = granted.unwrap_or(config.ttl);
    let margin = (config.retry_timeout / 2).min(ttl / 4);
    let limit = config.fence_after().min(ttl.saturating_sub(margin * 2));
    (limit, margin)
}

/// The fencing deadline of the current lease, and the keeper's margin.
pub(super) fn fence_deadline(shared: &Shared) -> (Option<Instant>, Duration) {
    let state = shared.lease.lock().map(|l| *l).unwrap_or_default();
    let (limit, margin) = fencing(&shared.cluster_config(), state.ttl);
    (state.renewed_at.map(|t| t + limit), margin)
}

fn set(shared: &Shared, f: impl FnOnce(&mut LeaseState)) {
    if let Ok(mut l) = shared.lease.lock() {
        f(&mut l);
    }
}

/// Renews the lease until `shutdown`.
pub(super) async fn keep_alive(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (ttl, period) = {
            let c = shared.cluster_config();
            let granted = shared.lease.lock().ok().and_then(|l| l.ttl);
            (c.ttl, c.loop_wait.min(granted.unwrap_or(c.ttl) / 3))
        };
        let started = Instant::now();
        let result = match current(&shared) {
            Some(id) => shared.dcs.keep_alive(id).await,
            None => match shared.dcs.grant_lease(ttl).await {
                Ok((id, granted)) => {
                    tracing::info!(lease = format!("{id:x}"), ?granted, "lease granted");
                    set(&shared, |l| {
                        l.id = Some(id);
                        l.ttl = Some(granted);
                    });
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {
                metrics::lease_renewal(started.elapsed());
                // etcd restarted the lease's clock no earlier than when we
                // asked: counting from then never overestimates its life.
                set(&shared, |l| l.renewed_at = Some(started));
            }
            Err(DcsError::LeaseExpired(id)) => {
                tracing::warn!(lease = format!("{id:x}"), "lease expired: taking a new one");
                set(&shared, |l| {
                    l.id = None;
                    l.ttl = None;
                });
                shared.wake.notify_one();
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease renewal failed");
                // The HA loop decides whether to fence; let it look now.
                shared.wake.notify_one();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(period.max(Duration::from_millis(200))) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(ttl: u64, loop_wait: u64, retry_timeout: u64) -> ClusterConfig {
        ClusterConfig {
            ttl: Duration::from_secs(ttl),
            loop_wait: Duration::from_secs(loop_wait),
            retry_timeout: Duration::from_secs(retry_timeout),
            ..ClusterConfig::default()
        }
    }

    /// The keeper fences at `limit + margin` after a renewal: before the
    /// lease expires, and after the renewal period, whatever the lease.
    #[test]
    fn fencing_stays_inside_the_lease_granted() {
        let s = Duration::from_secs;
        // As configured: loop_wait + retry_timeout, half a retry_timeout.
        assert_eq!(fencing(&config(10, 2, 3), Some(s(10))), (s(5), s(3) / 2));
        // ttl and retry_timeout raised by edit-config under a 10 s lease.
        for (c, granted) in [
            (config(30, 10, 10), s(10)),
            (config(10, 2, 3), s(3)),
            (config(60, 20, 20), s(2)),
        ] {
            let (limit, margin) = fencing(&c, Some(granted));
            assert!(!margin.is_zero());
            assert!(limit + margin < granted, "{c:?} {granted:?}");
            assert!(limit > c.loop_wait.min(granted / 3), "{c:?} {granted:?}");
        }
        // No lease granted yet: the config's ttl.
        assert_eq!(fencing(&config(10, 2, 3), None), (s(5), s(3) / 2));
    }
}
