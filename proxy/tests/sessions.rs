//! A client session's life beyond single messages, through the proxy in
//! transaction mode: cancel (to the running query, never to another
//! client's), clients that vanish mid-transaction, mid-COPY or mid-query,
//! and the commands that pin a client to its server.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{config, first_value, one_server, primary, wait_backends, Raw, Running};
use pgha_local::wait_until;
use pgha_proxy::config::PoolMode;
use pgha_proxy::protocol::messages as msg;

/// The error code of the first ErrorResponse among `msgs`, if any.
fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .and_then(|(_, body)| msg::error_fields(body))
        .map(|f| f.code)
}

#[test]
fn cancel_reaches_the_running_query_and_never_another_clients() {
    let (_sb, pg, p) = one_server("px-cancel");
    let port = p.rw();
    let pg_port = pg.port();
    p.rt.block_on(async move {
        common::cancel_a_running_sleep(port, pg_port).await;

        // An idle client's cancel must not hit the next user of its server.
        let idle = Running::client(port).await;
        idle.simple_query("select 1").await.unwrap();
        let stale = idle.cancel_token();
        let b = Running::client(port).await;
        let bq = tokio::spawn(async move { b.simple_query("select pg_sleep(2)").await });
        // Sent while B's query runs on the server the idle client used
        // (the pool has one): a forwarded stale cancel would end it.
        tokio::task::spawn_blocking(move || {
            wait_backends(
                pg_port,
                "query = 'select pg_sleep(2)' and state = 'active'",
                1,
            );
        })
        .await
        .unwrap();
        stale.cancel_query(tokio_postgres::NoTls).await.unwrap();
        if let Err(e) = bq.await.unwrap() {
            panic!("another client's query failed: {}", common::db_message(&e));
        }
    });
}

#[test]
fn cancel_reaches_a_client_still_waiting_for_a_server() {
    let (_sb, pg) = primary("px-cancel-wait");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_secs(60);
    let p = Running::start(cfg);
    let port = p.rw();
    let shared = p.handle().shared.clone();
    let mut holder = Raw::connect(port);
    holder.query("begin");
    p.rt.block_on(async move {
        let b = Running::client(port).await;
        let token = b.cancel_token();
        let waiting = tokio::spawn(async move { b.simple_query("select 1").await });
        let s2 = shared.clone();
        tokio::task::spawn_blocking(move || {
            wait_until(
                "client B waits for the pool",
                Duration::from_secs(10),
                || {
                    Ok((s2
                        .pools
                        .snapshot()
                        .iter()
                        .map(|p| p.waiting())
                        .sum::<usize>()
                        == 1)
                        .then_some(()))
                },
            )
        })
        .await
        .unwrap()
        .unwrap();
        let released = "the waiting client is released by its cancel";
        common::cancel_ends(token, waiting, released).await;
    });
    holder.query("commit");
}

#[test]
fn a_client_that_vanishes_mid_transaction_never_hands_over_a_dirty_server() {
    let (_sb, pg, p) = one_server("px-vanish");
    pg.psql("create table v(x int)").unwrap();
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| msg::put_query(b, "begin; insert into v values (1)"));
    assert_eq!(a.until_ready().1, b'T');
    drop(a);
    let mut b = Raw::connect(p.rw());
    b.send_with(|m| msg::put_query(m, "select count(*) from v"));
    let got = b.until_ready_full();
    assert_eq!(first_value(&got), "0", "the insert was rolled back");
    assert_eq!(
        got.last().unwrap().1,
        b"I",
        "not inside the vanished transaction"
    );
}

