//! Protocol-level prepared statements in transaction mode through the
//! proxy, with a raw client that controls every message: per-client names
//! on shared servers, a standalone Describe, statements made stale by DDL,
//! DISCARD ALL and SQL DEALLOCATE.

#![allow(clippy::unwrap_used)]

mod common;

use common::{config, first_value, one_server, parse, primary, Raw, Running};
use pgha_proxy::config::PoolMode;
use pgha_proxy::protocol::messages as msg;

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
fn a_statement_made_stale_by_ddl_can_be_prepared_again() {
    let (_sb, pg, p) = one_server("px-ddl");
    pg.psql("create table ddl_t(x int); insert into ddl_t values (1)")
        .unwrap();
    let port = p.rw();
    let direct = pg.port();
    p.rt.block_on(async move {
        let c = Running::client(port).await;
        let s = c.prepare("select * from ddl_t").await.unwrap();
        assert_eq!(c.query(&s, &[]).await.unwrap().len(), 1);
        let d = Running::client(direct).await;
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

/// With several servers each holding the statement, the first error
/// after the DDL makes every server prepare the text afresh: a client
/// that prepares it again works on whichever server runs it, not only on
/// the one that reported the stale plan.
#[test]
fn after_a_stale_plan_the_text_is_prepared_afresh_on_every_server() {
    let (_sb, pg) = primary("px-ddl2");
    pg.psql("create table ddl2(x int); insert into ddl2 values (1)")
        .unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    let p = Running::start(cfg);
    let port = p.rw();
    let direct = pg.port();
    let sql = "select * from ddl2";
    p.rt.block_on(async move {
        let c1 = Running::client(port).await;
        let c2 = Running::client(port).await;
        // Both servers prepare the text: each client holds one in a
        // transaction while it prepares and runs it.
        let mut old = Vec::new();
        for c in [&c1, &c2] {
            c.batch_execute("begin").await.unwrap();
            let s = c.prepare(sql).await.unwrap();
            assert_eq!(c.query(&s, &[]).await.unwrap().len(), 1);
            old.push(s);
        }
        let pids: Vec<i32> = {
            let mut v = Vec::new();
            for c in [&c1, &c2] {
                v.push(
                    c.query_one("select pg_backend_pid()", &[])
                        .await
                        .unwrap()
                        .get(0),
                );
            }
            v
        };
        assert_ne!(pids[0], pids[1], "the clients share a server");
        for c in [&c1, &c2] {
            c.batch_execute("commit").await.unwrap();
        }
        let d = Running::client(direct).await;
        d.batch_execute("alter table ddl2 add column y int")
            .await
            .unwrap();
        // The old statement fails once, as on a direct connection.
        let err = c1.query(&old[0], &[]).await.unwrap_err();
        assert!(
            common::db_message(&err).contains("cached plan must not change result type"),
            "{err:?}"
        );
        // Then, on both servers at once, the text prepared again works.
        for round in 0..3 {
            for c in [&c1, &c2] {
                c.batch_execute("begin").await.unwrap();
            }
            for c in [&c1, &c2] {
                let s = c.prepare(sql).await.unwrap();
                let rows = c
                    .query(&s, &[])
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {}", common::db_message(&e)));
                assert_eq!(rows[0].len(), 2);
            }
            for c in [&c1, &c2] {
                c.batch_execute("commit").await.unwrap();
            }
        }
    });
}

/// A client's `DISCARD ALL` or `DEALLOCATE ALL` in transaction mode drops
/// every prepared statement on its server, the ones the proxy prepared
/// there for other clients too: those are prepared again when next used
/// (they used to fail with "prepared statement ... does not exist"). The
/// client's own statements are gone, as on a direct connection.
#[test]
fn discard_all_from_one_client_does_not_break_the_others_statements() {
    let (_sb, pg) = primary("px-discard");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    let p = Running::start(cfg);
    let port = p.rw();
    p.rt.block_on(async move {
        let a = Running::client(port).await;
        let b = Running::client(port).await;
        for reset in ["DISCARD ALL", "DEALLOCATE ALL"] {
            let sa = a.prepare("select $1::int4 * 2").await.unwrap();
            let sb = b.prepare("select $1::int4 * 2").await.unwrap();
            let row = b.query_one(&sb, &[&21i32]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 42);
            a.batch_execute(reset).await.unwrap();
            // The one server dropped it; B's statement is prepared again.
            let row = b.query_one(&sb, &[&4i32]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 8, "after {reset}");
            let gone = a.query_one(&sa, &[&1i32]).await.unwrap_err();
            assert_eq!(
                gone.code(),
                Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME),
                "A's own statement is gone after {reset}: {gone}"
            );
            let again = a.prepare("select $1::int4 * 2").await.unwrap();
            assert_eq!(
                a.query_one(&again, &[&5i32])
                    .await
                    .unwrap()
                    .get::<_, i32>(0),
                10
            );
        }
    });
}

/// The replies up to ReadyForQuery, in short: command tags, SQLSTATEs, the
/// first value of a row, and the status.
fn replies(c: &mut Raw) -> String {
    let mut out = Vec::new();
    for (tag, body) in c.until_ready_full() {
        out.push(match tag {
            b'C' => String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap()).into_owned(),
            b'E' => format!("E{}", msg::error_fields(&body).unwrap().code),
            b'D' => first_value(&[(tag, body)]),
            b'Z' => format!("Z{}", body[0] as char),
            _ => continue,
        });
    }
    out.join(" ")
}

/// Prepares `sql` as `name` over the protocol.
fn prepare(c: &mut Raw, name: &str, sql: &str) -> String {
    c.send_with(|b| {
        parse(b, name, sql);
        msg::put_empty(b, b'S');
    });
    replies(c)
}

/// Runs the protocol-level statement `name`.
fn run(c: &mut Raw, name: &str) -> String {
    c.send_with(|b| {
        msg::put_bind_simple(b, "", name);
        msg::put_execute(b, "", 0);
        msg::put_empty(b, b'S');
    });
    replies(c)
}

/// What ActiveRecord does: statements prepared over the protocol,
/// dropped with SQL DEALLOCATE; every reply on `port`.
fn deallocate_story(port: u16) -> Vec<String> {
    let mut a = Raw::connect(port);
    let mut b = Raw::connect(port);
    let mut seen = Vec::new();
    for (name, sql) in [("Ar_1", "select 1"), ("s2", "select 2"), ("s3", "select 3")] {
        seen.push(prepare(&mut a, name, sql));
    }
    // Another client's statement of the same text.
    seen.push(prepare(&mut b, "b", "select 1"));
    let q = |c: &mut Raw, sql: &str| {
        c.send_with(|m| msg::put_query(m, sql));
        replies(c)
    };
    seen.push(q(&mut a, "DEALLOCATE \"Ar_1\""));
    seen.push(run(&mut a, "Ar_1"));
    seen.push(run(&mut b, "b"));
    seen.push(prepare(&mut a, "Ar_1", "select 1"));
    seen.push(run(&mut a, "Ar_1"));
    // Inside a transaction, which stays open.
    seen.push(q(&mut a, "begin"));
    seen.push(q(&mut a, "deallocate prepare S2;"));
    seen.push(q(&mut a, "select 'still in'"));
    seen.push(run(&mut a, "s2"));
    seen.push(q(&mut a, "rollback"));
    // In an aborted transaction it fails, and the statement stays.
    seen.push(q(&mut a, "begin"));
    seen.push(q(&mut a, "select 1/0"));
    seen.push(q(&mut a, "DEALLOCATE s3"));
    seen.push(q(&mut a, "rollback"));
    seen.push(run(&mut a, "s3"));
    // A name never prepared.
    seen.push(q(&mut a, "DEALLOCATE nosuch"));
    seen
}

#[test]
fn sql_deallocate_of_a_protocol_statement_works_as_on_the_server() {
    let (_sb, pg, p) = one_server("px-dealloc");
    let direct = deallocate_story(pg.port());
    let want = [
        // Prepared (ParseComplete not shown).
        "ZI",
        "ZI",
        "ZI",
        "ZI",
        "DEALLOCATE ZI",
        "E26000 ZI",
        "1 SELECT 1 ZI",
        "ZI",
        "1 SELECT 1 ZI",
        "BEGIN ZT",
        "DEALLOCATE ZT",
        "still in SELECT 1 ZT",
        "E26000 ZE",
        "ROLLBACK ZI",
        "BEGIN ZT",
        "E22012 ZE",
        "E25P02 ZE",
        "ROLLBACK ZI",
        "3 SELECT 1 ZI",
        "E26000 ZI",
    ];
    assert_eq!(direct, want, "the server itself");
    assert_eq!(deallocate_story(p.rw()), direct, "through the proxy");
}
