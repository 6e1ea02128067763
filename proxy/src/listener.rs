//! Starting and stopping the proxy: binds the read-write and read-only
//! listeners (TCP, and Unix-domain sockets with `unix_socket_dir`), spawns
//! one session per client, and stops on a cancellation token. Tests run
//! the proxy in-process through [`Proxy::start`].
//! May call: `session`, `topology`, `config`, `auth` (loading users),
//! `sockopt`.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthError, Users};
use crate::router::{Route, RoutingTable};
use crate::{Config, Shared};

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Users(#[from] AuthError),
    #[error("invalid config: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot listen on {path:?}: {reason}")]
    Unix { path: PathBuf, reason: String },
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    pub rw_addr: SocketAddr,
    pub ro_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub shared: Arc<Shared>,
    /// Cancel to stop everything at once; sessions end with it.
    pub shutdown: CancellationToken,
    /// Cancel to stop accepting new clients (a child of `shutdown`).
    pub accepting: CancellationToken,
    pub tasks: TaskTracker,
    /// Client sessions only: what a drain waits for.
    pub sessions: TaskTracker,
    /// The Unix-domain sockets listened on (`unix_socket_dir`); each file
    /// is removed when its listener stops accepting.
    pub unix_sockets: Vec<PathBuf>,
}

impl ProxyHandle {
    /// Stops at once: listeners and sessions end now.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.shared.bells.stop();
        self.tasks.close();
        self.sessions.close();
        self.tasks.wait().await;
        self.sessions.wait().await;
    }

    /// Graceful stop (SIGTERM): stop accepting, let each client finish the
    /// transaction it is in (up to `bound`), then stop everything.
    pub async fn drain(self, bound: std::time::Duration) {
        self.accepting.cancel();
        self.shared.draining.cancel();
        self.tasks.close();
        self.sessions.close();
        if tokio::time::timeout(bound, self.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!("drain bound of {bound:?} reached; closing remaining clients");
        }
        self.shutdown.cancel();
        self.shared.bells.stop();
        self.tasks.wait().await;
        self.sessions.wait().await;
    }
}

/// Entry point.
pub struct Proxy;

impl Proxy {
    /// Binds the configured addresses (port 0 allowed) and starts serving.
    pub async fn start(cfg: Arc<Config>) -> Result<ProxyHandle, StartError> {
        let users = cfg.users_file.as_deref().map(Users::load).transpose()?;
        let shutdown = CancellationToken::new();
        let table = match cfg.etcd {
            Some(_) => RoutingTable::default(),
            None => RoutingTable::from_static(&cfg.backends),
        };
        let shared = Shared::new(cfg.clone(), users, table);
        shared
            .pools
            .set_config(cfg.clone(), crate::tls::server_tls(&cfg)?, false);
        shared.tls.store(crate::tls::client_tls(&cfg)?);
        let shared = Arc::new(shared);
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        let rw = bind(cfg.listen_rw).await?;
        let ro = bind(cfg.listen_ro).await?;
        let admin = bind(cfg.listen_admin).await?;
        let local = |l: &TcpListener, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { addr, source })
        };
        let (rw_addr, ro_addr) = (local(&rw, cfg.listen_rw)?, local(&ro, cfg.listen_ro)?);
        // Named after the ports bound (port 0 in tests): what libpq
        // looks for with host=<dir> port=<port>. Held until the accept
        // loops take them: a start that fails from here on removes the
        // files it made.
        let mut unix = Vec::new();
        if let Some(dir) = &cfg.unix_socket_dir {
            for (port, route) in [
                (rw_addr.port(), Route::ReadWrite),
                (ro_addr.port(), Route::ReadOnly),
            ] {
                unix.push((bind_unix(dir, port).await?, route));
            }
        }
        let handle = ProxyHandle {
            rw_addr,
            ro_addr,
            admin_addr: local(&admin, cfg.listen_admin)?,
            shared: shared.clone(),
            accepting: shutdown.child_token(),
            shutdown,
            tasks: TaskTracker::new(),
            sessions: TaskTracker::new(),
            unix_sockets: unix.iter().map(|(l, _)| l.file.path.clone()).collect(),
        };
        handle.tasks.spawn(crate::admin::serve(
            admin,
            shared.clone(),
            handle.shutdown.clone(),
        ));
        if let Some(etcd) = &cfg.etcd {
            let keys = pgha_cluster::Keys::new(&etcd.cluster)
                .map_err(|e| StartError::Config(e.to_string()))?;
            handle.tasks.spawn(crate::watch::run(
                shared.clone(),
                etcd.endpoints.clone(),
                keys,
                handle.shutdown.clone(),
            ));
        }
        let ctx = || AcceptCtx {
            shared: shared.clone(),
            accepting: handle.accepting.clone(),
            tasks: handle.sessions.clone(),
        };
        for (l, route) in [(rw, Route::ReadWrite), (ro, Route::ReadOnly)] {
            let l = Arc::new(l);
            shared.sockets.listen(&l);
            handle
                .tasks
                .spawn(accept_loop(l, route, ctx(), crate::session::serve_tcp));
        }
        for (l, route) in unix {
            handle.tasks.spawn(accept_loop(
                Arc::new(l),
                route,
                ctx(),
                crate::session::serve_unix,
            ));
        }
        handle
            .tasks
            .spawn(ring_sessions(shared.clone(), handle.shutdown.clone()));
        let (sweep_shared, sweep_stop) = (shared.clone(), handle.shutdown.clone());
        handle.tasks.spawn(async move {
            // Clients that have not logged in within startup_timeout or sat
            // idle past client_idle_timeout / idle_transaction_timeout;
            // the pools' coarse clock.
            let mut tick = tokio::time::interval(crate::bell::SWEEP_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        crate::clock::refresh();
                        let cfg = sweep_shared.cfg();
                        let limits = crate::bell::IdleLimits::new(
                            cfg.client_idle_timeout,
                            cfg.idle_transaction_timeout,
                        );
                        sweep_shared.bells.sweep(limits);
                    }
                    _ = sweep_stop.cancelled() => return,
                }
            }
        });
        let (upkeep_shared, upkeep_stop) = (shared.clone(), handle.shutdown.clone());
        handle.tasks.spawn(async move {
            // Housekeeping: idle timeouts, min_idle, histogram upkeep.
            let period = upkeep_shared.cfg().server_idle_timeout.clamp(
                std::time::Duration::from_millis(100),
                std::time::Duration::from_secs(5),
            );
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        upkeep_shared.metrics.upkeep();
                        upkeep_shared.pools.maintain().await;
                    }
                    _ = upkeep_stop.cancelled() => return,
                }
            }
        });
        Ok(handle)
    }
}

