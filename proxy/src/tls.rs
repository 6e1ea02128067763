//! TLS (rustls): towards clients, the certificate and key named in the
//! config answer SSLRequest with `S`; towards servers, `server_tls_mode`
//! as libpq's sslmode (`require` encrypts without checking the
//! certificate, `verify-full` checks it against `server_tls_ca_file` and
//! the backend's host).
//!
//! Clients over TLS are offered SCRAM-SHA-256-PLUS with the
//! `tls-server-end-point` binding (RFC 5929): the hash of the proxy's own
//! certificate, so a client that requires channel binding knows no one
//! between it and the proxy relayed its login. (The proxy logs in to
//! servers on its own connections.) May call: `rustls`, `rustls_pemfile`,
//! `tokio_rustls`, `sha2`, the filesystem.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256, Sha384, Sha512};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{Config, ServerTlsMode};

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

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.display().to_string();
    move |source| TlsError::Read { path, source }
}

/// The certificates in a PEM file (at least one).
fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut open(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err(path))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// A TLS acceptor for the certificate chain and private key in PEM files.
fn acceptor(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
    let certs = pem_certs(cert)?;
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
        .with_single_cert(certs.clone(), key_der)?;
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        end_point: end_point(&certs[0]).map(Arc::from),
    })
}

/// One DER element: its tag, its contents and what follows it.
fn der(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, b| (l << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The `tls-server-end-point` channel binding data of a certificate (RFC
/// 5929): its hash with the hash function of its signature algorithm,
/// SHA-256 for MD5 and SHA-1. `None` for algorithms without one (Ed25519,
/// RSA-PSS): then -PLUS is not offered, as libpq would refuse it anyway.
fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    let (SEQUENCE, body, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, _tbs, rest) = der(body)? else {
        return None;
    };
    let (SEQUENCE, alg, _) = der(rest)? else {
        return None;
    };
    let (OID, oid, _) = der(alg)? else {
        return None;
    };
    // 1.2.840.113549.1.1.x (RSA with ...) and 1.2.840.10045.4.x (ECDSA with ...).
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let bits = match (oid.strip_prefix(RSA), oid.strip_prefix(ECDSA)) {
        (Some([4 | 5 | 11]), _) | (_, Some([1] | [3, 2])) => 256,
        (Some([12]), _) | (_, Some([3, 3])) => 384,
        (Some([13]), _) | (_, Some([3, 4])) => 512,
        _ => return None,
    };
    Some(match bits {
        256 => Sha256::digest(cert).to_vec(),
        384 => Sha384::digest(cert).to_vec(),
        _ => Sha512::digest(cert).to_vec(),
    })
}

/// The acceptor for `tls_cert_file` and `tls_key_file`; `None` without them.
pub fn client_tls(cfg: &Config) -> Result<Option<Arc<Tls>>, TlsError> {
    match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => Ok(Some(Arc::new(acceptor(cert, key)?))),
        _ => Ok(None),
    }
}

/// The acceptor, printable in debug output of the shared state.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    /// The certificate's `tls-server-end-point` binding data, when its
    /// signature algorithm defines one (see [`end_point`]).
    pub end_point: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

/// How to reach the servers over TLS.
#[derive(Clone)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    pub connector: TlsConnector,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServerTls({:?})", self.mode)
    }
}

/// The connector for `server_tls_mode`; `None` for `disable`.
pub fn server_tls(cfg: &Config) -> Result<Option<Arc<ServerTls>>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match (cfg.server_tls_mode, &cfg.server_tls_ca_file) {
        (ServerTlsMode::Disable, _) => return Ok(None),
        (ServerTlsMode::VerifyFull, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in pem_certs(ca)? {
                roots.add(c)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (ServerTlsMode::VerifyFull, None) => {
            return Err(TlsError::Empty {
                path: "server_tls_ca_file".into(),
                what: "CA file (required by verify-full)",
            })
        }
        (ServerTlsMode::Prefer | ServerTlsMode::Require, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    };
    Ok(Some(Arc::new(ServerTls {
        mode: cfg.server_tls_mode,
        connector: TlsConnector::from(Arc::new(config)),
    })))
}

/// libpq's `sslmode=require`: any certificate is accepted (encryption
/// without authentication of the server), but the handshake's signatures
/// are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_point_binding_is_the_certificates_hash_by_its_signature_algorithm() {
        let self_signed = |alg: &'static rcgen::SignatureAlgorithm| {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let der = self_signed(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(end_point(&der), Some(Sha256::digest(&der).to_vec()));
        let der = self_signed(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(end_point(&der), Some(Sha384::digest(&der).to_vec()));
        let der = self_signed(&rcgen::PKCS_ED25519);
        assert_eq!(end_point(&der), None, "Ed25519 defines no hash");
        for junk in [&b""[..], b"\x30", b"\x30\x85\x01", b"\x30\x03\x30\x01"] {
            assert_eq!(end_point(junk), None);
        }
    }
}
