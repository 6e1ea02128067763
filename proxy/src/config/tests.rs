use super::*;

const MINIMAL: &str = r#"
    [[backends]]
    name = "pg1"
    port = 5432
    role = "primary"
"#;

#[test]
fn minimal_static_config_gets_documented_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.pool_mode, PoolMode::Transaction);
    assert_eq!(c.listen_rw.port(), 6432);
    assert_eq!(c.listen_ro.port(), 6433);
    assert_eq!(c.backends[0].host, "127.0.0.1");
    assert_eq!(c.checkout_timeout, Duration::from_secs(10));
    assert_eq!(c.reserve_pool_size, 0);
    assert_eq!(c.reserve_pool_timeout, Duration::from_secs(5));
}

#[test]
fn the_reserve_pool_is_read_and_a_change_replaces_the_pools() {
    let c = Config::parse(&format!(
        "reserve_pool_size = 3\nreserve_pool_timeout = \"1500ms\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.reserve_pool_size, 3);
    assert_eq!(c.reserve_pool_timeout, Duration::from_millis(1500));
    let changed = c.changed_keys(&Config::parse(MINIMAL).unwrap());
    assert_eq!(changed, ["reserve_pool_size", "reserve_pool_timeout"]);
    assert!(changed
        .iter()
        .all(|k| crate::config::POOL_KEYS.contains(&k.as_str())));
}

#[test]
fn durations_and_modes_are_readable() {
    let c = Config::parse(&format!(
        "pool_mode = \"session\"\ncheckout_timeout = \"250ms\"\nauth_method = \"md5\"\nmax_backend_connections = 90\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.max_backend_connections, 90);
    assert_eq!(c.pool_mode, PoolMode::Session);
    assert_eq!(c.checkout_timeout, Duration::from_millis(250));
    assert_eq!(c.auth_method, AuthMethod::Md5);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let e = Config::parse(&format!("pool_sise = 3\n{MINIMAL}")).unwrap_err();
    assert!(e.to_string().contains("pool_sise"), "{e}");
}

#[test]
fn changed_keys_names_what_differs_and_restart_keys_are_kept() {
    let old = Config::parse(MINIMAL).unwrap();
    let mut new = Config::parse(&format!(
        "pool_size = 7\nlisten_rw = \"127.0.0.1:7000\"\nadmin_token = \"t\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(
        new.changed_keys(&old),
        vec!["admin_token", "listen_rw", "pool_size"]
    );
    new.keep_restart_keys(&old);
    assert_eq!(new.changed_keys(&old), vec!["admin_token", "pool_size"]);
    assert!(old.changed_keys(&old).is_empty());
}

#[test]
fn tcp_keepalive_is_on_by_default_and_user_timeout_off() {
    let c = Config::parse(MINIMAL).unwrap();
    assert!(c.tcp_keepalive);
    assert_eq!(c.tcp_keepalive_idle, Duration::from_secs(30));
    assert_eq!(c.tcp_keepalive_interval, Duration::from_secs(10));
    assert_eq!(c.tcp_keepalive_count, 3);
    assert_eq!(c.tcp_user_timeout, Duration::ZERO);
    let c = Config::parse(&format!(
        "tcp_keepalive_idle = \"2s\"\ntcp_user_timeout = \"1500ms\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.tcp_keepalive_idle, Duration::from_secs(2));
    assert_eq!(c.tcp_user_timeout, Duration::from_millis(1500));
}

#[test]
fn bad_tcp_values_name_key_and_reason() {
    for (key, value, reason) in [
        ("tcp_keepalive_idle", "'0s'", "must be at least 1s"),
        ("tcp_keepalive_idle", "'1500ms'", "must be whole seconds"),
        ("tcp_keepalive_interval", "'500ms'", "must be at least 1s"),
        (
            "tcp_keepalive_interval",
            "'40000s'",
            "must be at most 32767s",
        ),
        ("tcp_keepalive_count", "0", "must be between 1 and 127"),
        ("tcp_keepalive_count", "128", "must be between 1 and 127"),
        ("tcp_user_timeout", "'1500us'", "must be whole milliseconds"),
        (
            "tcp_user_timeout",
            "'30days'",
            "must be at most 2147483647ms",
        ),
    ] {
        let e = Config::parse(&format!("{key} = {value}\n{MINIMAL}")).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains(&format!("`{key}`: {reason}")),
            "{key} = {value}: {e}"
        );
    }
    // With keepalive off its other keys are not used, so not checked.
    let off = "tcp_keepalive = false\ntcp_keepalive_idle = '0s'\ntcp_keepalive_count = 0";
    assert!(Config::parse(&format!("{off}\n{MINIMAL}")).is_ok());
}

#[test]
fn bad_values_name_key_and_reason() {
    let e = Config::parse(&format!("pool_size = 0\n{MINIMAL}")).unwrap_err();
    assert!(
        e.to_string().contains("`pool_size`: must be at least 1"),
        "{e}"
    );
    let e = Config::parse("").unwrap_err();
    assert!(e.to_string().contains("`backends`"), "{e}");
    let e = Config::parse(&format!("checkout_timeout = \"soon\"\n{MINIMAL}")).unwrap_err();
    assert!(e.to_string().contains("checkout_timeout"), "{e}");
    for key in ["client_idle_timeout", "idle_transaction_timeout"] {
        let e = Config::parse(&format!("{key} = \"50ms\"\n{MINIMAL}")).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("`{key}`: must be 0s (off) or at least 100ms")),
            "{e}"
        );
        let c = Config::parse(&format!("{key} = \"0s\"\n{MINIMAL}")).unwrap();
        assert!(c.client_idle_timeout.is_zero() && c.idle_transaction_timeout.is_zero());
    }
    let e = Config::parse(&format!(
        "unix_socket_dir = \"/run/pgha\"\nlisten_rw = \"127.0.0.1:7000\"\nlisten_ro = \"127.0.0.2:7000\"\n{MINIMAL}"
    ))
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("`unix_socket_dir`: needs listen_rw and listen_ro on different ports"),
        "{e}"
    );
    let long = format!("unix_socket_dir = \"/{}\"\n{MINIMAL}", "d".repeat(100));
    let e = Config::parse(&long).unwrap_err();
    assert!(
        e.to_string().contains("`unix_socket_dir`: is too long"),
        "{e}"
    );
    let long = format!("handover_socket = \"/{}\"\n{MINIMAL}", "h".repeat(107));
    let e = Config::parse(&long).unwrap_err();
    assert!(
        e.to_string().contains("`handover_socket`: is too long"),
        "{e}"
    );
    let c = Config::parse(&format!("idle_transaction_timeout = \"30s\"\n{MINIMAL}")).unwrap();
    assert_eq!(c.idle_transaction_timeout, Duration::from_secs(30));
}

#[test]
fn pools_entries_set_the_size_of_the_pools_they_match_first() {
    let c = Config::parse(&format!(
        r#"pool_size = 10
min_idle = 1
{MINIMAL}
[[pools]]
database = "reports"
user = "batch"
pool_size = 1
min_idle = 0

[[pools]]
database = "reports"
pool_size = 4

[[pools]]
user = "batch"
min_idle = 3

[[pools]]
database = "legacy"
pool_mode = "session"
"#
    ))
    .unwrap();
    let limits = |db, user| {
        let l = c.pool_settings(db, user);
        (l.size, l.min_idle)
    };
    let mode = |db, user| c.pool_settings(db, user).mode;
    assert_eq!(mode("legacy", "app"), PoolMode::Session);
    // What an entry leaves out is the top-level value, not a later
    // entry's: legacy's pools of batch take entry 3 (min_idle), whose
    // pool_mode is the top-level one.
    assert_eq!(mode("legacy", "batch"), PoolMode::Transaction);
    assert_eq!(limits("legacy", "app"), (10, 1));
    // The first entry that matches, in file order, even where a later one
    // matches too.
    assert_eq!(limits("reports", "batch"), (1, 0));
    // Database only: its pool_size, the top-level min_idle.
    assert_eq!(limits("reports", "app"), (4, 1));
    // User only: the top-level pool_size, its min_idle.
    assert_eq!(limits("sales", "batch"), (10, 3));
    // Nothing matches: the top-level keys.
    assert_eq!(limits("sales", "app"), (10, 1));
    // Names are compared exactly, as PostgreSQL compares them.
    assert_eq!(limits("Reports", "app"), (10, 1));
}

#[test]
fn bad_pools_entries_name_the_entry_key_and_reason() {
    let bad = |entries: &str| {
        Config::parse(&format!("min_idle = 2\n{MINIMAL}\n{entries}"))
            .unwrap_err()
            .to_string()
    };
    let e = bad("[[pools]]\npool_size = 5\n");
    assert!(
        e.contains("`database` of [[pools]] entry 1: name a database, a user or both"),
        "{e}"
    );
    let e = bad("[[pools]]\ndatabase = \"a\"\n");
    assert!(
        e.contains("`pool_size` of [[pools]] entry 1: the entry sets nothing"),
        "{e}"
    );
    let e =
        bad("[[pools]]\ndatabase = \"a\"\npool_size = 3\n[[pools]]\nuser = \"u\"\npool_size = 0\n");
    assert!(
        e.contains("`pool_size` of [[pools]] entry 2: must be at least 1"),
        "{e}"
    );
    // The top-level min_idle (2) would exceed the entry's pool_size.
    let e = bad("[[pools]]\ndatabase = \"a\"\npool_size = 1\n");
    assert!(
        e.contains("`min_idle` of [[pools]] entry 1: the top-level min_idle (2) cannot exceed the pool_size that applies (1)"),
        "{e}"
    );
    let e = bad("[[pools]]\nuser = \"u\"\nmin_idle = 30\n");
    assert!(
        e.contains("its min_idle (30) cannot exceed the pool_size that applies (20)"),
        "{e}"
    );
    // Entry 2 could never apply: entry 1 takes all its pools (the same
    // database and user, or the same database and any user, or any
    // database and the same user).
    for first in [
        "database = \"a\"\nuser = \"u\"",
        "database = \"a\"",
        "user = \"u\"",
    ] {
        let e = bad(&format!(
            "[[pools]]\n{first}\npool_size = 3\n[[pools]]\ndatabase = \"a\"\nuser = \"u\"\npool_size = 4\n"
        ));
        assert!(
            e.contains("`database` of [[pools]] entry 2: entry 1 comes first and matches every pool this one does"),
            "{first}: {e}"
        );
    }
    // The narrower entry first: both apply, each to its own pools.
    let c = Config::parse(&format!(
        "{MINIMAL}\n[[pools]]\ndatabase = \"a\"\nuser = \"u\"\npool_size = 3\n[[pools]]\ndatabase = \"a\"\npool_size = 4\n"
    ))
    .unwrap();
    assert_eq!(
        (
            c.pool_settings("a", "u").size,
            c.pool_settings("a", "v").size
        ),
        (3, 4)
    );
    let e = bad("[[pools]]\ndatabase = \"a\"\npool_sise = 3\n");
    assert!(e.contains("pool_sise"), "{e}");
    // A valid entry with min_idle 0 under a top-level min_idle of 2.
    let c = Config::parse(&format!(
        "min_idle = 2\n{MINIMAL}\n[[pools]]\ndatabase = \"a\"\npool_size = 1\nmin_idle = 0\n"
    ))
    .unwrap();
    assert_eq!(c.pool_settings("a", "x").size, 1);
}

#[test]
fn changing_pools_entries_is_a_pool_key() {
    let old = Config::parse(MINIMAL).unwrap();
    let new = Config::parse(&format!(
        "{MINIMAL}\n[[pools]]\ndatabase = \"a\"\npool_size = 3\n"
    ))
    .unwrap();
    let changed = new.changed_keys(&old);
    assert_eq!(changed, vec!["pools".to_owned()]);
    assert!(POOL_KEYS.contains(&"pools"));
}
