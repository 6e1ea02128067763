//! `[[pools]]` entries on a running proxy: each database's (or user's)
//! pool size and pool mode, what /metrics and /status say of them, and a
//! reload that changes them.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{config, metric, primary, proxy_backends_in, Running};
use pgha_local::wait_until;
use pgha_proxy::config::{PoolMode, PoolRule};

#[test]
fn pools_entries_size_their_databases_pools_and_a_reload_resizes_them() {
    let (sb, pg) = primary("px-pool-rules");
    pg.psql("create database reports").unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    cfg.checkout_timeout = Duration::from_millis(500);
    cfg.pools = vec![PoolRule {
        database: Some("reports".into()),
        pool_size: Some(1),
        ..PoolRule::default()
    }];
    let p = Running::start(cfg.clone());
    let client = |db: &str| p.client_in(db).unwrap();
    let (a, b, r1, r2) = (
        client("postgres"),
        client("postgres"),
        client("reports"),
        client("reports"),
    );
    let begin = |c: &tokio_postgres::Client| p.rt.block_on(c.batch_execute("begin"));
    // The top-level pool_size: two transactions at once in postgres.
    begin(&a).unwrap();
    begin(&b).unwrap();
    // The entry's: one in reports; the second waits, then times out.
    begin(&r1).unwrap();
    let err = p.first_cell(&r2, "select 1").unwrap_err();
    let text = common::db_message(&err);
    assert!(text.contains("no server connection available"), "{text}");
    assert_eq!(proxy_backends_in(&pg, "postgres"), 2);
    assert_eq!(proxy_backends_in(&pg, "reports"), 1);
    let sizes = || {
        let mut s: Vec<(String, usize)> = (p.handle().shared.pools.snapshot().iter())
            .filter(|pool| !pool.is_retired())
            .map(|pool| (pool.login().database.clone(), pool.settings().size))
            .collect();
        s.sort();
        s
    };
    assert_eq!(sizes(), [("postgres".into(), 2), ("reports".into(), 1)]);
    // /metrics: each pool's servers under its own database, none lost to
    // another pool of the same backend and route.
    let shared = p.handle().shared.clone();
    let active = |db: &str| {
        let series = format!(
            "pgha_proxy_server_connections{{state=\"active\",database=\"{db}\",user=\"postgres\",backend=\"{}\",route=\"rw\"}}",
            shared.topology.load().leader.as_ref().unwrap().id()
        );
        metric(&shared.metrics.render(&shared), &series)
    };
    assert_eq!((active("postgres"), active("reports")), (2.0, 1.0));
    for c in [&a, &b, &r1] {
        p.rt.block_on(c.batch_execute("commit")).unwrap();
    }

    // A reload that changes the entry replaces the pools: reports now
    // holds two transactions at once.
    let path = sb.path().join("reload.toml");
    let mut next = cfg;
    next.pools[0].pool_size = Some(2);
    std::fs::write(&path, toml::to_string(&next).unwrap()).unwrap();
    let r = pgha_proxy::reload::reload(&p.handle().shared, &path).unwrap();
    assert_eq!(r.applied, ["pools"]);
    begin(&r1).unwrap();
    begin(&r2).unwrap();
    // The replaced pool's idle server has closed, or is about to: its
    // backend leaves pg_stat_activity when it has seen the EOF.
    common::wait_backends(
        pg.port(),
        "application_name = 'pgha-proxy' and datname = 'reports'",
        2,
    );
    assert!(sizes().contains(&("reports".into(), 2)), "{:?}", sizes());
    // The replaced pools left no series behind: postgres's was not made
    // again, so no series names it.
    let text = shared.metrics.render(&shared);
    assert!(!text.contains("database=\"postgres\""), "{text}");
    assert_eq!(active("reports"), 2.0);
    for c in [&r1, &r2] {
        p.rt.block_on(c.batch_execute("commit")).unwrap();
    }
}

