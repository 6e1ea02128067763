//! The safety invariants under faults: no acknowledged commit lost in
//! synchronous mode, a leader cut off from etcd fences itself in time with
//! never two writable primaries, pause mode really takes no action, and
//! the fencing keeper is kept running.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, SplitBrainWatch, SETTLE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgha_local::{processes_under, psql_with_password, wait_until, AgentOptions};

fn opts(n: usize, bootstrap: &[&str]) -> Vec<AgentOptions> {
    let o = AgentOptions {
        bootstrap: bootstrap.iter().map(|s| s.to_string()).collect(),
        ..AgentOptions::default()
    };
    vec![o; n]
}

#[test]
fn synchronous_mode_loses_no_acknowledged_insert_when_the_primary_is_killed() {
    let mut c = Cluster::start("sync", 1, &opts(3, &["synchronous_mode = true"]));
    let p = c.wait_healthy(SETTLE);
    let sync = wait_until("a synchronous standby", Duration::from_secs(60), || {
        Ok((0..3).find(|&i| c.nodes[i].api_get("/sync").is_ok_and(|r| r.0 == 200)))
    })
    .unwrap();
    assert_ne!(sync, p);
    c.nodes[p]
        .psql("create table acked(id int primary key)")
        .unwrap();

    let acked = Arc::new(Mutex::new(Vec::new()));
    let port = c.nodes[p].pg_port();
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            for id in 1.. {
                if psql_with_password(port, &format!("insert into acked values ({id})")).is_err() {
                    return;
                }
                acked.lock().unwrap().push(id);
            }
        })
    };
    wait_until("30 acknowledged inserts", Duration::from_secs(60), || {
        Ok((acked.lock().unwrap().len() >= 30).then_some(()))
    })
    .unwrap();
    // Postgres first: it dies with its agent (parent-death signal).
    c.nodes[p].kill_postgres().unwrap();
    c.nodes[p].kill_agent().unwrap();
    writer.join().unwrap();
    let acked = acked.lock().unwrap().clone();

    let (new, _) = c.wait_writable_sql(&[p], "select 1", Duration::from_secs(60));
    assert_eq!(new, sync, "only the listed sync standby may be promoted");
    let ids = acked
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let found = c.nodes[new]
        .psql(&format!("select count(*) from acked where id in ({ids})"))
        .unwrap();
    println!(
        "{} acknowledged inserts, {found} found on the new primary",
        acked.len()
    );
    assert_eq!(
        found,
        acked.len().to_string(),
        "an acknowledged insert was lost"
    );
}

#[test]
fn leader_cut_off_from_etcd_stops_writes_before_its_ttl_and_no_two_primaries_exist() {
    let c = Cluster::start("fencing", 3, &opts(3, &[]));
    let p = c.wait_healthy(SETTLE);
    let ports = c.nodes.iter().map(|n| n.pg_port()).collect();
    let watch = SplitBrainWatch::start(ports);

    let frozen_at = Instant::now();
    for i in 0..3 {
        c.etcd.pause(i).unwrap();
    }
    wait_until(
        "the leader to stop accepting writes",
        Duration::from_secs(30),
        || Ok((!c.nodes[p].is_writable().unwrap_or(false)).then_some(())),
    )
    .unwrap();
    let fenced = frozen_at.elapsed();
    println!("leader fenced {fenced:?} after etcd froze (ttl 10s)");
    // The last renewal may have been up to loop_wait (2s) before the freeze,
    // so the lease can expire 8s after it: writes must stop before that.
    assert!(fenced < Duration::from_secs(8), "fenced after {fenced:?}");
    // Past the TTL with etcd still frozen: nobody may be writable.
    wait_until("the TTL to pass", Duration::from_secs(30), || {
        assert_eq!(
            c.writable_now(),
            Vec::<usize>::new(),
            "writable without etcd"
        );
        Ok((frozen_at.elapsed() > Duration::from_secs(12)).then_some(()))
    })
    .unwrap();
    for i in 0..3 {
        c.etcd.resume(i).unwrap();
    }
    let (new, _) = c.wait_writable_sql(&[], "select 1", Duration::from_secs(90));
    println!("after etcd came back, {} leads", c.nodes[new].name());
    assert_eq!(
        watch.finish(),
        1,
        "at most one writable primary at any moment"
    );
}

