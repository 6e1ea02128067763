//! Doorbells: how the proxy wakes every client session at once (routing
//! change, drain, stop) without each session polling a shared `Notify`,
//! `watch` or `CancellationToken` on every turn. Those take a lock per
//! poll, and a session waits twice per transaction.
//!
//! Each session task holds one [`Doorbell`] registered in [`Bells`];
//! waiting on it costs a waker registration (two atomic compare-exchanges)
//! and a flag load. Ringing all of them is rare and walks the registry.
//!
//! The bell also ends a client that does not finish its startup in time:
//! one sweeper, ticking every [`SWEEP_TICK`], stops the bells of
//! sessions still starting past their deadline, instead of a timer per
//! new client (a timer costs a wheel insertion and removal, and a clock
//! read, on every connection). May call: `atomic_waker`.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use rustc_hash::FxHashMap;

use crate::lock;

/// One session's doorbell.
#[derive(Debug, Default)]
pub struct Doorbell {
    rung: AtomicBool,
    /// The proxy stops: the session ends at once.
    stopped: AtomicBool,
    /// Set when the session's message loop registered the waker during
    /// the current poll (see `until_stopped`).
    armed: AtomicBool,
    waker: AtomicWaker,
    /// [`RUNNING`], [`STARTING`] or [`EXPIRED`].
    startup: AtomicU8,
    /// Sweeper tick + 1 at which the session began waiting for a server's
    /// reply without watching its client; 0: it is not (see
    /// [`Doorbell::awaiting_reply`]).
    awaiting: AtomicU64,
    /// Set by the sweeper when that wait is long: the session watches its
    /// client too, so a client that vanishes during a long query is seen.
    watch: AtomicBool,
    /// Since when the session waits for its client and nothing else (see
    /// [`Doorbell::idle_from`]): `(tick + 1) << 2 | in_transaction`; 0: it
    /// does not; [`IDLE`] or [`IDLE_IN_TRANSACTION`]: the sweeper found
    /// that wait past its limit. One word, so a client's message (which
    /// stores 0) and the sweeper's verdict (a compare-exchange from the
    /// wait it judged) cannot cross.
    idle: AtomicU64,
}

/// Idle between transactions past `client_idle_timeout`.
pub const IDLE: u64 = 1;
/// Idle inside a transaction past `idle_transaction_timeout`.
pub const IDLE_IN_TRANSACTION: u64 = 2;

/// How long a session may wait for its client, in sweeper ticks
/// (0: for ever). See [`Bells::sweep`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdleLimits {
    /// Between transactions.
    pub client: u64,
    /// Inside a transaction (holding its server).
    pub in_transaction: u64,
}

impl IdleLimits {
    /// The limits of `client_idle_timeout` and `idle_transaction_timeout`,
    /// rounded up to whole ticks.
    pub fn new(client: Duration, in_transaction: Duration) -> IdleLimits {
        IdleLimits {
            client: ticks(client),
            in_transaction: ticks(in_transaction),
        }
    }

    pub fn any(&self) -> bool {
        self.client != 0 || self.in_transaction != 0
    }
}

/// Not bound by a startup deadline (logged in, or never registered with one).
const RUNNING: u8 = 0;
/// Logging in, within a deadline the sweeper enforces.
const STARTING: u8 = 1;
/// The deadline passed before the login finished: the session was stopped.
const EXPIRED: u8 = 2;

/// How often the sweeper runs: the resolution of `startup_timeout` and of
/// the idle limits (a client is dropped between its limit and two ticks
/// after it: the limit is rounded up to whole ticks, plus the tick in
/// progress), and how soon a slow reply makes a session watch its client.
pub const SWEEP_TICK: Duration = Duration::from_millis(100);

/// `d` in whole sweeper ticks, rounded up.
fn ticks(d: Duration) -> u64 {
    d.as_nanos().div_ceil(SWEEP_TICK.as_nanos()) as u64
}

