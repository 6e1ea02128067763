//! TLS towards clients: psql with sslmode=require and verify-full against a
//! certificate signed by a test CA; plain clients still work. TLS towards
//! servers: each `server_tls_mode` against a server that refuses plain
//! connections and one without TLS.

#![allow(clippy::unwrap_used)]

mod common;

use common::{config, primary, psql, psql_conninfo, Running};
use std::io::{Read, Write};

use pgha_local::{reserve_port, PgInstance, PgOptions, RunAs, Sandbox};
use pgha_proxy::config::{AuthMethod, ClientTlsMode, PoolMode, ServerTlsMode};
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

/// `client_tls_mode = require`, as PostgreSQL's `hostssl` lines: a TCP
/// client without TLS is refused (28000, saying how to connect), TLS
/// clients are served, and so are their cancels (libpq sends them without
/// TLS) and clients of the Unix socket (local). Without a certificate the
/// key is refused by name.
#[test]
fn client_tls_mode_require_refuses_plain_tcp_clients_only() {
    let (sb, pg) = primary("px-tls-require");
    certificates(sb.path());
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.client_tls_mode = ClientTlsMode::Require;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("`client_tls_mode`") && e.contains("tls_cert_file"),
        "{e}"
    );
    cfg.tls_cert_file = Some(sb.path().join("server.pem"));
    cfg.tls_key_file = Some(sb.path().join("server.key"));
    cfg.auth_method = AuthMethod::Md5;
    let users = sb.path().join("users.txt");
    std::fs::write(&users, "\"postgres\" \"s3cret\"\n").unwrap();
    cfg.users_file = Some(users);
    let sockets = sb.subdir("sockets").unwrap();
    let port = reserve_port().unwrap();
    cfg.listen_rw.set_port(port.get());
    cfg.unix_socket_dir = Some(sockets.clone());
    let p = Running::start(cfg);

    let pw = ("PGPASSWORD", "s3cret");
    // Refused before any password is asked for.
    let (tag, body) = common::Raw::start_on(p.rw(), &[]).recv();
    let e = pgha_proxy::protocol::messages::error_fields(&body).unwrap();
    assert_eq!((tag, e.code.as_str()), (b'E', "28000"), "{}", e.message);
    // libpq with a Kerberos ticket asks for GSS encryption first.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p.rw())).unwrap();
    let mut answer = [0u8; 1];
    for code in [80_877_104i32, 80_877_103] {
        s.write_all(&[8i32.to_be_bytes(), code.to_be_bytes()].concat())
            .unwrap();
        s.read_exact(&mut answer).unwrap();
    }
    assert_eq!(
        &answer, b"S",
        "an SSLRequest after a GSSENCRequest gets TLS"
    );
    let err = psql(p.rw(), "select 1", &[("PGSSLMODE", "disable"), pw]).unwrap_err();
    assert!(
        err.contains("only over TLS") && err.contains("sslmode=require"),
        "{err}"
    );
    assert_eq!(
        psql(p.rw(), "select 1", &[("PGSSLMODE", "require"), pw]).unwrap(),
        "1"
    );
    assert_eq!(
        psql(p.rw(), "select 2", &[("PGSSLMODE", "prefer"), pw]).unwrap(),
        "2"
    );
    let local = format!(
        "host={} port={} user=postgres dbname=postgres password=s3cret",
        sockets.to_str().unwrap(),
        p.rw()
    );
    assert_eq!(psql_conninfo(&local, "select 3").unwrap(), "3");

    // psql's Ctrl-C: libpq sends the cancel on a new connection, plain.
    let sleeper = std::process::Command::new("psql")
        .args(["-XAtq", "-c", "select pg_sleep(60)"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &p.rw().to_string(),
            "-U",
            "postgres",
            "postgres",
        ])
        .env("PGSSLMODE", "require")
        .env("PGPASSWORD", "s3cret")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_backends(
        pg.port(),
        "query = 'select pg_sleep(60)' and state = 'active'",
        1,
    );
    let pid = nix::unistd::Pid::from_raw(sleeper.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = sleeper.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    let sleeping = "query = 'select pg_sleep(60)' and state = 'active'";
    common::wait_backends(pg.port(), sleeping, 0);
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

#[test]
fn servers_are_reached_over_tls_as_server_tls_mode_says() {
    let sb = Sandbox::new("px-server-tls").unwrap();
    let certs = sb.subdir("certs").unwrap();
    certificates(&certs);
    let key = certs.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    RunAs::for_postgres().unwrap().own(&certs).unwrap();
    let opts = PgOptions::default()
        .set("ssl", "on")
        .set(
            "ssl_cert_file",
            &format!("'{}'", certs.join("server.pem").display()),
        )
        .set("ssl_key_file", &format!("'{}'", key.display()));
    let pg = PgInstance::primary(&sb, "tls", &opts).unwrap();
    // From now on the server refuses plain TCP connections.
    let hba = pg.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("hostnossl all all all reject\n{rules}")).unwrap();
    assert_eq!(pg.psql("select pg_reload_conf()").unwrap(), "t");
    let plain = PgInstance::primary(&sb, "plain", &PgOptions::default()).unwrap();

    let ssl_of_backend = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";
    let through = |pg: &PgInstance, mode: ServerTlsMode, host: &str| {
        let mut cfg = config(pg, PoolMode::Transaction);
        cfg.server_tls_mode = mode;
        cfg.server_tls_ca_file = Some(certs.join("ca.pem"));
        cfg.backends[0].host = host.into();
        let p = Running::start(cfg);
        psql(p.rw(), ssl_of_backend, &[])
    };
    for mode in [ServerTlsMode::Prefer, ServerTlsMode::Require] {
        assert_eq!(through(&pg, mode, "127.0.0.1").unwrap(), "t", "{mode:?}");
    }
    // verify-full: the certificate names localhost, signed by the test CA.
    assert_eq!(
        through(&pg, ServerTlsMode::VerifyFull, "localhost").unwrap(),
        "t"
    );
    // The proxy cannot reach the server: the client is told so.
    let unreachable = |pg: &PgInstance, mode: ServerTlsMode, host: &str| {
        let e = through(pg, mode, host).unwrap_err();
        assert!(
            e.contains("cannot connect to the database server"),
            "{mode:?}: {e}"
        );
    };
    unreachable(&pg, ServerTlsMode::VerifyFull, "127.0.0.1"); // wrong name
                                                              // Plain TCP refused: the server's reason, at once.
    let e = through(&pg, ServerTlsMode::Disable, "127.0.0.1").unwrap_err();
    assert!(
        e.contains("refused the connection") && e.contains("pg_hba.conf"),
        "{e}"
    );

    // A server without TLS: prefer falls back to plain, require refuses.
    assert_eq!(
        through(&plain, ServerTlsMode::Prefer, "127.0.0.1").unwrap(),
        "f"
    );
    unreachable(&plain, ServerTlsMode::Require, "127.0.0.1");
}

