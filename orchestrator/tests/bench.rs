//! Failover-time measurements (ignored by default; run with
//! `cargo nextest run -p pgha-orchestrator --test bench --run-ignored only --no-capture`).
//! `PGHA_BENCH_KILLS` sets the number of kills (default 20).

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, SETTLE};

fn kills() -> usize {
    std::env::var("PGHA_BENCH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let median = times[times.len() / 2];
    let worst = times[times.len() - 1];
    let all: Vec<String> = times
        .iter()
        .map(|t| format!("{:.2}", t.as_secs_f64()))
        .collect();
    println!(
        "{what}: n={} median={:.2}s worst={:.2}s best={:.2}s all=[{}]",
        times.len(),
        median.as_secs_f64(),
        worst.as_secs_f64(),
        times[0].as_secs_f64(),
        all.join(" ")
    );
}

#[test]
#[ignore = "benchmark: minutes long"]
fn bench_failover_time_after_sigkill_of_primary_postgres_and_agent() {
    let mut c = Cluster::start_n("bench-failover", 3);
    let mut p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key, at timestamptz default now())")
        .unwrap();
    let mut times = Vec::new();
    for round in 0..kills() {
        c.wait_healthy(SETTLE);
        let start = Instant::now();
        // Postgres first: it dies with its agent (parent-death signal).
        c.nodes[p].kill_postgres().unwrap();
        c.nodes[p].kill_agent().unwrap();
        let (new, at) = c.wait_writable(&[p], Duration::from_secs(60));
        times.push(at - start);
        println!(
            "round {round}: {} -> {} in {:?}",
            c.nodes[p].name(),
            c.nodes[new].name(),
            at - start
        );
        c.nodes[p].restart_agent().unwrap();
        p = new;
    }
    report(
        "failover (SIGKILL primary postgres+agent, default ttl 10s)",
        times,
    );
}

#[test]
#[ignore = "benchmark: minutes long"]
fn bench_leader_postgres_crash_restarted_in_place() {
    let c = Cluster::start_n("bench-crash", 3);
    let p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key)")
        .unwrap();
    let mut times = Vec::new();
    for _ in 0..kills() {
        c.wait_healthy(SETTLE);
        let start = Instant::now();
        c.nodes[p].kill_postgres().unwrap();
        let (new, at) = c.wait_writable(&[], Duration::from_secs(60));
        assert_eq!(new, p);
        times.push(at - start);
    }
    report("postgres crash on the leader (agent alive)", times);
}
