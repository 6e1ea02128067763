//! End to end, as `pgha up` starts it: etcd, three agents in synchronous mode
//! and the proxy as real processes. An application writing through the
//! read-write port survives the loss of its primary, the freeze of its
//! agent (fenced in time), a planned switchover and a proxy restart without
//! losing an acknowledged write, and the read-only port never serves a read
//! from a node that lost the leadership.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::time::{Duration, Instant};

use pgha_loadtest::reader::{read_until, ReadOutcome};
use pgha_loadtest::{missing_ids, WriteOutcome, Writer};
use pgha_local::{sibling_binary, wait_until, LocalStack, StackOptions};

fn stack() -> LocalStack {
    LocalStack::up(&StackOptions {
        dir: None,
        etcd_members: 3,
        nodes: 3,
        synchronous: true,
        pool_mode: "transaction".into(),
        conventional_ports: false,
        agent_bin: sibling_binary("pgha-agent").unwrap(),
        proxy_bin: sibling_binary("pgha-proxy").unwrap(),
    })
    .unwrap()
}

/// A writer on the read-write port and a reader on the read-only port,
/// running on their own runtime until `stop` is called.
struct Load {
    rt: tokio::runtime::Runtime,
    stop: tokio::sync::watch::Sender<bool>,
    writer: tokio::task::JoinHandle<WriteOutcome>,
    reader: tokio::task::JoinHandle<ReadOutcome>,
}

fn start_load(stack: &LocalStack, table: &str) -> Load {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut writer = Writer::new(stack.rw_url(), table);
    // The proxy holds a transaction for up to 20s while the leader changes.
    writer.statement_timeout = Duration::from_secs(30);
    rt.block_on(writer.prepare()).unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let w = rt.spawn({
        let rx = rx.clone();
        async move { writer.run(stopped(rx)).await }
    });
    let ro = stack.ro_url();
    let r = rt.spawn(async move { read_until(&ro, stopped(rx)).await });
    Load {
        rt,
        stop,
        writer: w,
        reader: r,
    }
}

