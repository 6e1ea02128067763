//! Peers that vanish without a FIN or RST (power-off, partition), against
//! a real PostgreSQL 15: the harness's `Blackhole` drops every packet to
//! and from one loopback port (iptables, run as root). The proxy's TCP
//! keepalive and TCP_USER_TIMEOUT must notice; without them each test
//! waits out its bound and fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{config, db_message, primary, Raw, Running};
use pgha_local::{reserve_port, wait_until, Blackhole};
use pgha_proxy::config::{Config, PoolMode};
use pgha_proxy::protocol::messages as msg;

/// How long a test waits for the proxy to notice a vanished peer. The
/// settings here give up after about 3 s (keepalive 1 s + 2 x 1 s) or 2 s
/// (user timeout); without them the wait would be minutes to forever.
const BOUND: Duration = Duration::from_secs(20);

/// One server connection per pool, so a leaked or reused dead one shows;
/// keepalive that gives up on a silent peer after about 3 s.
fn fast_keepalive(mut cfg: Config) -> Config {
    cfg.pool_size = 1;
    cfg.tcp_keepalive_idle = Duration::from_secs(1);
    cfg.tcp_keepalive_interval = Duration::from_secs(1);
    cfg.tcp_keepalive_count = 2;
    cfg
}

/// (idle, checked out) server connections over every pool.
fn server_conns(p: &Running) -> (usize, usize) {
    let pools = p.handle().shared.pools.snapshot();
    pools
        .iter()
        .map(|pool| pool.counts())
        .fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1))
}

fn wait_server_conns(p: &Running, what: &str, want: (usize, usize)) {
    wait_until(what, BOUND, || {
        let now = server_conns(p);
        if now == want {
            return Ok(Some(()));
        }
        Err(format!("server connections (idle, in use) = {now:?}").into())
    })
    .unwrap();
}

/// A tokio-postgres client of the proxy in the middle of a transaction
/// (`BEGIN; SELECT 1` done, nothing in flight).
fn client_in_transaction(p: &Running) -> tokio_postgres::Client {
    let port = p.rw();
    p.rt.block_on(async {
        let c = Running::client(port).await;
        c.simple_query("BEGIN; SELECT 1").await.unwrap();
        c
    })
}

/// The client's next query fails within the bound with "server connection
/// lost" (08006).
fn next_query_fails(p: &Running, client: &tokio_postgres::Client) {
    let q = client.simple_query("SELECT 2");
    let r =
        p.rt.block_on(async { tokio::time::timeout(BOUND, q).await });
    let err = r
        .expect("the client must get an error within the bound")
        .expect_err("the query cannot succeed: its server vanished");
    let text = db_message(&err);
    assert!(text.starts_with("08006"), "{text}");
}

/// A new client through the proxy runs a query: with pool_size 1, on a new
/// server connection (the dead one was neither kept nor handed out).
fn new_client_works(p: &Running) {
    let port = p.rw();
    p.rt.block_on(async {
        let q = async { Running::client(port).await.simple_query("select 1").await };
        let rows = tokio::time::timeout(BOUND, q).await;
        rows.expect("a new client must be served within the bound")
            .expect("a new client's query");
    });
    assert_eq!(server_conns(p), (1, 0));
}

#[test]
fn keepalive_drops_a_vanished_server_under_an_idle_transaction() {
    let (_sb, pg) = primary("px-net-keepalive-server");
    let p = Running::start(fast_keepalive(config(&pg, PoolMode::Transaction)));
    let client = client_in_transaction(&p);
    assert_eq!(server_conns(&p), (0, 1), "the transaction holds the server");

    let hole = Blackhole::port(pg.port()).unwrap();
    let cut = Instant::now();
    // Nothing is in flight: only keepalive can find out the server is gone.
    wait_server_conns(&p, "the vanished server's connection dropped", (0, 0));
    eprintln!(
        "server connection dropped {:?} after the cut",
        cut.elapsed()
    );
    // The proxy tells the client at its next request.
    next_query_fails(&p, &client);

    drop(hole);
    new_client_works(&p);
}

