//! Operating the proxy: the real binary with a config file (admin HTTP,
//! SIGHUP reload, SIGTERM), graceful drain, malformed input, and the
//! Unix-domain listeners.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{binary_config, config, http, metric, primary, psql, Raw, Running};
use pgha_local::{reserve_port, wait_until, Proc, StopSignal};
use pgha_proxy::config::PoolMode;
use pgha_proxy::protocol::messages as msg;

#[test]
fn the_binary_serves_admin_http_reloads_users_on_sighup_and_exits_on_sigterm() {
    let (sb, pg) = primary("px-binary");
    let dir = sb.subdir("proxy").unwrap();
    std::fs::write(dir.join("users.txt"), "\"postgres\" \"first\"\n").unwrap();
    let bin = binary_config(
        &dir,
        &pg,
        "admin_token = \"tok\"\nusers_file = \"users.txt\"\nauth_method = \"scram-sha-256\"\n",
    );
    let (conf, rw, admin) = (&bin.path, bin.rw.get(), bin.admin.get());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgha-proxy"));
    cmd.arg("--config").arg(conf);
    let mut proc = Proc::spawn(
        "pgha-proxy",
        cmd,
        &dir.join("proxy.log"),
        None,
        StopSignal::Term,
    )
    .unwrap();
    wait_until("proxy admin up", Duration::from_secs(20), || {
        Ok(TcpStream::connect(("127.0.0.1", admin)).ok().map(|_| ()))
    })
    .unwrap();
    assert!(http(admin, "GET", "/health", None).starts_with("HTTP/1.1 200"));
    assert_eq!(
        psql(rw, "select 1", &[("PGPASSWORD", "first")]).unwrap(),
        "1"
    );
    let metrics = http(admin, "GET", "/metrics", None);
    assert!(
        metrics.contains("pgha_proxy_transactions_total{route=\"rw\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pgha_proxy_server_connections"),
        "{metrics}"
    );
    let status = http(admin, "GET", "/status", None);
    assert!(status.contains("\"leader\""), "{status}");
    assert!(http(admin, "POST", "/pause", None).starts_with("HTTP/1.1 401"));
    assert!(http(admin, "POST", "/pause", Some("tok")).starts_with("HTTP/1.1 200"));
    assert!(http(admin, "POST", "/resume", Some("tok")).starts_with("HTTP/1.1 200"));

    std::fs::write(dir.join("users.txt"), "\"postgres\" \"second\"\n").unwrap();
    proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until("new password accepted", Duration::from_secs(10), || {
        Ok(psql(rw, "select 1", &[("PGPASSWORD", "second")])
            .ok()
            .map(|_| ()))
    })
    .unwrap();
    assert!(psql(rw, "select 1", &[("PGPASSWORD", "first")]).is_err());

    // A config file with a typo: the proxy says so and keeps serving.
    let good = std::fs::read_to_string(conf).unwrap();
    std::fs::write(conf, format!("pool_sise = 3\n{good}")).unwrap();
    proc.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until("the refusal logged", Duration::from_secs(10), || {
        let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
        Ok((log.contains("reload refused") && log.contains("pool_sise")).then_some(()))
    })
    .unwrap();
    assert_eq!(
        psql(rw, "select 1", &[("PGPASSWORD", "second")]).unwrap(),
        "1"
    );

    proc.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = proc.wait_exit(Duration::from_secs(15)).unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn drain_lets_open_transactions_finish_and_closes_idle_clients() {
    let (_sb, pg) = primary("px-drain");
    let mut p = Running::start(config(&pg, PoolMode::Transaction));
    let port = p.rw();
    let mut idle = Raw::connect(port);
    let mut busy = Raw::connect(port);
    busy.query("begin");
    let handle = p.proxy.take().unwrap();
    let drained = p.rt.spawn(handle.drain(Duration::from_secs(30)));
    // The idle client is told and closed at once.
    let (tag, body) = idle.recv();
    assert_eq!(tag, b'E');
    assert_eq!(msg::error_fields(&body).unwrap().code, "57P01");
    // No new clients.
    wait_until("listener closed", Duration::from_secs(10), || {
        Ok(TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(()))
    })
    .unwrap();
    // The open transaction still runs to its end, then the client is closed.
    assert_eq!(busy.query("select 7"), vec!["7"]);
    busy.query("commit");
    let (tag, _) = busy.recv();
    assert_eq!(tag, b'E');
    // The drain ends when the last client left, long before its bound.
    p.rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), drained).await })
        .expect("drain must not wait out its 30s bound")
        .unwrap();
}

