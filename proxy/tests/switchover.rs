//! The planned switchover handshake, proxy side (ARCHITECTURE.md): when
//! the switchover key names the leader the proxy routes to, new
//! transactions wait, open ones get `switchover_drain_timeout`, and the
//! proxy acknowledges with the number still open; when the leader moves
//! or the request is withdrawn, waiting transactions go on.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::etcd::{leader_is, server_port, wait_routing, Cluster};
use common::{http, Raw, Running};
use pgha_cluster::{Switchover, SwitchoverPhase};
use pgha_local::{wait_until, PgInstance, Sandbox};
use pgha_proxy::config::PoolMode;
use pgha_proxy::protocol::messages as msg;

/// Asks for a switchover away from pg1, as `pgha switchover` would.
fn request_switchover(c: &Cluster, id: u64) {
    let sw = Switchover {
        id,
        leader: "pg1".into(),
        candidate: Some("pg2".into()),
        phase: SwitchoverPhase::Requested,
        requested_at_ms: 0,
    };
    c.put(&c.keys.switchover(), pgha_cluster::encode(&sw));
}

/// A session-mode proxy on a fresh primary with an admin token, whose
/// held requests wait at most `wait`; its admin port.
fn session_proxy(label: &str, wait: Duration) -> (Sandbox, PgInstance, Running, u16) {
    let (sb, pg) = common::primary(label);
    let mut cfg = common::config(&pg, PoolMode::Session);
    cfg.admin_token = Some("tok".into());
    cfg.leader_wait_timeout = wait;
    let p = Running::start(cfg);
    let admin = p.handle().admin_addr.port();
    (sb, pg, p, admin)
}

/// POST `path` on the admin port with the token; it must succeed.
fn admin_post(admin: u16, path: &str) {
    let r = http(admin, "POST", path, Some("tok"));
    assert!(r.starts_with("HTTP/1.1 200"), "{path}: {r}");
}

#[test]
fn a_switchover_pauses_new_transactions_acknowledges_and_resumes_on_the_new_leader() {
    let c = Cluster::start("px-switch");
    let mut cfg = c.config(PoolMode::Transaction);
    cfg.leader_wait_timeout = Duration::from_secs(20);
    cfg.id = "px1".into();
    let p = Running::start(cfg);
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    request_switchover(&c, 7);
    wait_routing(&shared, "paused", |t| t.paused);
    wait_until("proxy ack", Duration::from_secs(10), || {
        Ok(c.proxy_ack("px1")
            .filter(|a| a.paused_for == Some(7))
            .map(|_| ()))
    })
    .unwrap();
    // A transaction started during the pause waits, then runs on pg2.
    let port = p.rw();
    let waiting = std::thread::spawn(move || {
        let mut a = Raw::connect(port);
        server_port(&mut a)
    });
    c.fail_over_to_pg2();
    c.delete(&c.keys.switchover());
    assert_eq!(waiting.join().unwrap(), c.pg2.port());
    wait_routing(&shared, "resumed", |t| !t.paused);
}

/// During a switchover, transactions already open on the old leader get
/// `switchover_drain_timeout` to finish: the proxy acknowledges as soon as
/// they did (in_flight 0), or when the bound runs out, with the number
/// still open, never before.
#[test]
fn a_switchover_waits_for_open_transactions_up_to_its_drain_bound() {
    let c = Cluster::start("px-switch-drain");
    for (id, bound, commits) in [
        (7u64, Duration::from_secs(1), false),
        (8, Duration::from_secs(20), true),
    ] {
        let mut cfg = c.config(PoolMode::Transaction);
        cfg.id = format!("px{id}");
        cfg.switchover_drain_timeout = bound;
        let proxy_id = cfg.id.clone();
        let p = Running::start(cfg);
        let shared = p.handle().shared.clone();
        leader_is(&shared, "pg1");
        let mut open = Raw::connect(p.rw());
        open.query("begin");
        open.query("select 1");
        let asked = std::time::Instant::now();
        request_switchover(&c, id);
        wait_routing(&shared, "paused", |t| t.paused);
        let acked = || c.proxy_ack(&proxy_id).filter(|a| a.paused_for == Some(id));
        if commits {
            assert!(
                acked().is_none(),
                "acknowledged while a transaction was open"
            );
            open.query("commit");
        }
        let ack = wait_until(
            "the proxy's acknowledgement",
            Duration::from_secs(30),
            || Ok(acked()),
        )
        .unwrap();
        let took = asked.elapsed();
        if commits {
            assert_eq!(ack.in_flight, 0);
            assert!(
                took < bound,
                "waited out the bound after the commit: {took:?}"
            );
        } else {
            assert_eq!(ack.in_flight, 1, "the open transaction is reported");
            assert!(
                took >= bound,
                "acknowledged before the drain bound: {took:?}"
            );
        }
        c.delete(&c.keys.switchover());
        wait_routing(&shared, "resumed", |t| !t.paused);
    }
}

