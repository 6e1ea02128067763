//! `max_backend_connections`: a bound on the server connections to one
//! backend, all its pools (databases, users, routes) together, so that
//! many pools cannot exhaust the node's `max_connections` (PgBouncer's
//! `max_db_connections`, per node instead of per database name).
//!
//! Every connection to the backend holds one of its slots for as long as
//! it is open (idle or in use). A pool that must open a connection while
//! the backend is full closes a spare idle connection of another pool
//! first (the pool with the most: a busy pool is not starved by idle ones
//! elsewhere); with none, it waits in line, within the checkout timeout,
//! for a slot to come free or a connection to go idle. The bound follows
//! reloads: it grows at once, and shrinks as connections close.
//!
//! Without a bound (0) the slots still count: a reload that sets one then
//! finds every connection already open in use, instead of counting only
//! those opened after it. May call: `pool` (idle lists), tokio sync.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::lock;
use crate::pool::{Pool, Waiting};

/// The slots of one backend.
#[derive(Debug)]
pub struct BackendCap {
    slots: Arc<Semaphore>,
    /// The bound now, and the slots to retire as they come back after it
    /// shrank below what was in use. A lock: a slot coming back and a
    /// reload shrinking the bound must not interleave (closes and reloads
    /// are rare).
    bound: Mutex<Bound>,
    /// The pools sharing them, for closing one's idle connection.
    pools: Mutex<Vec<Weak<Pool>>>,
    /// Pools waiting for a slot now.
    waiting: AtomicUsize,
    /// A spare connection of this backend went idle while a pool waits.
    idle_came: Notify,
}

#[derive(Debug)]
struct Bound {
    max: usize,
    owed: usize,
}

/// A slot a connection holds until it closes.
#[derive(Debug)]
pub struct CapSlot {
    permit: Option<OwnedSemaphorePermit>,
    cap: Arc<BackendCap>,
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        let mut bound = lock(&self.cap.bound);
        let Some(p) = self.permit.take() else {
            return;
        };
        if bound.owed > 0 {
            // Owed to a smaller bound: the slot goes instead of coming back.
            bound.owed -= 1;
            p.forget();
        } else {
            drop(p);
        }
    }
}

/// The slots of `max_backend_connections = max`: 0 is no bound, as many
/// as a semaphore holds.
pub fn slots_for(max: usize) -> usize {
    if max == 0 {
        Semaphore::MAX_PERMITS
    } else {
        max.min(Semaphore::MAX_PERMITS)
    }
}

impl BackendCap {
    pub fn new(max: usize) -> Arc<BackendCap> {
        Arc::new(BackendCap {
            slots: Arc::new(Semaphore::new(max)),
            bound: Mutex::new(Bound { max, owed: 0 }),
            pools: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            idle_came: Notify::new(),
        })
    }

    /// A reload set the bound to `max` (at least 1).
    pub fn resize(&self, max: usize) {
        let mut bound = lock(&self.bound);
        let old = std::mem::replace(&mut bound.max, max);
        if max > old {
            // Paying back a debt first.
            let more = max - old;
            let pay = bound.owed.min(more);
            bound.owed -= pay;
            self.slots.add_permits(more - pay);
        } else {
            let less = old - max;
            let now = self.slots.forget_permits(less);
            bound.owed += less - now;
        }
    }

    /// No connection holds a slot and no pool is left: the backend's
    /// count may be forgotten (it left the cluster, or moved address).
    pub fn unused(&self) -> bool {
        let bound = lock(&self.bound);
        bound.owed == 0
            && self.slots.available_permits() == bound.max
            && lock(&self.pools).iter().all(|p| p.strong_count() == 0)
    }