#[test]
fn malformed_and_oversized_messages_get_a_protocol_error_not_a_crash() {
    let (_sb, pg) = primary("px-badinput");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.max_message_size = 4096;
    cfg.startup_timeout = Duration::from_millis(500);
    let p = Running::start(cfg);
    // Garbage instead of a startup packet.
    let mut s = TcpStream::connect(("127.0.0.1", p.rw())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&[0, 0, 0, 9, 0xde, 0xad, 0xbe, 0xef, 0])
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert_eq!(out.first(), Some(&b'E'), "{out:?}");
    // A message larger than max_message_size after login.
    let mut raw = Raw::connect(p.rw());
    raw.send(&[b'Q', 0, 1, 0, 0]);
    let (tag, body) = raw.recv();
    assert_eq!(tag, b'E');
    assert_eq!(msg::error_fields(&body).unwrap().code, "08P01");
    // A client that never finishes startup is dropped after the timeout.
    let mut slow = TcpStream::connect(("127.0.0.1", p.rw())).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    slow.write_all(&[0, 0, 0]).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        slow.read(&mut buf).unwrap_or(0),
        0,
        "closed without a reply"
    );
    // The proxy still serves everyone else.
    assert_eq!(Raw::connect(p.rw()).query("select 1"), vec!["1"]);
}

/// A reload that sets `max_backend_connections` counts the servers
/// already open (each holds its backend's slot, bound or not): with three
/// busy and a bound of two, a new pool's client waits until the backend is
/// under the bound, instead of opening a fourth.
#[test]
fn a_bound_set_by_reload_counts_the_servers_already_open() {
    let (sb, pg) = primary("px-cap-reload");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 5;
    cfg.checkout_timeout = Duration::from_secs(20);
    let p = Running::start(cfg.clone());
    let busy: Vec<_> = (0..3).map(|_| p.client_with(|_| {}).unwrap()).collect();
    for c in &busy {
        p.rt.block_on(c.batch_execute("begin")).unwrap();
    }
    // Logged in on the pool's cached parameters: no server yet.
    let other = p.client_with(|_| {}).unwrap();
    assert_eq!(common::proxy_backends(&pg), 3);

    let path = sb.path().join("reload.toml");
    let mut next = cfg;
    next.max_backend_connections = 2;
    std::fs::write(&path, toml::to_string(&next).unwrap()).unwrap();
    let r = pgha_proxy::reload::reload(&p.handle().shared, &path).unwrap();
    assert_eq!(r.applied, ["max_backend_connections"]);

    // The next transaction needs a server of the replacing pool: the
    // backend is over its bound.
    let query = p.rt.spawn(async move {
        let rows = other.simple_query("show work_mem").await;
        rows.map(|r| match &r[1] {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).unwrap().to_owned(),
            m => panic!("{m:?}"),
        })
    });
    wait_until(
        "the new client waits for room",
        Duration::from_secs(10),
        || Ok((common::waiting_for_backend(&p) == 1).then_some(())),
    )
    .unwrap();
    // One transaction ends: its server closes (its pool was replaced), and
    // its slot is the one the smaller bound retires. Still no room.
    p.rt.block_on(busy[0].batch_execute("commit")).unwrap();
    wait_until("the server to close", Duration::from_secs(10), || {
        Ok((common::proxy_backends(&pg) == 2).then_some(()))
    })
    .unwrap();
    assert_eq!(common::waiting_for_backend(&p), 1, "2 open, bound 2");
    assert!(!query.is_finished());
    // A second one ends: now there is room.
    p.rt.block_on(busy[1].batch_execute("commit")).unwrap();
    let got =
        p.rt.block_on(query)
            .unwrap()
            .expect("room within the timeout");
    assert_eq!(got, "4MB");
    common::wait_proxy_backends_at_most(&pg, 2);
    p.rt.block_on(busy[2].batch_execute("commit")).unwrap();
}

