//! TCP options on the proxy's sockets: TCP_NODELAY, keepalive and
//! TCP_USER_TIMEOUT, so that a peer that vanished without a FIN or RST
//! (power-off, partition) is noticed: a vanished session-mode client gives
//! its server connection back, and a client waiting on a vanished server
//! gets an error instead of hanging for the kernel's retransmission limit
//! (tcp_retries2, ~15 minutes), as PgBouncer's tcp_keepalive and
//! tcp_user_timeout do.
//!
//! Client sockets get them from their listener: Linux copies a listening
//! socket's options to every connection it accepts, so they are set on the
//! two listeners (at start and on each reload) and a new client costs no
//! system call for them. Each server connection a pool opens gets them
//! when it connects. A reload swaps the options for sockets made from then
//! on. May call: `config`, `socket2`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};

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

    /// Sets every option on `sock`, turning off what is off (a reload may
    /// turn keepalive off on a listener); all are tried, the first failure
    /// is returned.
    pub fn apply(&self, sock: SockRef<'_>) -> std::io::Result<()> {
        let nodelay = sock.set_tcp_nodelay(true);
        let keepalive = match self.keepalive {
            Some(k) => sock.set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(k.idle)
                    .with_interval(k.interval)
                    .with_retries(k.count),
            ),
            None => sock.set_keepalive(false),
        };
        let user_timeout = set_user_timeout(&sock, self.user_timeout);
        nodelay.and(keepalive).and(user_timeout)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_user_timeout(sock: &SockRef<'_>, t: Option<Duration>) -> std::io::Result<()> {
    sock.set_tcp_user_timeout(t)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_user_timeout(_: &SockRef<'_>, t: Option<Duration>) -> std::io::Result<()> {
    if t.is_none() {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "TCP_USER_TIMEOUT exists only on Linux",
    ))
}

/// How long the kernel holds a new connection that sent nothing before
/// handing it to the proxy anyway (then `startup_timeout` applies).
const DEFER_ACCEPT: std::ffi::c_int = 10;

/// TCP_DEFER_ACCEPT, as PgBouncer sets it: a new connection is handed
/// over with its first bytes (the startup packet or SSLRequest) already
/// there, so a client costs one wake-up and one read less. Neither
/// socket2 nor nix offers it.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn defer_accept(l: &impl std::os::fd::AsRawFd, secs: std::ffi::c_int) -> std::io::Result<()> {
    // SAFETY: `l` is an open socket for the whole call; the option value
    // is a c_int on the stack, and its size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const std::ffi::c_int).cast(),
            std::mem::size_of::<std::ffi::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn defer_accept(_: &impl std::os::fd::AsRawFd, _: std::ffi::c_int) -> std::io::Result<()> {
    Ok(())
}

/// The options for sockets made from now on, shared by the listeners and
/// the pools; a reload swaps them.
#[derive(Debug)]
pub struct SocketSetup {
    current: ArcSwap<TcpOptions>,
    /// The listeners whose accepted sockets inherit the options.
    listeners: Mutex<Vec<Weak<TcpListener>>>,
    /// A failure was logged at warn; later ones go to debug, so a kernel
    /// that refuses an option does not log once per connection.
    warned: AtomicBool,
}

impl SocketSetup {
    pub fn new(cfg: &Config) -> SocketSetup {
        SocketSetup {
            current: ArcSwap::from_pointee(TcpOptions::from_config(cfg)),
            listeners: Mutex::new(Vec::new()),
            warned: AtomicBool::new(false),
        }
    }

    /// Sockets made from now on get `cfg`'s options, clients accepted by
    /// the listeners included; open ones keep theirs.
    pub fn set(&self, cfg: &Config) {
        let opts = TcpOptions::from_config(cfg);
        self.current.store(Arc::new(opts));
        let mut listeners = crate::lock(&self.listeners);
        listeners.retain(|l| l.strong_count() > 0);
        for l in listeners.iter().filter_map(Weak::upgrade) {
            self.report(opts.apply(SockRef::from(&*l)), "listener");
        }
    }

