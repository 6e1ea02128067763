//! Routing from etcd (see `common::etcd`): writes follow the leader key,
//! reads go to fresh replicas, and clients of a server that left its role
//! are told so cleanly.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::etcd::{leader_is, record, server_port, wait_routing, Cluster};
use common::{Raw, Running};
use pgha_cluster::Role;
use pgha_local::wait_until;
use pgha_proxy::config::PoolMode;

/// The etcd cluster and a transaction-mode proxy that routes to its
/// leader (pg1) and its replica (pg2).
fn routing_to_both(label: &str) -> (Cluster, Running) {
    let c = Cluster::start(label);
    let p = Running::start(c.config(PoolMode::Transaction));
    let shared = p.handle().shared.clone();
    wait_routing(&shared, "leader and one replica", |t| {
        t.leader.is_some() && t.replicas.len() == 1
    });
    (c, p)
}

#[test]
fn writes_go_to_the_etcd_leader_reads_to_fresh_replicas_with_truthful_parameters() {
    let (c, p) = routing_to_both("px-route");
    let shared = p.handle().shared.clone();
    let (mut rw, rw_params) = Raw::connect_with_params(p.rw());
    let (mut ro, ro_params) = Raw::connect_with_params(p.ro());
    assert_eq!(server_port(&mut rw), c.pg1.port());
    assert_eq!(server_port(&mut ro), c.pg2.port());
    let get = |ps: &Vec<(String, String)>, k: &str| {
        ps.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    };
    assert_eq!(get(&rw_params, "in_hot_standby").as_deref(), Some("off"));
    assert_eq!(get(&ro_params, "in_hot_standby").as_deref(), Some("on"));
    // libpq's read-write check accepts the read-write port.
    let ok = common::psql(
        p.rw(),
        "select 1",
        &[("PGTARGETSESSIONATTRS", "read-write")],
    );
    assert_eq!(ok.unwrap(), "1");

    // A lagging replica gets no reads: they fall back to the leader.
    c.put(
        &c.keys.member("pg2"),
        record(&c.pg2, Role::Replica, 64 << 20, false),
    );
    wait_routing(&shared, "lagging replica dropped", |t| {
        t.replicas.is_empty()
    });
    let (mut ro2, ro2_params) = Raw::connect_with_params(p.ro());
    assert_eq!(get(&ro2_params, "in_hot_standby").as_deref(), Some("off"));
    assert_eq!(server_port(&mut ro2), c.pg1.port());
    // When the replica is back the client's next transaction runs there,
    // and the client is told that it now talks to a standby (a
    // ParameterStatus ahead of the reply), as it was told the opposite at
    // login. So does one tagged noloadbalance, back to the leader.
    c.put(
        &c.keys.member("pg2"),
        record(&c.pg2, Role::Replica, 0, false),
    );
    wait_routing(&shared, "replica back", |t| t.replicas.len() == 1);
    assert_eq!(
        port_and_standby(&mut ro2),
        (c.pg2.port(), Some("on".into()))
    );
    c.put(
        &c.keys.member("pg2"),
        record(&c.pg2, Role::Replica, 0, true),
    );
    wait_routing(&shared, "noloadbalance replica dropped", |t| {
        t.replicas.is_empty()
    });
    assert_eq!(
        port_and_standby(&mut ro2),
        (c.pg1.port(), Some("off".into()))
    );
    // Same node again: nothing to tell.
    assert_eq!(port_and_standby(&mut ro2), (c.pg1.port(), None));
}

/// A cancel sent to the read-only port reaches the replica running the
/// query (the leader, given the replica's key, would end nothing).
#[test]
fn a_cancel_on_the_read_only_port_reaches_the_replica_running_the_query() {
    let (c, p) = routing_to_both("px-ro-cancel");
    let (ro, replica) = (p.ro(), c.pg2.port());
    p.rt.block_on(common::cancel_a_running_sleep(ro, replica));
}

/// The port of the server that ran a query, and the `in_hot_standby` the
/// client was told ahead of the reply, if it was.
fn port_and_standby(raw: &mut Raw) -> (u16, Option<String>) {
    use pgha_proxy::protocol::messages as msg;
    raw.send_with(|b| msg::put_query(b, "select inet_server_port()"));
    let got = raw.until_ready_full();
    let standby = got.iter().find_map(|(t, body)| {
        let (k, v) = msg::parameter_status(body).filter(|_| *t == b'S')?;
        (k == "in_hot_standby").then(|| v.to_owned())
    });
    (common::first_value(&got).parse().unwrap(), standby)
}