/// A reload (what SIGHUP runs) applies new settings to running sessions,
/// swaps static backends, replaces pools when their shape changes, keeps
/// restart-only keys, and refuses a bad file without changing anything.
#[test]
fn reload_applies_settings_and_backends_keeps_restart_keys_and_refuses_a_bad_file() {
    let (sb, pg1) = primary("px-reload");
    let pg2 = pgha_local::PgInstance::primary(&sb, "pg2", &Default::default()).unwrap();
    for (pg, name) in [(&pg1, "pg1"), (&pg2, "pg2")] {
        pg.psql(&format!(
            "create table whoami(n text); insert into whoami values ('{name}')"
        ))
        .unwrap();
    }
    let cfg = config(&pg1, PoolMode::Transaction);
    let p = Running::start(cfg.clone());
    let shared = p.handle().shared.clone();
    let path = sb.path().join("reload.toml");
    let reload = |c: &pgha_proxy::Config| {
        std::fs::write(&path, toml::to_string(c).unwrap()).unwrap();
        pgha_proxy::reload::reload(&shared, &path)
    };
    let client = p.rt.block_on(Running::client(p.rw()));
    let one = |sql: &str| -> String {
        p.rt.block_on(client.query_one(sql, &[]))
            .unwrap()
            .get::<_, String>(0)
    };
    let pid = || one("select pg_backend_pid()::text");
    assert_eq!(one("select n from whoami"), "pg1");
    let before = pid();
    assert_eq!(pid(), before, "an idle pooled server is reused");

    // Pool shape: the pools are replaced, the client does not notice.
    let mut next = cfg.clone();
    next.pool_size = 3;
    let r = reload(&next).unwrap();
    assert_eq!(r.applied, vec!["pool_size"]);
    assert!(r.need_restart.is_empty());
    assert_ne!(pid(), before, "the old pool's idle server was closed");

    // New backend, client limit, and a key that needs a restart.
    next.backends[0].port = pg2.port();
    next.max_client_conn = 1;
    next.listen_rw = "127.0.0.1:1".parse().unwrap();
    let r = reload(&next).unwrap();
    assert_eq!(r.applied, vec!["backends", "max_client_conn"]);
    assert_eq!(r.need_restart, vec!["listen_rw"]);
    assert_eq!(
        shared.cfg().listen_rw,
        cfg.listen_rw,
        "restart keys keep their value"
    );
    wait_until(
        "the session to follow the new backend",
        Duration::from_secs(10),
        || Ok((one("select n from whoami") == "pg2").then_some(())),
    )
    .unwrap();
    let refused = psql(p.rw(), "select 1", &[]).unwrap_err();
    assert!(refused.contains("too many clients"), "{refused}");

    // A bad file changes nothing and names the key.
    let mut bad = next.clone();
    bad.max_client_conn = 100;
    bad.min_idle = 10;
    let e = reload(&bad).unwrap_err();
    assert!(
        e.to_string()
            .contains("`min_idle`: cannot exceed pool_size"),
        "{e}"
    );
    assert_eq!(shared.cfg().max_client_conn, 1);
    assert_eq!(one("select n from whoami"), "pg2");
}

