//! Routing from etcd: a real etcd, a primary and a streaming replica; the
//! tests rewrite the `leader` and `members/` keys (as agents would) while
//! clients run, and check where their traffic lands.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Raw, Running};
use pgha_cluster::{Keys, Member, PgState, ProxyAck, Role, Switchover, SwitchoverPhase, Tags};
use pgha_local::{wait_until, EtcdCluster, PgInstance, PgOptions, Sandbox};
use pgha_proxy::config::{Config, EtcdConfig, PoolMode};
use pgha_proxy::Shared;

struct Cluster {
    _sb: Sandbox,
    etcd: EtcdCluster,
    pg1: PgInstance,
    pg2: PgInstance,
    keys: Keys,
}

fn record(pg: &PgInstance, role: Role, lag: u64, noloadbalance: bool) -> Vec<u8> {
    pgha_cluster::encode(&Member {
        name: pg.name().into(),
        role,
        state: PgState::Running,
        host: "127.0.0.1".into(),
        port: pg.port(),
        lag_bytes: (role == Role::Replica).then_some(lag),
        tags: Tags {
            noloadbalance,
            ..Tags::default()
        },
        ..Member::default()
    })
}

impl Cluster {
    fn start(label: &str) -> Cluster {
        let sb = Sandbox::new(label).unwrap();
        let etcd = EtcdCluster::start(&sb, 1).unwrap();
        let pg1 = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
        pg1.psql("create table t(x int)").unwrap();
        let pg2 = PgInstance::replica(&sb, "pg2", &pg1, &PgOptions::default()).unwrap();
        let c = Cluster {
            _sb: sb,
            etcd,
            pg1,
            pg2,
            keys: Keys::new("t").unwrap(),
        };
        c.put(
            &c.keys.member("pg1"),
            record(&c.pg1, Role::Primary, 0, false),
        );
        c.put(
            &c.keys.member("pg2"),
            record(&c.pg2, Role::Replica, 0, false),
        );
        c.put(&c.keys.leader(), b"pg1".to_vec());
        c
    }

    fn put(&self, key: &str, value: Vec<u8>) {
        let eps = self.etcd.endpoints();
        let key = key.to_owned();
        common::runtime().block_on(async move {
            let mut c = etcd_client::Client::connect(eps, None).await.unwrap();
            c.put(key, value, None).await.unwrap();
        });
    }

    fn delete(&self, key: &str) {
        let eps = self.etcd.endpoints();
        let key = key.to_owned();
        common::runtime().block_on(async move {
            let mut c = etcd_client::Client::connect(eps, None).await.unwrap();
            c.delete(key, None).await.unwrap();
        });
    }

    /// The acknowledgement proxy `id` wrote, if any.
    fn proxy_ack(&self, id: &str) -> Option<ProxyAck> {
        let eps = self.etcd.endpoints();
        let key = self.keys.proxy(id);
        common::runtime().block_on(async move {
            let mut c = etcd_client::Client::connect(eps, None).await.ok()?;
            let resp = c.get(key, None).await.ok()?;
            let kv = resp.kvs().first()?;
            pgha_cluster::decode("ack", kv.value()).ok()
        })
    }

    fn config(&self, mode: PoolMode) -> Config {
        Config {
            listen_rw: "127.0.0.1:0".parse().unwrap(),
            listen_ro: "127.0.0.1:0".parse().unwrap(),
            listen_admin: "127.0.0.1:0".parse().unwrap(),
            pool_mode: mode,
            auth_method: pgha_proxy::config::AuthMethod::Trust,
            leader_wait_timeout: Duration::from_millis(800),
            etcd: Some(EtcdConfig {
                endpoints: self.etcd.endpoints(),
                cluster: "t".into(),
            }),
            ..Config::default()
        }
    }

    /// Promotes pg2 and moves the leader key to it, as a failover would.
    fn fail_over_to_pg2(&self) {
        assert_eq!(self.pg2.psql("select pg_promote()").unwrap(), "t");
        self.put(
            &self.keys.member("pg2"),
            record(&self.pg2, Role::Primary, 0, false),
        );
        self.put(&self.keys.leader(), b"pg2".to_vec());
        self.put(
            &self.keys.member("pg1"),
            record(&self.pg1, Role::Replica, 0, false),
        );
    }
}

fn wait_routing(
    shared: &Shared,
    what: &str,
    ok: impl Fn(&pgha_proxy::router::RoutingTable) -> bool,
) {
    wait_until(what, Duration::from_secs(15), || {
        Ok(ok(&shared.topology.load()).then_some(()))
    })
    .unwrap();
}

fn leader_is(shared: &Shared, name: &str) {
    wait_routing(shared, &format!("leader {name}"), |t| {
        t.leader.as_ref().is_some_and(|l| l.name == name)
    });
}

fn server_port(raw: &mut Raw) -> u16 {
    raw.query("select inet_server_port()")[0].parse().unwrap()
}

#[test]
fn writes_go_to_the_etcd_leader_reads_to_fresh_replicas_with_truthful_parameters() {
    let c = Cluster::start("px-route");
    let p = Running::start(c.config(PoolMode::Transaction));
    let shared = p.handle().shared.clone();
    wait_routing(&shared, "leader and one replica", |t| {
        t.leader.is_some() && t.replicas.len() == 1
    });
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
    let mut ro2 = Raw::connect(p.ro());
    assert_eq!(server_port(&mut ro2), c.pg1.port());
    // So does one tagged noloadbalance.
    c.put(
        &c.keys.member("pg2"),
        record(&c.pg2, Role::Replica, 0, false),
    );
    wait_routing(&shared, "replica back", |t| t.replicas.len() == 1);
    assert_eq!(server_port(&mut ro2), c.pg2.port());
    c.put(
        &c.keys.member("pg2"),
        record(&c.pg2, Role::Replica, 0, true),
    );
    wait_routing(&shared, "noloadbalance replica dropped", |t| {
        t.replicas.is_empty()
    });
    assert_eq!(server_port(&mut ro2), c.pg1.port());
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
    assert!(client.is_closed());
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

#[test]
fn a_switchover_pauses_new_transactions_acknowledges_and_resumes_on_the_new_leader() {
    let c = Cluster::start("px-switch");
    let mut cfg = c.config(PoolMode::Transaction);
    cfg.leader_wait_timeout = Duration::from_secs(20);
    cfg.id = "px1".into();
    let p = Running::start(cfg);
    let shared = p.handle().shared.clone();
    leader_is(&shared, "pg1");
    let sw = Switchover {
        id: 7,
        leader: "pg1".into(),
        candidate: Some("pg2".into()),
        phase: SwitchoverPhase::Requested,
        requested_at_ms: 0,
    };
    c.put(&c.keys.switchover(), pgha_cluster::encode(&sw));
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
    let _ = Arc::clone(&shared);
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
        let sw = Switchover {
            id,
            leader: "pg1".into(),
            candidate: Some("pg2".into()),
            phase: SwitchoverPhase::Requested,
            requested_at_ms: 0,
        };
        c.put(&c.keys.switchover(), pgha_cluster::encode(&sw));
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
