//! One connection from the proxy to a Postgres server: startup,
//! authentication (trust, cleartext, md5, SCRAM-SHA-256), the role check
//! `pg_is_in_recovery()` that every new connection must pass, and the reset
//! used between session-mode clients.
//!
//! After login the session moves bytes on [`ServerConn::stream`] itself;
//! this module only runs the proxy's own little conversations. May call:
//! `protocol`, `tracker`, `prepared`, `sockopt`, tokio networking.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::config::ServerTlsMode;
use crate::prepared::ServerCache;
use crate::protocol::messages::{self as msg, ErrorFields};
use crate::protocol::{split_frame, Frame, ProtocolError};
use crate::router::Backend;
use crate::sockopt::SocketSetup;
use crate::tls::ServerTls;
use crate::tracker::Tracker;
use crate::vars::Vars;

/// Messages from a server larger than this are refused during login.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Why a server connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot connect to {backend}: {source}")]
    Connect {
        backend: String,
        source: std::io::Error,
    },
    #[error("I/O error with server: {0}")]
    Io(#[from] std::io::Error),
    #[error("server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("server refused: {} {}", .0.code, .0.message)]
    Rejected(ErrorFields),
    #[error("server asks for a password the proxy does not have")]
    NoPassword,
    #[error("server asks for SCRAM, but the proxy has only the md5 hash of this user's password (put the password or a SCRAM verifier in the users file, or use md5 on the server)")]
    Md5ForScram,
    #[error("server authentication failed: {0}")]
    Auth(String),
    #[error("server protocol error: {0}")]
    Protocol(String),
    #[error("server closed the connection")]
    Closed,
    #[error("TLS to {backend}: {reason}")]
    Tls { backend: String, reason: String },
}

impl ServerError {
    /// Whether waiting may help: the server is down, starting, stopping or
    /// full. A refusal for the login itself (bad password, unknown
    /// database, bad startup `options`) stays a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            ServerError::Rejected(f) => ["08", "53", "57"].iter().any(|c| f.code.starts_with(c)),
            ServerError::NoPassword | ServerError::Md5ForScram | ServerError::Auth(_) => false,
            _ => true,
        }
    }
}

impl From<ProtocolError> for ServerError {
    fn from(e: ProtocolError) -> Self {
        ServerError::Protocol(e.to_string())
    }
}

/// ParameterStatus values a server reported, and the same as wire
/// messages, encoded once so a new client gets them with one copy.
#[derive(Debug, Default)]
pub struct ParamSet {
    pub list: Vec<(String, String)>,
    pub wire: bytes::Bytes,
    /// The tracked session settings among them (see `vars`), looked up
    /// once per server connection instead of once per client.
    pub vars: Vars,
}

impl ParamSet {
    pub fn new(list: Vec<(String, String)>) -> ParamSet {
        let mut wire = BytesMut::new();
        for (k, v) in &list {
            msg::put_parameter_status(&mut wire, k, v);
        }
        ParamSet {
            vars: Vars::from_params(list.iter().map(|(k, v)| (k, v))),
            list,
            wire: wire.freeze(),
        }
    }
}

/// Shared with the sessions and the pool.
pub type Params = Arc<ParamSet>;

/// Who logs in, where, and the secret that lets it in (never printed).
#[derive(Clone)]
pub struct Login {
    pub user: String,
    pub database: String,
    /// The client's startup `options` (command-line settings such as
    /// `-c search_path=app`; empty: none), sent on every server connection
    /// opened for it: clients with different options use different pools,
    /// so the settings hold in every transaction.
    pub options: String,
    pub secret: Secret,
}

/// What the proxy logs in to servers with, for one user. One word and a
/// tag: every session keeps its login.
#[derive(Clone, Default)]
pub enum Secret {
    /// Nothing: only servers that trust the user let it in.
    #[default]
    None,
    /// The password: answers whatever a server asks.
    Password(String),
    /// The md5 hash of the password (`md5...`, from the users file or
    /// auth_query) when the password itself is not known: it answers an
    /// md5 challenge, not SCRAM.
    Md5(String),
    /// (ClientKey, ServerKey) for SCRAM without the password: recovered
    /// from the client's own SCRAM login against a verifier.
    ScramKeys(Box<([u8; 32], [u8; 32])>),
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user", &self.user)
            .field("database", &self.database)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// The SCRAM exchange with a server in progress.
enum ScramClient {
    Password(ScramSha256),
    Keys(crate::auth::scram::KeyClient),
}

impl std::fmt::Debug for ScramClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramClient(..)")
    }
}

