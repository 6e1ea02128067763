//! The protocol's hard cases through the proxy in transaction mode, with a
//! raw client that controls every message: pipelines, Flush, errors, COPY,
//! vanished clients, notices, prepared statements and cancel.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{config, primary, Raw, Running};
use pgha_local::wait_until;
use pgha_proxy::config::PoolMode;
use pgha_proxy::protocol::messages as msg;

fn parse(b: &mut BytesMut, name: &str, sql: &str) {
    let mut rest = sql.as_bytes().to_vec();
    rest.extend_from_slice(&[0, 0, 0]);
    msg::put_parse(b, name, &rest);
}

/// Parse (unnamed) + Bind + Execute + Sync for `sql`.
fn unnamed_query(b: &mut BytesMut, sql: &str) {
    parse(b, "", sql);
    msg::put_bind_simple(b, "", "");
    msg::put_execute(b, "", 0);
    msg::put_empty(b, b'S');
}

fn one_server(label: &str) -> (pgha_local::Sandbox, pgha_local::PgInstance, Running) {
    let (sb, pg) = primary(label);
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_millis(300);
    let p = Running::start(cfg);
    (sb, pg, p)
}

fn first_value(msgs: &[(u8, Vec<u8>)]) -> String {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
    String::from_utf8_lossy(&body[6..6 + len]).into_owned()
}

#[test]
fn several_syncs_in_flight_each_get_their_replies_in_order() {
    let (_sb, _pg, p) = one_server("px-pipe");
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| {
        unnamed_query(b, "select 1");
        unnamed_query(b, "select 2");
        msg::put_query(b, "select 3");
    });
    for want in ["1", "2", "3"] {
        let got = a.until_ready_full();
        assert_eq!(first_value(&got), want);
        assert_eq!(got.last().unwrap().1, b"I");
    }
    // The server went back to the pool: another client gets it.
    let mut b = Raw::connect(p.rw());
    assert_eq!(b.query("select 4"), vec!["4"]);
}

#[test]
fn flush_without_sync_keeps_the_server_until_the_sync() {
    let (_sb, _pg, p) = one_server("px-flush");
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| {
        parse(b, "s1", "select 41 + 1");
        msg::put_target(b, b'D', b'S', "s1");
        msg::put_empty(b, b'H');
    });
    assert_eq!(a.recv().0, b'1');
    assert_eq!(a.recv().0, b't');
    assert_eq!(a.recv().0, b'T');
    // Still attached: a second client cannot get the only server.
    let mut b = Raw::connect(p.rw());
    b.send_with(|m| msg::put_query(m, "select 1"));
    let (tags, _) = b.until_ready();
    assert_eq!(
        tags[0], b'E',
        "pool exhausted while the Flush holds the server"
    );
    a.send_with(|b| {
        msg::put_bind_simple(b, "", "s1");
        msg::put_execute(b, "", 0);
        msg::put_empty(b, b'S');
    });
    let got = a.until_ready_full();
    assert_eq!(first_value(&got), "42");
    assert_eq!(b.query("select 1"), vec!["1"]);
}

#[test]
fn an_error_mid_pipeline_skips_to_the_sync_and_the_next_group_runs() {
    let (_sb, _pg, p) = one_server("px-pipe-err");
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| {
        parse(b, "bad", "selec 1");
        msg::put_bind_simple(b, "", "bad");
        msg::put_execute(b, "", 0);
        msg::put_empty(b, b'S');
        unnamed_query(b, "select 5");
    });
    let (tags, status) = a.until_ready();
    assert_eq!((tags, status), (vec![b'E', b'Z'], b'I'));
    assert_eq!(first_value(&a.until_ready_full()), "5");
    // The failed Parse left nothing behind: the name can be used again.
    a.send_with(|b| {
        parse(b, "bad", "select 6");
        msg::put_bind_simple(b, "", "bad");
        msg::put_execute(b, "", 0);
        msg::put_empty(b, b'S');
    });
    let got = a.until_ready_full();
    assert_eq!(got[0].0, b'1');
    assert_eq!(first_value(&got), "6");
}

