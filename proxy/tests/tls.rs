//! TLS towards clients: psql with sslmode=require and verify-full against a
//! certificate signed by a test CA; plain clients still work.

#![allow(clippy::unwrap_used)]

mod common;

use common::{config, primary, psql, Running};
use pgha_proxy::config::PoolMode;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

/// Writes ca.pem, server.pem and server.key into `dir`.
fn certificates(dir: &std::path::Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pgha test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("server.key"), leaf_key.serialize_pem()).unwrap();
}

#[test]
fn psql_connects_with_sslmode_require_and_verify_full() {
    let (sb, pg) = primary("px-tls");
    certificates(sb.path());
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.tls_cert_file = Some(sb.path().join("server.pem"));
    cfg.tls_key_file = Some(sb.path().join("server.key"));
    let p = Running::start(cfg);
    let require = psql(p.rw(), "select 1", &[("PGSSLMODE", "require")]);
    assert_eq!(require.unwrap(), "1");
    let ca = sb.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let out = std::process::Command::new("psql")
        .args(["-XAtq", "-c", "select 2"])
        .arg(format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={ca}",
            p.rw()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    // Clients that do not ask for TLS are still served.
    assert_eq!(
        psql(p.rw(), "select 3", &[("PGSSLMODE", "disable")]).unwrap(),
        "3"
    );
}

#[test]
fn without_a_certificate_ssl_is_refused_and_plain_clients_work() {
    let (_sb, pg) = primary("px-notls");
    let p = Running::start(config(&pg, PoolMode::Transaction));
    let err = psql(p.rw(), "select 1", &[("PGSSLMODE", "require")]).unwrap_err();
    assert!(err.contains("does not support SSL"), "{err}");
    assert_eq!(
        psql(p.rw(), "select 1", &[("PGSSLMODE", "prefer")]).unwrap(),
        "1"
    );
}
