//! Rolling restart: a new pgha-proxy takes the running one's listening
//! sockets over `handover_socket` (file descriptors passed with
//! SCM_RIGHTS), as HAProxy's `expose-fd listeners` and nginx's binary
//! upgrade do. The sockets never close, so no connection attempt is
//! refused or reset while one proxy replaces the other: those queued on
//! them wait for the new proxy's first accept. The old proxy then stops
//! accepting and drains as on SIGTERM. (SO_REUSEPORT, PgBouncer's way,
//! resets the connections queued on the old socket when it closes.)
//!
//! The exchange: the new proxy connects and sends [`REQUEST`]; the old one
//! answers with one message, a line per socket (`rw`, `ro`, `admin`,
//! `unix-rw PATH`, `unix-ro PATH`) and the descriptors in that order; the
//! new one sends [`READY`] once it listens on all of them. Only then does
//! the old one stop accepting: a successor that fails to start before
//! that leaves it serving (both accept from the same sockets meanwhile).
//! A drain (SIGTERM) that comes during an exchange waits for its outcome
//! ([`Gate`]): it would otherwise remove the Unix socket files the
//! successor serves from then on.
//! May call: `router`.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};

use crate::router::Route;

/// What the new proxy sends to ask for the sockets.
pub const REQUEST: &[u8] = b"pgha-proxy handover 1\n";

/// What the new proxy sends once it serves the sockets.
pub const READY: &[u8] = b"ready\n";

/// How long the old proxy waits for [`READY`].
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The most sockets one proxy listens on (three TCP, two Unix-domain).
const MAX_SOCKETS: usize = 5;

/// How long either side waits for the other.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Orders a handover exchange and the start of a drain: one waits for
/// the other. A drain that began first refuses the exchange (its socket
/// files are going); one that comes during an exchange waits for it to end
/// (at most [`TIMEOUT`] and [`READY_TIMEOUT`], when the successor hangs),
/// so the files stay if the successor took over and go if it failed. A
/// stop (SIGINT) during an exchange marks the files kept before its
/// listeners close (a stale one is replaced at the next start); it still
/// waits for the exchange's task to end, as for every task.
#[derive(Debug, Default)]
pub struct Gate {
    lock: tokio::sync::Mutex<()>,
    drain_waited: AtomicBool,
}

impl Gate {
    /// Held for the whole exchange.
    pub async fn exchange(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Held by a drain while it stops accepting.
    pub async fn before_drain(&self) -> tokio::sync::MutexGuard<'_, ()> {
        if let Ok(g) = self.lock.try_lock() {
            return g;
        }
        self.drain_waited.store(true, Ordering::Relaxed);
        tracing::info!("a handover is in progress: the drain waits for its outcome");
        self.lock.lock().await
    }

    /// Held now, if no exchange runs: a stop (SIGINT) takes it so that
    /// none begins while the listeners close.
    pub fn try_hold(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.lock.try_lock().ok()
    }

    /// Whether a drain had to wait for an exchange.
    pub fn drain_waited(&self) -> bool {
        self.drain_waited.load(Ordering::Relaxed)
    }
}

/// One listening socket and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Tcp(Listener),
    Unix(Route, PathBuf),
}

/// The TCP listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Rw,
    Ro,
    Admin,
}

impl Role {
    fn line(&self) -> String {
        let route = |r: &Route| match r {
            Route::ReadWrite => "rw",
            Route::ReadOnly => "ro",
        };
        match self {
            Role::Tcp(Listener::Rw) => "rw".into(),
            Role::Tcp(Listener::Ro) => "ro".into(),
            Role::Tcp(Listener::Admin) => "admin".into(),
            Role::Unix(r, path) => format!("unix-{} {}", route(r), path.display()),
        }
    }

    fn parse(line: &str) -> Option<Role> {
        let (kind, path) = match line.split_once(' ') {
            Some((kind, path)) => (kind, Some(path).filter(|p| !p.is_empty())),
            None => (line, None),
        };
        let unix = |r| path.map(|p| Role::Unix(r, PathBuf::from(p)));
        match (kind, line.contains(' ')) {
            ("rw", false) => Some(Role::Tcp(Listener::Rw)),
            ("ro", false) => Some(Role::Tcp(Listener::Ro)),
            ("admin", false) => Some(Role::Tcp(Listener::Admin)),
            ("unix-rw", true) => unix(Route::ReadWrite),
            ("unix-ro", true) => unix(Route::ReadOnly),
            _ => None,
        }
    }
}

/// The sockets a running proxy offers its successor: copies of its
/// listeners' descriptors, kept only while it accepts.
#[derive(Debug, Default)]
pub struct Offer {
    pub sockets: Vec<(Role, OwnedFd)>,
}

