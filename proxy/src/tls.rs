//! TLS towards clients (rustls): loads the certificate and key named in
//! the config and answers SSLRequest with `S` when configured.
//!
//! SCRAM channel binding (`-PLUS`) is not offered: the proxy terminates TLS
//! and talks to servers on its own connections. May call: `rustls`,
//! `rustls_pemfile`, `tokio_rustls`, the filesystem.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

/// The certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

fn open(path: &Path) -> Result<std::io::BufReader<std::fs::File>, TlsError> {
    let f = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(std::io::BufReader::new(f))
}

/// A TLS acceptor for the certificate chain and private key in PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
    let read_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Read { path, source }
    };
    let certs = rustls_pemfile::certs(&mut open(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err(cert))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: cert.display().to_string(),
            what: "certificate",
        });
    }
    let key_der = rustls_pemfile::private_key(&mut open(key)?)
        .map_err(read_err(key))?
        .ok_or_else(|| TlsError::Empty {
            path: key.display().to_string(),
            what: "private key",
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)?;
    Ok(Tls(TlsAcceptor::from(Arc::new(config))))
}

/// The acceptor, printable in debug output of the shared state.
#[derive(Clone)]
pub struct Tls(pub TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}
