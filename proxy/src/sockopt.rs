//! TCP options on the proxy's sockets, set once per socket: on every
//! accepted client (both listeners) and every server connection a pool
//! opens.
//!
//! Besides TCP_NODELAY, keepalive and TCP_USER_TIMEOUT, so that a peer
//! that vanished without a FIN or RST (power-off, partition) is noticed:
//! a vanished session-mode client gives its server connection back, and a
//! client waiting on a vanished server gets an error instead of hanging
//! for the kernel's retransmission limit (tcp_retries2, ~15 minutes), as
//! PgBouncer's tcp_keepalive and tcp_user_timeout do. A reload swaps the
//! options for sockets made from then on. May call: `config`, `socket2`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::Config;

/// When the kernel probes a quiet connection and gives up on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Quiet time before the first probe (TCP_KEEPIDLE).
    pub idle: Duration,
    /// Between unanswered probes (TCP_KEEPINTVL).
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped (TCP_KEEPCNT).
    pub count: u32,
}

/// The options one socket gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// None: keepalive stays off (the kernel's default for a new socket).
    pub keepalive: Option<Keepalive>,
    /// None: the kernel's default (no limit beyond tcp_retries2).
    pub user_timeout: Option<Duration>,
}

impl TcpOptions {
    /// The `tcp_*` keys of `cfg` (validated there: whole seconds for
    /// keepalive, at least one probe).
    pub fn from_config(cfg: &Config) -> TcpOptions {
        TcpOptions {
            keepalive: cfg.tcp_keepalive.then_some(Keepalive {
                idle: cfg.tcp_keepalive_idle,
                interval: cfg.tcp_keepalive_interval,
                count: cfg.tcp_keepalive_count,
            }),
            user_timeout: (!cfg.tcp_user_timeout.is_zero()).then_some(cfg.tcp_user_timeout),
        }
    }

    /// Sets every option on `tcp`; all are tried, the first failure is
    /// returned. Options left at the kernel's default cost no syscall.
    pub fn apply(&self, tcp: &TcpStream) -> std::io::Result<()> {
        let sock = SockRef::from(tcp);
        let nodelay = sock.set_tcp_nodelay(true);
        let keepalive = self.keepalive.map_or(Ok(()), |k| {
            let params = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            sock.set_tcp_keepalive(&params)
        });
        let user_timeout = self
            .user_timeout
            .map_or(Ok(()), |t| set_user_timeout(&sock, t));
        nodelay.and(keepalive).and(user_timeout)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_user_timeout(sock: &SockRef<'_>, t: Duration) -> std::io::Result<()> {
    sock.set_tcp_user_timeout(Some(t))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_user_timeout(_: &SockRef<'_>, _: Duration) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "TCP_USER_TIMEOUT exists only on Linux",
    ))
}

/// The options for sockets made from now on, shared by the listeners and
/// the pools; a reload swaps them.
#[derive(Debug)]
pub struct SocketSetup {
    current: ArcSwap<TcpOptions>,
    /// A failure was logged at warn; later ones go to debug, so a kernel
    /// that refuses an option does not log once per connection.
    warned: AtomicBool,
}

impl SocketSetup {
    pub fn new(cfg: &Config) -> SocketSetup {
        SocketSetup {
            current: ArcSwap::from_pointee(TcpOptions::from_config(cfg)),
            warned: AtomicBool::new(false),
        }
    }

    /// Sockets made from now on get `cfg`'s options; open ones keep theirs.
    pub fn set(&self, cfg: &Config) {
        self.current
            .store(std::sync::Arc::new(TcpOptions::from_config(cfg)));
    }

    /// The options now.
    pub fn current(&self) -> TcpOptions {
        **self.current.load()
    }

    /// Applies the current options to a new `peer` ("client" or "server")
    /// socket. A failure is not fatal: the connection works, it may only
    /// miss a vanished peer.
    pub fn apply(&self, tcp: &TcpStream, peer: &'static str) {
        let Err(e) = self.current.load().apply(tcp) else {
            return;
        };
        if self.warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(peer, error = %e, "cannot set TCP options");
        } else {
            tracing::warn!(peer, error = %e, "cannot set TCP options (keepalive, user timeout): a vanished peer may go unnoticed; logged once");
        }
    }
}

// The getters read back are Linux's.
#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
mod tests {
    use super::*;

    /// A connected loopback pair: (the accepted side, the connecting side).
    #[allow(clippy::unwrap_used)]
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (l.accept().await.unwrap().0, c)
    }

    #[tokio::test]
    async fn apply_sets_keepalive_and_user_timeout_on_a_real_socket() {
        let cfg = Config {
            tcp_keepalive_idle: Duration::from_secs(7),
            tcp_keepalive_interval: Duration::from_secs(3),
            tcp_keepalive_count: 4,
            tcp_user_timeout: Duration::from_millis(2500),
            ..Config::default()
        };
        let (accepted, _peer) = pair().await;
        TcpOptions::from_config(&cfg).apply(&accepted).unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(3));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(2500))
        );
    }

    #[tokio::test]
    async fn keepalive_off_and_no_user_timeout_leave_the_kernel_defaults() {
        let cfg = Config {
            tcp_keepalive: false,
            ..Config::default()
        };
        let opts = TcpOptions::from_config(&cfg);
        assert_eq!(
            opts,
            TcpOptions {
                keepalive: None,
                user_timeout: None
            }
        );
        let (accepted, _peer) = pair().await;
        opts.apply(&accepted).unwrap();
        let s = SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
    }

    #[tokio::test]
    async fn a_reload_changes_the_options_of_sockets_made_afterwards() {
        let setup = SocketSetup::new(&Config::default());
        let (before, _p1) = pair().await;
        setup.apply(&before, "client");
        setup.set(&Config {
            tcp_keepalive_idle: Duration::from_secs(5),
            ..Config::default()
        });
        let (after, _p2) = pair().await;
        setup.apply(&after, "client");
        let idle = |t: &TcpStream| SockRef::from(t).tcp_keepalive_time().unwrap();
        assert_eq!(idle(&before), Duration::from_secs(30));
        assert_eq!(idle(&after), Duration::from_secs(5));
        assert_eq!(
            setup.current().keepalive.map(|k| k.idle),
            Some(Duration::from_secs(5))
        );
    }
}
