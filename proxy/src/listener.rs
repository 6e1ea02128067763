//! Starting and stopping the proxy: binds the read-write and read-only
//! listeners (TCP, and Unix-domain sockets with `unix_socket_dir`), spawns
//! one session per client, and stops on a cancellation token. Tests run
//! the proxy in-process through [`Proxy::start`].
//! May call: `session`, `topology`, `config`, `auth` (loading users),
//! `sockopt`, `unix`, `handover`, `accept`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::os::fd::OwnedFd;

use crate::auth::{AuthError, Users};
use crate::handover::{Listener, Role};
use crate::router::{Route, RoutingTable};
use crate::unix::{bind_unix, unix_inherited, UnixSocket};
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
    #[error("handover_socket: {0}")]
    Handover(String),
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
    /// is removed when its listener stops accepting, unless handed over.
    pub unix_sockets: Vec<PathBuf>,
    /// Cancelled once a successor took the listening sockets (see
    /// `handover`): this proxy no longer accepts and should drain.
    pub handed_over: CancellationToken,
    /// Whether this proxy took its listening sockets from a predecessor.
    pub took_over: bool,
    /// Orders a handover in progress and a drain.
    pub handover: Arc<crate::handover::Gate>,
}

impl ProxyHandle {
    /// Stops at once: listeners and sessions end now.
    pub async fn stop(self) {
        // During a handover the successor may serve the socket files a
        // moment later: they stay.
        let exchange = self.handover.try_hold();
        if exchange.is_none() {
            self.handed_over.cancel();
        }
        self.shutdown.cancel();
        drop(exchange);
        self.shared.bells.stop();
        self.tasks.close();
        self.sessions.close();
        self.tasks.wait().await;
        self.sessions.wait().await;
    }

