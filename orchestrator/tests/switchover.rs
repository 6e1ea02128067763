//! Planned switchover through the REST API.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::time::Duration;

use common::{Cluster, SETTLE};
use pgha_local::{wait_until, AgentOptions};

#[test]
fn switchover_moves_the_leader_to_the_named_candidate_and_refuses_a_nofailover_one() {
    let nofailover = AgentOptions {
        nofailover: true,
        ..AgentOptions::default()
    };
    let opts = [AgentOptions::default(), AgentOptions::default(), nofailover];
    let c = Cluster::start("switchover", 1, &opts);
    let p = c.wait_healthy(SETTLE);
    let leader = &c.nodes[p];

    // node3 is tagged nofailover: refused with a JSON error.
    let (code, body) = leader
        .api_send("POST", "/switchover", r#"{"candidate":"node3"}"#, true)
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("nofailover"), "{body}");
    if p == 2 {
        return; // a nofailover node cannot win the bootstrap race anyway
    }

    let cand = (0..2).find(|&i| i != p).unwrap();
    leader
        .psql("create table t(id int); insert into t values (1)")
        .unwrap();
    let body = format!(r#"{{"candidate":"{}"}}"#, c.nodes[cand].name());
    let start = std::time::Instant::now();
    let (code, resp) = leader.api_send("POST", "/switchover", &body, true).unwrap();
    assert_eq!(code, 202, "{resp}");
    wait_until("candidate is the primary", Duration::from_secs(60), || {
        Ok((c.nodes[cand].api_get("/primary").map(|r| r.0).unwrap_or(0) == 200).then_some(()))
    })
    .unwrap();
    println!("switchover took {:?}", start.elapsed());
    assert_eq!(c.writable_now(), vec![cand]);
    c.nodes[cand].psql("insert into t values (2)").unwrap();
    // The old leader follows the new one.
    c.wait_value(p, "select count(*) from t", "2", Duration::from_secs(120));
    assert!(!c.nodes[p].is_writable().unwrap());
    let (_, hist) = c.nodes[cand].api_get("/history").unwrap();
    assert!(hist.contains("switchover"), "{hist}");
}
