//! Harness errors: each says what was being started and where its log is.

use std::path::PathBuf;

/// Something the harness started or waited for did not work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("timed out after {waited:?} waiting for {what}{}", last.as_deref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    Timeout {
        what: String,
        waited: std::time::Duration,
        last: Option<String>,
    },
    #[error("{what} exited early ({status}); log {log:?} ends with:\n{tail}")]
    Exited {
        what: String,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{0} not found; install the system dependencies with: scripts/install-deps.sh")]
    Missing(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