/// Session-mode clients keep their server between transactions. One idle
/// there does not hold up a switchover's drain (only open transactions
/// do), and its next request waits for the end of the pause: withdrawn,
/// it runs on the same server with its session intact; after the leader
/// moved, the client gets a FATAL error and its request never reaches the
/// old leader.
#[test]
fn session_clients_between_transactions_do_not_hold_up_a_switchover_and_wait_for_its_end() {
    let c = Cluster::start("px-switch-session");
    let mut cfg = c.config(PoolMode::Session);
    cfg.id = "pxs".into();
    let bound = Duration::from_secs(20);
    cfg.switchover_drain_timeout = bound;
    cfg.leader_wait_timeout = Duration::from_secs(20);
    let p = Running::start(cfg);
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    let acked = |id| c.proxy_ack("pxs").filter(|a| a.paused_for == Some(id));
    let rows = |pg: &pgha_local::PgInstance, x| {
        pg.psql(&format!("select count(*) from t where x = {x}"))
            .unwrap()
    };
    let mut idle = Raw::connect(p.rw());
    let pid = idle.query("select pg_backend_pid()");
    idle.query("select set_config('app.kept', 'yes', false)");
    let mut later = Raw::connect(p.rw());
    later.query("select 1");
    let mut open = Raw::connect(p.rw());
    open.query("begin");
    open.query("insert into t values (1)");

    let asked = std::time::Instant::now();
    request_switchover(&c, 9);
    wait_routing(&shared, "paused", |t| t.paused);
    // A bounded window: no acknowledgement while a transaction is open.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        acked(9).is_none(),
        "acknowledged while a transaction was open"
    );
    open.query("commit");
    let ack = wait_until("the acknowledgement", Duration::from_secs(30), || {
        Ok(acked(9))
    })
    .unwrap();
    let took = asked.elapsed();
    assert_eq!(ack.in_flight, 0);
    assert!(
        took < bound,
        "idle session clients held up the drain: {took:?}"
    );
    let admin = p.handle().admin_addr.port();
    let parked = || {
        let r = http(admin, "GET", "/status", None);
        let status: serde_json::Value =
            serde_json::from_str(r.split_once("\r\n\r\n").unwrap().1).unwrap();
        let pools = status["pools"].as_array().unwrap().clone();
        pools
            .iter()
            .map(|p| p["parked"].as_u64().unwrap())
            .sum::<u64>()
    };
    let parked_are = |n| {
        wait_until(&format!("{n} parked"), Duration::from_secs(10), || {
            Ok((parked() == n).then_some(()))
        })
        .unwrap()
    };
    parked_are(3);

    // A request during the pause waits for its end, then runs on the
    // client's own server.
    let bytes_in = || {
        let text = http(admin, "GET", "/metrics", None);
        common::metric(&text, "pgha_proxy_client_bytes_in_total")
    };
    let before = bytes_in();
    let held = std::thread::spawn(move || {
        idle.query("insert into t values (2)");
        let pid = idle.query("select pg_backend_pid()");
        (pid, idle.query("select current_setting('app.kept')"))
    });
    // Once the proxy has read it, a bounded window: nothing may reach
    // the server while paused.
    wait_until("the request read", Duration::from_secs(10), || {
        Ok((bytes_in() > before).then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rows(&c.pg1, 2), "0", "a transaction ran during the pause");
    assert!(!held.is_finished());
    c.delete(&c.keys.switchover());
    let (pid_after, kept) = held.join().unwrap();
    assert_eq!(pid_after, pid, "the session kept its server");
    assert_eq!(kept, ["yes"]);
    assert_eq!(rows(&c.pg1, 2), "1");
    wait_routing(&shared, "resumed", |t| !t.paused);
    // The others, quiet, are in flight again once resumed.
    parked_are(0);

    // Paused again, and this time the leader moves: the waiting request
    // is refused with the session, never run on pg1.
    request_switchover(&c, 10);
    wait_until("the acknowledgement", Duration::from_secs(30), || {
        Ok(acked(10))
    })
    .unwrap();
    later.send_with(|b| msg::put_query(b, "insert into t values (3)"));
    c.fail_over_to_pg2();
    c.delete(&c.keys.switchover());
    let (tag, body) = later.recv();
    let e = msg::error_fields(&body).unwrap();
    assert_eq!(
        (tag, e.severity.as_str(), e.code.as_str()),
        (b'E', "FATAL", "57P01"),
        "{}",
        e.message
    );
    later.expect_closed();
    assert_eq!(rows(&c.pg1, 3), "0", "the old leader got the write");
    assert_eq!(rows(&c.pg2, 3), "0");
}

/// A transaction open on a pool that was replaced (here by /reconnect)
/// still holds up a switchover: the pool is retired, not forgotten, until
/// its last connection closes, and /status lists it meanwhile.
#[test]
fn a_transaction_on_a_replaced_pool_still_holds_up_a_switchover() {
    let c = Cluster::start("px-switch-retired");
    let mut cfg = c.config(PoolMode::Transaction);
    cfg.id = "pxr".into();
    cfg.switchover_drain_timeout = Duration::from_secs(20);
    cfg.admin_token = Some("tok".into());
    let p = Running::start(cfg);
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    let admin = p.handle().admin_addr.port();
    let retired_pools = || {
        let r = http(admin, "GET", "/status", None);
        let body = r.split_once("\r\n\r\n").unwrap().1;
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        let pools = status["pools"].as_array().unwrap().clone();
        let retired = pools.into_iter().filter(|p| p["retired"] == true);
        retired
            .map(|p| p["active"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let mut open = Raw::connect(p.rw());
    open.query("begin");
    open.query("insert into t values (4)");
    let r = http(admin, "POST", "/reconnect", Some("tok"));
    assert!(r.ends_with("reconnecting 1 pools\n"), "{r}");
    assert_eq!(
        retired_pools(),
        [1],
        "the replaced pool with its transaction"
    );

    request_switchover(&c, 11);
    wait_routing(&shared, "paused", |t| t.paused);
    let acked = || c.proxy_ack("pxr").filter(|a| a.paused_for == Some(11));
    // A bounded window: no acknowledgement while the transaction is open.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        acked().is_none(),
        "acknowledged while a transaction was open"
    );
    open.query("commit");
    let ack = wait_until("the acknowledgement", Duration::from_secs(30), || {
        Ok(acked())
    })
    .unwrap();
    assert_eq!(ack.in_flight, 0);
    assert_eq!(
        retired_pools(),
        Vec::<u64>::new(),
        "forgotten once its connection closed"
    );
    c.delete(&c.keys.switchover());
    wait_routing(&shared, "resumed", |t| !t.paused);
}

/// The admin pause holds a session client's next request too, and the
/// client can cancel it (it is waiting in the proxy, not on its idle
/// server); its session goes on, on the same server, after the resume.
#[test]
fn a_session_request_held_by_a_pause_can_be_cancelled() {
    let (_sb, _pg, p, admin) = session_proxy("px-pause-cancel", Duration::from_secs(60));
    let c = p.client_in("postgres").unwrap();
    let pid = p.first_cell(&c, "select pg_backend_pid()").unwrap();
    admin_post(admin, "/pause");
    let token = c.cancel_token();
    let asked = std::time::Instant::now();
    let err = p.rt.block_on(async {
        let held = c.simple_query("select 1");
        tokio::pin!(held);
        // Cancel until it lands: one sent before the proxy holds the
        // request reaches the idle server, which ignores it.
        loop {
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
            let tick = tokio::time::sleep(Duration::from_millis(200));
            tokio::select! {
                r = &mut held => break r.unwrap_err(),
                _ = tick => assert!(asked.elapsed() < Duration::from_secs(20), "the cancel never landed"),
            }
        }
    });
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
    admin_post(admin, "/resume");
    assert_eq!(p.first_cell(&c, "select pg_backend_pid()").unwrap(), pid);
}

/// While paused, only requests wait: a Flush or the COPY messages a failed
/// COPY leaves coming pass at once (an idle server ignores them), and a
/// request held past `leader_wait_timeout` gets one error and its
/// ReadyForQuery, the session intact.
#[test]
fn a_paused_session_client_gets_one_error_per_request_held_too_long() {
    let (_sb, _pg, p, admin) = session_proxy("px-pause-stray", Duration::from_secs(1));
    let mut raw = Raw::connect(p.rw());
    let pid = raw.query("select pg_backend_pid()");
    admin_post(admin, "/pause");
    // CopyData, CopyDone, CopyFail, Flush; then a query.
    raw.send(b"d\0\0\0\x06ab");
    raw.send(b"c\0\0\0\x04f\0\0\0\x05\0H\0\0\0\x04");
    raw.send_with(|b| msg::put_query(b, "select 1"));
    let got = raw.until_ready_full();
    let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"EZ", "{got:?}");
    let e = msg::error_fields(&got[0].1).unwrap();
    assert_eq!(e.code, "57P03", "{}", e.message);
    assert_eq!(got[1].1, b"I");
    admin_post(admin, "/resume");
    assert_eq!(raw.query("select pg_backend_pid()"), pid);
}
