//! The agent's etcd lease: granted once, renewed every `loop_wait` by its own
//! task, replaced if it ever expires. The member record and the leader key
//! live on it, so an agent that dies loses both within `ttl`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::dcs::DcsError;
use crate::metrics;

/// The current lease and when it was last renewed.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeaseState {
    pub id: Option<i64>,
    pub renewed_at: Option<Instant>,
}

pub(super) fn current(shared: &Shared) -> Option<i64> {
    shared.lease.lock().ok().and_then(|l| l.id)
}

pub(super) fn renewed_at(shared: &Shared) -> Option<Instant> {
    shared.lease.lock().ok().and_then(|l| l.renewed_at)
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
            (c.ttl, c.loop_wait.min(c.ttl / 3))
        };
        let started = Instant::now();
        let result = match current(&shared) {
            Some(id) => shared.dcs.keep_alive(id).await,
            None => match shared.dcs.grant_lease(ttl).await {
                Ok(id) => {
                    tracing::info!(lease = format!("{id:x}"), ?ttl, "lease granted");
                    set(&shared, |l| l.id = Some(id));
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
                set(&shared, |l| l.id = None);
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
