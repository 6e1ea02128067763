//! pgha-proxy: the Postgres wire-protocol proxy applications connect to.
//!
//! A read-write listener routes to the leader, a read-only listener to
//! healthy replicas; server connections are pooled per (database, user,
//! backend) in session or transaction mode. The module layout follows the
//! data flow: `listener` accepts, `session` serves one client, `server` is
//! one backend connection, `pool` keeps them, `router`/`topology` decide
//! where traffic goes, `protocol` parses bytes.

pub mod accept;
pub mod admin;
pub mod auth;
pub mod bell;
pub mod cancel;
pub mod cap;
pub mod clock;
pub mod config;
pub mod handover;
pub mod listener;
pub mod metrics;
pub mod pool;
pub mod prepared;
pub mod protocol;
pub mod reload;
pub mod router;
pub mod server;
pub mod session;
pub mod sets;
pub mod sockopt;
pub mod switchover;
pub mod tls;
pub mod topology;
pub mod tracker;
pub mod unix;
pub mod vars;
pub mod watch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub use config::Config;
pub use listener::{Proxy, ProxyHandle, StartError};

/// Locks `m`, also after a panic elsewhere poisoned it: every value the
/// proxy keeps behind a mutex stays valid between statements.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// State shared by every session of one proxy.
#[derive(Debug)]
pub struct Shared {
    /// The configuration; swapped on SIGHUP (see `reload`).
    pub(crate) cfg: arc_swap::ArcSwap<Config>,
    /// The users file's contents; swapped on SIGHUP.
    pub users: arc_swap::ArcSwapOption<auth::Users>,
    /// Cancelled on SIGTERM: sessions finish their transaction and leave.
    pub draining: tokio_util::sync::CancellationToken,
    pub pools: pool::Pools,
    /// TCP options for new client and server sockets; swapped on SIGHUP.
    pub sockets: Arc<sockopt::SocketSetup>,
    pub topology: Arc<topology::Topology>,
    pub cancels: Arc<cancel::Cancels>,
    /// Every session's doorbell: routing changes, drain, stop.
    pub bells: Arc<bell::Bells>,
    pub statements: prepared::Registry,
    pub pause: switchover::PauseState,
    pub metrics: metrics::Metrics,
    /// TLS towards clients, when configured; swapped on SIGHUP.
    pub tls: arc_swap::ArcSwapOption<tls::Tls>,
    clients: AtomicUsize,
    turn: AtomicUsize,
}

/// Counts a client connection while it lives.
#[derive(Debug)]
pub struct ClientGuard {
    shared: Arc<Shared>,
    /// Clients connected, this one included: beyond `max_client_conn`,
    /// this one is refused.
    pub clients: usize,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.shared.clients.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub fn new(cfg: Arc<Config>, users: Option<auth::Users>, table: router::RoutingTable) -> Self {
        let sockets = Arc::new(sockopt::SocketSetup::new(&cfg));
        Shared {
            pools: pool::Pools::new(cfg.clone(), sockets.clone()),
            sockets,
            cfg: arc_swap::ArcSwap::new(cfg),
            users: arc_swap::ArcSwapOption::from(users.map(Arc::new)),
            draining: tokio_util::sync::CancellationToken::new(),
            topology: Arc::new(topology::Topology::new(table)),
            cancels: Arc::default(),
            bells: Arc::default(),
            statements: prepared::Registry::default(),
            pause: switchover::PauseState::default(),
            metrics: metrics::Metrics::new(),
            tls: arc_swap::ArcSwapOption::empty(),
            clients: AtomicUsize::new(0),
            turn: AtomicUsize::new(0),
        }
    }

    /// Registers a new client connection.
    pub fn client_enter(self: &Arc<Self>) -> ClientGuard {
        let n = self.clients.fetch_add(1, Ordering::AcqRel) + 1;
        ClientGuard {
            shared: self.clone(),
            clients: n,
        }
    }

    /// The configuration now.
    pub fn cfg(&self) -> Arc<Config> {
        self.cfg.load_full()
    }

    /// Client connections now.
    pub fn client_count(&self) -> usize {
        self.clients.load(Ordering::Acquire)
    }

    /// Round-robin counter for read-only balancing.
    pub fn next_turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }
}
