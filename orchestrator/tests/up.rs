//! `pgha up` as a user runs it: one command brings up etcd, agents and the
//! proxy; the printed connection string works; SIGTERM stops everything;
//! a second run resumes the same cluster with its data.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgha_local::{processes_under, psql_with, wait_until};

/// Starts `pgha up` in `dir` with its output in `dir/up.out`.
fn pgha_up(dir: &Path) -> Child {
    let out = std::fs::File::create(dir.join("up.out")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_pgha"))
        .args([
            "up",
            "--random-ports",
            "--etcd",
            "1",
            "--nodes",
            "2",
            "--dir",
        ])
        .arg(dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap()
}

/// The read-write URL `pgha up` printed, once it did.
fn printed_rw_url(dir: &Path, child: &mut Child) -> String {
    wait_until(
        "pgha up to print its URLs",
        Duration::from_secs(180),
        || {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                let out = std::fs::read_to_string(dir.join("up.out")).unwrap_or_default();
                return Err(format!("pgha up exited {status}: {out}").into());
            }
            let out = std::fs::read_to_string(dir.join("up.out")).unwrap_or_default();
            Ok(out
                .lines()
                .find_map(|l| l.trim().strip_prefix("read-write"))
                .map(|u| u.trim().to_owned()))
        },
    )
    .unwrap()
}

fn psql_url(url: &str, sql: &str) -> Result<String, pgha_local::Error> {
    // postgresql://app:PASSWORD@127.0.0.1:PORT/app
    let rest = url.strip_prefix("postgresql://app:").unwrap();
    let (password, rest) = rest.split_once('@').unwrap();
    let port: u16 = rest
        .trim_start_matches("127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    psql_with(port, "app", "app", password, sql)
}

fn stop(child: &mut Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_until("pgha up to stop", Duration::from_secs(90), || {
        Ok(child.try_wait().map_err(|e| e.to_string())?)
    })
    .unwrap();
    assert!(status.success(), "pgha up exited {status}");
}

#[test]
fn pgha_up_serves_its_connection_string_stops_cleanly_and_resumes_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = pgha_up(dir.path());
    let url = printed_rw_url(dir.path(), &mut first);
    psql_url(
        &url,
        "create table kept(v text); insert into kept values ('survives restarts')",
    )
    .unwrap();
    let out = std::fs::read_to_string(dir.path().join("up.out")).unwrap();
    assert!(out.contains("read-only"), "{out}");
    assert!(out.contains("/metrics"), "{out}");
    assert!(out.contains("synchronous mode"), "{out}");
    assert!(
        out.contains("leader"),
        "the cluster table is printed: {out}"
    );
    stop(&mut first);
    let left = processes_under(dir.path());
    assert!(left.is_empty(), "left behind by pgha up: {left:?}");

    let mut second = pgha_up(dir.path());
    let url2 = printed_rw_url(dir.path(), &mut second);
    assert_eq!(url, url2, "a resumed stack keeps its ports and password");
    let out = std::fs::read_to_string(dir.path().join("up.out")).unwrap();
    assert!(out.contains("resumed"), "{out}");
    let kept = wait_until(
        "the old data through the proxy",
        Duration::from_secs(60),
        || Ok(psql_url(&url2, "select v from kept").ok()),
    )
    .unwrap();
    assert_eq!(kept, "survives restarts");
    stop(&mut second);
    assert!(processes_under(dir.path()).is_empty());
}

#[test]
fn pgha_up_rejects_an_impossible_etcd_size_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgha"))
        .args(["up", "--random-ports", "--etcd", "2", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--etcd must be 1 or 3"), "{err}");
}
