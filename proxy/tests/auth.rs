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
