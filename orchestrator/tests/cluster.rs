//! Real clusters of three agents: bootstrap, replication, failover.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::time::Duration;

use common::{Cluster, SETTLE};
use pgha_local::wait_until;

#[test]
fn three_nodes_bootstrap_into_one_primary_and_two_streaming_replicas() {
    let c = Cluster::start_n("bootstrap", 3);
    let p = c.wait_healthy(SETTLE);
    let primary = &c.nodes[p];
    primary
        .psql("create table t(id int primary key, note text); insert into t values (1, 'hello')")
        .unwrap();
    for i in (0..3).filter(|&i| i != p) {
        c.wait_value(
            i,
            "select note from t where id = 1",
            "hello",
            Duration::from_secs(30),
        );
    }
    // Data checksums and SCRAM, as the issue asks.
    assert_eq!(primary.psql("show data_checksums").unwrap(), "on");
    assert_eq!(
        primary
            .psql("select count(*) from pg_authid where rolpassword like 'SCRAM-SHA-256%'")
            .unwrap(),
        "4"
    );
    // Patroni-style health checks and the status and metrics endpoints.
    for (i, n) in c.nodes.iter().enumerate() {
        let want = |yes: bool| if yes { 200 } else { 503 };
        assert_eq!(
            n.api_get("/primary").unwrap().0,
            want(i == p),
            "{}",
            n.name()
        );
        assert_eq!(
            n.api_get("/replica").unwrap().0,
            want(i != p),
            "{}",
            n.name()
        );
        assert_eq!(n.api_get("/read-only").unwrap().0, 200);
        assert_eq!(n.api_get("/health").unwrap().0, 200);
        assert_eq!(n.api_get("/liveness").unwrap().0, 200);
        assert_eq!(n.api_get("/async").unwrap().0, want(i != p));
        assert_eq!(n.api_get("/sync").unwrap().0, 503, "no synchronous mode");
    }
    let replica = (0..3).find(|&i| i != p).unwrap();
    let (_, status) = c.nodes[replica].api_get("/status").unwrap();
    assert!(status.contains("\"lsn\""), "{status}");
    wait_until("replica within 1MB of lag", Duration::from_secs(30), || {
        let code = c.nodes[replica]
            .api_get("/replica?lag=1MB")
            .map_err(|e| e.to_string())?
            .0;
        Ok((code == 200).then_some(()))
    })
    .unwrap();
    let (_, metrics) = c.nodes[p].api_get("/metrics").unwrap();
    for m in [
        "pgha_agent_role 1",
        "pgha_agent_postgres_up 1",
        "pgha_agent_timeline",
    ] {
        assert!(metrics.contains(m), "{m} missing in\n{metrics}");
    }
    let (code, cluster) = c.nodes[p].api_get("/cluster").unwrap();
    assert_eq!(code, 200);
    assert!(
        cluster.contains("node1") && cluster.contains("node3"),
        "{cluster}"
    );
    // One slot per replica, both in use.
    assert_eq!(
        primary
            .psql("select count(*) from pg_replication_slots where active")
            .unwrap(),
        "2"
    );
}

#[test]
fn sigkill_of_primary_postgres_and_agent_promotes_a_replica_that_accepts_writes() {
    let mut c = Cluster::start_n("failover", 3);
    let p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key, at timestamptz default now()); insert into probe default values")
        .unwrap();
    for i in (0..3).filter(|&i| i != p) {
        c.wait_value(
            i,
            "select count(*) from probe",
            "1",
            Duration::from_secs(30),
        );
    }
    let start = std::time::Instant::now();
    // Postgres first: it dies with its agent (parent-death signal).
    c.nodes[p].kill_postgres().unwrap();
    c.nodes[p].kill_agent().unwrap();
    let (new, at) = c.wait_writable(&[p], Duration::from_secs(60));
    let took = at - start;
    println!(
        "failover after SIGKILL of primary postgres+agent: {took:?} (to {})",
        c.nodes[new].name()
    );
    assert_ne!(new, p);
    assert!(took < Duration::from_secs(10 + 5), "took {took:?}");
    assert_eq!(c.writable_now(), vec![new], "exactly one writable primary");
    // The remaining replica follows the new leader.
    let other = (0..3).find(|&i| i != p && i != new).unwrap();
    c.nodes[new]
        .psql("insert into probe default values")
        .unwrap();
    c.wait_value(
        other,
        "select count(*) from probe",
        "3",
        Duration::from_secs(60),
    );
}

#[test]
fn crashed_leader_postgres_is_restarted_in_place_without_failover() {
    let c = Cluster::start_n("crash", 2);
    let p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key)")
        .unwrap();
    let start = std::time::Instant::now();
    c.nodes[p].kill_postgres().unwrap();
    let (new, at) = c.wait_writable(&[], Duration::from_secs(60));
    println!("leader postgres restarted in place after {:?}", at - start);
    assert_eq!(new, p, "the same node leads again");
    assert!(at - start < Duration::from_secs(5), "took {:?}", at - start);
    c.wait_healthy(SETTLE);
}

#[test]
fn sigterm_of_the_leader_agent_releases_the_key_so_a_replica_takes_over_at_once() {
    let mut c = Cluster::start_n("graceful", 3);
    let p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key)")
        .unwrap();
    let start = std::time::Instant::now();
    c.nodes[p].stop_agent().unwrap();
    let (new, at) = c.wait_writable(&[p], Duration::from_secs(60));
    println!(
        "graceful leader shutdown: {} writable after {:?}",
        c.nodes[new].name(),
        at - start
    );
    assert!(at - start < Duration::from_secs(5), "took {:?}", at - start);
}

#[test]
fn replicas_react_to_leader_key_deletion_through_the_watch_not_the_loop_tick() {
    // loop_wait 10s: a reaction within 4s can only come from the etcd watch.
    let o = pgha_local::AgentOptions {
        bootstrap: vec![
            "ttl = \"30s\"".into(),
            "loop_wait = \"10s\"".into(),
            "retry_timeout = \"3s\"".into(),
        ],
        ..pgha_local::AgentOptions::default()
    };
    let mut c = Cluster::start("watch", 1, &vec![o; 3]);
    let p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key)")
        .unwrap();
    let start = std::time::Instant::now();
    c.nodes[p].stop_agent().unwrap();
    let (_, at) = c.wait_writable(&[p], Duration::from_secs(60));
    println!(
        "promoted {:?} after the leader's SIGTERM (loop_wait 10s)",
        at - start
    );
    assert!(at - start < Duration::from_secs(4), "took {:?}", at - start);
}
