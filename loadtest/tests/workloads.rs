//! The load tools against a real PostgreSQL: the writer's bookkeeping of
//! acknowledged writes and outage windows, and pgbench's figures.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::time::Duration;

use pgha_loadtest::{missing_ids, pgbench, Writer};
use pgha_local::{wait_until, PgInstance, PgOptions, Sandbox};

#[test]
fn writer_records_acked_ids_and_the_outage_window_across_a_crash() {
    let sb = Sandbox::new("writer").unwrap();
    let mut pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let writer = Writer::new(pg.conn_str("postgres"), "acked");
    rt.block_on(writer.prepare()).unwrap();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn({
        let writer = writer.clone();
        async move {
            writer
                .run(async {
                    let _ = stop_rx.await;
                })
                .await
        }
    });
    let count = |pg: &PgInstance| -> u64 {
        pg.psql("select count(*) from acked")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    wait_until("some writes", Duration::from_secs(30), || {
        Ok((count(&pg) >= 50).then_some(()))
    })
    .unwrap();
    // Crash and restart the server under the writer.
    pg.kill().unwrap();
    pg.start().unwrap();
    let after_restart = count(&pg);
    wait_until("writes resume", Duration::from_secs(30), || {
        Ok((count(&pg) >= after_restart + 50).then_some(()))
    })
    .unwrap();
    stop_tx.send(()).unwrap();
    let out = rt.block_on(task).unwrap();

    assert!(out.acked.len() >= 100, "{} acked", out.acked.len());
    assert!(out.failures >= 1, "the crash must show as failed attempts");
    assert!(out.reconnects >= 1, "the writer reconnects on its own");
    assert_eq!(
        out.unavailable.len(),
        1,
        "one outage: {:?}",
        out.unavailable
    );
    assert!(out.worst_window() > Duration::ZERO);
    assert!(out.max_gap >= out.worst_window());
    let missing = rt
        .block_on(missing_ids(&pg.conn_str("postgres"), "acked", &out.acked))
        .unwrap();
    assert!(missing.is_empty(), "acknowledged but missing: {missing:?}");
}

#[test]
fn missing_ids_finds_what_is_not_there() {
    let sb = Sandbox::new("missing").unwrap();
    let pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    pg.psql("create table t(id bigint primary key); insert into t values (1), (3)")
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let missing = rt
        .block_on(missing_ids(&pg.conn_str("postgres"), "t", &[1, 2, 3, 4]))
        .unwrap();
    assert_eq!(missing, vec![2, 4]);
}

#[test]
fn pgbench_reports_tps_latency_and_p99_from_a_real_run() {
    let sb = Sandbox::new("pgbench").unwrap();
    let pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", &pg.conn_str("postgres")])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let args: Vec<String> = ["-n", "-S", "-M", "prepared", "-c", "2", "-t", "200"]
        .map(String::from)
        .to_vec();
    let r = pgbench::run(&pg.conn_str("postgres"), &args, &sb.subdir("logs").unwrap()).unwrap();
    assert_eq!(r.transactions, 400);
    assert_eq!(r.failed, 0);
    assert!(r.tps > 0.0);
    assert!(r.latency_p99 >= r.latency_avg / 10 && r.latency_p99 > Duration::ZERO);
}
