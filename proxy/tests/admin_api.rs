//! The admin API's actions on a running proxy: POST `/reconnect`.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config, http, primary, Running};
use pgha_local::{wait_until, PgInstance};
use pgha_proxy::config::PoolMode;

/// Waits until the server process `pid` has exited.
fn wait_gone(pg: &PgInstance, pid: &str) {
    common::wait_backends(pg.port(), &format!("pid = {pid}"), 0);
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
    let client = |db: &str| p.client_in(db).unwrap();
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

/// A client waiting for a slot in a pool that /reconnect replaces moves
/// to the new pool and is served at once, instead of waiting out its
/// checkout timeout in line for the old pool's busy server.
#[test]
fn reconnect_moves_waiting_clients_to_the_new_pool() {
    let (_sb, pg) = primary("px-reconnect-wait");
    let mut cfg = config(&pg, PoolMode::Session);
    cfg.admin_token = Some("tok".into());
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_secs(20);
    let p = Running::start(cfg);
    let admin = p.handle().admin_addr.port();
    let port = p.rw();
    // A holds the pool's one server for its session.
    let a = p.client_with(|_| {}).unwrap();
    let a_pid = p.first_cell(&a, "select pg_backend_pid()").unwrap();
    // B's login waits for it.
    let b = p.rt.spawn(async move { Running::client(port).await });
    let waiting = || {
        let pools = p.handle().shared.pools.snapshot();
        pools.iter().map(|x| x.waiting()).sum::<usize>()
    };
    wait_until("B waits for a server", Duration::from_secs(10), || {
        Ok((waiting() == 1).then_some(()))
    })
    .unwrap();
    let r = http(admin, "POST", "/reconnect", Some("tok"));
    assert!(r.ends_with("reconnecting 1 pools\n"), "{r}");
    // Without the move, B would wait until A leaves or its checkout
    // timeout ends (then its login fails).
    let b = p.rt.block_on(b).unwrap();
    let b_pid = p.first_cell(&b, "select pg_backend_pid()").unwrap();
    assert_ne!(b_pid, a_pid);
    // A keeps its server until it leaves; then it closes.
    assert_eq!(p.first_cell(&a, "select pg_backend_pid()").unwrap(), a_pid);
    drop(a);
    wait_gone(&pg, &a_pid);
}