    /// Graceful stop (SIGTERM): stop accepting, let each client finish the
    /// transaction it is in (up to `bound`), then stop everything.
    pub async fn drain(self, bound: std::time::Duration) {
        // Not after a handover: the exchange is over (its task may not
        // have let go of the gate yet).
        let exchange = match self.handed_over.is_cancelled() {
            true => None,
            false => Some(self.handover.before_drain().await),
        };
        self.accepting.cancel();
        drop(exchange);
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
        // Checked before a predecessor's sockets are taken: from then on
        // it drains, and a start that fails leaves no one accepting.
        let keys = cfg
            .etcd
            .as_ref()
            .map(|etcd| pgha_cluster::Keys::new(&etcd.cluster))
            .transpose()
            .map_err(|e| StartError::Config(e.to_string()))?;
        let mut taken = match &cfg.handover_socket {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || crate::handover::take(&path))
                    .await
                    .map_err(|e| StartError::Handover(e.to_string()))?
                    .map_err(StartError::Handover)?
                    .unwrap_or_default()
            }
            None => Default::default(),
        };
        let inherited = &mut taken.sockets;
        let took_over = !inherited.is_empty();
        if took_over {
            tracing::info!(
                sockets = inherited.len(),
                "took the listening sockets of the running pgha-proxy, which now drains"
            );
        }
        let handed_over = CancellationToken::new();
        let rw = tcp_listener(inherited, Listener::Rw, cfg.listen_rw).await?;
        let ro = tcp_listener(inherited, Listener::Ro, cfg.listen_ro).await?;
        let admin = tcp_listener(inherited, Listener::Admin, cfg.listen_admin).await?;
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
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let kept = handed_over.clone();
                let l = match unix_inherited(inherited, route, &path, kept.clone()) {
                    Some(l) => l,
                    None => bind_unix(&path, 0o777, false, kept).await?,
                };
                unix.push((l, route));
            }
        }
        // Sockets of the predecessor this configuration no longer has.
        for (role, _) in inherited.drain(..) {
            tracing::info!(
                ?role,
                "not listening on the predecessor's socket any more (the configuration changed)"
            );
        }
        // What a successor would take: copies of the descriptors, kept
        // while this proxy accepts.
        let mut offer = crate::handover::Offer::default();
        if cfg.handover_socket.is_some() {
            use std::os::fd::AsFd;
            let copy = |fd: std::os::fd::BorrowedFd<'_>| {
                fd.try_clone_to_owned()
                    .map_err(|e| StartError::Handover(e.to_string()))
            };
            for (which, l) in [
                (Listener::Rw, &rw),
                (Listener::Ro, &ro),
                (Listener::Admin, &admin),
            ] {
                offer.sockets.push((Role::Tcp(which), copy(l.as_fd())?));
            }
            for (l, route) in &unix {
                let role = Role::Unix(*route, l.file.path.clone());
                offer.sockets.push((role, copy(l.listener.as_fd())?));
            }
        }
        let handover = match &cfg.handover_socket {
            // After a takeover the file is the predecessor's, which no
            // longer serves it: replaced without a probe.
            Some(path) => Some(bind_unix(path, 0o600, took_over, handed_over.clone()).await?),
            None => None,
        };
        // Everything is bound: the predecessor may stop accepting now.
        // (Had this start failed, it would have gone on serving.)
        if took_over {
            match tokio::task::spawn_blocking(move || taken.ready()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "handover: the predecessor did not hear that this proxy is ready")
                }
                Err(e) => tracing::warn!(error = %e, "handover: telling the predecessor failed"),
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
            handed_over,
            took_over,
            handover: Default::default(),
        };
        // Also stopped by a handover: the successor answers from then on.
        let admin_stop = handle.shutdown.child_token();
        if let Some(listener) = handover {
            handle.tasks.spawn(offer_sockets(
                listener,
                offer,
                shared.clone(),
                (handle.handed_over.clone(), handle.handover.clone()),
                [handle.accepting.clone(), admin_stop.clone()],
            ));
        }
        handle
            .tasks
            .spawn(crate::admin::serve(admin, shared.clone(), admin_stop));
        if let (Some(etcd), Some(keys)) = (&cfg.etcd, keys) {
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
    let mut failures = crate::accept::Failures::default();
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
                failures.accepted(route.label());
                tasks.spawn(serve(shared.clone(), stream, route));
            }
            Err(e) => {
                if let Some(pause) = failures.failed(&e, route.label(), &shared.metrics) {
                    tokio::select! {
                        biased;
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }
}

/// The predecessor's TCP listener `which` if it listens where `addr`
/// says (port 0: any port), else a new one bound to `addr`.
async fn tcp_listener(
    inherited: &mut Vec<(Role, OwnedFd)>,
    which: Listener,
    addr: SocketAddr,
) -> Result<TcpListener, StartError> {
    let failed = |source| StartError::Bind { addr, source };
    if let Some(i) = inherited.iter().position(|(r, _)| *r == Role::Tcp(which)) {
        let l = std::net::TcpListener::from(inherited.remove(i).1);
        let at = l.local_addr().map_err(failed)?;
        if at.ip() == addr.ip() && (addr.port() == 0 || addr.port() == at.port()) {
            l.set_nonblocking(true).map_err(failed)?;
            return TcpListener::from_std(l).map_err(failed);
        }
        tracing::info!(%at, %addr, "the predecessor listened elsewhere; binding as configured");
    }
    TcpListener::bind(addr).await.map_err(failed)
}

/// Serves `handover_socket`: the first successor that asks gets the
/// listening sockets, and once it serves them this proxy stops accepting
/// clients and admin requests (`stop`; the caller then drains). Ends,
/// closing the copies, once this proxy stops accepting.
async fn offer_sockets(
    listener: UnixSocket,
    mut offer: crate::handover::Offer,
    shared: Arc<Shared>,
    (handed_over, gate): (CancellationToken, Arc<crate::handover::Gate>),
    stop: [CancellationToken; 2],
) {
    let [accepting, admin] = stop;
    let mut failures = crate::accept::Failures::default();
    loop {
        let stream = tokio::select! {
            _ = accepting.cancelled() => return,
            a = listener.listener.accept() => match a {
                Ok((s, _)) => {
                    failures.accepted("handover");
                    s
                }
                Err(e) => {
                    // Out of descriptors, say: not at once again (see `accept`).
                    if let Some(pause) = failures.failed(&e, "handover", &shared.metrics) {
                        tokio::select! {
                            _ = accepting.cancelled() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                    }
                    continue;
                }
            },
        };
        // A drain that comes now waits until the outcome is known.
        let _exchange = gate.exchange().await;
        if accepting.is_cancelled() {
            // Draining already (SIGTERM): its socket files are going.
            return;
        }
        let exchange = move || {
            let mut s = stream.into_std()?;
            s.set_nonblocking(false)?;
            let r = crate::handover::give(&mut s, &offer);
            Ok::<_, std::io::Error>((r, offer))
        };
        match tokio::task::spawn_blocking(exchange).await {
            Ok(Ok((Ok(()), _))) => {
                // Kept for the successor: this proxy's files must stay.
                handed_over.cancel();
                accepting.cancel();
                admin.cancel();
                tracing::info!("handed the listening sockets to a new pgha-proxy; draining");
                return;
            }
            Ok(Ok((Err(e), back))) => {
                tracing::warn!(error = %e, "handover socket: refused a request");
                offer = back;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "handover socket: cannot serve; no more handovers");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "handover socket: the exchange failed; no more handovers");
                return;
            }
        }
    }
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