#[test]
fn leader_change_keeps_idle_clients_and_aborts_in_flight_transactions_cleanly() {
    let c = Cluster::start("px-failover");
    let p = Running::start(c.config(PoolMode::Transaction));
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    let mut idle = Raw::connect(p.rw());
    assert_eq!(server_port(&mut idle), c.pg1.port());
    let mut in_tx = Raw::connect(p.rw());
    in_tx.query("begin");
    in_tx.query("insert into t values (1)");
    // A client that stays idle through the failover: its session still
    // refers to the old leader's pool, whose idle servers must close all
    // the same.
    let mut sleeper = Raw::connect(p.rw());
    sleeper.query("select 1");

    c.fail_over_to_pg2();
    leader_is(&shared, "pg2");

    // The idle client never notices; its next transaction runs on pg2.
    assert_eq!(server_port(&mut idle), c.pg2.port());
    idle.query("insert into t values (2)");
    // The transaction on the old primary gets a clear error ...
    in_tx.send_with(|b| pgha_proxy::protocol::messages::put_query(b, "insert into t values (3)"));
    let got = in_tx.until_ready_full();
    let err = got.iter().find(|(t, _)| *t == b'E').expect("an error");
    let fields = pgha_proxy::protocol::messages::error_fields(&err.1).unwrap();
    assert_eq!(fields.code, "57P01");
    assert!(
        fields.message.contains("leader changed"),
        "{}",
        fields.message
    );
    // ... and its connection stays usable, now on the new leader.
    assert_eq!(server_port(&mut in_tx), c.pg2.port());
    // No write reached the demoted node: its uncommitted insert was dropped.
    assert_eq!(c.pg1.psql("select count(*) from t").unwrap(), "0");
    assert_eq!(c.pg2.psql("select count(*) from t").unwrap(), "1");
    // Every connection the proxy had to the old leader is closed, the
    // pooled idle ones included, not left until server_lifetime.
    let proxy_conns = "select count(*) from pg_stat_activity where application_name = 'pgha-proxy'";
    wait_until(
        "the proxy's connections to pg1 to close",
        Duration::from_secs(10),
        || Ok(matches!(c.pg1.psql(proxy_conns).as_deref(), Ok("0")).then_some(())),
    )
    .unwrap();
    assert_ne!(
        c.pg2.psql(proxy_conns).unwrap(),
        "0",
        "the proxy is on pg2 now"
    );
}

#[test]
fn session_clients_pinned_to_the_old_primary_are_closed_with_a_fatal_error() {
    let c = Cluster::start("px-failover-sess");
    let p = Running::start(c.config(PoolMode::Session));
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    let port = p.rw();
    let client = p.rt.block_on(Running::client(port));
    p.rt.block_on(client.simple_query("select 1")).unwrap();
    c.fail_over_to_pg2();
    leader_is(&shared, "pg2");
    let err = p.rt.block_on(client.simple_query("select 1")).unwrap_err();
    assert!(
        err.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN) || client.is_closed(),
        "{err:?}"
    );
    // The FATAL reaches the query before the connection task has read
    // the close that follows it.
    wait_until("the client is closed", Duration::from_secs(10), || {
        Ok(client.is_closed().then_some(()))
    })
    .unwrap();
    let fresh = p.rt.block_on(Running::client(port));
    let row =
        p.rt.block_on(fresh.query_one("select inet_server_port()", &[]))
            .unwrap();
    assert_eq!(row.get::<_, i32>(0), i32::from(c.pg2.port()));
}