/// The byte stream to a server: plain TCP or TLS over it.
#[derive(Debug)]
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ServerStream {
    fn tcp(&self) -> &TcpStream {
        match self {
            ServerStream::Plain(s) => s,
            ServerStream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether the server sent something (or closed) while nobody was
    /// reading: an idle pooled connection that did is not reused. Looks
    /// at the socket without consuming, so it works under TLS too.
    pub fn has_unread_input(&self) -> bool {
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        !matches!(self.tcp().poll_peek(&mut cx, &mut buf), Poll::Pending)
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl crate::session::WriteNow for ServerStream {
    fn write_now(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ServerStream::Plain(s) => s.write_now(buf),
            ServerStream::Tls(_) => Ok(0),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Asks the server for TLS (SSLRequest) and runs the handshake; a server
/// that declines is used in plain text only under `prefer`.
async fn negotiate_tls(
    mut tcp: TcpStream,
    backend: &Backend,
    tls: &ServerTls,
) -> Result<ServerStream, ServerError> {
    let fail = |reason: String| ServerError::Tls {
        backend: backend.name.clone(),
        reason,
    };
    let mut req = BytesMut::new();
    req.extend_from_slice(&8i32.to_be_bytes());
    req.extend_from_slice(&crate::protocol::SSL_REQUEST_CODE.to_be_bytes());
    tcp.write_all(&req).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode == ServerTlsMode::Prefer => return Ok(ServerStream::Plain(tcp)),
        b'N' => return Err(fail("the server does not accept TLS".into())),
        other => {
            return Err(fail(format!(
                "unexpected answer {other:#04x} to SSLRequest"
            )))
        }
    }
    let name = rustls::pki_types::ServerName::try_from(backend.host.clone())
        .map_err(|e| fail(format!("host {:?}: {e}", backend.host)))?;
    let stream = tls
        .connector
        .connect(name, tcp)
        .await
        .map_err(|e| fail(e.to_string()))?;
    Ok(ServerStream::Tls(Box::new(stream)))
}

/// How new server connections are made.
#[derive(Debug, Clone)]
pub struct ConnectOpts {
    /// Connecting, TLS and login together.
    pub timeout: Duration,
    /// Prepared statements kept (transaction mode).
    pub cache_size: usize,
    pub tls: Option<Arc<ServerTls>>,
    /// TCP options (keepalive, user timeout) as configured now.
    pub sockets: Arc<SocketSetup>,
}

/// A logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    pub stream: ServerStream,
    /// Bytes read from the server not yet handled.
    pub rbuf: BytesMut,
    pub backend: Arc<Backend>,
    /// ParameterStatus values the server reported at login (updated as it
    /// reports changes).
    pub params: Params,
    /// The tracked session settings as the server last reported them.
    pub vars: Vars,
    /// The server's BackendKeyData, for cancel requests.
    pub key: (i32, i32),
    pub in_recovery: bool,
    /// When it was opened and last given back, on [`crate::clock`].
    pub created: u64,
    pub idle_since: u64,
    pub tracker: Tracker,
    pub prepared: ServerCache,
    /// Must not be reused (its prepared statements went stale after DDL).
    pub discard: bool,
    /// Its backend's `max_backend_connections` slot (every pooled one has
    /// one, bound or not; the proxy's own auth_query connections none):
    /// freed when the connection closes.
    pub cap_slot: Option<crate::cap::CapSlot>,
}

impl ServerConn {
    /// Connects, logs in and checks the server's role, all within `timeout`.
    pub async fn connect(
        backend: Arc<Backend>,
        login: &Login,
        opts: &ConnectOpts,
    ) -> Result<Box<ServerConn>, ServerError> {
        tokio::time::timeout(opts.timeout, Self::connect_inner(backend, login, opts))
            .await
            .map_err(|_| ServerError::Timeout(opts.timeout))?
    }

    async fn connect_inner(
        backend: Arc<Backend>,
        login: &Login,
        opts: &ConnectOpts,
    ) -> Result<Box<ServerConn>, ServerError> {
        let tcp = TcpStream::connect((backend.host.as_str(), backend.port))
            .await
            .map_err(|source| ServerError::Connect {
                backend: backend.name.clone(),
                source,
            })?;
        opts.sockets.apply(&tcp);
        let stream = match &opts.tls {
            Some(tls) => negotiate_tls(tcp, &backend, tls).await?,
            None => ServerStream::Plain(tcp),
        };
        let cache_size = opts.cache_size;
        let mut conn = Box::new(ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            backend,
            params: Arc::new(ParamSet::default()),
            vars: Vars::default(),
            key: (0, 0),
            in_recovery: true,
            created: crate::clock::refresh(),
            idle_since: crate::clock::now_ms(),
            tracker: Tracker::default(),
            prepared: ServerCache::new(cache_size),
            discard: false,
            cap_slot: None,
        });
        conn.login(login).await?;
        let rows = conn
            .simple_query("select pg_catalog.pg_is_in_recovery()")
            .await?;
        conn.in_recovery = match rows.first().map(String::as_str) {
            Some("f") => false,
            Some("t") => true,
            other => {
                return Err(ServerError::Protocol(format!(
                    "pg_is_in_recovery() returned {other:?}"
                )))
            }
        };
        Ok(conn)
    }

    /// Reads the next whole message from the server.
    pub async fn read_frame(&mut self) -> Result<Frame, ServerError> {
        loop {
            if let Some(f) = split_frame(&mut self.rbuf, MAX_LOGIN_MESSAGE)? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ServerError::Closed);
            }
        }
    }

    async fn login(&mut self, login: &Login) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        let mut params = vec![
            ("user", login.user.as_str()),
            ("database", login.database.as_str()),
            ("application_name", "pgha-proxy"),
        ];
        if !login.options.is_empty() {
            params.push(("options", login.options.as_str()));
        }
        msg::put_startup(&mut out, &params);
        self.stream.write_all(&out).await?;
        let mut scram: Option<ScramClient> = None;
        let mut params = Vec::new();
        loop {
            let f = self.read_frame().await?;
            match f.tag() {
                b'R' => self.auth_step(f.body(), login, &mut scram).await?,
                b'S' => {
                    if let Some((k, v)) = msg::parameter_status(f.body()) {
                        params.push((k.to_owned(), v.to_owned()));
                    }
                }
                b'K' => {
                    self.key = msg::backend_key(f.body())
                        .ok_or_else(|| ServerError::Protocol("bad BackendKeyData".into()))?;
                }
                b'E' => return Err(rejected(f.body())),
                b'Z' => {
                    let set = ParamSet::new(params);
                    self.vars = set.vars.clone();
                    self.params = Arc::new(set);
                    return Ok(());
                }
                _ => {}
            }
        }
    }

    async fn auth_step(
        &mut self,
        body: &[u8],
        login: &Login,
        scram: &mut Option<ScramClient>,
    ) -> Result<(), ServerError> {
        let bad = || ServerError::Protocol("bad authentication request".into());
        let (code, data) = body.split_first_chunk::<4>().ok_or_else(bad)?;
        let mut out = BytesMut::new();
        match i32::from_be_bytes(*code) {
            0 => return Ok(()),
            3 => match &login.secret {
                Secret::Password(pw) => msg::put_password(&mut out, pw),
                _ => return Err(ServerError::NoPassword),
            },
            5 => {
                let salt: [u8; 4] = data.try_into().map_err(|_| bad())?;
                let stored = match &login.secret {
                    Secret::Password(pw) => crate::auth::md5_stored(&login.user, pw),
                    Secret::Md5(hash) => hash.clone(),
                    Secret::ScramKeys(_) | Secret::None => return Err(ServerError::NoPassword),
                };
                msg::put_password(&mut out, &crate::auth::md5_salted(&stored, salt));
            }
            10 => {
                let client = match &login.secret {
                    Secret::Password(pw) => ScramClient::Password(ScramSha256::new(
                        pw.as_bytes(),
                        ChannelBinding::unsupported(),
                    )),
                    Secret::ScramKeys(keys) => {
                        let (ck, sk) = **keys;
                        ScramClient::Keys(crate::auth::scram::KeyClient::new(
                            ck,
                            sk,
                            crate::auth::nonce(),
                        ))
                    }
                    Secret::Md5(_) => return Err(ServerError::Md5ForScram),
                    Secret::None => return Err(ServerError::NoPassword),
                };
                let first = match &client {
                    ScramClient::Password(c) => c.message().to_vec(),
                    ScramClient::Keys(k) => k.first(),
                };
                msg::put_sasl_initial(&mut out, "SCRAM-SHA-256", &first);
                *scram = Some(client);
            }
            11 => {
                let auth = |e: String| ServerError::Auth(e);
                let reply = match scram.as_mut().ok_or_else(bad)? {
                    ScramClient::Password(c) => {
                        c.update(data).map_err(|e| auth(e.to_string()))?;
                        c.message().to_vec()
                    }
                    ScramClient::Keys(k) => k.respond(data).map_err(|e| auth(e.to_string()))?,
                };
                msg::put_sasl_response(&mut out, &reply);
            }
            12 => {
                let auth = |e: String| ServerError::Auth(e);
                return match scram.as_mut().ok_or_else(bad)? {
                    ScramClient::Password(c) => c.finish(data).map_err(|e| auth(e.to_string())),
                    ScramClient::Keys(k) => k.verify(data).map_err(|e| auth(e.to_string())),
                };
            }
            other => {
                return Err(ServerError::Auth(format!(
                    "unsupported authentication request {other}"
                )))
            }
        }
        self.stream.write_all(&out).await?;
        Ok(())
    }

    /// Runs `sql` with the simple protocol; the first column of each row.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<String>, ServerError> {
        let rows = self.query_rows(sql).await?;
        Ok(rows
            .into_iter()
            .map(|r| r.into_iter().next().flatten().unwrap_or_default())
            .collect())
    }

    /// Runs `sql` with the simple protocol; every column of each row
    /// (`None` for NULL).
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let mut out = BytesMut::new();
        msg::put_query(&mut out, sql);
        self.stream.write_all(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.read_frame().await?;
            match f.tag() {
                b'D' => rows.push(columns(f.body()).unwrap_or_default()),
                b'E' => error = Some(rejected(f.body())),
                // DISCARD ALL reports the settings it reset.
                b'S' => {
                    if let Some((k, v)) = msg::parameter_status(f.body()) {
                        self.vars.set(k, v);
                    }
                }
                b'Z' => {
                    if let Some(s) = msg::ready_status(f.body()) {
                        self.tracker = Tracker::default();
                        if s != b'I' {
                            return Err(ServerError::Protocol(format!(
                                "server not idle after {sql:?}"
                            )));
                        }
                    }
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    };
                }
                _ => {}
            }
        }
    }

    /// Resets session state before another session-mode client gets it.
    pub async fn reset(&mut self) -> Result<(), ServerError> {
        self.simple_query("DISCARD ALL").await?;
        self.prepared.clear();
        Ok(())
    }
}

