//! The `pgha` CLI against a real two-node cluster.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{Cluster, CLI, SETTLE};
use pgha_local::{wait_until, TEST_PASSWORD};

fn pgha(c: &Cluster, args: &[&str]) -> Output {
    Command::new(CLI)
        .args(["--etcd", &c.etcd.endpoints_csv(), "--cluster", "test"])
        .args(["--api-password", TEST_PASSWORD])
        .args(args)
        .output()
        .unwrap()
}

fn ok(c: &Cluster, args: &[&str]) -> String {
    let out = pgha(c, args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgha {args:?}: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn fails(c: &Cluster, args: &[&str]) -> String {
    let out = pgha(c, args);
    assert_eq!(out.status.code(), Some(1), "pgha {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_lists_switches_over_edits_config_and_explains_errors() {
    let c = Cluster::start_n("cli", 2);
    let p = c.wait_healthy(SETTLE);
    let other = 1 - p;
    let list = ok(&c, &["list"]);
    assert!(
        list.contains("MEMBER") && list.contains("node1") && list.contains("node2"),
        "{list}"
    );
    assert!(list.contains("leader"), "{list}");
    let json = ok(&c, &["list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["leader"], c.nodes[p].name());

    let err = fails(&c, &["switchover", "--candidate", "nosuch"]);
    assert!(err.contains("not a member"), "{err}");

    let out = ok(&c, &["switchover", "--candidate", c.nodes[other].name()]);
    assert!(
        out.contains(&format!("{} is the new leader", c.nodes[other].name())),
        "{out}"
    );
    wait_until("old leader follows", Duration::from_secs(120), || {
        Ok(c.nodes[p]
            .api_get("/replica")
            .is_ok_and(|r| r.0 == 200)
            .then_some(()))
    })
    .unwrap();
    wait_until("the switchover in history", Duration::from_secs(30), || {
        Ok(ok(&c, &["history"]).contains("switchover").then_some(()))
    })
    .unwrap();

    let out = ok(
        &c,
        &["edit-config", "--set", "maximum_lag_on_failover=2097152"],
    );
    assert!(out.contains("2097152"), "{out}");
    assert!(ok(&c, &["show-config"]).contains("2097152"));
    let err = fails(&c, &["edit-config", "--set", "ttl=1s"]);
    assert!(err.contains("ttl"), "{err}");
    ok(&c, &["pause"]);
    assert!(ok(&c, &["list"]).contains("paused"));
    ok(&c, &["resume"]);
    assert!(!ok(&c, &["list"]).contains("paused"));

    // Now node `p` is the replica: reinitialize and restart it; the leader refuses.
    let err = fails(&c, &["reinit", c.nodes[other].name()]);
    assert!(err.contains("leader cannot be reinitialized"), "{err}");
    ok(&c, &["reinit", c.nodes[p].name()]);
    ok(&c, &["restart", c.nodes[p].name()]);
    c.wait_healthy(SETTLE);

    let out = Command::new(CLI)
        .args(["--etcd", "http://127.0.0.1:1", "--cluster", "test", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("cannot reach etcd"), "{err}");
}