/// Sends `offer` on `stream` once the successor asked for it, then waits
/// for it to say it serves them.
pub fn give(stream: &mut UnixStream, offer: &Offer) -> Result<(), String> {
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let mut asked = [0u8; REQUEST.len()];
    stream
        .read_exact(&mut asked)
        .map_err(|e| format!("reading the request: {e}"))?;
    if asked != REQUEST {
        return Err("not a pgha-proxy handover request".into());
    }
    let text: String = offer
        .sockets
        .iter()
        .map(|(role, _)| role.line() + "\n")
        .collect();
    let fds: Vec<RawFd> = offer.sockets.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(text.as_bytes())];
    let sent = sendmsg::<UnixAddr>(stream.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None)
        .map_err(|e| format!("sending the sockets: {e}"))?;
    if sent != text.len() {
        return Err("the sockets' names did not fit one message".into());
    }
    let mut ready = [0u8; READY.len()];
    stream
        .set_read_timeout(Some(READY_TIMEOUT))
        .and_then(|()| stream.read_exact(&mut ready))
        .map_err(|e| format!("the successor did not start ({e})"))?;
    if ready != READY {
        return Err("the successor answered something else than ready".into());
    }
    Ok(())
}

/// Sockets taken from a predecessor, which serves them until [`Taken::ready`].
#[derive(Debug, Default)]
pub struct Taken {
    pub sockets: Vec<(Role, OwnedFd)>,
    stream: Option<UnixStream>,
}

impl Taken {
    /// Tells the predecessor this proxy serves the sockets now: it stops
    /// accepting and drains.
    pub fn ready(self) -> Result<(), String> {
        match self.stream {
            Some(mut s) => s
                .write_all(READY)
                .map_err(|e| format!("telling the predecessor: {e}")),
            None => Ok(()),
        }
    }
}

/// Asks the proxy listening on `path` for its sockets. `Ok(None)` when
/// none does (no socket file, or one nothing listens on any more).
pub fn take(path: &Path) -> Result<Option<Taken>, String> {
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("connecting to {}: {e}", path.display())),
    };
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .and_then(|()| stream.write_all(REQUEST))
        .map_err(|e| format!("asking {} for its sockets: {e}", path.display()))?;
    let mut text = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    let mut iov = [IoSliceMut::new(&mut text)];
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| format!("receiving the sockets from {}: {e}", path.display()))?;
    let len = msg.bytes;
    let mut fds = Vec::new();
    let cmsgs = msg
        .cmsgs()
        .map_err(|e| format!("receiving the sockets: {e}"))?;
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(got) = c {
            // Owned from here: closed if anything below fails.
            fds.extend(got.into_iter().map(own));
        }
    }
    let text = std::str::from_utf8(&text[..len]).map_err(|_| "a malformed answer".to_owned())?;
    let roles: Option<Vec<Role>> = text.lines().map(Role::parse).collect();
    match roles {
        Some(roles) if roles.len() == fds.len() && !roles.is_empty() => Ok(Some(Taken {
            sockets: roles.into_iter().zip(fds).collect(),
            stream: Some(stream),
        })),
        _ => Err(format!(
            "{} answered with {} sockets for {text:?}",
            path.display(),
            fds.len()
        )),
    }
}

/// Takes ownership of a descriptor the kernel just installed in this
/// process for this message (SCM_RIGHTS): nothing else refers to it.
#[allow(unsafe_code)]
fn own(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` is open and owned by nobody else (see above).
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_read_back_as_written() {
        for role in [
            Role::Tcp(Listener::Rw),
            Role::Tcp(Listener::Ro),
            Role::Tcp(Listener::Admin),
            Role::Unix(Route::ReadWrite, "/run/pgha dir/.s.PGSQL.6432".into()),
            Role::Unix(Route::ReadOnly, "/x/.s.PGSQL.6433".into()),
        ] {
            assert_eq!(Role::parse(&role.line()), Some(role));
        }
        for bad in ["", "rw x", "unix-rw", "unix-rw ", "tcp", "admin "] {
            assert_eq!(Role::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_listener_passes_to_the_taker_and_accepts_there() {
        let dir = tempfile_dir();
        let path = dir.join("handover.sock");
        assert!(take(&path).unwrap().is_none(), "no file: nobody to ask");
        let server = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let offer = Offer {
            sockets: vec![(Role::Tcp(Listener::Rw), tcp.try_clone().unwrap().into())],
        };
        let giver = std::thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            give(&mut s, &offer)
        });
        let mut got = take(&path).unwrap().unwrap();
        let (role, fd) = got.sockets.remove(0);
        got.ready().unwrap();
        giver.join().unwrap().unwrap();
        drop(tcp);
        assert_eq!(role, Role::Tcp(Listener::Rw));
        let taken = std::net::TcpListener::from(fd);
        assert_eq!(taken.local_addr().unwrap(), addr);
        let _client = std::net::TcpStream::connect(addr).unwrap();
        taken.accept().unwrap();
        // A socket file nothing listens on is stale, not an error.
        assert!(take(&path).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "pgha-handover-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