fn rejected(body: &[u8]) -> ServerError {
    ServerError::Rejected(msg::error_fields(body).unwrap_or_default())
}

/// The columns of a DataRow as text (`None` for NULL).
fn columns(body: &[u8]) -> Option<Vec<Option<String>>> {
    let (count, mut rest) = body.split_first_chunk::<2>()?;
    let mut out = Vec::new();
    for _ in 0..u16::from_be_bytes(*count) {
        let (len, r) = rest.split_first_chunk::<4>()?;
        let len = i32::from_be_bytes(*len);
        match usize::try_from(len) {
            Ok(n) => {
                out.push(Some(String::from_utf8_lossy(r.get(..n)?).into_owned()));
                rest = r.get(n..)?;
            }
            Err(_) => {
                out.push(None);
                rest = r;
            }
        }
    }
    Some(out)
}

/// Sends a CancelRequest for `key` to the server at `backend`.
pub async fn send_cancel(backend: &Backend, key: (i32, i32)) -> Result<(), ServerError> {
    let mut s = TcpStream::connect((backend.host.as_str(), backend.port))
        .await
        .map_err(|source| ServerError::Connect {
            backend: backend.name.clone(),
            source,
        })?;
    let mut out = BytesMut::new();
    msg::put_cancel(&mut out, key.0, key.1);
    s.write_all(&out).await?;
    // The server closes the connection after handling the request.
    let mut sink = [0u8; 1];
    let _ = s.read(&mut sink).await;
    Ok(())
}
