//! A new client connection up to its first ReadyForQuery: SSL/GSS
//! negotiation (refused until TLS is configured), cancel requests, the
//! client limit, authentication, and the parameters of the node that will
//! serve it. Bounded by `startup_timeout` (the deadline on the session's
//! bell, see `bell`) so slow clients cannot hold a slot.
//!
//! The tracked settings a client sends in its startup packet (TimeZone,
//! DateStyle, application_name... see `vars`) are set on every server it
//! uses; its `options` choose its pools (see `server::Login`). May call:
//! `auth`, `cancel`, the session.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ClientError, ClientIo, Session};
use crate::auth::{self, AuthError};
use crate::bell::Doorbell;
use crate::config::{AuthMethod, ClientTlsMode};
use crate::protocol::messages as msg;
use crate::protocol::{split_startup, ProtocolError, StartupPacket, StartupParams};
use crate::router::Route;
use crate::server::{Login, Secret};
use crate::Shared;

/// How a client reached the proxy.
pub enum Link {
    /// TCP without TLS.
    Plain,
    /// A Unix-domain socket: local, without TLS (as PostgreSQL's `local`).
    Local,
    /// TLS, with the channel binding data a SCRAM login may bind to (see
    /// `tls`), if the certificate gives one.
    Tls(Option<Arc<[u8]>>),
}

/// What the first bytes of a TCP connection asked for.
enum Negotiated {
    Plain(tokio::net::TcpStream, BytesMut),
    /// SSLRequest, answered `S`: the TLS handshake comes next.
    Tls(tokio::net::TcpStream, Arc<crate::tls::Tls>),
    Done,
}

/// Reads the first 8 bytes: an SSLRequest gets `S` (with a certificate;
/// the TLS handshake is the caller's) or `N`; anything else is the start
/// of a startup packet, kept for the handshake. Bounded, with the rest of
/// the login, by the startup deadline on the session's bell.
async fn negotiate(shared: &Shared, mut stream: tokio::net::TcpStream) -> Negotiated {
    let mut buf = BytesMut::with_capacity(256);
    let request = |buf: &BytesMut, code: i32| {
        buf.len() == 8 && buf[..4] == 8i32.to_be_bytes() && buf[4..8] == code.to_be_bytes()
    };
    // libpq asks for GSS encryption first when it holds a Kerberos
    // ticket (gssencmode=prefer): `N`, then its SSLRequest comes.
    for _ in 0..2 {
        while buf.len() < 8 {
            if !matches!(stream.read_buf(&mut buf).await, Ok(n) if n > 0) {
                return Negotiated::Done;
            }
        }
        if !request(&buf, crate::protocol::GSSENC_REQUEST_CODE) {
            break;
        }
        buf.clear();
        if stream.write_all(b"N").await.is_err() {
            return Negotiated::Done;
        }
    }
    if !request(&buf, crate::protocol::SSL_REQUEST_CODE) {
        return Negotiated::Plain(stream, buf);
    }
    buf.clear();
    let tls = shared.tls.load_full();
    let answer: &[u8] = if tls.is_some() { b"S" } else { b"N" };
    if stream.write_all(answer).await.is_err() {
        return Negotiated::Done;
    }
    match tls {
        Some(acceptor) => Negotiated::Tls(stream, acceptor),
        None => Negotiated::Plain(stream, buf),
    }
}

/// The TLS handshake after `S`.
async fn accept_tls(
    stream: tokio::net::TcpStream,
    acceptor: Arc<crate::tls::Tls>,
) -> Option<Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    match acceptor.acceptor.accept(stream).await {
        Ok(tls) => Some(Box::new(tls)),
        Err(e) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
    }
}

/// Serves one TCP client: negotiates TLS if it asks and the proxy has a
/// certificate, then serves it to the end. The TLS handshake and session
/// are boxed: plain clients must not pay for their size.
/// Ends when the proxy stops, wherever the session is, and when the client
/// has not logged in within `startup_timeout` (from the moment it was
/// accepted: negotiation, TLS and authentication together).
pub async fn serve_tcp(shared: Arc<Shared>, stream: tokio::net::TcpStream, route: Route) {
    with_startup_deadline(shared, |shared, bell| {
        serve_client(shared, stream, route, bell)
    })
    .await;
}

