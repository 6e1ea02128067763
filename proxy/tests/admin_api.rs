//! The admin API's actions on a running proxy: POST `/reconnect`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config, http, primary, Running};
use pgha_local::{wait_until, PgInstance};
use pgha_proxy::config::PoolMode;

/// Waits until the server process `pid` has exited.
fn wait_gone(pg: &PgInstance, pid: &str) {
    wait_until(
        &format!("server process {pid} to exit"),
        Duration::from_secs(10),
        || {
            let n = pg.psql(&format!(
                "select count(*) from pg_stat_activity where pid = {pid}"
            ))?;
            Ok((n == "0").then_some(()))
        },
    )
    .unwrap();
}

/// RECONNECT, as PgBouncer's: idle server connections of the named
/// database (or of all) close at once, a busy one when its transaction
/// ends, and the clients carry on on new ones without an error; other
/// databases' servers stay.
#[test]
fn reconnect_replaces_idle_servers_now_and_busy_ones_when_released() {
    let (_sb, pg) = primary("px-reconnect");
    pg.psql("create database reports").unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.admin_token = Some("tok".into());
    let p = Running::start(cfg);
    let admin = p.handle().admin_addr.port();
    let client = |db: &str| {
        p.client_with(|c| {
            c.dbname(db);
        })
        .unwrap()
    };
    let (busy, idle, other) = (client("postgres"), client("postgres"), client("reports"));
    let pid = |c: &tokio_postgres::Client| p.first_cell(c, "select pg_backend_pid()").unwrap();
    // busy holds a server in its transaction; idle's and other's went
    // back to their pools.
    p.rt.block_on(busy.batch_execute("begin")).unwrap();
    let busy_pid = pid(&busy);
    let idle_pid = pid(&idle);
    let other_pid = pid(&other);
    assert_ne!(busy_pid, idle_pid);

    let r = http(admin, "POST", "/reconnect?database=postgres", None);
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let r = http(admin, "POST", "/reconnect?database=postgres", Some("tok"));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.ends_with("reconnecting 1 pools\n"), "{r}");
    // The idle server closes now; the busy one serves its transaction on.
    wait_gone(&pg, &idle_pid);
    assert_eq!(pid(&busy), busy_pid);
    p.rt.block_on(busy.batch_execute("commit")).unwrap();
    wait_gone(&pg, &busy_pid);
    // Both go on, on a new server; reports kept its own.
    let next = pid(&idle);
    assert!(next != idle_pid && next != busy_pid, "{next}");
    assert_ne!(pid(&busy), busy_pid);
    assert_eq!(pid(&other), other_pid);

    // Without a database: every pool.
    let r = http(admin, "POST", "/reconnect", Some("tok"));
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    // postgres's new pool and reports's.
    assert!(r.ends_with("reconnecting 2 pools\n"), "{r}");
    wait_gone(&pg, &other_pid);
    assert_ne!(pid(&other), other_pid);
}