    /// A pool of this backend was made.
    pub fn add_pool(&self, pool: &Arc<Pool>) {
        let mut pools = lock(&self.pools);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    fn slot_of(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> CapSlot {
        CapSlot {
            permit: Some(permit),
            cap: self.clone(),
        }
    }

    /// A slot now, if one is free (no eviction, no wait): for `min_idle`.
    pub fn try_slot(self: &Arc<Self>) -> Option<CapSlot> {
        let p = self.slots.clone().try_acquire_owned().ok()?;
        Some(self.slot_of(p))
    }

    /// Waits for a slot in line; see [`crate::pool::Pool::checkout`], which
    /// looks at its own idle list and closes others' between waits.
    pub fn waiter(self: &Arc<Self>) -> Waiter<'_> {
        Waiter {
            cap: self,
            _counted: Waiting::new(&self.waiting),
        }
    }

    /// A spare connection of this backend went idle: a waiting pool may
    /// take or close it. One relaxed load when nobody waits.
    pub fn idle_returned(&self) {
        if self.waiting.load(Ordering::Relaxed) > 0 {
            self.idle_came.notify_waiters();
        }
    }

    /// Closes one spare idle connection of another pool than `me`, trying
    /// the pools with the most first; whether one was closed.
    pub fn close_idle_elsewhere(&self, me: &Pool) -> bool {
        let pools: Vec<Arc<Pool>> = lock(&self.pools)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|p| !std::ptr::eq(Arc::as_ptr(p), me))
            .collect();
        let mut by_spare: Vec<(usize, &Arc<Pool>)> = pools
            .iter()
            .map(|p| (p.spare_idle(), p))
            .filter(|(n, _)| *n > 0)
            .collect();
        by_spare.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        // A pool's own clients may take its spares meanwhile: the next.
        let closed = by_spare.iter().any(|(_, p)| p.close_one_idle());
        if closed {
            tracing::debug!(backend = %me.backend.name, "closed another pool's idle server connection: max_backend_connections reached");
        }
        closed
    }
}

/// One pool's place in line for a slot (counted while it waits).
pub struct Waiter<'a> {
    cap: &'a Arc<BackendCap>,
    _counted: Waiting<'a>,
}

impl Waiter<'_> {
    /// A wake-up for the next spare connection to go idle; enable it
    /// before looking, so one that goes idle after the look still wakes.
    pub fn idle_came(&self) -> tokio::sync::futures::Notified<'_> {
        self.cap.idle_came.notified()
    }

    /// The next slot in line (its place kept across wake-ups while the
    /// future lives).
    pub async fn slot(&self) -> Option<CapSlot> {
        let p = self.cap.slots.clone().acquire_owned().await.ok()?;
        Some(self.cap.slot_of(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload that shrinks the bound below what is in use retires slots
    /// as connections close, never more; growing pays that debt first.
    #[test]
    fn the_bound_follows_a_reload_without_ever_being_exceeded() {
        let cap = BackendCap::new(2);
        let (a, b) = (cap.try_slot().unwrap(), cap.try_slot().unwrap());
        assert!(cap.try_slot().is_none(), "full");
        cap.resize(1);
        drop(a);
        assert!(
            cap.try_slot().is_none(),
            "a's slot was owed to the new bound"
        );
        drop(b);
        let c = cap.try_slot().expect("one slot under the new bound");
        assert!(cap.try_slot().is_none());
        // Down to 1 while 1 is used, then up to 3: 2 more, no debt.
        cap.resize(3);
        let (d, e) = (cap.try_slot().unwrap(), cap.try_slot().unwrap());
        assert!(cap.try_slot().is_none(), "3 in use");
        // Shrink by 2 with all in use, grow by 1: one slot still owed.
        cap.resize(1);
        cap.resize(2);
        drop((c, d));
        let f = cap.try_slot().expect("bound 2, only e in use");
        assert!(cap.try_slot().is_none(), "e and f: 2 in use");
        drop((e, f));
        let all: Vec<_> = (0..3).filter_map(|_| cap.try_slot()).collect();
        assert_eq!(all.len(), 2, "bound 2");
    }

    /// No bound still counts: setting one later finds the connections
    /// already open, and lifting it again frees every slot.
    #[test]
    fn a_bound_set_by_reload_counts_the_connections_already_open() {
        let cap = BackendCap::new(slots_for(0));
        let open: Vec<_> = (0..3).map(|_| cap.try_slot().unwrap()).collect();
        cap.resize(slots_for(2));
        assert!(cap.try_slot().is_none(), "3 open, bound 2");
        drop(open);
        let now: Vec<_> = (0..3).filter_map(|_| cap.try_slot()).collect();
        assert_eq!(now.len(), 2, "one slot was owed: bound 2");
        cap.resize(slots_for(0));
        let more: Vec<_> = (0..100).filter_map(|_| cap.try_slot()).collect();
        assert_eq!(more.len(), 100, "no bound again");
        assert!(!cap.unused(), "slots held");
        drop((now, more));
        assert!(cap.unused());
    }
}