/// A `[[pools]]` entry in session mode under a transaction-mode proxy:
/// its database's clients keep their server for their whole session
/// (state made inside a function, which transaction mode cannot see,
/// stays with its client), the server is reset before the next client;
/// other databases pool per transaction.
#[test]
fn a_pools_entry_in_session_mode_keeps_its_clients_servers() {
    let (_sb, pg) = primary("px-pool-mode");
    pg.psql("create database legacy").unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_millis(500);
    cfg.pools = vec![PoolRule {
        database: Some("legacy".into()),
        pool_mode: Some(PoolMode::Session),
        pool_size: Some(2),
        ..PoolRule::default()
    }];
    let p = Running::start(cfg);
    let client = |db: &str| p.client_in(db).unwrap();
    let cell = |c: &tokio_postgres::Client, sql: &str| p.first_cell(c, sql);
    let setting = "select current_setting('app.v', true)";

    // Transaction mode in postgres: one server serves both clients.
    let (a, b) = (client("postgres"), client("postgres"));
    let pid = cell(&a, "select pg_backend_pid()").unwrap();
    assert_eq!(cell(&b, "select pg_backend_pid()").unwrap(), pid);

    // Session mode in legacy: L holds its server between its
    // transactions, with what its function call set; M, logging in
    // meanwhile, gets the other one (in transaction mode it would run on
    // L's, idle between L's transactions, and see L's setting).
    let l = client("legacy");
    let l_pid = cell(&l, "select pg_backend_pid()").unwrap();
    cell(&l, "select set_config('app.v', 'mine', false)").unwrap();
    let m = client("legacy");
    let m_pid = cell(&m, "select pg_backend_pid()").unwrap();
    assert_ne!(m_pid, l_pid);
    assert_eq!(cell(&m, setting).unwrap(), "");
    // A session-mode login takes a server: with both held, N cannot log in.
    let err = p.client_in("legacy").unwrap_err();
    let text = common::db_message(&err);
    assert!(text.contains("no server connection available"), "{text}");
    assert_eq!(cell(&l, "select pg_backend_pid()").unwrap(), l_pid);
    assert_eq!(cell(&l, setting).unwrap(), "mine");
    let status = |db: &str| {
        let pools = p.handle().shared.pools.snapshot();
        let pool = pools.iter().find(|x| x.login().database == db).unwrap();
        pool.settings().mode
    };
    assert_eq!(status("legacy"), PoolMode::Session);
    assert_eq!(status("postgres"), PoolMode::Transaction);

    // L leaves: N logs in on its server, reset.
    drop(l);
    let n = wait_until("N logs in", Duration::from_secs(10), || {
        Ok(p.client_in("legacy").ok())
    })
    .unwrap();
    assert_eq!(cell(&n, "select pg_backend_pid()").unwrap(), l_pid);
    assert_eq!(cell(&n, setting).unwrap(), "");
    assert_eq!(cell(&m, "select pg_backend_pid()").unwrap(), m_pid);
}

/// PgBouncer's reserve pool. With pool_size 1 and reserve_pool_size 1, a
/// second transaction waits reserve_pool_timeout, then gets a second
/// server; a third waits until checkout_timeout (the reserve is spent).
/// Once nobody waits and the connections closed (server_idle_timeout),
/// the reserve slot goes again.
#[test]
fn a_client_waiting_past_reserve_pool_timeout_gets_a_reserve_connection() {
    let (_sb, pg) = primary("px-reserve");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.reserve_pool_size = 1;
    cfg.reserve_pool_timeout = Duration::from_millis(300);
    cfg.checkout_timeout = Duration::from_secs(2);
    cfg.server_idle_timeout = Duration::from_millis(500);
    let p = Running::start(cfg);
    let client = || p.client_in("postgres").unwrap();
    let (a, b, c) = (client(), client(), client());
    let begin = |c: &tokio_postgres::Client| p.rt.block_on(c.batch_execute("begin"));
    begin(&a).unwrap();
    let started = std::time::Instant::now();
    begin(&b).unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "served after {waited:?}"
    );
    assert_eq!(proxy_backends_in(&pg, "postgres"), 2);
    let pools = p.handle().shared.pools.snapshot();
    let [pool] = &pools[..] else {
        panic!("one pool expected, got {}", pools.len())
    };
    assert_eq!(pool.reserve_in_use(), 1);
    let status = common::http(p.handle().admin_addr.port(), "GET", "/status", None);
    assert!(status.contains("\"reserve\": 1"), "{status}");
    // The reserve is spent: the next client waits until checkout_timeout.
    let err = p.first_cell(&c, "select 1").unwrap_err();
    let text = common::db_message(&err);
    assert!(text.contains("no server connection available"), "{text}");
    assert_eq!(proxy_backends_in(&pg, "postgres"), 2);
    for c in [&a, &b] {
        p.rt.block_on(c.batch_execute("commit")).unwrap();
    }
    // Both idle connections time out; the freed reserve slot is forgotten.
    wait_until("the reserve slot to go", Duration::from_secs(10), || {
        Ok((pool.reserve_in_use() == 0 && !pool.in_use()).then_some(()))
    })
    .unwrap();
    common::wait_proxy_backends_at_most(&pg, 0);
    // And the pool serves again, from its own slot.
    assert_eq!(p.first_cell(&c, "select 7").unwrap(), "7");
}