/// The metrics count what clients did: requests and transactions per
/// route, waits for a server, bytes both ways to the byte, connected
/// clients, server connections and errors by kind.
#[test]
fn metrics_count_the_traffic_clients_send_and_receive() {
    let (_sb, pg) = primary("px-metrics");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 2;
    let p = Running::start(cfg);
    let shared = p.handle().shared.clone();
    let render = || shared.metrics.render(&shared);
    let mut a = Raw::connect(p.rw());
    let mut b = Raw::connect(p.rw());
    let before = render();
    assert_eq!(metric(&before, "pgha_proxy_client_connections"), 2.0);

    // A: ten one-statement transactions and one of three requests.
    let (mut sent, mut received) = (0usize, 0usize);
    let mut run = |raw: &mut Raw, sql: &str| {
        raw.send_with(|m| msg::put_query(m, sql));
        sent += 1 + 4 + sql.len() + 1;
        let reply = raw.until_ready_full();
        assert!(!reply.iter().any(|(t, _)| *t == b'E'), "{sql}: {reply:?}");
        received += reply
            .iter()
            .map(|(_, body)| 1 + 4 + body.len())
            .sum::<usize>();
    };
    for _ in 0..10 {
        run(&mut a, "select 1");
    }
    for sql in ["begin", "select 2", "commit"] {
        run(&mut a, sql);
    }
    let after = render();
    let delta = |series: &str| metric(&after, series) - metric(&before, series);
    assert_eq!(delta("pgha_proxy_queries_total{route=\"rw\"}"), 13.0);
    assert_eq!(delta("pgha_proxy_transactions_total{route=\"rw\"}"), 11.0);
    assert_eq!(delta("pgha_proxy_queries_total{route=\"ro\"}"), 0.0);
    assert_eq!(
        delta("pgha_proxy_wait_seconds_count{route=\"rw\"}"),
        11.0,
        "one server checkout per transaction"
    );
    assert_eq!(delta("pgha_proxy_client_bytes_in_total"), sent as f64);
    assert_eq!(delta("pgha_proxy_client_bytes_out_total"), received as f64);
    let servers: f64 = after
        .lines()
        .filter(|l| l.starts_with("pgha_proxy_server_connections{") && l.contains("route=\"rw\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        (1.0..=2.0).contains(&servers),
        "server connections: {servers}\n{after}"
    );

    // B sends garbage: a protocol error, counted, and B is gone.
    b.send(&[b'Q', 0, 0, 0, 1]);
    assert_eq!(b.recv().0, b'E');
    drop(b);
    drop(a);
    wait_until("both clients to be gone", Duration::from_secs(10), || {
        Ok((metric(&render(), "pgha_proxy_client_connections") == 0.0).then_some(()))
    })
    .unwrap();
    let end = render();
    assert_eq!(
        metric(&end, "pgha_proxy_errors_total{kind=\"protocol\"}")
            - metric(&before, "pgha_proxy_errors_total{kind=\"protocol\"}"),
        1.0,
        "{end}"
    );
}

/// `unix_socket_dir`: libpq clients reach both routes through sockets
/// named as PostgreSQL's (`host=<dir> port=<port>`), psql and pgbench
/// alike; a socket file a killed proxy left is replaced, one a live
/// process listens on is refused by name, and the files go when the
/// proxy stops.
#[test]
fn unix_socket_clients_reach_both_routes_and_the_socket_files_are_managed() {
    let (sb, pg) = primary("px-unix");
    let dir = sb.subdir("sockets").unwrap();
    let port = reserve_port().unwrap();
    // Left by a proxy that died: a socket file no one listens on.
    let stale = dir.join(format!(".s.PGSQL.{}", port.get()));
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.listen_rw.set_port(port.get());
    cfg.unix_socket_dir = Some(dir.clone());
    let p = Running::start(cfg.clone());
    let host = dir.to_str().unwrap();
    let via_socket = |port: u16, sql: &str| {
        common::psql_conninfo(
            &format!("host={host} port={port} user=postgres dbname=postgres"),
            sql,
        )
    };
    assert_eq!(
        via_socket(p.rw(), "select pg_is_in_recovery()").unwrap(),
        "f"
    );
    via_socket(p.rw(), "create table u(x int); insert into u values (1)").unwrap();
    assert_eq!(via_socket(p.ro(), "select count(*) from u").unwrap(), "1");
    let out = Command::new("pgbench")
        .args(["-n", "-M", "extended", "-c", "4", "-t", "50", "-h", host])
        .args(["-p", &p.rw().to_string(), "-U", "postgres", "postgres"])
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(b"select count(*) from u;\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "pgbench over the socket: {out:?}");

    // A second proxy on the same socket is refused while the first lives.
    let mut second = cfg.clone();
    // Its TCP ports bind (another address): only the socket is taken.
    second.listen_rw.set_port(0);
    second.listen_ro = std::net::SocketAddr::from(([127, 0, 0, 2], p.ro()));
    let e =
        p.rt.block_on(pgha_proxy::Proxy::start(std::sync::Arc::new(second)))
            .unwrap_err()
            .to_string();
    assert!(e.contains("another process listens on it"), "{e}");
    drop(p);
    // Neither the refused start (its first socket made) nor the stop
    // leaves a file.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "socket files left behind: {left:?}");
}

/// Out of file descriptors (a low open-file limit), the proxy does not
/// spin on its listener (accept fails at once there, whether a client
/// waits or not): it checks every 100 ms, warns once, and a client
/// waiting in the backlog gets in as soon as another leaves.
#[test]
fn out_of_file_descriptors_the_listener_pauses_and_a_waiting_client_gets_in_once_one_leaves() {
    let (sb, pg) = primary("px-nofile");
    let dir = sb.subdir("proxy").unwrap();
    let bin = binary_config(&dir, &pg, "auth_method = \"trust\"\npool_size = 2\n");
    const LIMIT: usize = 48;
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nofile={LIMIT}:{LIMIT}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_pgha-proxy"))
        .arg("--config")
        .arg(&bin.path);
    let log = dir.join("proxy.log");
    let mut proc = Proc::spawn("pgha-proxy", cmd, &log, None, StopSignal::Term).unwrap();
    let (rw, admin) = (bin.rw.get(), bin.admin.get());
    wait_until("proxy up", Duration::from_secs(20), || {
        Ok(psql(rw, "select 1", &[]).ok().map(|_| ()))
    })
    .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let count = |what: &str| text().matches(what).count();
    assert!(text().contains("the open-file limit is below max_client_conn"));
    let pid = proc.pid();
    // Descriptors numbered below the limit (one inherited above it may
    // be open too): all taken, accepting fails.
    let open_fds = || {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
        let number = |e: std::fs::DirEntry| e.file_name().to_str()?.parse::<usize>().ok();
        fds.filter_map(|e| number(e.ok()?))
            .filter(|n| *n < LIMIT)
            .count()
    };
    let rt = common::runtime();
    let mut clients = Vec::new();
    while open_fds() < LIMIT {
        let c = rt.block_on(Running::client(rw));
        rt.block_on(c.simple_query("select 1")).unwrap();
        clients.push(c);
        assert!(clients.len() < LIMIT, "the limit is not in force");
    }
    wait_until("the proxy warns", Duration::from_secs(10), || {
        Ok((count("cannot accept clients") == 1).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", text()));
    // One more client waits in the listen backlog.
    let waiting = Command::new("psql")
        .args(["-XAtq", "-h", "127.0.0.1", "-p", &rw.to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-c", "select 42"])
        .env("PGCONNECT_TIMEOUT", "60")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The proxy rests meanwhile: spinning on the listener would take a
    // second of CPU time in this second.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<u64> = after.split(' ').map(|x| x.parse().unwrap_or(0)).collect();
        // utime and stime (fields 14 and 15), in clock ticks of 10 ms.
        f[11] + f[12]
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu() - before;
    assert!(used <= 20, "{used} ticks of CPU in one second");
    assert_eq!(count("cannot accept clients"), 1, "warned once: {}", text());
    // A client leaves: the waiting one gets in.
    drop(clients.pop());
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42", "{out:?}");
    assert_eq!(count("accepting clients again"), 1, "{}", text());
    drop(clients);
    let metrics = http(admin, "GET", "/metrics", None);
    assert!(
        metric(&metrics, "pgha_proxy_errors_total{kind=\"accept\"}") >= 1.0,
        "{metrics}"
    );
    proc.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(proc.wait_exit(Duration::from_secs(15)).unwrap().success());
}