#[test]
fn copy_in_out_and_copy_fail_work_and_release_the_server() {
    let (_sb, pg, p) = one_server("px-copy");
    pg.psql("create table c(x int)").unwrap();
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| msg::put_query(b, "copy c from stdin"));
    assert_eq!(a.recv().0, b'G');
    a.send_with(|b| {
        msg::put_copy_data(b, b"1\n2\n");
        msg::put_empty(b, b'c');
    });
    let (tags, status) = a.until_ready();
    assert_eq!((tags, status), (vec![b'C', b'Z'], b'I'));
    a.send_with(|b| msg::put_query(b, "copy c to stdout"));
    let got = a.until_ready_full();
    let data: Vec<_> = got
        .iter()
        .filter(|(t, _)| *t == b'd')
        .map(|(_, d)| d.clone())
        .collect();
    assert_eq!(data, vec![b"1\n".to_vec(), b"2\n".to_vec()]);
    a.send_with(|b| msg::put_query(b, "copy c from stdin"));
    assert_eq!(a.recv().0, b'G');
    a.send_with(|b| msg::put_copy_fail(b, "client gave up"));
    let (tags, status) = a.until_ready();
    assert_eq!((tags, status), (vec![b'E', b'Z'], b'I'));
    let mut b = Raw::connect(p.rw());
    assert_eq!(b.query("select count(*) from c"), vec!["2"]);
}

#[test]
fn copy_data_sent_after_the_server_ended_the_copy_takes_no_server() {
    let (_sb, pg, p) = one_server("px-copy-err");
    pg.psql("create table ce(x int)").unwrap();
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| msg::put_query(b, "copy ce from stdin"));
    assert_eq!(a.recv().0, b'G');
    // A bad row: the server ends the COPY with an error at once.
    a.send_with(|b| msg::put_copy_data(b, b"not a number\n"));
    let (tags, status) = a.until_ready();
    assert_eq!((tags, status), (vec![b'E', b'Z'], b'I'));
    // The client was still streaming: the rest of its rows and CopyDone
    // arrive after the server let the COPY go. Nothing answers them.
    a.send_with(|b| {
        msg::put_copy_data(b, b"2\n3\n");
        msg::put_empty(b, b'c');
    });
    // The pool's only server is free for another client (checkout
    // timeout 300 ms), not held for the stale messages.
    let mut b = Raw::connect(p.rw());
    assert_eq!(b.query("select count(*) from ce"), vec!["0"]);
    assert_eq!(a.query("select 1"), vec!["1"]);
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

#[test]
fn notices_and_notifications_reach_the_client() {
    let (_sb, pg) = primary("px-notice");
    let p = Running::start(config(&pg, PoolMode::Session));
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| msg::put_query(b, "do $$ begin raise notice 'hello'; end $$"));
    let got = a.until_ready_full();
    let notice = got
        .iter()
        .find(|(t, _)| *t == b'N')
        .expect("a NoticeResponse");
    assert_eq!(msg::error_fields(&notice.1).unwrap().message, "hello");
    a.query("listen ch");
    let mut b = Raw::connect(p.rw());
    b.query("notify ch, 'payload'");
    let (tag, body) = a.recv();
    assert_eq!(tag, b'A');
    assert!(body.ends_with(b"ch\0payload\0"), "{body:?}");
}