/// LISTEN and SQL-level PREPARE leave state on the server that the
/// client's later transactions need. In transaction mode such a client
/// keeps its server (PgBouncer's lands on whichever is free: another
/// client gets its notifications, its EXECUTE fails), the others share the
/// rest of the pool, and the server is reset before anyone else gets it.
#[test]
fn listen_and_sql_prepare_keep_the_clients_server_and_it_is_reset_when_it_leaves() {
    let (_sb, pg) = primary("px-pin");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    cfg.checkout_timeout = Duration::from_secs(5);
    let p = Running::start(cfg);
    let mut a = Raw::connect(p.rw());
    let listen_pid = a.query("listen ch; select pg_backend_pid()::text")[0].clone();
    // B in a transaction holds a server: without the pin, the one A left.
    let mut b = Raw::connect(p.rw());
    b.query("begin");
    let b_pid = b.query("select pg_backend_pid()::text")[0].clone();
    assert_ne!(b_pid, listen_pid, "A's listening server was handed to B");
    assert_eq!(a.query("select pg_backend_pid()::text")[0], listen_pid);
    b.query("notify ch, 'hello'");
    b.send_with(|m| msg::put_query(m, "commit"));
    let got = b.until_ready_full();
    assert!(
        !got.iter().any(|(t, _)| *t == b'A'),
        "B got A's notification"
    );
    a.send_with(|m| msg::put_query(m, "select 1"));
    let got = a.until_ready_full();
    let note = got
        .iter()
        .find(|(t, _)| *t == b'A')
        .expect("A's notification reached A");
    assert!(String::from_utf8_lossy(&note.1).contains("hello"));

    a.query("prepare q as select 42");
    b.query("begin");
    b.send_with(|m| msg::put_query(m, "execute q"));
    let got = b.until_ready_full();
    assert_eq!(
        error_code(&got).as_deref(),
        Some("26000"),
        "A's statement is not B's"
    );
    b.query("rollback");
    assert_eq!(
        a.query("execute q"),
        ["42"],
        "A's EXECUTE finds its statement"
    );

    let shared = p.handle().shared.clone();
    let text = shared.metrics.render(&shared);
    assert!(
        text.lines()
            .any(|l| l == "pgha_proxy_clients_pinned_total 1"),
        "one client pinned once:\n{text}"
    );

    // A leaves: its server comes back reset. Both servers are looked at,
    // one held by C while D gets the other.
    drop(a);
    let mut c = Raw::connect(p.rw());
    let mut d = Raw::connect(p.rw());
    c.query("begin");
    for (who, r) in [("C", &mut c), ("D", &mut d)] {
        let state = r.query(
            "select (select count(*) from pg_listening_channels())::text || '/' || \
             (select count(*) from pg_prepared_statements)::text",
        );
        assert_eq!(state, ["0/0"], "{who}'s server still has A's state");
    }
    c.query("commit");
}

/// The first message a client gets is a FATAL with `code`, then the close.
fn closed_with(r: &mut Raw, code: &str) {
    let (tag, body) = r.recv();
    assert_eq!(tag, b'E', "an ErrorResponse");
    let f = msg::error_fields(&body).unwrap();
    assert_eq!(
        (f.severity.as_str(), f.code.as_str()),
        ("FATAL", code),
        "{}",
        f.message
    );
    r.expect_closed();
}

