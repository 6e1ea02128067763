//! Shared test setup: a real PostgreSQL 15 through the harness, the proxy
//! in-process on port 0, and a raw protocol client for exact message tests.

#![allow(dead_code)]

pub mod etcd;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgha_local::{reserve_port, PgInstance, PgOptions, Port, Sandbox};
use pgha_proxy::config::{BackendRole, Config, PoolMode, StaticBackend};
use pgha_proxy::protocol::{messages as msg, split_frame};
use pgha_proxy::{Proxy, ProxyHandle};

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn primary(label: &str) -> (Sandbox, PgInstance) {
    let sb = Sandbox::new(label).unwrap();
    let pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    (sb, pg)
}

/// A config file for the pgha-proxy binary, `<dir>/proxy.toml`: its
/// three listeners on ports reserved while this lives, `pg` as the static
/// primary, and the `extra` lines.
pub struct BinaryConfig {
    pub path: std::path::PathBuf,
    pub rw: Port,
    pub ro: Port,
    pub admin: Port,
}

pub fn binary_config(dir: &std::path::Path, pg: &PgInstance, extra: &str) -> BinaryConfig {
    let c = BinaryConfig {
        path: dir.join("proxy.toml"),
        rw: reserve_port().unwrap(),
        ro: reserve_port().unwrap(),
        admin: reserve_port().unwrap(),
    };
    std::fs::write(
        &c.path,
        format!(
            "listen_rw = \"127.0.0.1:{}\"\nlisten_ro = \"127.0.0.1:{}\"\nlisten_admin = \"127.0.0.1:{}\"\n\
             {extra}[[backends]]\nname = \"pg1\"\nport = {}\nrole = \"primary\"\n",
            c.rw.get(),
            c.ro.get(),
            c.admin.get(),
            pg.port()
        ),
    )
    .unwrap();
    c
}

/// A config pointing at `pg` as the primary, trust auth, ports 0.
pub fn config(pg: &PgInstance, mode: PoolMode) -> Config {
    Config {
        listen_rw: "127.0.0.1:0".parse().unwrap(),
        listen_ro: "127.0.0.1:0".parse().unwrap(),
        listen_admin: "127.0.0.1:0".parse().unwrap(),
        pool_mode: mode,
        pool_size: 4,
        auth_method: pgha_proxy::config::AuthMethod::Trust,
        checkout_timeout: Duration::from_secs(5),
        leader_wait_timeout: Duration::from_secs(2),
        backends: vec![StaticBackend {
            name: "pg1".into(),
            host: "127.0.0.1".into(),
            port: pg.port(),
            role: BackendRole::Primary,
            noloadbalance: false,
        }],
        ..Config::default()
    }
}

pub struct Running {
    pub rt: tokio::runtime::Runtime,
    pub proxy: Option<ProxyHandle>,
}

impl Running {
    pub fn start(cfg: Config) -> Running {
        let rt = runtime();
        let proxy = rt.block_on(Proxy::start(Arc::new(cfg))).unwrap();
        Running {
            rt,
            proxy: Some(proxy),
        }
    }

    pub fn handle(&self) -> &ProxyHandle {
        self.proxy.as_ref().unwrap()
    }

    pub fn rw(&self) -> u16 {
        self.handle().rw_addr.port()
    }

    pub fn ro(&self) -> u16 {
        self.handle().ro_addr.port()
    }

    pub fn conn_str(&self, port: u16) -> String {
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres")
    }

    /// A tokio-postgres client of 127.0.0.1:`port`: the proxy's, or a
    /// server's directly.
    /// A tokio-postgres client on the read-write port, its config
    /// adjusted by `with` (application name, startup options...).
    pub fn client_with(
        &self,
        with: impl FnOnce(&mut tokio_postgres::Config),
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(self.rw())
            .user("postgres")
            .dbname("postgres");
        with(&mut c);
        self.rt.block_on(async {
            let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            Ok(client)
        })
    }

    /// A tokio-postgres client on the read-write port, in database `db`.
    pub fn client_in(&self, db: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.client_with(|c| {
            c.dbname(db);
        })
    }

    /// The first column of the first row `sql` returns ("" if none).
    pub fn first_cell(
        &self,
        c: &tokio_postgres::Client,
        sql: &str,
    ) -> Result<String, tokio_postgres::Error> {
        let rows = self.rt.block_on(c.simple_query(sql))?;
        Ok(rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_default())
    }

    pub async fn client(port: u16) -> tokio_postgres::Client {
        let (c, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        c
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(p) = self.proxy.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), p.stop()).await });
        }
    }
}

/// psql -XAtq through the proxy; Ok(stdout) or Err(stderr).
pub fn psql(port: u16, sql: &str, env: &[(&str, &str)]) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", "postgres", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .envs(env.iter().copied());
    outcome(cmd)
}

/// psql -XAtq with a libpq connection string (TLS modes, channel
/// binding, other users and ports), never prompting for a password;
/// Ok(stdout) or Err(stderr).
pub fn psql_conninfo(conninfo: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.args(["-XAtqw", "-c", sql]).arg(conninfo);
    outcome(cmd)
}

