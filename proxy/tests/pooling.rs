//! Pooling and routing through the proxy against a real PostgreSQL 15:
//! psql, tokio-postgres and pgbench in every query mode, both pool modes,
//! limits and the release rule. (Authentication: `auth.rs`.)

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{config, primary, proxy_backends, psql, waiting_for_backend, Running};
use pgha_proxy::config::PoolMode;

#[test]
fn psql_on_the_read_write_port_reaches_a_primary_and_writes() {
    let (_sb, pg) = primary("px-psql");
    let p = Running::start(config(&pg, PoolMode::Transaction));
    assert_eq!(
        psql(p.rw(), "select pg_is_in_recovery()", &[]).unwrap(),
        "f"
    );
    psql(
        p.rw(),
        "create table t(x int); insert into t values (1)",
        &[],
    )
    .unwrap();
    assert_eq!(pg.psql("select count(*) from t").unwrap(), "1");
}

#[test]
fn tokio_postgres_prepared_statements_survive_across_transactions_in_transaction_mode() {
    let (_sb, pg) = primary("px-tokio");
    let p = Running::start(config(&pg, PoolMode::Transaction));
    let port = p.rw();
    p.rt.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(Running::client(port).await);
        }
        // Each client prepares once; its statements run later on whichever
        // of the 4 pooled server connections is free.
        let mut stmts = Vec::new();
        for c in &clients {
            stmts.push(c.prepare("select $1::int + 1").await.unwrap());
        }
        for round in 0..5 {
            let futs = clients.iter().zip(&stmts).map(|(c, s)| async move {
                c.query_one(s, &[&round]).await.unwrap().get::<_, i32>(0)
            });
            let got = futures::future::join_all(futs).await;
            assert!(got.iter().all(|v| *v == round + 1), "{got:?}");
        }
        let mut c = Running::client(port).await;
        let tx = c.transaction().await.unwrap();
        tx.execute("create temp table tt(x int)", &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
    });
}