#[test]
fn clients_reusing_a_statement_name_each_get_their_own_statement() {
    let (_sb, _pg, p) = one_server("px-names");
    let mut a = Raw::connect(p.rw());
    let mut b = Raw::connect(p.rw());
    for (c, sql) in [(&mut a, "select 'a'"), (&mut b, "select 'b'")] {
        c.send_with(|m| {
            parse(m, "s", sql);
            msg::put_empty(m, b'S');
        });
        assert_eq!(c.until_ready().0, vec![b'1', b'Z']);
    }
    for (which, want) in [(0, "a"), (1, "b"), (0, "a")] {
        let c = if which == 0 { &mut a } else { &mut b };
        c.send_with(|m| {
            msg::put_bind_simple(m, "", "s");
            msg::put_execute(m, "", 0);
            msg::put_empty(m, b'S');
        });
        let got = c.until_ready_full();
        assert_eq!(
            got[0].0, b'2',
            "no ParseComplete the client did not ask for"
        );
        assert_eq!(first_value(&got), want);
    }
    a.send_with(|m| {
        msg::put_target(m, b'C', b'S', "s");
        msg::put_empty(m, b'S');
    });
    assert_eq!(a.until_ready().0, vec![b'3', b'Z']);
    a.send_with(|m| {
        msg::put_bind_simple(m, "", "s");
        msg::put_empty(m, b'S');
    });
    assert_eq!(
        a.until_ready().0,
        vec![b'E', b'Z'],
        "closed statement is gone"
    );
}

#[test]
fn a_standalone_describe_on_another_server_prepares_the_statement_there() {
    let (_sb, pg) = primary("px-describe");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    let p = Running::start(cfg);
    let mut holder = Raw::connect(p.rw());
    holder.query("begin");
    let server_x: String = holder.query("select pg_backend_pid()").remove(0);
    let mut a = Raw::connect(p.rw());
    a.send_with(|m| {
        parse(m, "d1", "select 42::int as answer");
        msg::put_empty(m, b'S');
    });
    assert_eq!(a.until_ready().0, vec![b'1', b'Z']);
    // Park the other server (the one that has d1) in an open transaction,
    // and free server X, which never saw d1.
    let mut parker = Raw::connect(p.rw());
    parker.query("begin");
    assert_ne!(parker.query("select pg_backend_pid()").remove(0), server_x);
    holder.query("commit");
    a.send_with(|m| {
        msg::put_target(m, b'D', b'S', "d1");
        msg::put_empty(m, b'S');
    });
    assert_eq!(a.until_ready().0, vec![b't', b'T', b'Z']);
    assert_eq!(a.query("select pg_backend_pid()").remove(0), server_x);
}

#[test]
fn cancel_reaches_the_running_query_and_never_another_clients() {
    let (_sb, pg, p) = one_server("px-cancel");
    let port = p.rw();
    let pg_port = pg.port();
    p.rt.block_on(async move {
        let a = Running::client(port).await;
        let token = a.cancel_token();
        let running = tokio::spawn(async move { a.simple_query("select pg_sleep(30)").await });
        let direct = format!("host=127.0.0.1 port={pg_port} user=postgres dbname=postgres");
        tokio::task::spawn_blocking(move || {
            wait_until("pg_sleep to run", Duration::from_secs(10), || {
                let out = std::process::Command::new("psql")
                    .args(["-XAtq", &direct, "-c"])
                    .arg("select count(*) from pg_stat_activity where query like 'select pg_sleep(30)%' and state = 'active'")
                    .output()
                    .map_err(|e| e.to_string())?;
                Ok((String::from_utf8_lossy(&out.stdout).trim() == "1").then_some(()))
            })
        })
        .await
        .unwrap()
        .unwrap();
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("cancel must end the query quickly")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED));

        // An idle client's cancel must not hit the next user of its server.
        let idle = Running::client(port).await;
        idle.simple_query("select 1").await.unwrap();
        let stale = idle.cancel_token();
        let b = Running::client(port).await;
        let bq = tokio::spawn(async move { b.simple_query("select pg_sleep(2)").await });
        // Sent while B's query runs on the server the idle client used
        // (the pool has one): a forwarded stale cancel would end it.
        let direct = format!("host=127.0.0.1 port={pg_port} user=postgres dbname=postgres");
        tokio::task::spawn_blocking(move || {
            wait_until("B's query to run", Duration::from_secs(10), || {
                let out = std::process::Command::new("psql")
                    .args(["-XAtq", &direct, "-c"])
                    .arg("select count(*) from pg_stat_activity where query = 'select pg_sleep(2)' and state = 'active'")
                    .output()
                    .map_err(|e| e.to_string())?;
                Ok((String::from_utf8_lossy(&out.stdout).trim() == "1").then_some(()))
            })
        })
        .await
        .unwrap()
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
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiting client is released by its cancel")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
        );
    });
    holder.query("commit");
}