impl Doorbell {
    fn ring(&self) {
        self.rung.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.ring();
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The session waits for a reply and, to save a readiness registration
    /// per request, does not read its client meanwhile. If the wait
    /// outlasts a sweeper tick, the sweeper rings with [`Self::watching`]
    /// set. `tick`: [`Bells::tick`] now.
    pub fn awaiting_reply(&self, tick: u64) {
        self.awaiting.store(tick + 1, Ordering::Relaxed);
    }

    /// The reply came: the client is read again as usual.
    pub fn reply_came(&self) {
        self.awaiting.store(0, Ordering::Relaxed);
        if self.watch.load(Ordering::Relaxed) {
            self.watch.store(false, Ordering::Relaxed);
        }
    }

    /// The session now waits for its client and nothing else (no request
    /// outstanding, nothing buffered), inside a transaction or not, since
    /// sweeper tick `tick`. The sweeper ends the wait once it outlasts
    /// its [`IdleLimits`].
    pub fn idle_from(&self, tick: u64, in_transaction: bool) {
        self.idle.store(
            ((tick + 1) << 2) | u64::from(in_transaction),
            Ordering::Relaxed,
        );
    }

    /// The client sent something: it is no longer idle, and a verdict the
    /// sweeper reached on its wait is void.
    pub fn busy(&self) {
        self.idle.store(0, Ordering::Relaxed);
    }

    /// Which idle limit the session passed ([`IDLE`] or
    /// [`IDLE_IN_TRANSACTION`]), if the sweeper found it past one and the
    /// client has sent nothing since.
    pub fn take_idle_expired(&self) -> Option<u64> {
        let kind = self.idle.load(Ordering::Relaxed);
        let expired = matches!(kind, IDLE | IDLE_IN_TRANSACTION)
            && self
                .idle
                .compare_exchange(kind, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        expired.then_some(kind)
    }

    /// Whether the session should read its client while it waits for a
    /// slow reply.
    pub fn watching(&self) -> bool {
        self.watch.load(Ordering::Relaxed)
    }

    /// The login finished: the startup deadline no longer applies. False
    /// when the deadline passed first (the session must end).
    pub fn started(&self) -> bool {
        self.startup
            .compare_exchange(STARTING, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .map_or_else(|s| s != EXPIRED, |_| true)
    }

    /// The startup deadline passed before the login finished.
    pub fn startup_expired(&self) -> bool {
        self.startup.load(Ordering::Acquire) == EXPIRED
    }

    /// Stops the session if it is still logging in; true if it was.
    fn expire(&self) -> bool {
        let expired = self
            .startup
            .compare_exchange(STARTING, EXPIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if expired {
            self.stop();
        }
        expired
    }

    /// Runs `work` until it finishes (`Some`) or the proxy stops (`None`;
    /// `work` is dropped where it waits). While `work` waits on this bell
    /// (the message loop between transactions) the wake-up is already
    /// registered; elsewhere (startup, a checkout, a client slow to read)
    /// it is registered here.
    pub fn until_stopped<F: Future>(&self, work: F) -> UntilStopped<'_, F> {
        UntilStopped { bell: self, work }
    }

    /// Ready once the bell was rung since the last time it was ready.
    /// `registered` is the caller's note of the waker it left here: the
    /// same task waiting again (twice per transaction) registers nothing,
    /// since only a ring takes the waker out, and a ring is seen here.
    #[inline]
    pub fn poll_rung(&self, cx: &mut Context<'_>, registered: &mut Option<Waker>) -> Poll<()> {
        // Register first: a ring after the check still wakes us.
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker.register(cx.waker());
            *registered = Some(cx.waker().clone());
        }
        self.armed.store(true, Ordering::Relaxed);
        if self.rung.load(Ordering::Acquire) && self.rung.swap(false, Ordering::AcqRel) {
            // The ring took the waker.
            *registered = None;
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Doorbell::until_stopped`]. A plain struct, not an `async fn`:
    /// the session's whole future lives in it once, not twice (an `async
    /// fn` would keep its argument beside the pinned copy), which is most
    /// of what an idle client costs.
    pub struct UntilStopped<'a, F> {
        bell: &'a Doorbell,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for UntilStopped<'_, F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let bell = *this.bell;
        if bell.is_stopped() {
            return Poll::Ready(None);
        }
        bell.armed.store(false, Ordering::Relaxed);
        if let Poll::Ready(v) = this.work.poll(cx) {
            return Poll::Ready(Some(v));
        }
        if !bell.armed.load(Ordering::Relaxed) {
            bell.waker.register(cx.waker());
        }
        // Also when armed: a stop whose ring `work` consumed in this poll
        // set the flag before ringing.
        if bell.is_stopped() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// Every live session's doorbell, and the proxy-wide stop flag.
#[derive(Debug, Default)]
pub struct Bells {
    next: AtomicU64,
    /// Keyed by a counter: FxHash, not SipHash (no one else picks the keys).
    bells: Mutex<FxHashMap<u64, Arc<Doorbell>>>,
    stopped: AtomicBool,
    /// Sweeper ticks so far.
    tick: AtomicU64,
    /// Sessions registered with a startup deadline (in ticks), in the
    /// order they came: with one `startup_timeout` for all, that is
    /// deadline order (after a reload shortens it, a later deadline can
    /// sit behind an earlier one and wait for it: at most the difference).
    starting: Mutex<VecDeque<(u64, Arc<Doorbell>)>>,
}

/// A registered doorbell; unregistered on drop.
#[derive(Debug)]
pub struct Registered {
    bells: Arc<Bells>,
    id: u64,
    pub bell: Arc<Doorbell>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.bells.bells).remove(&self.id);
    }
}

impl Bells {
    pub fn register(self: &Arc<Self>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let bell = Arc::new(Doorbell::default());
        lock(&self.bells).insert(id, bell.clone());
        // Stopped while registering: `stop` sets the flag before it walks
        // the registry, so one of the two sees the other.
        if self.is_stopped() {
            bell.stop();
        }
        Registered {
            bells: self.clone(),
            id,
            bell,
        }
    }

    /// A bell whose session must finish logging in within `timeout`, or be
    /// stopped by [`Bells::sweep`].
    pub fn register_starting(self: &Arc<Self>, timeout: Duration) -> Registered {
        let r = self.register();
        r.bell.startup.store(STARTING, Ordering::Release);
        // +1: the current tick may be nearly over.
        let deadline = self.tick.load(Ordering::Acquire) + ticks(timeout) + 1;
        lock(&self.starting).push_back((deadline, r.bell.clone()));
        r
    }

    /// Sweeper ticks so far.
    pub fn tick(&self) -> u64 {
        self.tick.load(Ordering::Relaxed)
    }

    /// One sweeper tick: stops the sessions still logging in past their
    /// deadline and forgets the ones that finished, rings the sessions
    /// waiting for a reply since before the last tick so they watch their
    /// clients (see [`Doorbell::awaiting_reply`]), and rings the sessions
    /// idle past `limits` with the limit they passed (see
    /// [`Doorbell::take_idle_expired`]). Returns how many logins were
    /// stopped.
    pub fn sweep(&self, limits: IdleLimits) -> usize {
        let expired = self.expire_startups();
        let now = self.tick.load(Ordering::Acquire);
        for bell in lock(&self.bells).values() {
            let since = bell.awaiting.load(Ordering::Relaxed);
            // `since` is the starting tick + 1: waiting since before the
            // previous tick, so for one to two ticks.
            if since != 0 && since < now {
                bell.awaiting.store(0, Ordering::Relaxed);
                bell.watch.store(true, Ordering::Relaxed);
                bell.ring();
            }
            if limits.any() {
                Self::expire_idle(bell, now, limits);
            }
        }
        expired
    }

    /// Rings `bell` if its session has been idle for `limits` whole ticks.
    fn expire_idle(bell: &Doorbell, now: u64, limits: IdleLimits) {
        let idle = bell.idle.load(Ordering::Relaxed);
        if idle < 4 {
            // Busy, or already judged.
            return;
        }
        // Idle since during tick `since - 1`: `now - since` whole ticks.
        let (since, in_tx) = (idle >> 2, idle & 1 == 1);
        let (limit, kind) = if in_tx {
            (limits.in_transaction, IDLE_IN_TRANSACTION)
        } else {
            (limits.client, IDLE)
        };
        // Only if unchanged: a session that was busy (and maybe idle
        // again) since the load has a new, shorter wait.
        if limit != 0
            && now.saturating_sub(since) >= limit
            && bell
                .idle
                .compare_exchange(idle, kind, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            bell.ring();
        }
    }

    fn expire_startups(&self) -> usize {
        let now = self.tick.fetch_add(1, Ordering::AcqRel) + 1;
        let mut expired = 0;
        let mut q = lock(&self.starting);
        while let Some((deadline, bell)) = q.front() {
            if bell.startup.load(Ordering::Acquire) == STARTING {
                if *deadline > now {
                    break;
                }
                expired += usize::from(bell.expire());
            }
            q.pop_front();
        }
        expired
    }

    /// Rings every session's bell.
    pub fn ring_all(&self) {
        for bell in lock(&self.bells).values() {
            bell.ring();
        }
    }

    /// Stops every session: they end at their next turn.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        for bell in lock(&self.bells).values() {
            bell.stop();
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests;
