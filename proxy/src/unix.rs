//! Unix-domain listeners and their socket files: bound with the mode
//! asked, a stale file (left by a killed proxy) replaced, and removed when
//! the listener stops unless a successor took it over (`handover`).
//! May call: `handover`.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::handover::Role;
use crate::listener::StartError;
use crate::router::Route;

/// A Unix-domain listener and its socket file, removed when it is dropped
/// (the accept loop ends, or the start fails) if it is still this
/// listener's: a proxy started meanwhile may have replaced it.
pub struct UnixSocket {
    pub listener: UnixListener,
    pub file: SocketFile,
}

pub struct SocketFile {
    pub path: PathBuf,
    /// (device, inode) of the file this listener made.
    id: (u64, u64),
    /// Cancelled when the socket was handed to a successor, who serves
    /// the file now.
    kept: CancellationToken,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.kept.is_cancelled() {
            return;
        }
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = ?self.path, error = %e, "cannot remove the socket file");
            }
        }
    }
}

/// Listens on `path` with permissions `mode` (the client sockets
/// `<dir>/.s.PGSQL.<port>` open to every local user, as PostgreSQL's
/// default `unix_socket_permissions`). A socket file left by a proxy that
/// was killed is replaced; one a live process listens on, or a file that
/// is not a socket, is left alone and refused, unless `replace` (the
/// predecessor's, after a takeover).
pub async fn bind_unix(
    path: &Path,
    mode: u32,
    replace: bool,
    kept: CancellationToken,
) -> Result<UnixSocket, StartError> {
    let path = path.to_owned();
    let refuse = |reason: String| StartError::Unix {
        path: path.clone(),
        reason,
    };
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            return Err(refuse("a file that is not a socket is in the way".into()));
        }
        if !replace {
            // Stale only if nothing listens: a refused connection.
            // Anything else (accepted, no permission, a full backlog) may
            // be a live server's.
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
        }
        std::fs::remove_file(&path)
            .map_err(|e| refuse(format!("cannot remove the stale socket: {e}")))?;
    }
    let listener = UnixListener::bind(&path).map_err(|e| refuse(e.to_string()))?;
    let file = socket_file(&path, kept).map_err(|e| refuse(e.to_string()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| refuse(e.to_string()))?;
    Ok(UnixSocket { listener, file })
}

pub fn socket_file(path: &Path, kept: CancellationToken) -> std::io::Result<SocketFile> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok(SocketFile {
        path: path.to_owned(),
        id: (meta.dev(), meta.ino()),
        kept,
    })
}

/// The predecessor's Unix-domain listener for `route` at `path`, if it
/// had one there.
pub fn unix_inherited(
    inherited: &mut Vec<(Role, OwnedFd)>,
    route: Route,
    path: &Path,
    kept: CancellationToken,
) -> Option<UnixSocket> {
    let want = Role::Unix(route, path.to_owned());
    let i = inherited.iter().position(|(r, _)| *r == want)?;
    let l = std::os::unix::net::UnixListener::from(inherited.remove(i).1);
    let made = l
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(l))
        .and_then(|listener| Ok((listener, socket_file(path, kept)?)));
    match made {
        Ok((listener, file)) => Some(UnixSocket { listener, file }),
        Err(e) => {
            tracing::warn!(path = ?path, error = %e, "cannot use the predecessor's socket; binding anew");
            None
        }
    }
}