#[test]
fn a_statement_made_stale_by_ddl_can_be_prepared_again() {
    let (_sb, pg, p) = one_server("px-ddl");
    pg.psql("create table ddl_t(x int); insert into ddl_t values (1)")
        .unwrap();
    let port = p.rw();
    let direct = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port()
    );
    p.rt.block_on(async move {
        let c = Running::client(port).await;
        let s = c.prepare("select * from ddl_t").await.unwrap();
        assert_eq!(c.query(&s, &[]).await.unwrap().len(), 1);
        let (d, conn) = tokio_postgres::connect(&direct, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        d.batch_execute("alter table ddl_t add column y int")
            .await
            .unwrap();
        // As with a direct connection, the old statement fails once ...
        let err = c.query(&s, &[]).await.unwrap_err();
        assert!(
            common::db_message(&err).contains("cached plan must not change result type"),
            "{err:?}"
        );
        // ... and the same text prepared again works (not the stale copy).
        let s2 = c.prepare("select * from ddl_t").await.unwrap();
        let rows = c.query(&s2, &[]).await.unwrap();
        assert_eq!(rows[0].len(), 2);
    });
}

#[test]
fn a_transaction_on_a_primary_that_dies_gets_an_error_and_the_client_carries_on() {
    let (_sb, mut pg) = primary("px-crash");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.server_connect_timeout = Duration::from_secs(2);
    let p = Running::start(cfg);
    let mut a = Raw::connect(p.rw());
    a.query("begin");
    pg.kill().unwrap();
    a.send_with(|b| msg::put_query(b, "select 1"));
    let got = a.until_ready_full();
    let errors: Vec<_> = got
        .iter()
        .filter(|(t, _)| *t == b'E')
        .map(|(_, b)| msg::error_fields(b).unwrap())
        .collect();
    assert!(!errors.is_empty(), "{got:?}");
    // Never a FATAL: the client's session is not over.
    assert!(errors.iter().all(|e| e.severity == "ERROR"), "{errors:?}");
    assert_eq!(got.last().unwrap().1, b"I");
    pg.start().unwrap();
    // The same client connection works again once postgres is back.
    wait_until(
        "the client's next query succeeds",
        Duration::from_secs(20),
        || {
            a.send_with(|b| msg::put_query(b, "select 42"));
            let got = a.until_ready_full();
            Ok(got.iter().any(|(t, _)| *t == b'D').then_some(()))
        },
    )
    .unwrap();
}

#[test]
fn a_server_lost_with_several_syncs_in_flight_answers_each_of_them() {
    // tokio-postgres pipelines a Close+Sync and a Parse+Describe+Sync: when
    // the server dies under both, each Sync must still get its
    // ReadyForQuery, or the client waits for ever.
    let (_sb, pg, p) = one_server("px-lost-pipe");
    let mut a = Raw::connect(p.rw());
    a.send_with(|b| {
        unnamed_query(b, "select pg_sleep(60)");
        parse(b, "s1", "select 1");
        msg::put_target(b, b'D', b'S', "s1");
        msg::put_empty(b, b'S');
        // A third group without its Sync yet.
        unnamed_query(b, "select 3");
        b.truncate(b.len() - 5);
    });
    wait_until("the sleep to run", Duration::from_secs(20), || {
        let n = pg
            .psql("select pg_terminate_backend(pid) from pg_stat_activity where query = 'select pg_sleep(60)'")
            .map_err(|e| e.to_string())?;
        Ok((n == "t").then_some(()))
    })
    .unwrap();
    let mut groups = Vec::new();
    for _ in 0..2 {
        groups.push(a.until_ready_full());
    }
    a.send_with(|b| msg::put_empty(b, b'S'));
    groups.push(a.until_ready_full());
    for (i, got) in groups.iter().enumerate() {
        let errors: Vec<_> = got
            .iter()
            .filter(|(t, _)| *t == b'E')
            .map(|(_, b)| msg::error_fields(b).unwrap())
            .collect();
        assert!(!errors.is_empty(), "group {i} must fail: {got:?}");
        assert!(errors.iter().all(|e| e.severity == "ERROR"), "{errors:?}");
        assert_eq!(got.last().unwrap().1, b"I");
    }
    // The client goes on, on a new server connection.
    assert_eq!(a.query("select 42"), vec!["42"]);
}

