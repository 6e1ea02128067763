//! Authentication through the proxy against a real PostgreSQL 15: SCRAM
//! and md5 clients against a users file or `auth_query`, and the proxy's
//! own logins to servers that ask for SCRAM or md5.

#![allow(clippy::unwrap_used)]

mod common;

use common::{config, primary, psql, psql_conninfo, Running};
use pgha_proxy::config::{AuthMethod, PoolMode};

fn users_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("users.txt");
    std::fs::write(&path, "\"postgres\" \"s3cret\"\n").unwrap();
    path
}

#[test]
fn scram_and_md5_clients_get_in_with_the_right_password_only() {
    let (sb, pg) = primary("px-auth");
    for method in [AuthMethod::ScramSha256, AuthMethod::Md5] {
        let mut cfg = config(&pg, PoolMode::Transaction);
        cfg.auth_method = method;
        cfg.users_file = Some(users_file(sb.path()));
        let p = Running::start(cfg);
        let ok = psql(p.rw(), "select 1", &[("PGPASSWORD", "s3cret")]);
        assert_eq!(ok.unwrap(), "1", "{method:?}");
        let bad = psql(p.rw(), "select 1", &[("PGPASSWORD", "guess")]).unwrap_err();
        assert!(
            bad.contains("password authentication failed for user \"postgres\""),
            "{method:?}: {bad}"
        );
        assert!(!bad.contains("guess") && !bad.contains("s3cret"), "{bad}");
    }
}

#[test]
fn the_proxy_logs_in_to_servers_with_scram_and_md5() {
    let (sb, pg) = primary("px-srvauth");
    pg.psql("create role app_scram login password 'pw'")
        .unwrap();
    pg.psql("set password_encryption = 'md5'; create role app_md5 login password 'pw'")
        .unwrap();
    hba_first(
        &pg,
        "host all app_scram 127.0.0.1/32 scram-sha-256\n\
         host all app_md5 127.0.0.1/32 md5\n",
    );
    let users = sb.path().join("users.txt");
    std::fs::write(&users, "\"app_scram\" \"pw\"\n\"app_md5\" \"pw\"\n").unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.users_file = Some(users);
    cfg.auth_method = AuthMethod::ScramSha256;
    let p = Running::start(cfg);
    for user in ["app_scram", "app_md5"] {
        let me = login(p.rw(), user, Some("pw")).unwrap_or_else(|e| panic!("{user}: {e}"));
        assert_eq!(me, user);
    }
    // The server's method really is in force: a direct login needs the password.
    assert!(login(pg.port(), "app_md5", None).is_err());
}

#[test]
fn auth_query_users_log_in_with_scram_and_reach_servers_without_a_stored_password() {
    let (_sb, pg) = primary("px-authq");
    pg.psql("create role app login password 'pw'").unwrap();
    hba_first(&pg, "host all app 127.0.0.1/32 scram-sha-256\n");
    let mut cfg = config(&pg, PoolMode::Transaction);
    cfg.auth_method = AuthMethod::ScramSha256;
    cfg.auth_query = Some("SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into());
    let p = Running::start(cfg);
    assert_eq!(login(p.rw(), "app", Some("pw")).unwrap(), "app");
    let err = login(p.rw(), "app", Some("nope")).unwrap_err();
    assert!(
        err.contains("password authentication failed for user \"app\""),
        "{err}"
    );
}

#[test]
fn md5_hashes_from_the_users_file_or_auth_query_log_clients_in_and_answer_md5_servers() {
    let (sb, pg) = primary("px-md5hash");
    pg.psql(
        "set password_encryption = 'md5'; create role app_md5 login password 'pw'; \
         create role app_md5q login password 'pwq'",
    )
    .unwrap();
    pg.psql("create role app_scram login password 'pws'")
        .unwrap();
    hba_first(
        &pg,
        "host all app_md5,app_md5q 127.0.0.1/32 md5\n\
         host all app_scram 127.0.0.1/32 scram-sha-256\n",
    );
    // What PgBouncer users keep in their auth_file: pg_shadow's hash.
    let hash = pg
        .psql("select passwd from pg_shadow where usename = 'app_md5'")
        .unwrap();
    assert!(hash.starts_with("md5") && hash.len() == 35, "{hash}");
    let users = sb.path().join("users.txt");
    std::fs::write(&users, format!("\"app_md5\" \"{hash}\"\n")).unwrap();
    let start = |method| {
        let mut cfg = config(&pg, PoolMode::Transaction);
        cfg.users_file = Some(users.clone());
        cfg.auth_method = method;
        cfg.auth_query = Some("SELECT usename, passwd FROM pg_shadow WHERE usename = $1".into());
        Running::start(cfg)
    };
    let refused = |r: Result<String, String>, user: &str| {
        let err = r.unwrap_err();
        let want = format!("password authentication failed for user \"{user}\"");
        assert!(err.contains(&want), "{user}: {err}");
    };
    let p = start(AuthMethod::Md5);
    // The hash checks the client's md5 answer and answers the server's
    // md5 challenge (the server's method is in force: see below).
    assert_eq!(login(p.rw(), "app_md5", Some("pw")).unwrap(), "app_md5");
    refused(login(p.rw(), "app_md5", Some("pwx")), "app_md5");
    // The same from auth_query.
    assert_eq!(login(p.rw(), "app_md5q", Some("pwq")).unwrap(), "app_md5q");
    refused(login(p.rw(), "app_md5q", Some("pw")), "app_md5q");
    // A user known by a SCRAM verifier logs in with SCRAM under md5, as
    // PostgreSQL's md5 method does.
    assert_eq!(
        login(p.rw(), "app_scram", Some("pws")).unwrap(),
        "app_scram"
    );
    refused(login(p.rw(), "app_scram", Some("pw")), "app_scram");
    drop(p);
    // A SCRAM login cannot be checked against an md5 hash: refused with
    // the standard error, as PostgreSQL refuses it.
    let p = start(AuthMethod::ScramSha256);
    refused(login(p.rw(), "app_md5", Some("pw")), "app_md5");
    refused(login(p.rw(), "app_md5q", Some("pwq")), "app_md5q");
    assert_eq!(
        login(p.rw(), "app_scram", Some("pws")).unwrap(),
        "app_scram"
    );
    assert!(login(pg.port(), "app_md5", None).is_err());
}

/// Puts `rules` ahead of the server's pg_hba.conf and reloads it.
fn hba_first(pg: &pgha_local::PgInstance, rules: &str) {
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("{rules}{old}")).unwrap();
    pg.psql("select pg_reload_conf()").unwrap();
}

/// `user` logs in on `port` (with `password`, if any) and asks who it is.
fn login(port: u16, user: &str, password: Option<&str>) -> Result<String, String> {
    let password = password
        .map(|p| format!(" password={p}"))
        .unwrap_or_default();
    psql_conninfo(
        &format!("host=127.0.0.1 port={port} user={user} dbname=postgres{password}"),
        "select current_user",
    )
}