impl Load {
    fn acked_so_far(stack: &LocalStack, table: &str) -> u64 {
        stack
            .psql_rw(&format!("select count(*) from {table}"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn finish(self) -> (WriteOutcome, ReadOutcome, tokio::runtime::Runtime) {
        self.stop.send(true).unwrap();
        let w = self.rt.block_on(self.writer).unwrap();
        let r = self.rt.block_on(self.reader).unwrap();
        (w, r, self.rt)
    }
}

fn wait_for_more_writes(stack: &LocalStack, table: &str, more: u64) {
    let base = Load::acked_so_far(stack, table);
    wait_until("writes to go on", Duration::from_secs(120), || {
        Ok((Load::acked_so_far(stack, table) >= base + more).then_some(()))
    })
    .unwrap();
}

/// Every acknowledged id is in `table` on node `node`.
fn assert_no_acked_write_lost(
    stack: &LocalStack,
    rt: &tokio::runtime::Runtime,
    node: usize,
    table: &str,
    w: &WriteOutcome,
) {
    let conn = format!(
        "host=127.0.0.1 port={} user=postgres password={} dbname=app",
        stack.agents()[node].pg_port(),
        stack.state().password
    );
    let missing = rt.block_on(missing_ids(&conn, table, &w.acked)).unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}

/// Waits until `n` replicas stream from node `leader`.
fn wait_streaming_from(stack: &LocalStack, leader: usize, n: usize, what: &str) {
    wait_until(what, Duration::from_secs(120), || {
        let streaming = stack.agents()[leader]
            .psql("select count(*) from pg_stat_replication where state = 'streaming'")
            .map_err(|e| e.to_string())?;
        Ok((streaming == n.to_string()).then_some(()))
    })
    .unwrap();
}

#[test]
fn acknowledged_writes_survive_killing_the_primary_behind_the_proxy() {
    let mut stack = stack();
    let table = "e2e_kill";
    let load = start_load(&stack, table);
    wait_for_more_writes(&stack, table, 200);

    let old = stack.leader_index().unwrap();
    // The agent first (so it cannot restart postgres), then its postgres if
    // it did not already go down with the agent.
    stack.agent_mut(old).kill_agent().unwrap();
    if stack.agents()[old].postmaster_pid().is_some() {
        stack.agent_mut(old).kill_postgres().unwrap();
    }
    let new = wait_until("a new leader", Duration::from_secs(60), || {
        Ok(stack.leader_index().filter(|l| *l != old))
    })
    .unwrap();
    wait_for_more_writes(&stack, table, 200);
    let (w, r, rt) = load.finish();

    println!(
        "primary kill: write unavailability {:?} (windows {:?}), {} acked, {} failed attempts, {} reconnects",
        w.worst_window(),
        w.unavailable,
        w.acked.len(),
        w.failures,
        w.reconnects
    );
    assert_eq!(
        w.reconnects, 0,
        "the writer's client connection must survive the failover: {:?}",
        w.last_errors
    );
    assert_no_acked_write_lost(&stack, &rt, new, table, &w);
    // (The old primary is dead: whether a live one still gets reads is
    // the frozen-agent test's question.)
    assert!(!r.reads.is_empty(), "the reader must have read");
    // The cluster heals: the surviving replica streams from the new leader
    // (rewound first if it had received WAL the new leader never got).
    let healed = "the other replica to stream from the new leader";
    wait_streaming_from(&stack, new, 1, healed);
}

/// The leader's agent freezes (SIGSTOP: a stalled agent, a debugger, a
/// frozen cgroup) while its postgres runs on, and nobody renews the lease.
/// Its fencing keeper, a process of its own, stops that postgres before the
/// lease can expire, so no two nodes ever take writes at once; the writer
/// behind the proxy loses no acknowledged write, and once resumed the old
/// agent rejoins as a replica. (Without the keeper the old postgres stays
/// writable: the proxy then keeps every client off it, which
/// `proxy/tests/failover.rs` checks with a primary left writable.)
#[test]
fn a_frozen_primary_agent_is_fenced_before_another_node_leads() {
    let stack = stack();
    let table = "e2e_frozen";
    let load = start_load(&stack, table);
    wait_for_more_writes(&stack, table, 200);
    let old = stack.leader_index().unwrap();
    stack.agents()[old].pause_agent().unwrap();
    let writable = || -> Vec<usize> {
        (0..stack.agents().len())
            .filter(|i| stack.agents()[*i].is_writable().unwrap_or(false))
            .collect()
    };
    let mut two_primaries = Vec::new();
    let new = wait_until("another node to lead", Duration::from_secs(60), || {
        let now = writable();
        if now.len() > 1 {
            two_primaries.push(now.clone());
        }
        Ok(now.into_iter().find(|i| *i != old))
    })
    .unwrap();
    assert!(
        two_primaries.is_empty(),
        "two nodes took writes at once: {two_primaries:?}"
    );
    assert_eq!(
        stack.agents()[old].postmaster_pid(),
        None,
        "the frozen agent's postgres must be stopped before another node leads"
    );
    let log = std::fs::read_to_string(stack.agents()[old].agent_log()).unwrap();
    assert!(
        log.contains("fence keeper: the agent has not renewed its lease in time"),
        "the keeper, not something else, stopped it"
    );
    wait_for_more_writes(&stack, table, 200);
    let (w, _r, rt) = load.finish();
    println!(
        "frozen primary agent: write unavailability {:?}, {} acked, {} failed",
        w.worst_window(),
        w.acked.len(),
        w.failures
    );
    assert_eq!(w.reconnects, 0, "{:?}", w.last_errors);
    assert_no_acked_write_lost(&stack, &rt, new, table, &w);
    // Woken, the old agent finds its lease gone and another leader, and
    // its postgres follows the new leader.
    stack.agents()[old].resume_agent().unwrap();
    let rejoined = "the old primary and the other replica to stream from the new leader";
    wait_streaming_from(&stack, new, 2, rejoined);
}

#[test]
fn switchover_behind_the_proxy_fails_no_transaction() {
    let stack = stack();
    let table = "e2e_switchover";
    let load = start_load(&stack, table);
    wait_for_more_writes(&stack, table, 200);
    let old = stack.leader_index().unwrap();
    // In synchronous mode only the synchronous standby may take over.
    let candidate = (0..stack.agents().len())
        .find(|i| {
            stack.agents()[*i]
                .api_get("/sync")
                .is_ok_and(|(status, _)| status == 200)
        })
        .unwrap();
    assert_ne!(candidate, old);
    let body = format!(
        r#"{{"leader":"{}","candidate":"{}"}}"#,
        stack.agents()[old].name(),
        stack.agents()[candidate].name()
    );
    let (status, text) = stack.agents()[old]
        .api_send("POST", "/switchover", &body, true)
        .unwrap();
    assert!(status < 300, "switchover refused: {status} {text}");
    wait_until("the candidate to lead", Duration::from_secs(60), || {
        Ok((stack.leader_index() == Some(candidate)).then_some(()))
    })
    .unwrap();
    let led_at = Instant::now();
    wait_for_more_writes(&stack, table, 200);
    let (w, r, _rt) = load.finish();
    // The old primary lives on as a replica: from the moment the candidate
    // alone was writable, no read may find the old one writable again.
    let stale = r.primary_reads_from(stack.agents()[old].pg_port(), led_at);
    assert!(
        stale.is_empty(),
        "reads served by the old primary as a primary: {stale:?}"
    );
    println!(
        "switchover: write pause {:?}, {} acked, {} failed",
        w.max_gap,
        w.acked.len(),
        w.failures
    );
    assert_eq!(w.failures, 0, "failed transactions: {:?}", w.last_errors);
    assert_eq!(w.reconnects, 0);
    // About 0.3 s here; bounded below the proxy's switchover drain bound
    // (3 s), which a pause that waited it out would reach.
    assert!(
        w.max_gap < Duration::from_secs(2),
        "writes paused {:?}",
        w.max_gap
    );
}

#[test]
fn restarting_the_proxy_under_load_loses_no_acknowledged_write() {
    let mut stack = stack();
    let table = "e2e_proxy_restart";
    let load = start_load(&stack, table);
    wait_for_more_writes(&stack, table, 200);
    stack.proxy_mut().kill().unwrap();
    stack.proxy_mut().start_again().unwrap();
    wait_for_more_writes(&stack, table, 200);
    let (w, _r, rt) = load.finish();
    println!(
        "proxy restart: write unavailability {:?}, {} reconnects",
        w.worst_window(),
        w.reconnects
    );
    assert!(
        w.reconnects >= 1,
        "the client reconnects after the proxy died"
    );
    let missing = rt
        .block_on(missing_ids(&stack.rw_url(), table, &w.acked))
        .unwrap();
    assert!(missing.is_empty(), "acknowledged writes lost: {missing:?}");
}
