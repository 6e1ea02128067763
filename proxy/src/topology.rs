//! The current routing table, shared by every session without locks.
//!
//! Writers (the static config at start, the etcd watcher, the admin pause)
//! build a whole new [`RoutingTable`] and swap it in; readers load it with
//! one atomic operation on the hot path. A `watch` channel wakes sessions
//! that wait for a leader or for the end of a pause. May call: `router`,
//! `arc_swap`, tokio sync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::router::RoutingTable;

/// The shared, atomically swapped routing table.
#[derive(Debug)]
pub struct Topology {
    table: ArcSwap<RoutingTable>,
    /// The stored table's epoch, written after the table: a session that
    /// reads a new epoch then loads that table (or a newer one).
    epoch: AtomicU64,
    /// Serializes writers, so each stored table gets its own epoch.
    writer: Mutex<()>,
    changed: watch::Sender<u64>,
}

impl Topology {
    pub fn new(table: RoutingTable) -> Topology {
        let (changed, _) = watch::channel(table.epoch);
        Topology {
            epoch: AtomicU64::new(table.epoch),
            table: ArcSwap::from_pointee(table),
            writer: Mutex::new(()),
            changed,
        }
    }

    /// The current table's epoch: one atomic load, for checks made on
    /// every client message.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether new transactions wait (a switchover or an admin pause).
    pub fn paused(&self) -> bool {
        self.table.load().paused
    }

    /// The table now.
    pub fn load(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Replaces the table and wakes waiters. The table gets the next
    /// epoch whatever it carried: two writers (the etcd watch, an admin
    /// pause) never publish different tables under one epoch, which
    /// sessions rely on to notice every change.
    pub fn store(&self, table: RoutingTable) {
        let _writer = crate::lock(&self.writer);
        self.store_locked(table);
    }

    /// Applies `f` to a copy of the current table and stores it with the next epoch.
    pub fn update(&self, f: impl FnOnce(&mut RoutingTable)) {
        let _writer = crate::lock(&self.writer);
        let mut t = (*self.load()).clone();
        f(&mut t);
        self.store_locked(t);
    }

    fn store_locked(&self, mut table: RoutingTable) {
        let epoch = self.epoch.load(Ordering::Relaxed) + 1;
        table.epoch = epoch;
        self.table.store(Arc::new(table));
        self.epoch.store(epoch, Ordering::Release);
        self.changed.send_replace(epoch);
    }

    /// A receiver that sees every table change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Resolves at the next table change.
    pub async fn changed(&self) {
        let mut rx = self.changed.subscribe();
        let _ = rx.changed().await;
    }

    /// Waits until `ok` holds for the table, or `timeout` passes; the last
    /// table seen either way.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        ok: impl Fn(&RoutingTable) -> bool,
    ) -> Result<Arc<RoutingTable>, Arc<RoutingTable>> {
        // Fast path: no subscription when the table already suits.
        let t = self.load();
        if ok(&t) {
            return Ok(t);
        }
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let t = self.load();
            if ok(&t) {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(self.load()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Backend;

    #[tokio::test]
    async fn a_waiter_wakes_when_a_leader_appears() {
        let topo = Arc::new(Topology::new(RoutingTable::default()));
        let t2 = topo.clone();
        let waiter = tokio::spawn(async move {
            t2.wait_for(Duration::from_secs(10), |t| t.leader.is_some())
                .await
                .is_ok()
        });
        topo.update(|t| {
            t.leader = Some(Arc::new(Backend {
                name: "a".into(),
                host: "h".into(),
                port: 1,
            }))
        });
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn every_stored_table_gets_a_new_epoch() {
        let topo = Topology::new(RoutingTable::default());
        let before = topo.epoch();
        // A writer that built its table from an old load still gets a new
        // epoch, never one a session has seen with other contents.
        topo.store(RoutingTable {
            epoch: before,
            paused: true,
            ..RoutingTable::default()
        });
        assert_eq!(topo.epoch(), before + 1);
        assert_eq!(topo.load().epoch, before + 1);
        topo.update(|t| t.paused = false);
        assert_eq!(topo.epoch(), before + 2);
        assert!(!topo.load().paused);
    }

    #[tokio::test]
    async fn a_waiter_gives_up_after_its_bound() {
        let topo = Topology::new(RoutingTable::default());
        let r = topo
            .wait_for(Duration::from_millis(50), |t| t.leader.is_some())
            .await;
        assert!(r.is_err());
    }
}
