//! The session's handlers driven one event at a time, in an order the
//! message loop can produce but a test through sockets cannot force: two
//! real PostgreSQL servers, the client an in-memory pipe.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgha_local::{PgInstance, PgOptions, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::startup::{handshake, Link};
use super::*;
use crate::config::{AuthMethod, Config};
use crate::pool::tests::{backend, primary_pool};
use crate::protocol::split_frame;
use crate::router::RoutingTable;

/// Messages from the proxy up to the next ReadyForQuery: (tag, body).
async fn until_ready(app: &mut DuplexStream, buf: &mut BytesMut) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        while let Some(f) = split_frame(buf, 1 << 20).unwrap() {
            got.push((f.tag(), f.body().to_vec()));
            if f.tag() == b'Z' {
                return got;
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(20), app.read_buf(buf)).await;
        assert!(read.unwrap().unwrap() > 0, "the proxy closed the pipe");
    }
}

/// The leader moves while a session is attached to the old one for a
/// request whose reply it has not read, and the client's next message is
/// read before the session's bell: the message must not reach the old
/// leader. (The loop polls the client before the bell, so this order
/// happens whenever both are ready in one turn.)
#[test]
fn a_message_read_before_the_bell_never_reaches_a_server_that_left_its_role() {
    let sb = Sandbox::new("px-epoch").unwrap();
    let pg1 = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    let pg2 = PgInstance::primary(&sb, "pg2", &PgOptions::default()).unwrap();
    for pg in [&pg1, &pg2] {
        pg.psql("create table t(x int)").unwrap();
    }
    let cfg = Config {
        pool_mode: PoolMode::Transaction,
        auth_method: AuthMethod::Trust,
        backends: vec![backend(&pg1)],
        ..Config::default()
    };
    let table = RoutingTable::from_static(&cfg.backends);
    let shared = Arc::new(crate::Shared::new(Arc::new(cfg), None, table));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let replies = rt.block_on(async {
        let (mut app, end) = tokio::io::duplex(1 << 16);
        let mut hello = BytesMut::new();
        msg::put_startup(
            &mut hello,
            &[("user", "postgres"), ("database", "postgres")],
        );
        app.write_all(&hello).await.unwrap();
        let registered = shared.bells.register();
        let bell = registered.bell.clone();
        let route = Route::ReadWrite;
        let mut s = handshake(
            shared.clone(),
            end,
            route,
            1,
            BytesMut::new(),
            bell,
            Link::Local,
        )
        .await
        .expect("logged in");
        let mut buf = BytesMut::new();
        until_ready(&mut app, &mut buf).await;

        // A request goes to pg1; the session has not read its reply, so
        // the server stays attached.
        msg::put_query(&mut s.cbuf, "select 1");
        s.on_client_data().await.unwrap();
        assert_eq!(s.server.as_ref().unwrap().pool.backend.port, pg1.port());

        // The leader moves to pg2; the client's next request is handled
        // before the bell (which has rung, unheard).
        let pg2_backend = Arc::new(crate::router::Backend {
            name: pg2.name().into(),
            host: "127.0.0.1".into(),
            port: pg2.port(),
        });
        shared.topology.update(|t| t.leader = Some(pg2_backend));
        msg::put_query(&mut s.cbuf, "insert into t values (42)");
        s.on_client_data().await.unwrap();

        // The loop takes over: both requests are answered, then the client
        // leaves.
        let session = tokio::spawn(async move {
            let mut s = s;
            s.run().await
        });
        let first = until_ready(&mut app, &mut buf).await;
        let second = until_ready(&mut app, &mut buf).await;
        app.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
        session.await.unwrap();
        drop(registered);
        (first, second)
    });
    // The insert ran on pg2 and nowhere else; the request whose reply
    // pg1 never got to give fails with the leader change.
    let on = |pg: &PgInstance| pg.psql("select count(*) from t").unwrap();
    assert_eq!(on(&pg1), "0", "a write reached the old leader");
    assert_eq!(on(&pg2), "1");
    let tags: Vec<u8> = replies.1.iter().map(|(t, _)| *t).collect();
    assert_eq!(tags, b"CZ", "{:?}", replies.1);
    let err = replies
        .0
        .iter()
        .find(|(t, _)| *t == b'E')
        .expect("an error");
    assert_eq!(msg::error_fields(&err.1).unwrap().code, "57P01");
}

/// A pool retired while `maintain` connects for min_idle (a failover or
/// /reconnect meanwhile) keeps nothing: the new connection is closed, not
/// shelved where a client already waiting on the retired pool could take it.
#[test]
fn a_connection_made_for_min_idle_is_not_kept_by_a_pool_retired_meanwhile() {
    let sb = Sandbox::new("px-retire-race").unwrap();
    let pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    let cfg = Config {
        min_idle: 1,
        ..Config::default()
    };
    let (_shared, pool) = primary_pool(&pg, cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let proxy_servers =
        || pg.psql("select count(*) from pg_stat_activity where application_name = 'pgha-proxy'");
    rt.block_on(async {
        let maintain = pool.maintain();
        tokio::pin!(maintain);
        // Polled once: it has begun to connect and waits for the server.
        assert!(futures::poll!(maintain.as_mut()).is_pending());
        pool.retire();
        maintain.await;
    });
    assert_eq!(pool.counts(), (0, 0), "a retired pool kept a connection");
    pgha_local::wait_until("no proxy server left", Duration::from_secs(10), || {
        Ok((proxy_servers()? == "0").then_some(()))
    })
    .unwrap();
}