    /// Sets the current options on `l`, which its accepted sockets then
    /// inherit, and again on each [`SocketSetup::set`] while `l` lives.
    pub fn listen(&self, l: &Arc<TcpListener>) {
        let mut listeners = crate::lock(&self.listeners);
        self.report(self.current().apply(SockRef::from(&**l)), "listener");
        self.report(defer_accept(&**l, DEFER_ACCEPT), "listener");
        listeners.push(Arc::downgrade(l));
    }

    /// The options now.
    pub fn current(&self) -> TcpOptions {
        **self.current.load()
    }

    /// Applies the current options to a new server connection.
    pub fn apply(&self, tcp: &TcpStream) {
        self.report(self.current.load().apply(SockRef::from(tcp)), "server");
    }

    /// A failure is not fatal: the connection works, it may only miss a
    /// vanished peer.
    fn report(&self, r: std::io::Result<()>, socket: &'static str) {
        let Err(e) = r else {
            return;
        };
        if self.warned.swap(true, Ordering::Relaxed) {
            tracing::debug!(socket, error = %e, "cannot set TCP options");
        } else {
            tracing::warn!(socket, error = %e, "cannot set TCP options (keepalive, user timeout): a vanished peer may go unnoticed; logged once");
        }
    }
}

// The getters read back are Linux's.
#[cfg(all(test, any(target_os = "linux", target_os = "android")))]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A connection accepted by `l`, with its peer (which sent a byte, as
    /// clients do first, so a deferred accept returns).
    async fn accept(l: &TcpListener) -> (TcpStream, TcpStream) {
        use tokio::io::AsyncWriteExt;
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        c.write_all(b"x").await.unwrap();
        (l.accept().await.unwrap().0, c)
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_listener_hands_over_a_connection_only_with_its_first_bytes() {
        use tokio::io::AsyncWriteExt;
        let setup = SocketSetup::new(&Config::default());
        let l = listener().await;
        setup.listen(&l);
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
        assert!(early.is_err(), "a silent connection was handed over");
        c.write_all(&[0, 0, 0, 8]).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), l.accept()).await;
        assert!(accepted.is_ok(), "its first bytes hand it over");
    }

    async fn listener() -> Arc<TcpListener> {
        Arc::new(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn custom() -> Config {
        Config {
            tcp_keepalive_idle: Duration::from_secs(7),
            tcp_keepalive_interval: Duration::from_secs(3),
            tcp_keepalive_count: 4,
            tcp_user_timeout: Duration::from_millis(2500),
            ..Config::default()
        }
    }

    fn assert_custom(s: SockRef<'_>) {
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
    async fn a_server_connection_gets_every_option() {
        let (conn, _peer) = accept(&*listener().await).await;
        SocketSetup::new(&custom()).apply(&conn);
        assert_custom(SockRef::from(&conn));
    }

    #[tokio::test]
    async fn accepted_clients_inherit_the_listeners_options_without_a_call() {
        let setup = SocketSetup::new(&custom());
        let l = listener().await;
        setup.listen(&l);
        let (client, _peer) = accept(&l).await;
        assert_custom(SockRef::from(&client));
    }

    #[tokio::test]
    async fn a_reload_reaches_clients_accepted_afterwards_and_can_turn_options_off() {
        let setup = SocketSetup::new(&custom());
        let l = listener().await;
        setup.listen(&l);
        let (before, _p1) = accept(&l).await;
        setup.set(&Config {
            tcp_keepalive: false,
            ..Config::default()
        });
        assert_eq!(
            setup.current(),
            TcpOptions {
                keepalive: None,
                user_timeout: None
            }
        );
        let (after, _p2) = accept(&l).await;
        assert_custom(SockRef::from(&before));
        let s = SockRef::from(&after);
        assert!(s.tcp_nodelay().unwrap());
        assert!(!s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
        setup.set(&Config {
            tcp_keepalive_idle: Duration::from_secs(5),
            ..Config::default()
        });
        let (again, _p3) = accept(&l).await;
        let s = SockRef::from(&again);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_closed_listener_is_forgotten() {
        let setup = SocketSetup::new(&Config::default());
        setup.listen(&listener().await);
        setup.set(&custom());
        assert!(crate::lock(&setup.listeners).is_empty());
    }
}
