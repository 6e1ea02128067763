//! Server connection pools, one per (database, user, startup options,
//! backend).
//!
//! A semaphore bounds the connections per pool (idle plus checked out), so a
//! connection storm queues here instead of stampeding Postgres; a client
//! that waits past `checkout_timeout` gets an error. An idle connection
//! keeps its slot while nobody waits, so the common checkout and checkin
//! (every transaction in transaction mode) touch only the idle list.
//! A client that waited `reserve_pool_timeout` adds a slot, up to
//! `reserve_pool_size` of them (PgBouncer's reserve pool); those go again
//! once nobody waits and they are free.
//! Connections past their idle timeout or lifetime, closed by the server,
//! or belonging to a backend that left its role are dropped instead of
//! reused. `pools` keeps every pool, made on first use. May call:
//! `server`, `router`, `config`, `cap`, tokio sync.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use crate::clock;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

mod pools;
mod reserve;
#[cfg(test)]
pub(crate) mod tests;

pub use pools::Pools;

use crate::cap::{BackendCap, CapSlot};
use crate::config::{Config, PoolSettings};
use crate::lock;
use crate::router::{Backend, Route};
use crate::server::{ConnectOpts, Login, Params, ServerConn, ServerError};

/// Why no server connection was handed out.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no server connection available within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("server {0} is no longer in the role this route needs")]
    WrongRole(String),
    /// The pool was retired (failover, reload, /reconnect) while the
    /// client waited for a slot: the pool that replaced it serves it.
    #[error("the pool was replaced while the client waited")]
    Retired,
}

/// Counts a waiting client, also when its wait is abandoned (cancel).
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub(crate) fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One pool.
#[derive(Debug)]
pub struct Pool {
    pub backend: Arc<Backend>,
    pub route: Route,
    login: Login,
    cfg: Arc<Config>,
    /// Its size, minimum and mode: the top-level keys or a `[[pools]]`
    /// entry's.
    settings: PoolSettings,
    connect: ConnectOpts,
    /// Boxed: connections move in and out on every transaction, and a
    /// box moves as one pointer instead of the whole connection.
    idle: Mutex<Vec<Idle>>,
    /// `settings.size` slots, plus `reserve`.
    slots: Arc<Semaphore>,
    /// Reserve slots added to `slots` (at most `reserve_pool_size`).
    /// Raised before a slot is added, lowered after one is forgotten: it
    /// never counts fewer than there are.
    reserve: AtomicUsize,
    /// Set when the backend lost its role: nothing is reused any more.
    retired: AtomicBool,
    /// Checked-out connections.
    active: AtomicUsize,
    /// Of those, the ones parked: held by a session-mode (or pinned)
    /// client between transactions while the proxy is paused, which runs
    /// nothing there until the pause ends (see [`Checkout::park`]).
    parked: AtomicUsize,
    /// Clients waiting for a free slot.
    waiting: AtomicUsize,
    /// ParameterStatus of the last connection made, sent to new clients.
    params: Mutex<Option<Params>>,
    /// The backend's `max_backend_connections` slots (counted also
    /// without a bound).
    cap: Arc<BackendCap>,
    /// Clients holding a pool slot that wait for one of those.
    waiting_for_backend: AtomicUsize,
}

/// A checked-out connection; give it back with [`Checkout::checkin`].
#[derive(Debug)]
pub struct Checkout {
    pub conn: Box<ServerConn>,
    pub pool: Arc<Pool>,
    slot: OwnedSemaphorePermit,
    parked: bool,
}

impl Checkout {
    /// Returns the connection; `clean` when its last ReadyForQuery said
    /// idle with nothing outstanding. Anything else is closed.
    pub fn checkin(mut self, clean: bool) {
        self.unpark();
        let Checkout {
            conn, pool, slot, ..
        } = self;
        pool.take_back(conn, slot, clean);
    }