#[test]
fn pause_mode_promotes_and_restarts_nothing_until_resumed() {
    let mut c = Cluster::start_n("pause", 3);
    let p = c.wait_healthy(SETTLE);
    let (code, body) = c.nodes[p]
        .api_send("PATCH", "/config", r#"{"pause":true}"#, true)
        .unwrap();
    assert_eq!(code, 200, "{body}");
    wait_until("every agent paused", Duration::from_secs(30), || {
        Ok(c.nodes
            .iter()
            .all(|n| {
                n.api_get("/status")
                    .is_ok_and(|r| r.1.contains("\"paused\":true"))
            })
            .then_some(()))
    })
    .unwrap();
    c.nodes[p].kill_postgres().unwrap();
    let killed = Instant::now();
    // Longer than ttl + primary_start_timeout: nothing may happen.
    wait_until("20s of nothing", Duration::from_secs(60), || {
        assert_eq!(
            c.writable_now(),
            Vec::<usize>::new(),
            "promoted while paused"
        );
        assert!(
            c.nodes[p].psql("select 1").is_err(),
            "restarted while paused"
        );
        Ok((killed.elapsed() > Duration::from_secs(20)).then_some(()))
    })
    .unwrap();
    let (code, body) = c.nodes[p]
        .api_send("PATCH", "/config", r#"{"pause":false}"#, true)
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (new, _) = c.wait_writable_sql(&[], "select 1", Duration::from_secs(60));
    assert_eq!(c.writable_now(), vec![new]);
    let _ = &mut c;
}

#[test]
fn leader_agent_killed_alone_takes_its_postgres_down_and_no_two_primaries_exist() {
    let mut c = Cluster::start_n("agent-kill", 3);
    let p = c.wait_healthy(SETTLE);
    let ports = c.nodes.iter().map(|n| n.pg_port()).collect();
    let watch = SplitBrainWatch::start(ports);
    let start = Instant::now();
    c.nodes[p].kill_agent().unwrap();
    wait_until(
        "the orphaned postgres to stop",
        Duration::from_secs(10),
        || Ok(c.nodes[p].psql("select 1").is_err().then_some(())),
    )
    .unwrap();
    println!("orphaned primary postgres gone after {:?}", start.elapsed());
    let (new, at) = c.wait_writable_sql(&[p], "select 1", Duration::from_secs(60));
    println!("{} promoted after {:?}", c.nodes[new].name(), at - start);
    assert_eq!(
        watch.finish(),
        1,
        "at most one writable primary at any moment"
    );
}

/// The fencing keeper (a process of its own, which fences a stalled
/// agent's postgres: see the e2e frozen-agent test) is started again when
/// it dies, and `pgha_agent_fence_keeper_up` says whether one runs.
#[test]
fn a_killed_fencing_keeper_is_started_again() {
    let c = Cluster::start_n("keeper", 1);
    c.wait_healthy(SETTLE);
    let node = &c.nodes[0];
    let keepers = || -> Vec<u32> {
        processes_under(&node.data_dir())
            .into_iter()
            .filter(|(_, cmdline)| cmdline.contains("--fence-keeper"))
            .map(|(pid, _)| pid)
            .collect()
    };
    let first = keepers();
    assert_eq!(first.len(), 1, "one keeper per agent: {first:?}");
    let keeper_up = || {
        node.api_get("/metrics")
            .is_ok_and(|(_, text)| text.lines().any(|l| l == "pgha_agent_fence_keeper_up 1"))
    };
    assert!(keeper_up());
    kill(Pid::from_raw(first[0] as i32), Signal::SIGKILL).unwrap();
    let second = wait_until("another keeper", Duration::from_secs(20), || {
        let now = keepers();
        Ok((now.len() == 1 && now != first).then(|| now[0]))
    })
    .unwrap();
    assert_ne!(second, first[0]);
    wait_until("the metric to say so", Duration::from_secs(5), || {
        Ok(keeper_up().then_some(()))
    })
    .unwrap();
}