#[test]
fn user_timeout_fails_a_request_sent_to_a_vanished_server() {
    let (_sb, pg) = primary("px-net-user-timeout");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.tcp_keepalive = false;
    cfg.tcp_user_timeout = Duration::from_secs(2);
    let p = Running::start(cfg);
    let client = client_in_transaction(&p);

    let hole = Blackhole::port(pg.port()).unwrap();
    let cut = Instant::now();
    // The query reaches the socket and stays unacknowledged: the kernel
    // would retransmit for ~15 minutes, keepalive does not probe then.
    next_query_fails(&p, &client);
    eprintln!("the client got its error {:?} after the cut", cut.elapsed());
    assert_eq!(server_conns(&p), (0, 0));

    drop(hole);
    new_client_works(&p);
}

#[test]
fn keepalive_closes_a_vanished_session_client_and_frees_its_server() {
    let (_sb, pg) = primary("px-net-keepalive-client");
    let p = Running::start(fast_keepalive(config(&pg, PoolMode::Session)));
    // A port of the harness's own, so the blackhole cuts this client only.
    let local = reserve_port().unwrap();
    let mut first = Raw::connect_from(p.rw(), local.get());
    assert_eq!(first.query("select 1"), ["1"]);
    // A Flush (no reply) acknowledges the reply at once: a delayed ACK cut
    // off by the blackhole would leave the proxy retransmitting, and the
    // kernel does not probe a connection with data in flight.
    first.send_with(|b| msg::put_empty(b, b'H'));
    assert_eq!(
        server_conns(&p),
        (0, 1),
        "the session holds the only server connection"
    );

    let hole = Blackhole::port(local.get()).unwrap();
    let cut = Instant::now();
    wait_until("the proxy closes the vanished client", BOUND, || {
        match p.handle().shared.client_count() {
            0 => Ok(Some(())),
            n => Err(format!("{n} clients connected").into()),
        }
    })
    .unwrap();
    eprintln!("vanished client closed {:?} after the cut", cut.elapsed());
    assert_eq!(server_conns(&p), (1, 0), "its server is back in the pool");
    // The pool's only server connection now serves a second client (a
    // wait for it would end in an error after checkout_timeout).
    let mut second = Raw::connect(p.rw());
    assert_eq!(second.query("select 1"), ["1"]);

    // The blackhole goes first, so the first client's close reaches the
    // proxy's host (which answers with a reset) and frees its port.
    drop(hole);
    drop(first);
}

#[test]
fn a_reload_gives_new_server_connections_the_new_tcp_options_and_keeps_the_pool() {
    let (sb, pg) = primary("px-net-reload");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    cfg.tcp_keepalive = false;
    let p = Running::start(cfg.clone());
    let before = client_in_transaction(&p);

    let path = sb.path().join("reload.toml");
    let mut next = fast_keepalive(cfg);
    next.pool_size = 2;
    next.tcp_keepalive = true;
    std::fs::write(&path, toml::to_string(&next).unwrap()).unwrap();
    let r = pgha_proxy::reload::reload(&p.handle().shared, &path).unwrap();
    assert_eq!(
        r.applied,
        [
            "tcp_keepalive",
            "tcp_keepalive_count",
            "tcp_keepalive_idle",
            "tcp_keepalive_interval"
        ]
    );
    // A second server connection, opened after the reload in the same pool.
    let after = client_in_transaction(&p);
    assert_eq!(
        p.handle().shared.pools.snapshot().len(),
        1,
        "the pool stays"
    );
    assert_eq!(server_conns(&p), (0, 2));

    let _hole = Blackhole::port(pg.port()).unwrap();
    wait_server_conns(&p, "the new connection dropped", (0, 1));
    next_query_fails(&p, &after);
    // The connection opened before the reload has no keepalive: still held.
    assert_eq!(server_conns(&p), (0, 1));
    drop(before);
}