/// `idle_transaction_timeout` and `client_idle_timeout`, as PostgreSQL's
/// idle_in_transaction_session_timeout and idle_session_timeout: a client
/// that went quiet inside a transaction is closed with 25P03 once past
/// its limit, never before; its transaction is rolled back (its row lock
/// gone) and its server, the pool's only one, serves the next client
/// clean. A client quiet between transactions gets 57P05. A client that
/// keeps working, each statement well within the limits, is never
/// closed, however much longer than them it stays.
#[test]
fn clients_idle_past_their_limit_are_closed_and_their_transaction_rolled_back() {
    let (_sb, pg) = primary("px-idle");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_secs(10);
    let (in_tx_limit, idle_limit) = (Duration::from_secs(1), Duration::from_secs(2));
    cfg.idle_transaction_timeout = in_tx_limit;
    cfg.client_idle_timeout = idle_limit;
    let p = Running::start(cfg);
    pg.psql("create table idle_t(id int primary key, n int); insert into idle_t values (1, 0)")
        .unwrap();
    let think = Duration::from_millis(100);

    // Working: inside one transaction longer than its limit, then between
    // transactions longer than theirs.
    let mut worker = Raw::connect(p.rw());
    worker.query("begin");
    let began = Instant::now();
    while began.elapsed() < in_tx_limit * 3 / 2 {
        worker.query("update idle_t set n = n + 1 where id = 1");
        std::thread::sleep(think);
    }
    worker.query("commit");
    let began = Instant::now();
    while began.elapsed() < idle_limit * 5 / 4 {
        assert_eq!(worker.query("select 1"), ["1"]);
        std::thread::sleep(think);
    }
    let committed = worker.query("select n::text from idle_t where id = 1");
    drop(worker);

    // Quiet inside a transaction, holding a row lock and the only server.
    let mut idle = Raw::connect(p.rw());
    idle.query("begin");
    let quiet_from = Instant::now();
    idle.query("update idle_t set n = -1 where id = 1");
    // The next client waits for that server.
    let mut next = Raw::connect(p.rw());
    next.send_with(|m| {
        msg::put_query(
            m,
            "update idle_t set n = n + 1000 where id = 1 returning (n - 1000)::text",
        )
    });
    closed_with(&mut idle, "25P03");
    assert!(
        quiet_from.elapsed() >= in_tx_limit,
        "closed before its limit"
    );
    let got = next.until_ready_full();
    assert_eq!(
        first_value(&got),
        committed[0],
        "the quiet transaction was rolled back"
    );
    assert_eq!(got.last().unwrap().1, b"I", "the server came back clean");
    let shared = p.handle().shared.clone();
    let text = shared.metrics.render(&shared);
    assert!(
        text.lines()
            .any(|l| l == "pgha_proxy_errors_total{kind=\"idle_timeout\"} 1"),
        "counted once:\n{text}"
    );

    // Quiet between transactions (since before its last reply came).
    let quiet_from = Instant::now();
    assert_eq!(next.query("select 2"), ["2"]);
    closed_with(&mut next, "57P05");
    assert!(
        quiet_from.elapsed() >= idle_limit,
        "closed before its limit"
    );

    // The start of a message is not one: a client that sends a few bytes
    // of its next query and stalls is still quiet since its last reply.
    let mut stalled = Raw::connect(p.rw());
    stalled.query("begin");
    let quiet_from = Instant::now();
    stalled.query("select 3");
    stalled.send(b"Q\0\0");
    closed_with(&mut stalled, "25P03");
    assert!(
        quiet_from.elapsed() >= in_tx_limit,
        "closed before its limit"
    );
}

/// The same limits in session mode, where a client holds its server for
/// its whole life: quiet inside a transaction, 25P03, and the server is
/// closed, not reset and pooled (the next client gets a new backend and
/// the quiet transaction's row lock is gone); quiet between transactions,
/// 57P05, and the server is reset and kept for the next client.
#[test]
fn in_session_mode_idle_limits_close_the_client_and_free_or_keep_its_server() {
    let (_sb, pg) = primary("px-idle-session");
    let mut cfg = config(&pg, PoolMode::Session);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_secs(10);
    cfg.idle_transaction_timeout = Duration::from_millis(500);
    cfg.client_idle_timeout = Duration::from_millis(800);
    let p = Running::start(cfg);
    pg.psql("create table s(id int primary key, n int); insert into s values (1, 0)")
        .unwrap();
    let pid = "select pg_backend_pid()::text";

    let mut quiet_tx = Raw::connect(p.rw());
    let first = quiet_tx.query(pid)[0].clone();
    quiet_tx.query("begin");
    quiet_tx.query("update s set n = -1 where id = 1");
    closed_with(&mut quiet_tx, "25P03");
    let mut next = Raw::connect(p.rw());
    let second = next.query(pid)[0].clone();
    assert_ne!(
        first, second,
        "a server closed inside a transaction was pooled"
    );
    assert_eq!(
        next.query("update s set n = n + 1 where id = 1 returning n::text"),
        ["1"]
    );

    closed_with(&mut next, "57P05");
    let mut last = Raw::connect(p.rw());
    assert_eq!(last.query(pid), [second], "the clean server was kept");
}

