//! `max_backend_connections`: a bound on the server connections to one
//! backend, all its pools (databases, users, routes) together, so that
//! many pools cannot exhaust the node's `max_connections` (PgBouncer's
//! `max_db_connections`, per node instead of per database name).
//!
//! Every connection to the backend holds one of its slots for as long as
//! it is open (idle or in use). A pool that must open a connection while
//! the backend is full closes an idle connection of another pool first
//! (the one with the most idle ones: a busy pool is not starved by idle
//! ones elsewhere); with none idle, it waits, within the checkout timeout,
//! for a connection to close or to become idle. May call: `pool` (idle
//! lists), tokio sync.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::lock;
use crate::pool::{Pool, Waiting};

/// The slots of one backend.
#[derive(Debug)]
pub struct BackendCap {
    slots: Arc<Semaphore>,
    /// The pools sharing them, for closing one's idle connection.
    pools: Mutex<Vec<Weak<Pool>>>,
    /// Pools waiting for a slot now.
    waiting: AtomicUsize,
    /// A connection of this backend became idle while a pool waits.
    idle_came: Notify,
}

/// A slot a connection holds until it closes.
pub type CapSlot = OwnedSemaphorePermit;

impl BackendCap {
    pub fn new(max: usize) -> BackendCap {
        BackendCap {
            slots: Arc::new(Semaphore::new(max)),
            pools: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            idle_came: Notify::new(),
        }
    }

    /// A pool of this backend was made.
    pub fn add_pool(&self, pool: &Arc<Pool>) {
        let mut pools = lock(&self.pools);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    /// A slot now, if one is free (no eviction, no wait): for `min_idle`.
    pub fn try_slot(&self) -> Option<CapSlot> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A slot for a new connection of `pool`, by `deadline`: a free one,
    /// else one freed by closing another pool's idle connection, else the
    /// first to come free. `None` at the deadline.
    pub async fn slot(&self, pool: &Pool, deadline: Instant) -> Option<CapSlot> {
        let _waiting = Waiting::new(&self.waiting);
        loop {
            // Registered before looking, so an idle connection shelved
            // after the look still wakes this wait.
            let came = self.idle_came.notified();
            tokio::pin!(came);
            came.as_mut().enable();
            if let Some(slot) = self.try_slot() {
                return Some(slot);
            }
            if self.close_idle_elsewhere(pool) {
                continue;
            }
            tokio::select! {
                slot = self.slots.clone().acquire_owned() => return slot.ok(),
                _ = &mut came => {}
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// Called when a connection of this backend goes idle: a waiting pool
    /// may close it. One relaxed load when nobody waits.
    pub fn idle_returned(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.idle_came.notify_waiters();
        }
    }

    /// Closes one idle connection of the pool with the most idle ones
    /// (never `me`'s: it would reuse it instead); whether one was closed.
    fn close_idle_elsewhere(&self, me: &Pool) -> bool {
        let pools: Vec<Arc<Pool>> = lock(&self.pools)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), me))
            .collect();
        let fullest = pools
            .iter()
            .map(|p| (p.spare_idle(), p))
            .filter(|(idle, _)| *idle > 0)
            .max_by_key(|(idle, _)| *idle);
        match fullest {
            Some((_, p)) => {
                let closed = p.close_one_idle();
                if closed {
                    tracing::debug!(backend = %me.backend.name, "closed an idle server connection of another pool: max_backend_connections reached");
                }
                closed
            }
            None => false,
        }
    }

    /// Open connections to the backend.
    pub fn in_use(&self, max: usize) -> usize {
        max - self.slots.available_permits()
    }
}