/// Serves one client of a Unix-domain socket: as a TCP one, but without
/// TLS (PostgreSQL offers none there either: an SSLRequest gets `N`).
pub async fn serve_unix(shared: Arc<Shared>, stream: tokio::net::UnixStream, route: Route) {
    with_startup_deadline(shared, |shared, bell| {
        serve(shared, stream, route, BytesMut::new(), bell, Link::Local)
    })
    .await;
}

/// Runs a client's whole task, `work` given the session's bell, which
/// ends it if the login takes longer than `startup_timeout` and when the
/// proxy stops.
async fn with_startup_deadline<F: std::future::Future<Output = ()>>(
    shared: Arc<Shared>,
    work: impl FnOnce(Arc<Shared>, Arc<Doorbell>) -> F,
) {
    let timeout = shared.cfg.load().startup_timeout;
    let registered = shared.bells.register_starting(timeout);
    // Boxed once: spawning the task and ending it then move a pointer,
    // not the session's whole state (several copies per connection).
    let work = Box::pin(work(shared, registered.bell.clone()));
    if registered.bell.until_stopped(work).await.is_none() && registered.bell.startup_expired() {
        tracing::info!("client did not finish startup within {timeout:?}");
    }
}

/// Everything a TCP client's task does, from the first byte to the end.
async fn serve_client(
    shared: Arc<Shared>,
    stream: tokio::net::TcpStream,
    route: Route,
    bell: Arc<Doorbell>,
) {
    match negotiate(&shared, stream).await {
        Negotiated::Plain(stream, buf) => {
            serve(shared, stream, route, buf, bell, Link::Plain).await
        }
        Negotiated::Tls(stream, acceptor) => {
            let link = Link::Tls(acceptor.end_point.clone());
            // Boxed, so the plain path's state does not hold a TLS stream.
            let tls = Box::pin(accept_tls(stream, acceptor)).await;
            if let Some(tls) = tls {
                Box::pin(serve(shared, *tls, route, BytesMut::new(), bell, link)).await;
            }
        }
        Negotiated::Done => {}
    }
}

/// Serves one client connection to the end; `buf` holds bytes already
/// read, `bell` is rung on routing changes and drain, `link` says how
/// the client came.
pub async fn serve<C>(
    shared: Arc<Shared>,
    client: C,
    route: Route,
    buf: BytesMut,
    bell: Arc<Doorbell>,
    link: Link,
) where
    C: ClientIo,
{
    let guard = shared.client_enter();
    let clients = guard.clients;
    // Not boxed: its rare paths are (TLS, cancel, auth_query, password
    // exchanges), and what remains shares the task's memory with the
    // session's loop, which runs after it (`a_client_task_stays_small`).
    // The startup deadline (see `serve_tcp`) ends here, unless it passed
    // while the greeting went out.
    let session = handshake(shared, client, route, clients, buf, bell.clone(), link).await;
    // One binding for the session: a second (an `if` inside the `if let`)
    // keeps the moved-from Option beside it in every idle client's task.
    if let Some(mut session) = session.filter(|_| bell.started()) {
        session.run().await;
    }
    drop(guard);
}

async fn fatal<C: AsyncWrite + Unpin>(client: &mut C, code: &str, message: &str) {
    let mut out = BytesMut::new();
    msg::put_error(&mut out, "FATAL", code, message);
    let _ = client.write_all(&out).await;
    let _ = client.shutdown().await;
}

enum Startup {
    Params(StartupParams),
    Done,
}

async fn read_startup<C>(
    shared: &Shared,
    client: &mut C,
    buf: &mut BytesMut,
) -> Result<Startup, ProtocolError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match split_startup(buf)? {
            Some(StartupPacket::SslRequest) | Some(StartupPacket::GssEncRequest) => {
                if client.write_all(b"N").await.is_err() {
                    return Ok(Startup::Done);
                }
            }
            Some(StartupPacket::Cancel { pid, secret }) => {
                // Boxed: rare, and its state must not sit in every handshake.
                Box::pin(shared.cancels.cancel((pid, secret))).await;
                return Ok(Startup::Done);
            }
            Some(StartupPacket::Startup(p)) => return Ok(Startup::Params(p)),
            None => match client.read_buf(buf).await {
                Ok(0) | Err(_) => return Ok(Startup::Done),
                Ok(_) => {}
            },
        }
    }
}