struct AcceptCtx {
    shared: Arc<Shared>,
    accepting: CancellationToken,
    tasks: TaskTracker,
}

/// A listener the proxy accepts clients on: TCP or a Unix-domain socket.
trait Accept: Send + Sync + 'static {
    type Stream: Send + 'static;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Stream>>;
}

impl Accept for TcpListener {
    type Stream = tokio::net::TcpStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Stream>> {
        TcpListener::poll_accept(self, cx).map_ok(|(s, _)| s)
    }
}

impl Accept for UnixSocket {
    type Stream = tokio::net::UnixStream;
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<std::io::Result<Self::Stream>> {
        self.listener.poll_accept(cx).map_ok(|(s, _)| s)
    }
}

/// A Unix-domain listener and its socket file, removed when it is dropped
/// (the accept loop ends, or the start fails) if it is still this
/// listener's: a proxy started meanwhile may have replaced it.
struct UnixSocket {
    listener: UnixListener,
    file: SocketFile,
}

struct SocketFile {
    path: PathBuf,
    /// (device, inode) of the file this listener made.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = ?self.path, error = %e, "cannot remove the socket file");
            }
        }
    }
}

/// Accepts clients until the proxy stops accepting; each is served by a
/// task of its own, `serve`.
async fn accept_loop<L, F>(
    l: Arc<L>,
    route: Route,
    ctx: AcceptCtx,
    serve: fn(Arc<Shared>, L::Stream, Route) -> F,
) where
    L: Accept,
    F: Future<Output = ()> + Send + 'static,
{
    let AcceptCtx {
        shared,
        accepting,
        tasks,
    } = ctx;
    // One wait for the stop, registered once, not once per client.
    let stop = accepting.cancelled();
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stop => return,
            a = std::future::poll_fn(|cx| l.poll_accept(cx)) => a,
        };
        match accepted {
            // A TCP client's options are inherited from the listener (see
            // `sockopt`).
            Ok(stream) => {
                tasks.spawn(serve(shared.clone(), stream, route));
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
}

/// Listens on `<dir>/.s.PGSQL.<port>`, open to every local user (as
/// PostgreSQL's default `unix_socket_permissions`). A socket file left by
/// a proxy that was killed is replaced; one a live process listens on,
/// or a file that is not a socket, is left alone and refused.
async fn bind_unix(dir: &Path, port: u16) -> Result<UnixSocket, StartError> {
    let path = dir.join(format!(".s.PGSQL.{port}"));
    let refuse = |reason: String| StartError::Unix {
        path: path.clone(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(refuse("a file that is not a socket is in the way".into()));
        }
        // Stale only if nothing listens: a refused connection. Anything
        // else (accepted, no permission, a full backlog) may be a live
        // server's.
        let probe = std::time::Duration::from_secs(1);
        match tokio::time::timeout(probe, tokio::net::UnixStream::connect(&path)).await {
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Ok(Ok(_)) => return Err(refuse("another process listens on it".into())),
            Ok(Err(e)) => return Err(refuse(format!("it may be in use ({e})"))),
            Err(_) => {
                return Err(refuse(
                    "another process listens on it (it did not answer)".into(),
                ))
            }
        }
        std::fs::remove_file(&path)
            .map_err(|e| refuse(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(&path).map_err(|e| refuse(e.to_string()))?;
    let meta = std::fs::symlink_metadata(&path).map_err(|e| refuse(e.to_string()))?;
    let file = SocketFile {
        path: path.clone(),
        id: (meta.dev(), meta.ino()),
    };
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| refuse(e.to_string()))?;
    Ok(UnixSocket { listener, file })
}

/// Rings every session's doorbell when the routing table changes and when
/// the drain begins, and stops them all with `stop` (see `bell`).
async fn ring_sessions(shared: Arc<Shared>, stop: CancellationToken) {
    let mut changes = shared.topology.subscribe();
    let mut drain_rung = false;
    loop {
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
            }
            _ = shared.draining.cancelled(), if !drain_rung => drain_rung = true,
            _ = stop.cancelled() => {
                shared.bells.stop();
                return;
            }
        }
        shared.bells.ring_all();
    }
}
