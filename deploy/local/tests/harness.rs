//! Proves the harness against real servers: etcd answers across members, a
//! replica streams from its primary, a SIGKILL is seen, and nothing the
//! harness started outlives its handles.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use pgha_local::{processes_under, wait_until, EtcdCluster, PgInstance, PgOptions, Sandbox};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn client(endpoint: String) -> etcd_client::Client {
    etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap()
}

#[test]
fn three_member_etcd_cluster_answers_put_and_get_across_members() {
    let sb = Sandbox::new("etcd3").unwrap();
    let mut etcd = EtcdCluster::start(&sb, 3).unwrap();
    assert_eq!(etcd.members().len(), 3);
    let eps = etcd.endpoints();
    rt().block_on(async {
        let mut c1 = client(eps[0].clone()).await;
        c1.put("/pgha/test/k", "v1", None).await.unwrap();
        let mut c3 = client(eps[2].clone()).await;
        let got = c3.get("/pgha/test/k", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v1");
        let members = c3.member_list().await.unwrap();
        assert_eq!(members.members().len(), 3);
    });

    // With one member dead the other two still form a quorum.
    let status = etcd.kill(0).unwrap();
    assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
    assert!(!etcd.member(0).is_running());
    rt().block_on(async {
        // If the dead member led, the survivors elect a new leader first;
        // until then etcd answers "request timed out", as to any client.
        let mut c2 = client(eps[1].clone()).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while let Err(e) = c2.put("/pgha/test/k", "v2", None).await {
            assert!(tokio::time::Instant::now() < deadline, "no quorum: {e}");
        }
        let mut c3 = client(eps[2].clone()).await;
        let got = c3.get("/pgha/test/k", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v2");
    });

    // A killed member restarts on its old data and catches up.
    etcd.restart(0).unwrap();
    rt().block_on(async {
        let mut c1 = client(eps[0].clone()).await;
        let got = c1.get("/pgha/test/k", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v2");
    });
}

#[test]
fn paused_etcd_member_stops_answering_until_resumed() {
    let sb = Sandbox::new("etcd-pause").unwrap();
    let etcd = EtcdCluster::start(&sb, 1).unwrap();
    assert!(etcd.member(0).healthy().unwrap());
    etcd.pause(0).unwrap();
    assert!(
        etcd.member(0).healthy().is_err(),
        "a SIGSTOPped etcd must not answer"
    );
    etcd.resume(0).unwrap();
    wait_until("etcd answers again", Duration::from_secs(10), || {
        Ok(etcd.member(0).healthy().unwrap_or(false).then_some(()))
    })
    .unwrap();
}

#[test]
fn replica_streams_rows_from_the_primary_and_sees_it_die() {
    let sb = Sandbox::new("pg-stream").unwrap();
    let mut primary = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    let opts = PgOptions {
        slot: Some("pg2".into()),
        ..PgOptions::default()
    };
    let replica = PgInstance::replica(&sb, "pg2", &primary, &opts).unwrap();

    assert!(!primary.is_in_recovery().unwrap());
    assert!(replica.is_in_recovery().unwrap());
    // The postgres processes run as an unprivileged user even under root.
    let owner = std::fs::metadata(primary.data_dir().join("PG_VERSION"))
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    assert_ne!(owner, 0, "postgres data must not belong to root");

    primary
        .psql("create table t(id int primary key, note text); insert into t values (1, 'hello')")
        .unwrap();
    let note = wait_until(
        "row on the replica",
        Duration::from_secs(30),
        || match replica.psql("select note from t where id = 1") {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            Ok(_) => Ok(None),
            Err(e) => Err(e.to_string().into()),
        },
    )
    .unwrap();
    assert_eq!(note, "hello");
    let streaming = primary
        .psql("select state || ':' || coalesce(s.slot_name, '') from pg_stat_replication r join pg_replication_slots s on s.active_pid = r.pid")
        .unwrap();
    assert_eq!(streaming, "streaming:pg2");

    // SIGKILL of the primary: the process is gone by signal 9, connections
    // are refused, and the replica's WAL receiver notices.
    let pid = primary.proc().unwrap().pid();
    let status = primary.kill().unwrap();
    assert_eq!(status.and_then(|s| s.signal()), Some(libc::SIGKILL));
    assert!(!primary.is_running());
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
        "postmaster {pid} must be gone"
    );
    assert!(primary.psql("select 1").is_err());
    wait_until(
        "replica to lose its WAL sender",
        Duration::from_secs(30),
        || {
            let n = replica
                .psql("select count(*) from pg_stat_wal_receiver where status = 'streaming'")
                .map_err(|e| e.to_string())?;
            Ok((n == "0").then_some(()))
        },
    )
    .unwrap();
    // The replica still serves reads of what it had received.
    assert_eq!(replica.psql("select count(*) from t").unwrap(), "1");
}

#[test]
fn dropping_the_handles_leaves_no_process_behind() {
    let sb = Sandbox::new("cleanup").unwrap();
    let root = sb.path().to_owned();
    {
        let _etcd = EtcdCluster::start(&sb, 3).unwrap();
        let primary = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
        let _replica = PgInstance::replica(&sb, "pg2", &primary, &PgOptions::default()).unwrap();
        // Open sessions fork backends: they must go too.
        primary.psql("select pg_sleep(0)").unwrap();
        assert!(
            processes_under(&root).len() >= 5,
            "expected etcd and postgres processes under {root:?}"
        );
    }
    let left = processes_under(&root);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn a_panicking_test_still_stops_its_servers() {
    let sb = Sandbox::new("panic").unwrap();
    let root = sb.path().to_owned();
    let result = std::thread::spawn(move || {
        let _etcd = EtcdCluster::start(&sb, 1).unwrap();
        let _pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
        panic!("simulated test failure");
    })
    .join();
    assert!(result.is_err(), "the thread must have panicked");
    let left = processes_under(&root);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn a_failed_start_names_the_process_and_shows_its_log() {
    let sb = Sandbox::new("badconf").unwrap();
    let opts = PgOptions::default().set("shared_buffers", "'not-a-size'");
    let started = std::time::Instant::now();
    let err = PgInstance::primary(&sb, "pg1", &opts)
        .unwrap_err()
        .to_string();
    // The harness notices the exit instead of waiting out its start timeout.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(err.contains("postgres pg1"), "{err}");
    assert!(err.contains("shared_buffers"), "{err}");
}

#[test]
fn pgbouncer_forwards_queries_to_its_backend() {
    use pgha_local::{PgBouncer, PoolMode};
    let sb = Sandbox::new("bouncer").unwrap();
    let pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    let bouncer = PgBouncer::start(&sb, "pgbouncer", &pg, PoolMode::Transaction, 4).unwrap();
    let out = std::process::Command::new("psql")
        .args(["-XAtq", "-d", &bouncer.conn_str(), "-c", "show port"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        pg.port().to_string()
    );
}

#[test]
fn etcd_restarted_on_the_same_ports_and_data_keeps_its_keys() {
    let keep = tempfile::tempdir().unwrap();
    let sb = Sandbox::persistent(keep.path()).unwrap();
    let etcd = EtcdCluster::start(&sb, 3).unwrap();
    let eps = etcd.endpoints();
    rt().block_on(async {
        client(eps[0].clone())
            .await
            .put("/pgha/test/persist", "kept", None)
            .await
            .unwrap();
    });
    let claimed = etcd.stop();
    let etcd = EtcdCluster::start_on(&sb, claimed).unwrap();
    let eps = etcd.endpoints();
    rt().block_on(async {
        let got = client(eps[2].clone())
            .await
            .get("/pgha/test/persist", None)
            .await
            .unwrap();
        assert_eq!(got.kvs()[0].value(), b"kept");
    });
}

#[test]
fn a_state_dir_the_postgres_user_cannot_enter_is_refused_clearly() {
    if !nix::unistd::Uid::current().is_root() {
        return; // only root runs postgres as another user
    }
    let locked = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        locked.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let err = Sandbox::persistent(&locked.path().join("state"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot enter it"), "{err}");
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        open.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    assert!(Sandbox::persistent(&open.path().join("state")).is_ok());
}
