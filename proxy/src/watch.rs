//! Keeps the routing table in step with etcd: reads `leader` and
//! `members/` under the cluster prefix once, then watches from the next
//! revision. A compacted or cancelled watch, or a lost connection, starts
//! over with a full read, so no change is ever missed.
//!
//! [`ClusterView`] is the pure part (key events in, table out, unit
//! tested); [`run`] does the etcd I/O and, on each change, swaps the table
//! and retires pools of backends that left their role. May call:
//! `etcd_client`, `pgha_cluster` (keys and records only), `router`,
//! `topology`, `pool`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use pgha_cluster::{Key, Keys, Member, Switchover};
use tokio_util::sync::CancellationToken;

use crate::router::RoutingTable;
use crate::Shared;

/// The watch could not be kept up; the caller reconnects and resyncs.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("watch compacted at revision {0}: resync")]
    Compacted(i64),
    #[error("watch cancelled by etcd: {0}")]
    Cancelled(String),
    #[error("watch stream ended")]
    Ended,
}

/// What the proxy knows of the cluster's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    pub switchover: Option<Switchover>,
    /// Revision of the last change applied.
    pub revision: i64,
}

impl ClusterView {
    /// Applies one key's new value (`None`: deleted). Undecodable records
    /// are treated as absent and logged.
    pub fn apply(&mut self, keys: &Keys, key: &[u8], value: Option<&[u8]>) {
        match keys.parse(key) {
            Some(Key::Leader) => {
                self.leader = value
                    .and_then(|v| std::str::from_utf8(v).ok())
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty());
            }
            Some(Key::Member(name)) => {
                match value.map(|v| pgha_cluster::decode::<Member>("member", v)) {
                    Some(Ok(mut m)) => {
                        m.name = name.clone();
                        self.members.insert(name, m);
                    }
                    Some(Err(e)) => {
                        tracing::warn!(member = name, error = %e, "ignoring member record");
                        self.members.remove(&name);
                    }
                    None => {
                        self.members.remove(&name);
                    }
                }
            }
            Some(Key::Switchover) => {
                self.switchover = value.and_then(|v| pgha_cluster::decode("switchover", v).ok());
            }
            _ => {}
        }
    }

    /// The routing table this view implies.
    pub fn table(&self, epoch: u64, max_lag: u64, paused: bool) -> RoutingTable {
        let mut t =
            RoutingTable::from_members(epoch, self.leader.as_deref(), &self.members, max_lag);
        t.paused = paused;
        t
    }
}

/// Swaps in the table for `view` if routing changed, and closes pools of
/// backends that no longer serve their route.
pub fn publish(shared: &Shared, view: &ClusterView) {
    let current = shared.topology.load();
    install(
        shared,
        view.table(
            current.epoch + 1,
            shared.cfg().max_replica_lag,
            current.paused,
        ),
    );
}

/// Swaps in `next` (the topology gives it the next epoch) if its leader
/// or replicas differ, and closes pools of backends that no longer serve
/// their route. Used by the etcd watch and by a reload in static mode.
pub fn install(shared: &Shared, next: crate::router::RoutingTable) {
    let current = shared.topology.load();
    if next.leader == current.leader && next.replicas == current.replicas {
        return;
    }
    tracing::info!(
        leader = next.leader.as_ref().map(|b| b.name.as_str()),
        replicas = next.replicas.len(),
        epoch = next.epoch,
        "routing table changed"
    );
    let fallback = shared.cfg().ro_fallback_to_leader;
    shared
        .pools
        .retire_unless(|b, route| next.still_serves(route, b, fallback));
    shared.topology.store(next);
    shared.metrics.routing_changes.increment(1);
}

/// Watches until `stop`; reconnects with a short backoff after failures.
pub async fn run(shared: Arc<Shared>, endpoints: Vec<String>, keys: Keys, stop: CancellationToken) {
    loop {
        let result = tokio::select! {
            r = watch_once(&shared, &endpoints, &keys) => r,
            _ = stop.cancelled() => return,
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "etcd watch interrupted; resyncing");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One connection: full read, then watch from the next revision.
async fn watch_once(shared: &Shared, endpoints: &[String], keys: &Keys) -> Result<(), WatchError> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    let mut client = Client::connect(endpoints, Some(opts)).await?;
    let resp = client
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut view = ClusterView {
        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
        ..ClusterView::default()
    };
    for kv in resp.kvs() {
        view.apply(keys, kv.key(), Some(kv.value()));
    }
    publish(shared, &view);
    crate::switchover::on_view(shared, &view, &client, keys).await;
    let mut stream = client
        .watch(
            keys.prefix(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(view.revision + 1),
            ),
        )
        .await?;
    while let Some(resp) = stream.message().await? {
        if resp.compact_revision() > 0 {
            return Err(WatchError::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(WatchError::Cancelled(resp.cancel_reason().to_owned()));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let value = (ev.event_type() == EventType::Put).then(|| kv.value());
            view.apply(keys, kv.key(), value);
            view.revision = view.revision.max(kv.mod_revision());
        }
        publish(shared, &view);
        crate::switchover::on_view(shared, &view, &client, keys).await;
    }
    Err(WatchError::Ended)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgha_cluster::{PgState, Role};

    fn member(role: Role) -> Vec<u8> {
        pgha_cluster::encode(&Member {
            role,
            state: PgState::Running,
            host: "127.0.0.1".into(),
            port: 5432,
            lag_bytes: Some(0),
            ..Member::default()
        })
    }

    #[test]
    fn leader_and_member_events_build_the_table() {
        let keys = Keys::new("c").unwrap();
        let mut v = ClusterView::default();
        v.apply(
            &keys,
            keys.member("a").as_bytes(),
            Some(&member(Role::Primary)),
        );
        v.apply(
            &keys,
            keys.member("b").as_bytes(),
            Some(&member(Role::Replica)),
        );
        v.apply(&keys, keys.leader().as_bytes(), Some(b"a"));
        let t = v.table(1, 100, false);
        assert_eq!(t.leader.unwrap().name, "a");
        assert_eq!(t.replicas.len(), 1);
        // The leader key is deleted (lease expired): no writes anywhere.
        v.apply(&keys, keys.leader().as_bytes(), None);
        assert!(v.table(2, 100, false).leader.is_none());
        // A member whose record vanished is gone from reads too.
        v.apply(&keys, keys.member("b").as_bytes(), None);
        assert!(v.table(3, 100, false).replicas.is_empty());
    }

    #[test]
    fn garbage_records_and_foreign_keys_are_ignored() {
        let keys = Keys::new("c").unwrap();
        let mut v = ClusterView::default();
        v.apply(&keys, keys.member("a").as_bytes(), Some(b"{not json"));
        v.apply(&keys, b"/pgha/other/leader", Some(b"x"));
        v.apply(&keys, keys.leader().as_bytes(), Some(b"  "));
        assert_eq!(v, ClusterView::default());
    }
}