impl<C: ClientIo> Session<C> {
    /// Tells the client the parameters of the node that will serve it: the
    /// pool's cached values in transaction mode (no server needed, so
    /// clients can connect while every server is busy), else a server's.
    async fn startup_params(&mut self) -> Result<(), ClientError> {
        if self.tx_mode() {
            let table = self.shared.topology.load();
            let fallback = self.cfg.ro_fallback_to_leader;
            let turn = self.shared.next_turn();
            if let Some(b) = table
                .choose(self.route, turn, fallback)
                .filter(|_| !table.paused)
            {
                let pool = self.shared.pools.get(&b, &self.login, self.route);
                self.pool_cache = Some((b.clone(), pool.clone()));
                // The first transaction takes this pool without a new
                // choice while the table stays as it is (see `attach`).
                self.cache_epoch = self.sticky_epoch(&table);
                if let Some(params) = pool.cached_params() {
                    self.tell_params(&params);
                    return Ok(());
                }
            }
        }
        self.attach().await?;
        if self.tx_mode() {
            self.release();
        } else {
            // Session mode keeps this server: it gets the client's settings
            // ahead of the client's first message.
            self.sync_vars();
        }
        Ok(())
    }
}

/// Authenticates the client (users file, else auth_query); on success the
/// credentials the proxy logs in to servers with, on failure the client
/// got its error.
async fn client_login<C: ClientIo>(
    shared: &Shared,
    cfg: &crate::Config,
    client: &mut C,
    buf: &mut BytesMut,
    user: &str,
    binding: Option<&[u8]>,
) -> Option<Secret> {
    let method = cfg.auth_method;
    let users = shared.users.load_full();
    let mut secret = users.as_deref().and_then(|u| u.get(user)).cloned();
    if secret.is_none() && cfg.auth_query.is_some() && method != AuthMethod::Trust {
        secret = match Box::pin(auth::query::lookup(shared, user)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(user, error = %e, "auth_query failed");
                None
            }
        };
    }
    let known_only = users.is_some();
    // Trust needs no exchange; the others' state is boxed, so that it does
    // not sit in every client's handshake.
    let outcome = match method {
        AuthMethod::Trust => auth::trust(secret.as_ref(), known_only, user),
        _ => {
            Box::pin(auth::authenticate(
                client,
                buf,
                method,
                secret.as_ref(),
                known_only,
                user,
                binding,
            ))
            .await
        }
    };
    let client_key = match outcome {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(user, error = %e, "client authentication failed");
            shared.metrics.error(crate::metrics::ErrorKind::Auth);
            if !matches!(e, AuthError::Closed | AuthError::Io(_)) {
                let text = format!("password authentication failed for user \"{user}\"");
                fatal(client, "28P01", &text).await;
            }
            return None;
        }
    };
    Some(secret.map_or(Secret::None, |s| s.for_servers(client_key)))
}

/// Folds the startup packet's other settings (`search_path`,
/// `statement_timeout`, ...: what asyncpg's `server_settings`, pgjdbc's
/// `currentSchema` or node-postgres's `statement_timeout` send) into
/// `options` as `-c name=value` switches, after the client's own (a
/// server applies such parameters after `options`, so they win there
/// too): servers are opened with them, clients that differ use different
/// pools, and they hold in every transaction, as on a direct connection.
/// Refuses what a pooled server cannot serve.
fn fold_settings(
    params: &crate::protocol::StartupParams,
    options: &mut String,
) -> Result<(), String> {
    // A lone trailing backslash would escape the space joined after it.
    let trailing = options.bytes().rev().take_while(|&b| b == b'\\').count();
    if trailing % 2 == 1 {
        return Err("the startup options end in a lone backslash".into());
    }
    for (name, value) in params.others() {
        if name == "replication" {
            // PostgreSQL's spellings of false (any case, unique prefixes).
            let v = value.to_ascii_lowercase();
            let no = ["false", "no", "off", "0"]
                .iter()
                .any(|f| !v.is_empty() && f.starts_with(&v) && v != "o");
            if no {
                continue;
            }
            return Err("replication connections cannot go through pgha-proxy: connect to the PostgreSQL server itself".into());
        }
        // Protocol options: none is supported (the client was told so,
        // see `handshake`).
        if name.starts_with("_pq_.") {
            continue;
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(format!("invalid startup parameter name {name:?}"));
        }
        if !options.is_empty() {
            options.push(' ');
        }
        options.push_str("-c ");
        options.push_str(name);
        options.push('=');
        // The server splits `options` at white space; a backslash keeps
        // the next character.
        for c in value.chars() {
            if c.is_ascii_whitespace() || c == '\x0b' || c == '\\' {
                options.push('\\');
            }
            options.push(c);
        }
    }
    Ok(())
}