/// The error code of the first ErrorResponse among `msgs`, if any.
fn error_code(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    msgs.iter()
        .find(|(t, _)| *t == b'E')
        .and_then(|(_, body)| msg::error_fields(body))
        .map(|f| f.code)
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
    wait_until("the insert to run", Duration::from_secs(10), || {
        let n = pg.psql("select count(*) from pg_stat_activity where query like 'insert into w%'");
        Ok(matches!(n.as_deref(), Ok("1")).then_some(()))
    })
    .unwrap();
    let vanished = std::time::Instant::now();
    drop(c);
    // The proxy sees the client go while its query runs (it does not wait
    // for the reply), cancels the query and closes that server.
    wait_until(
        "the vanished client's query to stop",
        Duration::from_secs(10),
        || {
            let n =
                pg.psql("select count(*) from pg_stat_activity where query like 'insert into w%'");
            Ok(matches!(n.as_deref(), Ok("0")).then_some(()))
        },
    )
    .unwrap();
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
    wait_until("the statement to run", Duration::from_secs(10), || {
        let n = pg.psql(
            "select count(*) from pg_stat_activity where query like 'select pg_sleep(1); insert%'",
        );
        Ok(matches!(n.as_deref(), Ok("1")).then_some(()))
    })
    .unwrap();
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

/// Errors the proxy makes itself (here: no server within the checkout
/// timeout) keep the extended protocol in step as a server would: one
/// ErrorResponse per request group, the rest of the group skipped up to
/// its Sync, one ReadyForQuery per Sync, also for pipelined groups; a group
/// ended by Flush gets its error at once and its ReadyForQuery at the Sync.
#[test]
fn errors_the_proxy_makes_inside_pipelined_extended_groups_keep_the_protocol_in_step() {
    let (_sb, _pg, p) = one_server("px-own-errors");
    let mut holder = Raw::connect(p.rw());
    holder.query("begin");
    let mut b = Raw::connect(p.rw());
    b.send_with(|m| {
        unnamed_query(m, "select 1");
        unnamed_query(m, "select 2");
    });
    for group in 0..2 {
        let (tags, status) = b.until_ready();
        assert_eq!((tags, status), (vec![b'E', b'Z'], b'I'), "group {group}");
    }
    b.send_with(|m| {
        parse(m, "", "select 3");
        msg::put_bind_simple(m, "", "");
        msg::put_execute(m, "", 0);
        msg::put_empty(m, b'H');
    });
    let (tag, body) = b.recv();
    assert_eq!(tag, b'E');
    assert_eq!(msg::error_fields(&body).unwrap().code, "57P03");
    b.send_with(|m| msg::put_empty(m, b'S'));
    assert_eq!(b.until_ready(), (vec![b'Z'], b'I'));

    holder.query("commit");
    b.send_with(|m| unnamed_query(m, "select 4"));
    let got = b.until_ready_full();
    let tags: Vec<u8> = got.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, vec![b'1', b'2', b'D', b'C', b'Z']);
    assert_eq!(first_value(&got), "4");
}
