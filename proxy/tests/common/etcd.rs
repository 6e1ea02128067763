//! A real etcd, a primary and a streaming replica for the routing tests:
//! the tests rewrite the `leader` and `members/` keys (as agents would)
//! while clients run, and check where their traffic lands.

use std::time::Duration;

use super::Raw;
use pgha_cluster::{Keys, Member, PgState, ProxyAck, Role, Tags};
use pgha_local::{wait_until, EtcdCluster, PgInstance, PgOptions, Sandbox};
use pgha_proxy::config::{Config, EtcdConfig, PoolMode};
use pgha_proxy::Shared;

pub struct Cluster {
    _sb: Sandbox,
    pub etcd: EtcdCluster,
    pub pg1: PgInstance,
    pub pg2: PgInstance,
    pub keys: Keys,
}

pub fn record(pg: &PgInstance, role: Role, lag: u64, noloadbalance: bool) -> Vec<u8> {
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
    pub fn start(label: &str) -> Cluster {
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

    pub fn put(&self, key: &str, value: Vec<u8>) {
        let eps = self.etcd.endpoints();
        let key = key.to_owned();
        super::runtime().block_on(async move {
            let mut c = etcd_client::Client::connect(eps, None).await.unwrap();
            c.put(key, value, None).await.unwrap();
        });
    }

    pub fn delete(&self, key: &str) {
        let eps = self.etcd.endpoints();
        let key = key.to_owned();
        super::runtime().block_on(async move {
            let mut c = etcd_client::Client::connect(eps, None).await.unwrap();
            c.delete(key, None).await.unwrap();
        });
    }

    /// The acknowledgement proxy `id` wrote, if any.
    pub fn proxy_ack(&self, id: &str) -> Option<ProxyAck> {
        let eps = self.etcd.endpoints();
        let key = self.keys.proxy(id);
        super::runtime().block_on(async move {
            let mut c = etcd_client::Client::connect(eps, None).await.ok()?;
            let resp = c.get(key, None).await.ok()?;
            let kv = resp.kvs().first()?;
            pgha_cluster::decode("ack", kv.value()).ok()
        })
    }

    pub fn config(&self, mode: PoolMode) -> Config {
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
    pub fn fail_over_to_pg2(&self) {
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

pub fn wait_routing(
    shared: &Shared,
    what: &str,
    ok: impl Fn(&pgha_proxy::router::RoutingTable) -> bool,
) {
    wait_until(what, Duration::from_secs(15), || {
        Ok(ok(&shared.topology.load()).then_some(()))
    })
    .unwrap();
}

pub fn leader_is(shared: &Shared, name: &str) {
    wait_routing(shared, &format!("leader {name}"), |t| {
        t.leader.as_ref().is_some_and(|l| l.name == name)
    });
}

pub fn server_port(raw: &mut Raw) -> u16 {
    raw.query("select inet_server_port()")[0].parse().unwrap()
}