pub(super) async fn handshake<C>(
    shared: Arc<Shared>,
    mut client: C,
    route: Route,
    clients: usize,
    mut buf: BytesMut,
    bell: Arc<Doorbell>,
    link: Link,
) -> Option<Session<C>>
where
    C: ClientIo,
{
    let params = match read_startup(&shared, &mut client, &mut buf).await {
        Ok(Startup::Params(p)) => p,
        Ok(Startup::Done) => return None,
        Err(e) => {
            shared.metrics.error(crate::metrics::ErrorKind::Protocol);
            fatal(&mut client, "08P01", &e.to_string()).await;
            return None;
        }
    };
    // One load of the configuration for the whole login.
    let cfg = shared.cfg();
    if clients > cfg.max_client_conn {
        shared
            .metrics
            .error(crate::metrics::ErrorKind::TooManyClients);
        fatal(&mut client, "53300", "sorry, too many clients already").await;
        return None;
    }
    if matches!(link, Link::Plain) && cfg.client_tls_mode == ClientTlsMode::Require {
        shared.metrics.error(crate::metrics::ErrorKind::Auth);
        let text = "this proxy accepts TCP clients only over TLS (client_tls_mode = require): connect with sslmode=require or stricter";
        tracing::info!(user = params.user(), "{text}");
        fatal(&mut client, "28000", text).await;
        return None;
    }
    // As a PostgreSQL 15 server answers a client asking for a newer
    // minor version or for protocol options: 3.0, without them.
    if params.needs_negotiation() {
        let mut out = BytesMut::new();
        let unsupported: Vec<&str> = params.protocol_options().collect();
        msg::put_negotiate_protocol(&mut out, &unsupported);
        if client.write_all(&out).await.is_err() {
            return None;
        }
    }
    let binding = match &link {
        Link::Tls(b) => b.as_deref(),
        Link::Plain | Link::Local => None,
    };
    let user = params.user().to_owned();
    let database = params.database().to_owned();
    let mut options = params
        .options()
        .map_or_else(String::new, |v| v.trim().to_owned());
    if params.has_others() {
        if let Err(text) = fold_settings(&params, &mut options) {
            shared.metrics.error(crate::metrics::ErrorKind::Protocol);
            fatal(&mut client, "0A000", &text).await;
            return None;
        }
    }
    let secret = client_login(&shared, &cfg, &mut client, &mut buf, &user, binding).await?;
    let mode = cfg.pool_settings(&database, &user).mode;
    let cancel = shared.cancels.register();
    let key = cancel.key;
    let mut s = Session {
        mode,
        cfg,
        shared: shared.clone(),
        client,
        route,
        login: Login {
            user,
            database,
            options,
            secret,
        },
        vars: crate::vars::Vars::from_startup(&params),
        cancel,
        bell,
        // Buffers grow on first use; an idle client holds none.
        cbuf: if buf.is_empty() { BytesMut::new() } else { buf },
        keep: Default::default(),
        out_server: BytesMut::new(),
        // Room for the whole greeting at once (AuthenticationOk, about a
        // dozen ParameterStatus, BackendKeyData, ReadyForQuery: ~450
        // bytes), instead of growing it five times.
        out_client: BytesMut::with_capacity(1024),
        server: None,
        stmts: Default::default(),
        told: Arc::default(),
        skipping: false,
        owed: None,
        pool_cache: None,
        seen_epoch: 0,
        cache_epoch: 0,
        awaits_server: false,
        pinned: false,
        sets: Default::default(),
    };
    // The greeting is built in the session's client buffer, the node's
    // ParameterStatus between AuthenticationOk and BackendKeyData.
    msg::put_auth_ok(&mut s.out_client);
    if let Err(ClientError { code, message }) = s.startup_params().await {
        fatal(&mut s.client, code, &message).await;
        return None;
    }
    msg::put_backend_key(&mut s.out_client, key.0, key.1);
    msg::put_ready(&mut s.out_client, b'I');
    s.flush().await.ok()?;
    // An idle client holds no write buffer: the next reply takes one.
    s.out_client = BytesMut::new();
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(pairs: &[(&str, &str)]) -> crate::protocol::StartupParams {
        let mut b = BytesMut::new();
        msg::put_startup(&mut b, pairs);
        match split_startup(&mut b) {
            Ok(Some(StartupPacket::Startup(p))) => p,
            other => panic!("{other:?}"),
        }
    }

    fn folded(pairs: &[(&str, &str)]) -> Result<String, String> {
        let p = startup(pairs);
        let mut options = p.options().unwrap_or_default().to_owned();
        fold_settings(&p, &mut options).map(|()| options)
    }

    /// Other startup settings follow the client's own options as `-c`
    /// switches, escaped for the server's split at white space; tracked
    /// settings (any letter case) and false `replication` are not folded.
    #[test]
    fn startup_settings_fold_into_the_options_escaped() {
        let got = folded(&[
            ("user", "u"),
            ("options", "-c a=1"),
            ("search_path", "x y"),
            ("app.v", "a\\b\tc"),
            ("TIMEZONE", "UTC"),
            ("replication", "Of"),
        ]);
        assert_eq!(
            got.unwrap(),
            "-c a=1 -c search_path=x\\ y -c app.v=a\\\\b\\\tc"
        );
        assert_eq!(folded(&[("user", "u"), ("b", "1")]).unwrap(), "-c b=1");
        // A lone trailing backslash would swallow the joining space.
        assert!(folded(&[("user", "u"), ("options", "-c a=x\\"), ("b", "1")]).is_err());
        let even = folded(&[("user", "u"), ("options", "-c a=x\\\\"), ("b", "1")]);
        assert_eq!(even.unwrap(), "-c a=x\\\\ -c b=1");
        for bad in [
            ("replication", "database"),
            ("replication", "o"),
            ("a=b", "1"),
            ("x y", "1"),
        ] {
            assert!(folded(&[("user", "u"), bad]).is_err(), "{bad:?}");
        }
    }

    /// What every connected client holds while idle: its task's future.
    /// 10,000 idle clients must fit in 100 MB with everything else. The
    /// bound is for this (debug) build, 2,024 bytes today. Each of these
    /// went past it: the session's future held twice (an `async fn`
    /// wrapper keeping its argument beside the pinned copy); the session
    /// held twice (`if let Some(s) = session { if started {..} }` keeps the
    /// moved-from Option beside `s`: 2,736 bytes, 12 MB more for 10,000
    /// idle clients).
    #[tokio::test]
    async fn a_client_task_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _peer = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = l.accept().await.unwrap();
        let cfg = Arc::new(crate::Config::default());
        let table = crate::router::RoutingTable::default();
        let shared = Arc::new(Shared::new(cfg, None, table));
        let bell = Arc::new(Doorbell::default());
        let work = serve_client(shared.clone(), stream, Route::ReadWrite, bell);
        let size = std::mem::size_of_val(&work);
        // 2,016 bytes on 2026-12-04: 48 bytes more (a login's three
        // secret fields) had cost 620 bytes per idle client in release
        // (`bench-poolers --idle`), the task crossing an allocator size
        // class.
        assert!(size <= 2048, "a client's state takes {size} bytes");
        let _peer2 = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = l.accept().await.unwrap();
        let task = serve_tcp(shared, stream, Route::ReadWrite);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 256,
            "a client's task holds {size} bytes besides its state"
        );
    }
}