fn pgbench(port: u16, args: &[&str]) -> String {
    let out = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg("postgres")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

fn pgbench_every_mode(mode: PoolMode, label: &str) {
    let (_sb, pg) = primary(label);
    let out = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p"])
        .arg(pg.port().to_string())
        .args(["-U", "postgres", "postgres"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut cfg = config(&pg, mode);
    // Session mode needs one server per client; transaction mode shares 4.
    if mode == PoolMode::Session {
        cfg.pool_size = 8;
    }
    let p = Running::start(cfg);
    for m in ["simple", "extended", "prepared"] {
        // One thread per client: `-M prepared` prepares with a blocking
        // PQprepare, which, with clients sharing a thread, stalls the
        // thread's other clients inside their transactions, holding their
        // servers, while it waits for one. Six clients on four servers
        // then deadlock on the row locks of TPC-B's single branch until
        // the checkout timeout (on any transaction pooler).
        let text = pgbench(p.rw(), &["-M", m, "-c", "6", "-j", "6", "-t", "100"]);
        assert!(
            text.contains("number of transactions actually processed: 600/600"),
            "-M {m}: {text}"
        );
        assert!(!text.contains("error"), "-M {m}: {text}");
    }
}

#[test]
fn pgbench_simple_extended_and_prepared_all_pass_in_transaction_mode() {
    pgbench_every_mode(PoolMode::Transaction, "px-bench-tx");
}

#[test]
fn pgbench_simple_extended_and_prepared_all_pass_in_session_mode() {
    pgbench_every_mode(PoolMode::Session, "px-bench-sess");
}

#[test]
fn clients_beyond_max_client_conn_are_refused_with_53300() {
    let (_sb, pg) = primary("px-maxconn");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.max_client_conn = 2;
    let p = Running::start(cfg);
    let port = p.rw();
    p.rt.block_on(async {
        let a = Running::client(port).await;
        let b = Running::client(port).await;
        let err = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .expect("third client must be refused");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
            "{err}"
        );
        a.simple_query("select 1").await.unwrap();
        b.simple_query("select 1").await.unwrap();
    });
}

#[test]
fn an_open_transaction_holds_its_server_and_others_time_out_waiting_then_proceed() {
    let (_sb, pg) = primary("px-release");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_millis(300);
    let p = Running::start(cfg);
    let port = p.rw();
    p.rt.block_on(async {
        let a = Running::client(port).await;
        let b = Running::client(port).await;
        a.batch_execute("begin; select 1").await.unwrap();
        let err = b.simple_query("select 2").await.unwrap_err();
        let text = common::db_message(&err);
        assert!(text.contains("no server connection available"), "{text}");
        // A failed transaction ('E') keeps the server too.
        assert!(a.batch_execute("select 1/0").await.is_err());
        let err = b.simple_query("select 2").await.unwrap_err();
        let text = common::db_message(&err);
        assert!(text.contains("no server connection available"), "{text}");
        a.batch_execute("rollback").await.unwrap();
        let v: i32 = b.query_one("select 2", &[]).await.unwrap().get(0);
        assert_eq!(v, 2);
    });
}

#[test]
fn waiting_clients_get_a_returned_connection_at_once_and_the_pool_stays_within_its_size() {
    let (_sb, pg) = primary("px-handoff");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    // A handoff missed (a connection idle while a client waits for a
    // slot) would surface as this timeout.
    cfg.checkout_timeout = Duration::from_secs(3);
    let p = Running::start(cfg);
    let port = p.rw();
    let pg_port = pg.port();
    p.rt.block_on(async {
        // The server's view of the proxy's connections (by their
        // application_name: the harness's readiness psql may still be
        // exiting when the load starts).
        let observer = Running::client(pg_port).await;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let done = done.clone();
            tokio::spawn(async move {
                let mut most = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let n: i64 = observer
                        .query_one(
                            "select count(*) from pg_stat_activity \
                             where application_name = 'pgha-proxy'",
                            &[],
                        )
                        .await
                        .unwrap()
                        .get(0);
                    most = most.max(n);
                }
                most
            })
        };
        let mut tasks = Vec::new();
        for _ in 0..8 {
            tasks.push(tokio::spawn(async move {
                let c = Running::client(port).await;
                for _ in 0..40 {
                    // Simple queries: nothing left for the end (a statement
                    // Close would hold a server while the client quits, and
                    // that server connection is then replaced).
                    c.simple_query("select pg_sleep(0.001)")
                        .await
                        .expect("every transaction gets a connection in time");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let most = sampler.await.unwrap();
        assert!(
            (1..=2).contains(&most),
            "server connections at once: {most}, pool_size 2"
        );
    });
}

#[test]
fn session_mode_resets_the_server_before_the_next_client() {
    let (_sb, pg) = primary("px-session");
    let mut cfg = config(&pg, PoolMode::Session);
    cfg.pool_size = 1;
    let p = Running::start(cfg);
    let port = p.rw();
    p.rt.block_on(async {
        let a = Running::client(port).await;
        a.batch_execute("set work_mem = '7MB'; create temp table tmp(x int)")
            .await
            .unwrap();
        let pid_a: i32 = a
            .query_one("select pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        drop(a);
        // pool_size 1: the next client waits for the same server connection.
        let b = Running::client(port).await;
        let row = b
            .query_one("select pg_backend_pid(), current_setting('work_mem')", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), pid_a, "same server connection");
        assert_eq!(
            row.get::<_, String>(1),
            "4MB",
            "SET was reset by DISCARD ALL"
        );
        assert!(b.simple_query("select * from tmp").await.is_err());
    });
}

#[test]
fn idle_servers_close_after_the_idle_timeout_and_min_idle_stays_open() {
    let (_sb, pg) = primary("px-idle");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.server_idle_timeout = Duration::from_millis(300);
    let p = Running::start(cfg);
    let mut clients: Vec<_> = (0..3).map(|_| common::Raw::connect(p.rw())).collect();
    for c in &mut clients {
        c.query("begin");
    }
    assert_eq!(proxy_backends(&pg), 3);
    for c in &mut clients {
        c.query("commit");
    }
    pgha_local::wait_until("idle servers closed", Duration::from_secs(10), || {
        Ok((proxy_backends(&pg) == 0).then_some(()))
    })
    .unwrap();
    // Clients never noticed: the next transaction gets a fresh server.
    assert_eq!(clients[0].query("select 1"), vec!["1"]);
    drop(p);

    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.min_idle = 2;
    let p = Running::start(cfg);
    common::Raw::connect(p.rw()).query("select 1");
    pgha_local::wait_until("min_idle servers open", Duration::from_secs(20), || {
        let n = proxy_backends(&pg);
        if n == 2 {
            Ok(Some(()))
        } else {
            Err(format!("{n} proxy backends").into())
        }
    })
    .unwrap();
}

/// `max_backend_connections` bounds the server connections to a backend
/// across its pools (three here, one per startup `options`), whatever
/// each pool's own size: a pool needing one more while the backend is
/// full and nothing is idle waits, then gets the checkout timeout; once
/// another pool's server is idle, it closes that one and opens its own;
/// a waiting client gets the room as soon as another pool's transaction
/// ends. The backend never has more than the bound.
#[test]
fn max_backend_connections_bounds_a_backends_servers_across_pools() {
    let (_sb, pg) = primary("px-cap");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 5;
    cfg.max_backend_connections = 2;
    cfg.checkout_timeout = Duration::from_millis(1500);
    let p = Running::start(cfg);
    let client = |mb: u32| {
        p.client_with(|c| {
            c.options(format!("-c work_mem={mb}MB"));
        })
        .unwrap()
    };
    let (a, b, c) = (client(5), client(6), client(7));
    p.rt.block_on(async {
        a.batch_execute("begin").await.unwrap();
        b.batch_execute("begin").await.unwrap();
    });
    assert_eq!(proxy_backends(&pg), 2);
    let err = p.first_cell(&c, "show work_mem").unwrap_err();
    let text = common::db_message(&err);
    assert!(text.contains("no server connection available"), "{text}");
    assert_eq!(proxy_backends(&pg), 2, "past the bound");

    // A's server is idle now: C's pool closes it and opens its own.
    p.rt.block_on(a.batch_execute("commit")).unwrap();
    assert_eq!(p.first_cell(&c, "show work_mem").unwrap(), "7MB");
    common::wait_proxy_backends_at_most(&pg, 2);

    // C holds its server in a transaction, B still holds its own: A waits,
    // and gets in when B's transaction ends.
    p.rt.block_on(c.batch_execute("begin")).unwrap();
    let a_query =
        p.rt.spawn(async move { a.simple_query("show work_mem").await.map(|_| a) });
    pgha_local::wait_until("A waits for room", Duration::from_secs(10), || {
        Ok((waiting_for_backend(&p) == 1).then_some(()))
    })
    .unwrap();
    p.rt.block_on(b.batch_execute("commit")).unwrap();
    let a =
        p.rt.block_on(a_query)
            .unwrap()
            .expect("A got a server within its checkout timeout");
    assert_eq!(p.first_cell(&a, "show work_mem").unwrap(), "5MB");
    common::wait_proxy_backends_at_most(&pg, 2);
    assert_eq!(waiting_for_backend(&p), 0);
    p.rt.block_on(c.batch_execute("commit")).unwrap();
    drop(p);

    // One pool on a backend bounded to one connection: a client waiting
    // for room takes its own pool's connection as soon as it is idle.
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 5;
    cfg.max_backend_connections = 1;
    cfg.checkout_timeout = Duration::from_secs(10);
    let p = Running::start(cfg);
    let port = p.rw();
    let (x, y) =
        p.rt.block_on(async { (Running::client(port).await, Running::client(port).await) });
    p.rt.block_on(x.batch_execute("begin")).unwrap();
    let y_query =
        p.rt.spawn(async move { y.simple_query("select 1").await.map(|_| ()) });
    pgha_local::wait_until("Y waits for room", Duration::from_secs(10), || {
        Ok((waiting_for_backend(&p) == 1).then_some(()))
    })
    .unwrap();
    p.rt.block_on(x.batch_execute("commit")).unwrap();
    p.rt.block_on(y_query)
        .unwrap()
        .expect("Y got X's connection when it went idle");
    assert_eq!(proxy_backends(&pg), 1, "past the bound");
    drop(p);

    // With room on the backend, a new connection closes no other pool's.
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.max_backend_connections = 5;
    let p = Running::start(cfg);
    let client = |mb: u32| {
        p.client_with(|c| {
            c.options(format!("-c work_mem={mb}MB"));
        })
        .unwrap()
    };
    let (q, r) = (client(5), client(6));
    let pid = "select pg_backend_pid()::text";
    let q_server = p.first_cell(&q, pid).unwrap();
    assert_ne!(p.first_cell(&r, pid).unwrap(), q_server);
    assert_eq!(
        p.first_cell(&q, pid).unwrap(),
        q_server,
        "Q's idle server was closed"
    );
}

/// Transaction mode hands each transaction whichever server is free; the
/// client's session settings (its startup application_name, a SET
/// TimeZone) go with it, and another client never sees them.
#[test]
fn session_settings_follow_each_client_across_server_connections() {
    let (_sb, pg) = primary("px-vars");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    let p = Running::start(cfg);
    let default_tz = pg.psql("show timezone").unwrap();
    assert_ne!(default_tz, "Asia/Tokyo");
    let connect = |name: &str| {
        p.client_with(|c| {
            c.application_name(name);
        })
        .unwrap()
    };
    let (a, b) = (connect("app-a"), connect("app-b"));
    let one = |c: &tokio_postgres::Client, sql: &str| -> String {
        p.first_cell(c, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };

    one(&a, "set timezone = 'Asia/Tokyo'");
    // B takes the server A just used (the most recently idle) and keeps it.
    one(&b, "begin");
    assert_eq!(one(&b, "show timezone"), default_tz, "A's SET leaked to B");
    // A runs on the other server, which must be given A's setting.
    assert_eq!(one(&a, "show timezone"), "Asia/Tokyo");
    one(&b, "commit");
    assert_eq!(
        one(&a, "select current_setting('application_name')"),
        "app-a"
    );
    assert_eq!(
        one(&b, "select current_setting('application_name')"),
        "app-b"
    );
    assert_eq!(one(&a, "show timezone"), "Asia/Tokyo");
    assert_eq!(one(&b, "show timezone"), default_tz);

    // Settled: a server that already agrees with the client gets no SET.
    let shared = p.handle().shared.clone();
    let synced = || -> u64 {
        let text = shared.metrics.render(&shared);
        let line = text
            .lines()
            .find(|l| l.starts_with("pgha_proxy_session_settings_synced_total"))
            .unwrap_or_else(|| panic!("no settings counter in {text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    one(&a, "select 1"); // B ran last on the server A gets back
    let before = synced();
    assert!(before >= 3, "the SETs above were counted: {before}");
    for _ in 0..20 {
        one(&a, "select 1");
    }
    assert_eq!(synced(), before, "no SET for a server that agrees");
}

/// A client's startup `options` (libpq's PGOPTIONS) hold in every
/// transaction, whichever pooled server runs it: clients with other
/// options, or none, use other pools and never see them. PgBouncer refuses
/// such clients; dropping the options silently would run a client without
/// the statement_timeout it asked for. A bad option is refused at once
/// with the server's reason, not after the wait for a server that is down.
#[test]
fn startup_options_hold_in_every_transaction_and_bad_ones_are_refused_at_once() {
    let (_sb, pg) = primary("px-options");
    pg.psql("create schema s1; create table s1.t(x int); insert into s1.t values (42)")
        .unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.leader_wait_timeout = Duration::from_secs(30);
    let p = Running::start(cfg);
    let try_connect = |options: &str| {
        p.client_with(|c| {
            c.options(options);
        })
    };
    let connect = |options: &str| try_connect(options).unwrap();
    let one = |c: &tokio_postgres::Client, sql: &str| p.first_cell(c, sql);
    let a = connect("-c search_path=s1 -c statement_timeout=300");
    let b = connect("");
    for round in 0..3 {
        assert_eq!(one(&a, "show search_path").unwrap(), "s1", "round {round}");
        assert_eq!(one(&a, "select x from t").unwrap(), "42");
        assert_eq!(
            one(&b, "show search_path").unwrap(),
            "\"$user\", public",
            "A's options reached B in round {round}"
        );
        assert!(
            one(&b, "select x from t").is_err(),
            "B has no s1 on its path"
        );
        let slow = one(&a, "select pg_sleep(2)").unwrap_err();
        assert_eq!(
            slow.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "A's statement_timeout holds: {slow:?}"
        );
        assert_eq!(
            one(&b, "select pg_sleep(0.5)").unwrap(),
            "",
            "B has no timeout"
        );
    }
    let pools = p.handle().shared.pools.snapshot();
    let with = pools
        .iter()
        .filter(|pl| pl.login().options == "-c search_path=s1 -c statement_timeout=300")
        .count();
    assert_eq!(with, 1, "one pool for A's options");
    assert!(
        pools.iter().any(|pl| pl.login().options.is_empty()),
        "one for B"
    );

    // Its pool's first server is opened at login, for the greeting.
    let started = std::time::Instant::now();
    let err = try_connect("-c no_such_setting=1").unwrap_err();
    let text = common::db_message(&err);
    assert!(
        text.contains("no_such_setting"),
        "the server's reason: {text}"
    );
    assert_eq!(err.code().map(|c| c.code()), Some("08004"), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refused at once, not after leader_wait_timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(one(&a, "select x from t").unwrap(), "42", "others carry on");
}

/// The statements prepared on one server connection are bounded by
/// `prepared_cache_size`: past it the least recently used is closed on
/// the server, and a client's statement that was closed there is prepared
/// again when the client next uses it.
#[test]
fn a_server_connection_holds_at_most_prepared_cache_size_statements() {
    let (_sb, pg) = primary("px-stmt-cache");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.prepared_cache_size = 3;
    let p = Running::start(cfg);
    let port = p.rw();
    p.rt.block_on(async move {
        let c = Running::client(port).await;
        let mut stmts = Vec::new();
        for i in 0..6i32 {
            let s = c.prepare(&format!("select $1::int4 + {i}")).await.unwrap();
            stmts.push((i, s));
        }
        for round in 0..2 {
            for (i, s) in &stmts {
                let row = c.query_one(s, &[&100i32]).await.unwrap();
                assert_eq!(row.get::<_, i32>(0), 100 + i, "round {round}");
                // The only server connection, as it is now.
                let held = c
                    .simple_query("select count(*) from pg_prepared_statements")
                    .await
                    .unwrap();
                let n: usize = held
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0)?.parse().ok(),
                        _ => None,
                    })
                    .unwrap();
                assert!(n <= 3, "{n} statements on the server, limit 3");
            }
        }
    });
}