fn outcome(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Waits (10 s at most) until `n` backends of the server on `pg_port`
/// match `condition` in pg_stat_activity.
pub fn wait_backends(pg_port: u16, condition: &str, n: usize) {
    let direct = format!("host=127.0.0.1 port={pg_port} user=postgres dbname=postgres");
    let sql = format!("select count(*) from pg_stat_activity where {condition}");
    pgha_local::wait_until(
        &format!("{n} backends with {condition}"),
        Duration::from_secs(10),
        || Ok((psql_conninfo(&direct, &sql).ok() == Some(n.to_string())).then_some(())),
    )
    .unwrap();
}

/// Runs `select pg_sleep(30)` through the proxy's `port`, waits until it
/// runs on the server on `pg_port`, sends the client's cancel and expects
/// the query to end with 57014 within 10 s (a cancel sent anywhere else
/// would end nothing).
pub async fn cancel_a_running_sleep(port: u16, pg_port: u16) {
    let client = Running::client(port).await;
    let token = client.cancel_token();
    let running = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
    tokio::task::spawn_blocking(move || {
        let sleeping = "query = 'select pg_sleep(30)' and state = 'active'";
        wait_backends(pg_port, sleeping, 1);
    })
    .await
    .unwrap();
    cancel_ends(token, running, "the cancel must end the query quickly").await;
}

/// Sends the cancel of `token` and expects the `request` it was meant
/// for to end with 57014 within 10 s (`what` says why it should).
pub async fn cancel_ends(
    token: tokio_postgres::CancelToken,
    request: tokio::task::JoinHandle<
        Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>,
    >,
    what: &str,
) {
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect(what)
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
}

/// A proxy in transaction mode with a pool of one server connection and a
/// 300 ms checkout timeout.
pub fn one_server(label: &str) -> (Sandbox, PgInstance, Running) {
    let (sb, pg) = primary(label);
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.pool_size = 1;
    cfg.checkout_timeout = Duration::from_millis(300);
    let p = Running::start(cfg);
    (sb, pg, p)
}

/// A Parse of `sql` as statement `name`, no parameter types.
pub fn parse(b: &mut BytesMut, name: &str, sql: &str) {
    let mut rest = sql.as_bytes().to_vec();
    rest.extend_from_slice(&[0, 0, 0]);
    msg::put_parse(b, name, &rest);
}

/// The first column of the first DataRow among `msgs`.
pub fn first_value(msgs: &[(u8, Vec<u8>)]) -> String {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    let len = i32::from_be_bytes(body[2..6].try_into().unwrap()) as usize;
    String::from_utf8_lossy(&body[6..6 + len]).into_owned()
}

/// A blocking client that speaks raw protocol messages.
pub struct Raw {
    s: TcpStream,
    buf: BytesMut,
}

impl Raw {
    /// Connects and logs in (trust) as postgres, up to the first ReadyForQuery.
    pub fn connect(port: u16) -> Raw {
        Raw::connect_with_params(port).0
    }

    /// Connects from 127.0.0.1:`local` (a port reserved by the harness, so
    /// no other socket shares it) and logs in.
    pub fn connect_from(port: u16, local: u16) -> Raw {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let addr = |p: u16| std::net::SocketAddr::from(([127, 0, 0, 1], p));
        s.bind(&addr(local).into()).unwrap();
        s.connect(&addr(port).into()).unwrap();
        Raw::login(s.into()).0
    }

    /// Connects and returns the ParameterStatus values the proxy sent.
    pub fn connect_with_params(port: u16) -> (Raw, Vec<(String, String)>) {
        Raw::login(TcpStream::connect(("127.0.0.1", port)).unwrap())
    }

    /// Connects and sends a startup packet: user and database postgres,
    /// then `more`; the replies are the caller's to read.
    pub fn start_on(port: u16, more: &[(&str, &str)]) -> Raw {
        Raw::start(TcpStream::connect(("127.0.0.1", port)).unwrap(), more)
    }

    /// As [`Raw::start_on`], asking for protocol 3.`minor`.
    pub fn start_minor(port: u16, minor: u16, more: &[(&str, &str)]) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        Raw::start_version(s, 3 << 16 | i32::from(minor), more)
    }

    /// Sends a startup packet on `s`: user and database postgres, then
    /// `more`.
    fn start(s: TcpStream, more: &[(&str, &str)]) -> Raw {
        Raw::start_version(s, pgha_proxy::protocol::PROTOCOL_V3, more)
    }

    fn start_version(s: TcpStream, version: i32, more: &[(&str, &str)]) -> Raw {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw {
            s,
            buf: BytesMut::new(),
        };
        let mut all = vec![("user", "postgres"), ("database", "postgres")];
        all.extend_from_slice(more);
        let mut out = BytesMut::new();
        msg::put_startup(&mut out, &all);
        out[4..8].copy_from_slice(&version.to_be_bytes());
        r.send(&out);
        r
    }

    /// Connects with startup parameters `more` besides user and database;
    /// the error the login got, if any.
    pub fn try_connect_with(port: u16, more: &[(&str, &str)]) -> Result<Raw, msg::ErrorFields> {
        let mut r = Raw::start_on(port, more);
        loop {
            match r.recv() {
                (b'E', body) => return Err(msg::error_fields(&body).unwrap()),
                (b'Z', _) => return Ok(r),
                _ => {}
            }
        }
    }

    /// Logs in on `s`; returns the ParameterStatus values the proxy sent.
    fn login(s: TcpStream) -> (Raw, Vec<(String, String)>) {
        let mut r = Raw::start(s, &[]);
        let mut params = Vec::new();
        for (tag, body) in r.until_ready_full() {
            assert_ne!(tag, b'E', "login failed: {:?}", msg::error_fields(&body));
            if tag == b'S' {
                let (k, v) = msg::parameter_status(&body).unwrap();
                params.push((k.to_owned(), v.to_owned()));
            }
        }
        (r, params)
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Builds messages with the proxy's own encoders and sends them at once.
    pub fn send_with(&mut self, f: impl FnOnce(&mut BytesMut)) {
        let mut out = BytesMut::new();
        f(&mut out);
        self.send(&out);
    }

    /// The next message: tag and body.
    pub fn recv(&mut self) -> (u8, Vec<u8>) {
        loop {
            if let Some(f) = split_frame(&mut self.buf, 1 << 30).unwrap() {
                return (f.tag(), f.body().to_vec());
            }
            let mut chunk = [0u8; 8192];
            let n = self.s.read(&mut chunk).expect("read from proxy");
            assert!(n > 0, "proxy closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The proxy closed the connection: nothing more to read (the read
    /// timeout bounds the wait).
    pub fn expect_closed(&mut self) {
        assert!(self.buf.is_empty(), "unread messages before the close");
        let mut chunk = [0u8; 64];
        match self.s.read(&mut chunk) {
            Ok(0) => {}
            Ok(n) => panic!("{n} more bytes instead of the close"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }

    /// Tags of every message up to and including the next ReadyForQuery;
    /// returns them with the ReadyForQuery status.
    pub fn until_ready(&mut self) -> (Vec<u8>, u8) {
        let mut tags = Vec::new();
        loop {
            let (tag, body) = self.recv();
            tags.push(tag);
            if tag == b'Z' {
                return (tags, body[0]);
            }
        }
    }

    /// Messages up to the next ReadyForQuery, with bodies.
    pub fn until_ready_full(&mut self) -> Vec<(u8, Vec<u8>)> {
        let mut all = Vec::new();
        loop {
            let m = self.recv();
            let done = m.0 == b'Z';
            all.push(m);
            if done {
                return all;
            }
        }
    }

    /// Runs a simple query; the first column of each row.
    pub fn query(&mut self, sql: &str) -> Vec<String> {
        self.send_with(|b| msg::put_query(b, sql));
        let mut rows = Vec::new();
        for (tag, body) in self.until_ready_full() {
            if tag == b'E' {
                panic!("query {sql:?} failed: {:?}", msg::error_fields(&body));
            }
            if tag == b'D' {
                let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                rows.push(if len < 0 {
                    String::new()
                } else {
                    String::from_utf8_lossy(&body[6..6 + len as usize]).into_owned()
                });
            }
        }
        rows
    }
}

/// Server connections the proxy has open on `pg`.
pub fn proxy_backends(pg: &PgInstance) -> usize {
    count_proxy_backends(pg, "")
}

/// Server connections the proxy has open on `pg` in database `db`.
pub fn proxy_backends_in(pg: &PgInstance, db: &str) -> usize {
    count_proxy_backends(pg, &format!("and datname = '{db}'"))
}

fn count_proxy_backends(pg: &PgInstance, and: &str) -> usize {
    pg.psql(&format!(
        "select count(*) from pg_stat_activity where application_name = 'pgha-proxy' {and}"
    ))
    .unwrap()
    .parse()
    .unwrap()
}

/// Waits until the proxy has at most `n` server connections open on
/// `pg`: a server it closed stays in pg_stat_activity until its backend
/// process has seen the EOF and exited, which on a loaded machine can be
/// after the proxy opened the next one.
pub fn wait_proxy_backends_at_most(pg: &PgInstance, n: usize) {
    pgha_local::wait_until(
        &format!("at most {n} proxy server connections"),
        Duration::from_secs(10),
        || Ok((proxy_backends(pg) <= n).then_some(())),
    )
    .unwrap();
}

/// Clients of `p` waiting for their backend to have room.
pub fn waiting_for_backend(p: &Running) -> usize {
    let pools = p.handle().shared.pools.snapshot();
    pools.iter().map(|pool| pool.waiting_for_backend()).sum()
}

/// The server's message text of a tokio-postgres error.
pub fn db_message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| format!("{}: {}", d.code().code(), d.message()))
        .unwrap_or_else(|| e.to_string())
}

/// One HTTP/1.1 request to the admin API on 127.0.0.1:`port`, with a
/// bearer token when given: the whole response, status line first.
pub fn http(port: u16, method: &str, path: &str, auth: Option<&str>) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = auth
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// One series' value in Prometheus text (`name{labels}` exactly as
/// rendered); 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