/// How many clients the proxy pinned so far (`pgha_proxy_clients_pinned_total`).
fn pinned(p: &Running) -> u64 {
    let shared = p.handle().shared.clone();
    let text = shared.metrics.render(&shared);
    text.lines()
        .find_map(|l| l.strip_prefix("pgha_proxy_clients_pinned_total "))
        .map_or(0, |n| n.parse().unwrap())
}

/// Whether B's next statement finds a free server (one pool slot: it
/// cannot while a pinned client holds it) and, if it does, what it sees.
fn next_client_sees(p: &Running, sql: &str) -> Result<String, String> {
    let mut b = Raw::connect(p.rw());
    b.send_with(|m| msg::put_query(m, sql));
    let got = b.until_ready_full();
    match error_code(&got) {
        Some(code) => Err(code),
        None => Ok(first_value(&got)),
    }
}

/// In transaction mode a statement that may leave session state behind
/// (a SET of a custom GUC or search_path, alone, among other statements
/// or through the extended protocol; a temporary table; a session
/// advisory lock; a WITH HOLD cursor) pins its client, so its server and
/// the state never reach another client; the next client gets the server
/// only once the pinned one left (reset). What ends with its transaction
/// (SET LOCAL, ON COMMIT DROP, xact locks, plain cursors) and settings the
/// proxy carries itself (application_name, TimeZone) pin nothing. One pool
/// slot, so without the pin the next client would get the very server.
#[test]
fn session_state_that_outlives_its_transaction_keeps_the_clients_server() {
    let (_sb, pg) = primary("px-set");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_millis(700);
    let p = Running::start(cfg);
    let tenant = "coalesce(nullif(current_setting('app.tenant', true), ''), '-') || ' ' || \
        current_setting('search_path') || ' ' || current_setting('work_mem') || ' ' || \
        (select count(*) from pg_class where relnamespace = pg_my_temp_schema()) || ' ' || \
        (select count(*) from pg_cursors where is_holdable) || ' ' || \
        (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid())";
    let defaults = next_client_sees(&p, &format!("select {tenant}")).unwrap();
    assert!(defaults.starts_with("- "), "{defaults}");

    // Harmless: transaction-scoped, or carried by the proxy.
    let mut a = Raw::connect(p.rw());
    a.query("begin");
    a.query("set local app.tenant = 'a'");
    a.query("set local search_path = tenant_a");
    a.query("commit");
    a.query("begin; set local work_mem = '9MB'; select 1 where 'x' = 'x;y'; commit");
    a.query("begin; create temp table t1 (x int) on commit drop; commit");
    a.query("begin");
    a.query("select pg_advisory_xact_lock(7)");
    a.query("declare c1 cursor for select 1");
    a.query("commit");
    a.query("set application_name = 'tenant-app'");
    a.query("SET TIME ZONE 'Europe/Paris'");
    assert_eq!(pinned(&p), 0);
    assert_eq!(
        next_client_sees(&p, &format!("select {tenant}")).as_deref(),
        Ok(defaults.as_str()),
        "SET LOCAL left nothing and pinned nothing"
    );

    // Once A left, its server comes back reset: what the next client sees.
    let after_leaving = || {
        wait_until(
            "the pinned client's server back",
            Duration::from_secs(10),
            || Ok(next_client_sees(&p, &format!("select {tenant}")).ok()),
        )
        .unwrap()
    };
    for (how, sql) in [
        ("a custom setting", "set app.tenant = 'a'"),
        ("search_path", "SET search_path = tenant_a, public"),
        (
            "a SET among other statements",
            "begin; set work_mem = '77MB'; commit",
        ),
        (
            "a temporary table",
            "/* app */ create temp table t2 (x int)",
        ),
        ("a session advisory lock", "select pg_advisory_lock(42)"),
        (
            "a WITH HOLD cursor",
            "declare c2 cursor with hold for select 1",
        ),
    ] {
        let before = pinned(&p);
        let mut a = Raw::connect(p.rw());
        a.query(sql);
        let pid = a.query("select pg_backend_pid()::text");
        let next = next_client_sees(&p, &format!("select {tenant}"));
        assert!(
            next.is_err(),
            "{how}: another client got A's server: {next:?}"
        );
        assert_eq!(pinned(&p), before + 1, "{how} pins");
        assert_eq!(a.query("select pg_backend_pid()::text"), pid, "{how}");
        let mine = a.query(&format!("select {tenant}"));
        assert_ne!(mine[0], defaults, "{how}: A's setting holds for A");
        drop(a);
        assert_eq!(after_leaving(), defaults, "{how}: reset when A left");
    }

    // Through the extended protocol (tokio-postgres prepares the SET as
    // a named statement, then binds it).
    let c = p.client_with(|_| {}).unwrap();
    p.rt.block_on(c.execute("set search_path = tenant_c, public", &[]))
        .unwrap();
    assert_eq!(pinned(&p), 7);
    let next = next_client_sees(&p, &format!("select {tenant}"));
    assert!(
        next.is_err(),
        "extended SET: another client got C's server: {next:?}"
    );
    let mine =
        p.rt.block_on(c.query_one("select current_setting('search_path')", &[]));
    assert_eq!(mine.unwrap().get::<_, String>(0), "tenant_c, public");
    drop(c);
    assert_eq!(after_leaving(), defaults, "extended SET: reset when C left");
}

