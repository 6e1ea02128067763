//! Losing one etcd member of three is not a reason to demote anybody.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, SETTLE};
use pgha_local::{wait_until, AgentOptions};

#[test]
fn leader_keeps_writing_through_the_loss_of_one_etcd_member() {
    let mut c = Cluster::start("etcd-loss", 3, &vec![AgentOptions::default(); 2]);
    let p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key)")
        .unwrap();
    c.etcd.kill(0).unwrap();
    let killed = Instant::now();
    // Longer than ttl: the leader must stay writable and keep its key.
    wait_until(
        "15s with one etcd member dead",
        Duration::from_secs(60),
        || {
            assert_eq!(c.writable_now(), vec![p], "the leader was demoted");
            c.nodes[p].psql("insert into probe default values").unwrap();
            Ok((killed.elapsed() > Duration::from_secs(15)).then_some(()))
        },
    )
    .unwrap();
    // The cluster still reacts: a switchover through the surviving members.
    let cand = 1 - p;
    let body = format!(r#"{{"candidate":"{}"}}"#, c.nodes[cand].name());
    let (code, resp) = c.nodes[p]
        .api_send("POST", "/switchover", &body, true)
        .unwrap();
    assert_eq!(code, 202, "{resp}");
    wait_until("candidate leads", Duration::from_secs(60), || {
        Ok((c.nodes[cand].api_get("/primary").is_ok_and(|r| r.0 == 200)).then_some(()))
    })
    .unwrap();
    c.wait_healthy(SETTLE);
}
