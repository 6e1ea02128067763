//! Pausing new transactions: for a planned switchover (the handshake in
//! ARCHITECTURE.md) and from the admin API.
//!
//! When `switchover` names the leader the proxy routes to, new transactions
//! wait (the table is marked paused), in-flight ones get up to
//! `switchover_drain_timeout` to finish, and the proxy acknowledges in
//! `proxies/<id>` on a lease. When the leader key moves (or the switchover
//! is withdrawn) the pause ends and waiting transactions go to the new
//! leader. May call: `topology`, `pool` (in-flight count), `etcd_client`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use pgha_cluster::{Keys, ProxyAck};

use crate::watch::ClusterView;
use crate::Shared;

/// Why new transactions are held.
#[derive(Debug, Default)]
pub struct PauseState {
    admin: AtomicBool,
    /// The switchover id the proxy paused for.
    switchover: Mutex<Option<u64>>,
}

impl PauseState {
    fn switchover(&self) -> Option<u64> {
        *crate::lock(&self.switchover)
    }

    fn set_switchover(&self, id: Option<u64>) {
        *crate::lock(&self.switchover) = id;
    }

    fn paused(&self) -> bool {
        self.admin.load(Ordering::Acquire) || self.switchover().is_some()
    }
}

fn apply(shared: &Shared) {
    let paused = shared.pause.paused();
    if shared.topology.load().paused != paused {
        tracing::info!(paused, "routing pause changed");
        shared.topology.update(|t| t.paused = paused);
    }
}

/// Admin pause (true) or resume (false).
pub fn set_admin_pause(shared: &Shared, paused: bool) {
    shared.pause.admin.store(paused, Ordering::Release);
    apply(shared);
}

/// Waits (bounded) for transactions in flight on the leader to finish.
pub async fn drain(shared: &Shared, bound: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let n = shared.pools.rw_in_flight();
        if n == 0 || tokio::time::Instant::now() >= deadline {
            return n;
        }
        // Sessions give servers back without a signal; poll briefly.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reacts to a new view of the cluster: pause for a switchover of the
/// leader we route to, resume once the leader moved or it was withdrawn.
pub async fn on_view(shared: &Shared, view: &ClusterView, client: &Client, keys: &Keys) {
    let routed = shared
        .topology
        .load()
        .leader
        .as_ref()
        .map(|b| b.name.clone());
    let wanted = view
        .switchover
        .as_ref()
        .filter(|s| routed.as_deref() == Some(s.leader.as_str()))
        .map(|s| s.id);
    let current = shared.pause.switchover();
    if wanted == current {
        return;
    }
    shared.pause.set_switchover(wanted);
    apply(shared);
    let mut client = client.clone();
    let ack_key = keys.proxy(&shared.cfg().id);
    let in_flight = match wanted {
        Some(id) => {
            tracing::info!(id, "switchover requested: paused new transactions");
            drain(shared, shared.cfg().switchover_drain_timeout).await as u64
        }
        None => 0,
    };
    let ack = ProxyAck {
        paused_for: wanted,
        in_flight,
        leader: routed,
    };
    if let Err(e) = write_ack(&mut client, &ack_key, &ack).await {
        tracing::warn!(error = %e, "cannot write the proxy acknowledgement");
    }
}

async fn write_ack(
    client: &mut Client,
    key: &str,
    ack: &ProxyAck,
) -> Result<(), etcd_client::Error> {
    // The record lives on its own lease: a dead proxy's ack disappears.
    let lease = client.lease_grant(30, None).await?;
    let opts = PutOptions::new().with_lease(lease.id());
    client
        .put(key, pgha_cluster::encode(ack), Some(opts))
        .await?;
    Ok(())
}