#[test]
fn without_a_leader_writes_wait_their_bound_then_fail_and_never_go_to_a_replica() {
    let c = Cluster::start("px-noleader");
    let mut cfg = c.config(PoolMode::Transaction);
    cfg.leader_wait_timeout = Duration::from_secs(3);
    let p = Running::start(cfg);
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    let mut a = Raw::connect(p.rw());
    c.delete(&c.keys.leader());
    wait_routing(&shared, "no leader", |t| t.leader.is_none());
    a.send_with(|b| pgha_proxy::protocol::messages::put_query(b, "select 1"));
    let (tags, _) = a.until_ready();
    assert_eq!(tags[0], b'E');
    // The key names a member that is still in recovery: refused too.
    c.put(&c.keys.leader(), b"pg2".to_vec());
    leader_is(&shared, "pg2");
    a.send_with(|b| pgha_proxy::protocol::messages::put_query(b, "insert into t values (1)"));
    let got = a.until_ready_full();
    assert_eq!(got[0].0, b'E', "a replica must never get the write");
    // The proxy's own refusal, not the replica's 25006 ("cannot execute
    // INSERT in a read-only transaction"), which would mean it got there.
    let e = pgha_proxy::protocol::messages::error_fields(&got[0].1).unwrap();
    assert_eq!(e.code, "57P03", "{}", e.message);
    // A waiting transaction proceeds as soon as a real leader appears.
    c.delete(&c.keys.leader());
    wait_routing(&shared, "no leader", |t| t.leader.is_none());
    a.send_with(|b| pgha_proxy::protocol::messages::put_query(b, "select inet_server_port()"));
    c.put(&c.keys.leader(), b"pg1".to_vec());
    let got = a.until_ready_full();
    assert!(got.iter().any(|(t, _)| *t == b'D'), "{got:?}");
}

#[test]
fn a_replica_named_leader_before_its_promotion_never_tells_clients_it_is_read_only() {
    let c = Cluster::start("px-early-key");
    let mut cfg = c.config(PoolMode::Transaction);
    cfg.leader_wait_timeout = Duration::from_millis(500);
    let p = Running::start(cfg);
    let shared = p.handle().shared.clone();
    // The key moves to pg2 before pg2 is promoted (an agent's failover
    // takes the key first): logins on the read-write port meet a server
    // still in recovery, which they must not take for the pool's truth.
    c.put(&c.keys.leader(), b"pg2".to_vec());
    leader_is(&shared, "pg2");
    let rw = p.rw();
    let target_rw = [("PGTARGETSESSIONATTRS", "read-write")];
    for _ in 0..2 {
        let e = common::psql(rw, "select 1", &target_rw).unwrap_err();
        assert!(!e.contains("read-only"), "told a replica's parameters: {e}");
    }
    assert_eq!(c.pg2.psql("select pg_promote()").unwrap(), "t");
    // Now pg2 is the primary: a libpq client that insists on read-write
    // gets in (it checks in_hot_standby in the login's ParameterStatus).
    let got = common::psql(rw, "select pg_is_in_recovery()", &target_rw);
    assert_eq!(got.as_deref(), Ok("f"), "{got:?}");
}

#[test]
fn a_replica_promoted_under_its_pool_is_no_longer_called_a_standby_at_login() {
    let c = Cluster::start("px-promoted-params");
    let mut cfg = c.config(PoolMode::Transaction);
    cfg.pool_size = 1;
    let p = Running::start(cfg);
    let hot = |params: &[(String, String)]| {
        params
            .iter()
            .find(|(k, _)| k == "in_hot_standby")
            .map(|(_, v)| v.clone())
    };
    let (mut a, told) = Raw::connect_with_params(p.ro());
    assert_eq!(hot(&told).as_deref(), Some("on"));
    assert_eq!(a.query("select pg_is_in_recovery()"), vec!["t"]);
    // pg2 is promoted while its pooled connection waits idle (the keys
    // still call it a replica, so reads keep going there).
    assert_eq!(c.pg2.psql("select pg_promote()").unwrap(), "t");
    assert_eq!(a.query("select pg_is_in_recovery()"), vec!["f"]);
    // A new client is told what the server now says, not the value
    // remembered from before the promotion.
    let (mut b, told) = Raw::connect_with_params(p.ro());
    assert_eq!(hot(&told).as_deref(), Some("off"));
    assert_eq!(b.query("select pg_is_in_recovery()"), vec!["f"]);
}

#[test]
fn the_watch_resyncs_after_etcd_restarts() {
    let mut c = Cluster::start("px-resync");
    let p = Running::start(c.config(PoolMode::Transaction));
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    c.etcd.restart(0).unwrap();
    c.fail_over_to_pg2();
    leader_is(&shared, "pg2");
    let mut a = Raw::connect(p.rw());
    assert_eq!(server_port(&mut a), c.pg2.port());
}