/// SCRAM over TLS, as a client with `sslmode=verify-full` and a password
/// logs in: the right password only. Over TLS the proxy offers
/// SCRAM-SHA-256-PLUS, bound to its own certificate, so libpq's
/// `channel_binding=require` logs in; without TLS there is nothing to bind
/// to and libpq refuses to go on.
#[test]
fn scram_over_tls_needs_the_right_password_and_binds_to_the_proxys_certificate() {
    let (sb, pg) = primary("px-tls-scram");
    certificates(sb.path());
    let users = sb.path().join("users.txt");
    std::fs::write(&users, "\"postgres\" \"s3cret\"\n").unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.tls_cert_file = Some(sb.path().join("server.pem"));
    cfg.tls_key_file = Some(sb.path().join("server.key"));
    cfg.auth_method = AuthMethod::ScramSha256;
    cfg.users_file = Some(users);
    let p = Running::start(cfg);
    let ca = sb.path().join("ca.pem");
    let run = |password: &str, ssl: &str, binding: &str| {
        let conninfo = format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode={ssl} \
             sslrootcert={} password={password} channel_binding={binding}",
            p.rw(),
            ca.display()
        );
        psql_conninfo(&conninfo, "select 1")
    };
    assert_eq!(run("s3cret", "verify-full", "prefer").unwrap(), "1");
    assert_eq!(run("s3cret", "verify-full", "require").unwrap(), "1");
    assert_eq!(run("s3cret", "require", "disable").unwrap(), "1");
    for binding in ["prefer", "require"] {
        let bad = run("guess", "verify-full", binding).unwrap_err();
        assert!(
            bad.contains("password authentication failed for user \"postgres\""),
            "{binding}: {bad}"
        );
    }
    let plain = run("s3cret", "disable", "require").unwrap_err();
    assert!(plain.contains("channel binding"), "{plain}");
    assert_eq!(run("s3cret", "disable", "prefer").unwrap(), "1");
}
