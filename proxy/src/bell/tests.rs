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
