//! Bad input is refused clearly: config files, switchover targets, REST calls.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::process::Command;

use common::{Cluster, AGENT, SETTLE};

#[test]
fn malformed_config_file_is_rejected_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("name = \"n1\"\nnaem = \"typo\"\n", "naem"),
        ("name = \"n1\"\n[bootstrap]\nttl = \"3s\"\n", "ttl"),
        ("name = \"bad/name\"\n", "`name`"),
        ("name = [1\n", "agent.toml"),
    ];
    for (text, want) in cases {
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(AGENT)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(err.contains(want), "{text}: {err}");
    }
}

#[test]
fn rest_api_refuses_unauthenticated_malformed_and_unknown_member_requests() {
    let c = Cluster::start_n("badinput", 1);
    let p = c.wait_healthy(SETTLE);
    let n = &c.nodes[p];
    let (code, body) = n
        .api_send("POST", "/switchover", r#"{"candidate":"node2"}"#, false)
        .unwrap();
    assert_eq!(code, 401, "{body}");
    let (code, _) = n
        .api_send("PATCH", "/config", r#"{"pause":true}"#, false)
        .unwrap();
    assert_eq!(code, 401);
    let (code, body) = n
        .api_send("POST", "/switchover", "{not json", true)
        .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("\"error\""), "{body}");
    let (code, body) = n
        .api_send("POST", "/switchover", r#"{"candidate":"nosuch"}"#, true)
        .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("not a member"), "{body}");
    let (code, body) = n
        .api_send("PATCH", "/config", r#"{"ttl":"1s"}"#, true)
        .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("ttl"), "{body}");
    // Nothing changed: still the only, writable primary.
    assert_eq!(c.writable_now(), vec![p]);
}