    /// Marks a connection its client keeps between transactions as
    /// running nothing until the proxy's pause ends: a switchover's drain
    /// does not wait for it (see [`Pool::in_flight`]).
    pub fn park(&mut self) {
        if !self.parked {
            self.parked = true;
            self.pool.parked.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The client runs transactions on it again.
    pub fn unpark(&mut self) {
        if self.parked {
            self.parked = false;
            self.pool.parked.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub fn is_parked(&self) -> bool {
        self.parked
    }

    /// Closes a connection that cannot be reused.
    pub fn discard(self) {
        self.checkin(false);
    }
}

/// What a pool waiting on a full backend got.
enum Room {
    Slot(CapSlot),
    Idle(Box<ServerConn>, OwnedSemaphorePermit),
}

/// An idle connection. It keeps its slot unless a client was waiting for
/// one when it came back (then the slot went to that client, who takes a
/// connection from the idle list with it).
#[derive(Debug)]
struct Idle {
    conn: Box<ServerConn>,
    slot: Option<OwnedSemaphorePermit>,
}

impl Pool {
    fn new(
        backend: Arc<Backend>,
        route: Route,
        login: Login,
        cfg: Arc<Config>,
        connect: ConnectOpts,
        cap: Arc<BackendCap>,
    ) -> Pool {
        let settings = cfg.pool_settings(&login.database, &login.user);
        Pool {
            cap,
            waiting_for_backend: AtomicUsize::new(0),
            connect,
            route,
            slots: Arc::new(Semaphore::new(settings.size)),
            reserve: AtomicUsize::new(0),
            settings,
            backend,
            login,
            cfg,
            idle: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            params: Mutex::new(None),
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Closes idle connections and refuses to reuse the others.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        lock(&self.idle).clear();
        // Clients waiting for a slot stop waiting here (see `checkout`).
        self.slots.close();
    }

    /// Idle connections no client of this pool is about to take (those
    /// keeping their own slot).
    pub fn spare_idle(&self) -> usize {
        lock(&self.idle).iter().filter(|i| i.slot.is_some()).count()
    }

    /// Closes one spare idle connection, the longest idle (another pool of
    /// the backend needs its `max_backend_connections` slot); whether there
    /// was one.
    pub fn close_one_idle(&self) -> bool {
        let mut idle = lock(&self.idle);
        // Pushed and popped at the end: the first spare is the oldest.
        let Some(i) = idle.iter().position(|i| i.slot.is_some()) else {
            return false;
        };
        let closed = idle.remove(i);
        drop(idle);
        drop(closed);
        true
    }

    /// (idle, checked out) connection counts.
    pub fn counts(&self) -> (usize, usize) {
        (lock(&self.idle).len(), self.active.load(Ordering::Relaxed))
    }

    /// Checked-out connections that may run a transaction now: all but
    /// the parked ones (see [`Checkout::park`]).
    pub fn in_flight(&self) -> usize {
        // Checked out first: a connection checked in between the two
        // reads (unparked, then no longer active) is counted, not missed.
        let active = self.active.load(Ordering::SeqCst);
        active.saturating_sub(self.parked.load(Ordering::SeqCst))
    }

    /// Checked-out connections parked (see [`Checkout::park`]).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Whether any connection still holds one of its slots (checked out,
    /// being made, or idle): a retired pool is forgotten once none does.
    pub fn in_use(&self) -> bool {
        self.slots.available_permits() < self.capacity()
    }

    /// Slots there are: the pool's size and the reserve ones added.
    fn capacity(&self) -> usize {
        self.settings.size + self.reserve_in_use()
    }

    /// Reserve slots added now (see [`Pool::checkout`]).
    pub fn reserve_in_use(&self) -> usize {
        self.reserve.load(Ordering::Acquire)
    }

    /// Whose connections these are (the password included: not for
    /// display).
    pub fn login(&self) -> &Login {
        &self.login
    }

    /// Its size, minimum and mode.
    pub fn settings(&self) -> PoolSettings {
        self.settings
    }

    /// Clients waiting for a connection now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Clients waiting for their backend to have room for one more
    /// connection (`max_backend_connections`).
    pub fn waiting_for_backend(&self) -> usize {
        self.waiting_for_backend.load(Ordering::Relaxed)
    }

    /// Parameters a new client should see, if a connection was ever made.
    pub fn cached_params(&self) -> Option<Params> {
        lock(&self.params).clone()
    }

    fn reusable(&self, c: &ServerConn, now: u64) -> bool {
        let idle = clock::between(c.idle_since, now);
        if clock::between(c.created, now) > self.cfg.server_lifetime
            || idle > self.cfg.server_idle_timeout
        {
            return false;
        }
        // A connection idle for a while may have been closed by the server
        // (an admin shutdown notice or EOF waits in its socket). Recently
        // used ones skip the probe: it costs a syscall per transaction.
        if idle < Duration::from_secs(1) {
            return true;
        }
        !c.stream.has_unread_input()
    }

    /// A reusable idle connection and its slot, if there is one now. A
    /// connection without its own slot takes `held` (the caller's, if it
    /// already has one) or a free one; with neither, the newest one that
    /// kept its own slot is taken instead.
    fn take_idle(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
    ) -> Option<(Box<ServerConn>, OwnedSemaphorePermit)> {
        let now = clock::now_ms();
        loop {
            // Decided under the lock: a connection popped and pushed back
            // in between would look missing to a client holding a slot
            // for it, who would then open one more than pool_size.
            let (conn, slot, from_held) = {
                let mut idle = lock(&self.idle);
                let last = idle.len().checked_sub(1)?;
                let from_held = idle[last].slot.is_none() && held.is_some();
                let (at, slot) = match idle[last].slot.take().or_else(|| held.take()) {
                    Some(s) => (last, s),
                    None => match self.slots.clone().try_acquire_owned() {
                        Ok(s) => (last, s),
                        // Its slot went to a waiting client, who takes it;
                        // an older one may have kept its own (given back
                        // while nobody waited, then covered by this one).
                        Err(_) => {
                            let at = idle.iter().rposition(|i| i.slot.is_some())?;
                            (at, idle[at].slot.take()?)
                        }
                    },
                };
                (idle.remove(at).conn, slot, from_held)
            };
            if self.reusable(&conn, now) {
                return Some((conn, slot));
            }
            // Closed (dropped here); the caller's slot stays the caller's.
            if from_held {
                *held = Some(slot);
            }
        }
    }

    fn hand_out(self: &Arc<Self>, conn: Box<ServerConn>, slot: OwnedSemaphorePermit) -> Checkout {
        self.active.fetch_add(1, Ordering::Relaxed);
        Checkout {
            conn,
            pool: self.clone(),
            slot,
            parked: false,
        }
    }

    /// An idle pooled connection, if one is free right now (no waiting,
    /// no connecting): the common case, kept cheap.
    pub fn try_checkout_idle(self: &Arc<Self>) -> Option<Checkout> {
        let (conn, slot) = self.take_idle(&mut None)?;
        Some(self.hand_out(conn, slot))
    }

    /// A logged-in connection whose role suits `need_primary`, waiting at
    /// most `timeout` for a free slot.
    pub async fn checkout(
        self: &Arc<Self>,
        timeout: Duration,
        need_primary: bool,
    ) -> Result<Checkout, PoolError> {
        let waiting = Waiting::new(&self.waiting);
        // A connection given back before this client counted as waiting
        // kept its slot: it is in the idle list now (see `take_back`).
        if let Some(co) = self.try_checkout_idle() {
            return Ok(co);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let slot = self.wait_for_slot(deadline).await;
        drop(waiting);
        let slot = match slot {
            Some(Ok(slot)) => slot,
            // Closed: retired while this client waited.
            Some(Err(_)) => return Err(PoolError::Retired),
            None => return Err(PoolError::Timeout(timeout)),
        };
        let mut held = Some(slot);
        if let Some((conn, slot)) = self.take_idle(&mut held) {
            return Ok(self.hand_out(conn, slot));
        }
        // Boxed: connecting is rare and its state is large; it must not
        // grow every session's future.
        let cap_slot = match self.cap.try_slot() {
            // The common case: the backend has room.
            Some(s) => s,
            None => match Box::pin(self.backend_room(&mut held, deadline)).await {
                Some(Room::Slot(s)) => s,
                Some(Room::Idle(conn, slot)) => return Ok(self.hand_out(conn, slot)),
                None => return Err(PoolError::Timeout(timeout)),
            },
        };
        let slot = held.expect("an idle connection with its own slot leaves ours");
        let mut conn = Box::pin(ServerConn::connect(
            self.backend.clone(),
            &self.login,
            &self.connect,
        ))
        .await?;
        conn.cap_slot = Some(cap_slot);
        // A server in the wrong role (a replica named leader before its
        // promotion ends) says nothing about this pool's clients: its
        // in_hot_standby = on would turn libpq's read-write clients away.
        if need_primary && conn.in_recovery {
            return Err(PoolError::WrongRole(self.backend.name.clone()));
        }
        self.share_params(&mut conn);
        Ok(self.hand_out(conn, slot))
    }

    /// Room for one more connection to a full backend, by `deadline`:
    /// a slot, or an idle connection of this pool's own (given back while
    /// this waited). Between waits it closes a spare idle connection of
    /// another pool, whose slot then goes to the first in line.
    async fn backend_room(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        deadline: tokio::time::Instant,
    ) -> Option<Room> {
        let cap = &self.cap;
        let _counted = Waiting::new(&self.waiting_for_backend);
        let waiter = cap.waiter();
        // Made once: its place in line is kept across wake-ups.
        let slot = waiter.slot();
        let timeout = tokio::time::sleep_until(deadline);
        tokio::pin!(slot, timeout);
        loop {
            let came = waiter.idle_came();
            tokio::pin!(came);
            came.as_mut().enable();
            if let Some((conn, s)) = self.take_idle(held) {
                return Some(Room::Idle(conn, s));
            }
            // Another pool's connection is closed only if no slot is ours
            // yet (polling also takes or keeps the place in line).
            let now = std::future::poll_fn(|cx| {
                Poll::Ready(std::future::Future::poll(slot.as_mut(), cx))
            })
            .await;
            if let Poll::Ready(s) = now {
                return s.map(Room::Slot);
            }
            cap.close_idle_elsewhere(self);
            tokio::select! {
                biased;
                s = &mut slot => return s.map(Room::Slot),
                _ = &mut came => {}
                _ = &mut timeout => return None,
            }
        }
    }

    /// Remembers a new connection's ParameterStatus for new clients; when
    /// it equals the pool's, the connection shares the pool's copy, so a
    /// session moving between connections compares one pointer.
    fn share_params(&self, conn: &mut ServerConn) {
        let mut cached = lock(&self.params);
        match cached.as_ref() {
            Some(p) if p.wire == conn.params.wire => conn.params = p.clone(),
            _ => *cached = Some(conn.params.clone()),
        }
    }

    /// A server changed a parameter only it sets (`in_hot_standby`, at a
    /// promotion): the connection and the pool's copy for new clients
    /// follow, so logins keep telling the truth. Parameters clients can
    /// SET stay the session's own.
    pub fn server_reported(&self, params: &mut Params, key: &str, value: &str) {
        let list = &params.list;
        if !list.iter().any(|(k, v)| k == key && v != value) {
            return;
        }
        let list = list
            .iter()
            .map(|(k, v)| (k.clone(), if k == key { value } else { v }.to_owned()))
            .collect();
        *params = Arc::new(crate::server::ParamSet::new(list));
        *lock(&self.params) = Some(params.clone());
    }

    /// Takes a connection back (see [`Checkout::checkin`]). It keeps its
    /// slot unless a client waits for one.
    fn take_back(&self, mut conn: Box<ServerConn>, slot: OwnedSemaphorePermit, clean: bool) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        let now = clock::now_ms();
        if !(clean
            && !self.is_retired()
            && clock::between(conn.created, now) <= self.cfg.server_lifetime)
        {
            return;
        }
        conn.idle_since = now;
        self.shelve(conn, slot);
    }

    /// Puts a connection in the idle list, with its slot unless a client
    /// waits for one.
    fn shelve(&self, conn: Box<ServerConn>, slot: OwnedSemaphorePermit) {
        let mut idle = lock(&self.idle);
        // A pool retired since the caller looked (a connection `maintain`
        // made while a failover or /reconnect retired the pool) keeps
        // nothing: `retire` sets its flag before it clears the list under
        // this lock, so the connection is either seen here or cleared there.
        if self.is_retired() {
            drop(idle);
            drop((conn, slot));
            return;
        }
        // Read under the lock a waiting client takes after counting itself
        // (see `checkout`): either it finds this connection, or this sees it.
        let slot_left = if self.waiting.load(Ordering::Relaxed) == 0 {
            idle.push(Idle {
                conn,
                slot: Some(slot),
            });
            None
        } else {
            idle.push(Idle { conn, slot: None });
            Some(slot)
        };
        drop(idle);
        // The waiting client's, taken after the lock is free.
        drop(slot_left);
        // A pool waiting on the full backend may use it (or, a spare,
        // close it).
        self.cap.idle_returned();
    }

    /// Closes idle connections past their idle timeout or lifetime, then
    /// opens connections until the pool holds `min_idle` (bounded by pool_size).
    /// Called periodically by [`Pools::maintain`].
    pub async fn maintain(self: &Arc<Self>) {
        let now = clock::refresh();
        lock(&self.idle).retain(|Idle { conn: c, .. }| {
            clock::between(c.idle_since, now) <= self.cfg.server_idle_timeout
                && clock::between(c.created, now) <= self.cfg.server_lifetime
        });
        self.shrink_reserve();
        // Like PgBouncer's min_pool_size: connections in use count too.
        // Every connection holds a slot (checked out, being connected, or
        // idle with its own) except idle ones whose slot went to a waiter.
        let open = || {
            let unslotted = lock(&self.idle).iter().filter(|i| i.slot.is_none()).count();
            (unslotted + self.capacity()).saturating_sub(self.slots.available_permits())
        };
        // Not for a pool made for a client's own startup settings: any
        // client can make one, and they go once empty (`Pools::maintain`).
        let warm = self.login.options.is_empty();
        while warm && !self.is_retired() && open() < self.settings.min_idle {
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                return;
            };
            // Never at another pool's expense.
            let Some(cap_slot) = self.cap.try_slot() else {
                return;
            };
            let connected = Box::pin(ServerConn::connect(
                self.backend.clone(),
                &self.login,
                &self.connect,
            ))
            .await;
            match connected {
                Ok(mut c) if self.route != Route::ReadWrite || !c.in_recovery => {
                    c.cap_slot = Some(cap_slot);
                    self.share_params(&mut c);
                    self.shelve(c, slot);
                }
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(backend = %self.backend.name, error = %e, "min_idle connect failed");
                    return;
                }
            }
        }
    }
}