/// A client that vanishes in the middle of a COPY FROM STDIN, or while its
/// query runs inside a transaction, never leaves its server to the next
/// client: the next one (pool of one) gets a clean server at once, the
/// query is cancelled, and nothing the vanished client sent is committed.
/// A statement outside a transaction block is left to finish.
#[test]
fn a_client_that_vanishes_mid_copy_or_mid_query_leaves_no_dirty_server() {
    let (_sb, pg, p) = one_server("px-vanish-busy");
    pg.psql("create table w(x int)").unwrap();

    let mut a = Raw::connect(p.rw());
    a.send_with(|b| msg::put_query(b, "copy w from stdin"));
    assert_eq!(a.recv().0, b'G');
    a.send_with(|b| msg::put_copy_data(b, b"1\n2\n"));
    drop(a);
    let mut b = Raw::connect(p.rw());
    assert_eq!(b.query("select count(*) from w"), ["0"], "half a COPY");
    b.send_with(|m| msg::put_query(m, "select 1"));
    let (tags, status) = b.until_ready();
    assert_eq!(
        (tags, status),
        (vec![b'T', b'D', b'C', b'Z'], b'I'),
        "not inside the COPY"
    );
    drop(b);

    let mut c = Raw::connect(p.rw());
    c.query("begin");
    c.send_with(|m| msg::put_query(m, "insert into w values (3); select pg_sleep(30)"));
    let inserting = "query like 'insert into w%'";
    wait_backends(pg.port(), inserting, 1);
    let vanished = std::time::Instant::now();
    drop(c);
    // The proxy sees the client go while its query runs (it does not wait
    // for the reply), cancels the query and closes that server.
    wait_backends(pg.port(), inserting, 0);
    let mut d = Raw::connect(p.rw());
    assert_eq!(d.query("select count(*) from w"), ["0"], "rolled back");
    assert!(
        vanished.elapsed() < Duration::from_secs(10),
        "the next client waited for the vanished one's query: {:?}",
        vanished.elapsed()
    );

    // Outside a transaction block the statement runs on and commits, as
    // it would had the client been connected directly.
    let mut e = Raw::connect(p.rw());
    e.send_with(|m| msg::put_query(m, "select pg_sleep(1); insert into w values (5)"));
    wait_backends(pg.port(), "query like 'select pg_sleep(1); insert%'", 1);
    drop(e);
    wait_until(
        "the vanished client's insert to commit",
        Duration::from_secs(10),
        || {
            let n = pg.psql("select count(*) from w where x = 5");
            Ok(matches!(n.as_deref(), Ok("1")).then_some(()))
        },
    )
    .unwrap();
}
