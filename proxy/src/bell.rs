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
mod tests {
    use super::*;

    /// Resolves once the bell was rung, as the message loop sees it.
    fn rung(bell: &Doorbell) -> impl Future<Output = ()> + '_ {
        let mut registered = None;
        std::future::poll_fn(move |cx| bell.poll_rung(cx, &mut registered))
    }

    #[test]
    fn a_reply_awaited_past_a_whole_tick_rings_the_session_to_watch_its_client() {
        let bells = Arc::new(Bells::default());
        let r = bells.register();
        r.bell.awaiting_reply(bells.tick());
        bells.sweep(IdleLimits::default());
        assert!(!r.bell.watching(), "not yet a whole tick");
        bells.sweep(IdleLimits::default());
        assert!(r.bell.watching(), "waiting since before the last tick");
        assert!(r.bell.rung.load(Ordering::Acquire), "and woken to see it");
        r.bell.reply_came();
        assert!(!r.bell.watching());
        bells.sweep(IdleLimits::default());
        bells.sweep(IdleLimits::default());
        assert!(!r.bell.watching(), "no reply awaited: no ring");
    }

    /// A session idle for its limit's whole ticks is rung with the limit
    /// it passed, once; never before, never one that became busy, and the
    /// limit is the one for where it idles (inside a transaction or not).
    #[test]
    fn an_idle_session_is_rung_once_past_its_own_limit() {
        let bells = Arc::new(Bells::default());
        // 250 ms between transactions: 3 ticks; 100 ms inside one: 1.
        let limits = IdleLimits::new(Duration::from_millis(250), Duration::from_millis(100));
        assert_eq!(
            limits,
            IdleLimits {
                client: 3,
                in_transaction: 1
            }
        );
        let idle = bells.register();
        let in_tx = bells.register();
        let woke = bells.register();
        idle.bell.idle_from(bells.tick(), false);
        in_tx.bell.idle_from(bells.tick(), true);
        woke.bell.idle_from(bells.tick(), false);
        bells.sweep(limits);
        assert_eq!(in_tx.bell.take_idle_expired(), None, "not a whole tick yet");
        bells.sweep(limits);
        assert_eq!(in_tx.bell.take_idle_expired(), Some(IDLE_IN_TRANSACTION));
        assert!(
            in_tx.bell.rung.load(Ordering::Acquire),
            "and woken to see it"
        );
        woke.bell.busy();
        bells.sweep(limits);
        assert_eq!(idle.bell.take_idle_expired(), None, "2 of 3 ticks");
        bells.sweep(limits);
        assert_eq!(idle.bell.take_idle_expired(), Some(IDLE));
        assert_eq!(woke.bell.take_idle_expired(), None, "busy again");
        // A client's message voids a verdict it did not see yet.
        woke.bell.idle_from(bells.tick(), true);
        for _ in 0..2 {
            bells.sweep(limits);
        }
        woke.bell.busy();
        assert_eq!(
            woke.bell.take_idle_expired(),
            None,
            "spoke after the verdict"
        );
        for _ in 0..5 {
            bells.sweep(limits);
        }
        assert_eq!(idle.bell.take_idle_expired(), None, "rung once");
        assert_eq!(in_tx.bell.take_idle_expired(), None, "rung once");
        // No limit, no ring.
        woke.bell.idle_from(bells.tick(), true);
        for _ in 0..5 {
            bells.sweep(IdleLimits::new(Duration::from_secs(1), Duration::ZERO));
        }
        assert_eq!(woke.bell.take_idle_expired(), None);
    }

    #[tokio::test]
    async fn a_ring_wakes_a_waiting_session_once_and_stop_wakes_it_for_good() {
        let bells = Arc::new(Bells::default());
        let r = Arc::new(bells.register());
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { rung(&r.bell).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "not rung yet");
        bells.ring_all();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the ring")
            .expect("waiter task");
        // Consumed: a second wait pends until the next ring.
        let again = tokio::time::timeout(std::time::Duration::from_millis(50), rung(&r.bell));
        assert!(again.await.is_err(), "a ring is consumed once");

        // Work that waits on the bell itself (the message loop) ends too.
        // (A bell wakes one task: this one gets its own.)
        let other = bells.register();
        let looping = {
            tokio::spawn(async move {
                let bell = &other.bell;
                bell.until_stopped(async {
                    loop {
                        rung(bell).await;
                    }
                })
                .await
            })
        };
        let stopper = {
            let r = r.clone();
            tokio::spawn(async move { r.bell.until_stopped(std::future::pending::<()>()).await })
        };
        tokio::task::yield_now().await;
        assert!(!stopper.is_finished());
        bells.stop();
        let stopped = tokio::time::timeout(std::time::Duration::from_secs(5), stopper)
            .await
            .expect("woken by stop")
            .expect("stopper task");
        assert_eq!(stopped, None);
        let looped = tokio::time::timeout(std::time::Duration::from_secs(5), looping)
            .await
            .expect("the loop is stopped too")
            .expect("looping task");
        assert!(looped.is_none());
        // Already stopped: at once, and the work is not even started.
        assert_eq!(r.bell.until_stopped(async { 1 }).await, None);
        assert!(
            bells.register().bell.is_stopped(),
            "a bell made after the stop"
        );
        let id = r.id;
        drop(r);
        assert!(
            !lock(&bells.bells).contains_key(&id),
            "unregistered on drop"
        );
    }

    /// The sweeper stops a session still logging in once its deadline
    /// passed, never before and never one that finished; a session that
    /// finishes after the sweeper stopped it learns it must end.
    #[tokio::test]
    async fn the_startup_sweeper_stops_only_late_logins() {
        let bells = Arc::new(Bells::default());
        // 250 ms: 3 ticks, +1 for the tick in progress.
        let late = bells.register_starting(Duration::from_millis(250));
        let quick = bells.register_starting(Duration::from_millis(250));
        let plain = bells.register();
        let waiting = {
            let bell = late.bell.clone();
            tokio::spawn(async move { bell.until_stopped(std::future::pending::<()>()).await })
        };
        assert!(quick.bell.started(), "logged in before its deadline");
        for tick in 1..=3 {
            assert_eq!(
                bells.sweep(IdleLimits::default()),
                0,
                "tick {tick} is before the deadline"
            );
            assert!(!late.bell.is_stopped());
        }
        assert_eq!(
            bells.sweep(IdleLimits::default()),
            1,
            "the fourth tick is past it"
        );
        assert!(late.bell.is_stopped() && late.bell.startup_expired());
        let stopped = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the waiting session is woken")
            .expect("task");
        assert_eq!(stopped, None);
        assert!(!late.bell.started(), "too late to finish the login");
        assert!(!quick.bell.is_stopped() && !quick.bell.startup_expired());
        assert!(!plain.bell.is_stopped() && plain.bell.started());
        assert!(lock(&bells.starting).is_empty(), "both entries swept");
        // A finished login at the front lets the sweeper move past it at
        // once; an unfinished one behind it keeps its own deadline.
        let done = bells.register_starting(Duration::from_secs(60));
        let slow = bells.register_starting(Duration::from_millis(100));
        assert!(done.bell.started());
        assert_eq!(bells.sweep(IdleLimits::default()), 0);
        assert_eq!(
            bells.sweep(IdleLimits::default()),
            1,
            "100 ms: past it on the second tick"
        );
        assert!(slow.bell.is_stopped() && !done.bell.is_stopped());
    }
}
