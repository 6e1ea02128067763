//! The protocol's hard cases through the proxy in transaction mode, with a
//! raw client that controls every message: pipelines, Flush, errors, COPY,
//! notices, the startup's protocol negotiation. (Prepared statements:
//! `statements.rs`; a session's end, cancel and pinning: `sessions.rs`.)

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{config, first_value, one_server, parse, primary, Raw, Running};
use pgha_local::wait_until;
use pgha_proxy::config::PoolMode;
use pgha_proxy::protocol::messages as msg;

/// Parse (unnamed) + Bind + Execute + Sync for `sql`.
fn unnamed_query(b: &mut BytesMut, sql: &str) {
    parse(b, "", sql);
    msg::put_bind_simple(b, "", "");
    msg::put_execute(b, "", 0);
    msg::put_empty(b, b'S');
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

/// tokio-postgres runs COPY over the extended protocol: Bind, Execute and
/// Sync, then the data, CopyDone and a second Sync. The server ignores the
/// Sync that reaches it in copy-in mode and answers both with one
/// ReadyForQuery; the proxy must not wait for a second one.
#[test]
fn copy_in_over_the_extended_protocol_releases_the_server() {
    let (_sb, pg, p) = one_server("px-copy-ext");
    pg.psql("create table cx(x int)").unwrap();
    let a = p.client_with(|_| {}).unwrap();
    let copy = |data: &'static [u8]| {
        p.rt.block_on(async {
            use futures::SinkExt;
            let sink = a.copy_in("copy cx from stdin").await?;
            futures::pin_mut!(sink);
            sink.send(bytes::Bytes::from_static(data)).await?;
            sink.finish().await
        })
    };
    assert_eq!(copy(b"1\n2\n3\n").unwrap(), 3);
    // The pool's only server is free for another client (checkout
    // timeout 300 ms), and A's next transactions run.
    let mut b = Raw::connect(p.rw());
    assert_eq!(b.query("select count(*) from cx"), vec!["3"]);
    for _ in 0..3 {
        assert_eq!(p.first_cell(&a, "select 1").unwrap(), "1");
        assert_eq!(b.query("select 2"), vec!["2"]);
    }
    // A COPY that fails (a bad row) leaves the same state.
    assert!(copy(b"not a number\n").is_err());
    assert_eq!(b.query("select count(*) from cx"), vec!["3"]);
    assert_eq!(p.first_cell(&a, "select 4").unwrap(), "4");
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

/// Settings sent as startup parameters (asyncpg's `server_settings`,
/// pgjdbc's `currentSchema`, node-postgres's `statement_timeout`) hold in
/// every transaction, as on a direct connection: the pool's servers are
/// opened with them (values with spaces and backslashes intact), and a
/// client without them never sees them. They used to be dropped silently,
/// running such a client in the wrong schema and without its timeout. A
/// replication connection or a malformed name is refused with a clear
/// error; an unknown setting, with the server's reason. Such pools are
/// not kept warm by `min_idle` and are forgotten once empty: any client
/// can make one.
#[test]
fn startup_parameters_hold_in_every_transaction() {
    let (_sb, pg) = primary("px-startup-params");
    pg.psql(
        "create schema \"a b\"; create table \"a b\".t(x int); insert into \"a b\".t values (7)",
    )
    .unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.min_idle = 1;
    cfg.server_idle_timeout = Duration::from_secs(1);
    let p = Running::start(cfg);
    let settings = [
        ("search_path", "\"a b\""),
        ("statement_timeout", "1s"),
        ("app.note", "x y\\z"),
    ];
    let mut a = Raw::try_connect_with(p.rw(), &settings).unwrap();
    let mut a2 = Raw::try_connect_with(p.rw(), &settings).unwrap();
    let mut b = Raw::connect(p.rw());
    let code_of = |raw: &mut Raw, sql: &str| {
        raw.send_with(|m| msg::put_query(m, sql));
        let got = raw.until_ready_full();
        let e = got.iter().find(|(t, _)| *t == b'E').map(|(_, body)| body);
        e.map(|body| msg::error_fields(body).unwrap().code)
    };
    for round in 0..3 {
        assert_eq!(a.query("show search_path"), ["\"a b\""], "round {round}");
        assert_eq!(a.query("select x from t"), ["7"]);
        assert_eq!(a.query("show app.note"), ["x y\\z"]);
        assert_eq!(
            b.query("show search_path"),
            ["\"$user\", public"],
            "A's settings reached B in round {round}"
        );
        assert_eq!(code_of(&mut b, "select x from t").as_deref(), Some("42P01"));
        assert_eq!(
            code_of(&mut a, "select pg_sleep(3)").as_deref(),
            Some("57014"),
            "A's statement_timeout holds"
        );
        assert_eq!(code_of(&mut b, "select pg_sleep(0.5)"), None, "B has none");
        // The settings are the server session's own (what RESET would
        // return to), not a SET made on it.
        let sql = "select reset_val from pg_settings where name = 'search_path'";
        assert_eq!(a2.query(sql), ["\"a b\""], "round {round}");
    }
    let refused = |more: &[(&str, &str)]| Raw::try_connect_with(p.rw(), more).err().unwrap();
    let e = refused(&[("replication", "database")]);
    assert_eq!(e.code, "0A000");
    assert!(e.message.contains("replication"), "{}", e.message);
    let e = refused(&[("bad name", "1")]);
    assert_eq!(e.code, "0A000");
    assert!(e.message.contains("bad name"), "{}", e.message);
    let e = refused(&[("no_such_setting", "1")]);
    assert!(e.message.contains("no_such_setting"), "{}", e.message);
    // A client that says it is no replication connection is an ordinary one.
    let mut c = Raw::try_connect_with(p.rw(), &[("replication", "False")]).unwrap();
    assert_eq!(c.query("select 1"), ["1"]);
    assert_eq!(a.query("select x from t"), ["7"], "A carries on");
    drop((a, a2, c));
    // Once their idle servers closed, the settings' pools are forgotten;
    // the plain pool stays, kept warm.
    let shared = p.handle().shared.clone();
    let gone = || {
        let pools = shared.pools.snapshot();
        let left = pools.iter().filter(|p| !p.login().options.is_empty());
        Ok((left.count() == 0).then_some(()))
    };
    wait_until("the settings' pools gone", Duration::from_secs(20), gone).unwrap();
    assert_eq!(b.query("select 2"), ["2"]);
    let pools = shared.pools.snapshot();
    let warm = pools.iter().find(|p| p.login().options.is_empty()).unwrap();
    wait_until("min_idle's server", Duration::from_secs(20), || {
        Ok((warm.counts().0 == 1).then_some(()))
    })
    .unwrap();
}

#[test]
fn a_client_asking_for_a_newer_protocol_or_options_is_answered_as_the_server_answers() {
    let (_sb, pg) = primary("px-negotiate");
    let p = Running::start(config(&pg, PoolMode::Transaction));
    let options = [("_pq_.frobnicate", "on"), ("_pq_.other", "1")];
    // The same startup to the server itself and to the proxy: the same
    // NegotiateProtocolVersion first (3.0, both options unrecognised).
    let first = |port: u16, minor: u16, more: &[(&str, &str)]| {
        let mut r = Raw::start_minor(port, minor, more);
        let first = r.recv();
        (r, first)
    };
    let (_, direct) = first(pg.port(), 2, &options);
    assert_eq!(direct.0, b'v', "the server negotiates: {direct:?}");
    let (mut r, proxied) = first(p.rw(), 2, &options);
    assert_eq!(proxied, direct);
    // Then the login goes on at 3.0 and the session works.
    while r.recv().0 != b'Z' {}
    assert_eq!(r.query("select 41 + 1"), vec!["42"]);
    // Only a newer minor version, or only an option, is told too; a 3.0
    // client with no option is not.
    for (minor, more) in [(1, &[][..]), (0, &options[..1])] {
        let (_, direct) = first(pg.port(), minor, more);
        let (_, proxied) = first(p.rw(), minor, more);
        assert_eq!(proxied.0, b'v');
        assert_eq!(proxied, direct, "3.{minor} {more:?}");
    }
    let (_, plain) = first(p.rw(), 0, &[]);
    assert_eq!(plain.0, b'R', "{plain:?}");
}
