//! Rolling restart (`handover_socket`): a new proxy takes the running
//! one's listening sockets while clients connect without a pause, and the
//! old one drains; the binary too. Real PostgreSQL 15, tokio-postgres and
//! psql.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::process::Command;

use common::{binary_config, config, http, primary, psql, Running};
use pgha_local::{wait_until, Proc, StopSignal};
use pgha_proxy::config::PoolMode;

/// Clients that connect, run one query and leave, one after another,
/// until stopped: what each attempt got.
#[derive(Default)]
struct Churn {
    stop: AtomicBool,
    ok: AtomicUsize,
    /// Ended by the old proxy's drain (57P01): a client that reached it
    /// just before it stopped, as on SIGTERM.
    drained: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

impl Churn {
    fn run(self: Arc<Self>, port: u16) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
            while !self.stop.load(Ordering::Relaxed) {
                let r = rt.block_on(async {
                    // A login refused, reset or cut: what a handover must
                    // never cause.
                    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .map_err(|e| (true, e))?;
                    let conn = tokio::spawn(conn);
                    c.simple_query("select 1").await.map_err(|e| (false, e))?;
                    drop(c);
                    let _ = conn.await;
                    Ok(())
                });
                let shutdown = |e: &tokio_postgres::Error| {
                    e.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN)
                };
                match r {
                    Ok(()) => {
                        self.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    // Logged in on the old proxy, then ended by its drain
                    // (FATAL 57P01) before its query, as on SIGTERM.
                    Err((false, e)) if shutdown(&e) || e.is_closed() => {
                        self.drained.fetch_add(1, Ordering::Relaxed);
                    }
                    Err((login, e)) => {
                        let at = if login { "login" } else { "query" };
                        self.failed.lock().unwrap().push(format!("{at}: {e:?}"));
                    }
                }
            }
        })
    }

    /// Waits until `n` more attempts succeeded.
    fn wait_for(&self, n: usize) {
        let from = self.ok.load(Ordering::Relaxed);
        wait_until(
            &format!("{n} more connections served"),
            Duration::from_secs(30),
            || Ok((self.ok.load(Ordering::Relaxed) >= from + n).then_some(())),
        )
        .unwrap();
    }
}

#[test]
fn a_new_proxy_takes_the_listeners_without_refusing_a_connection_and_the_old_one_drains() {
    let (sb, pg) = primary("px-handover");
    pg.psql("create table t(x int)").unwrap();
    let mut cfg = config(&pg, PoolMode::Transaction);
    let path = sb.path().join("handover.sock");
    // Left by a proxy that was killed: stale, replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    cfg.handover_socket = Some(path.clone());
    cfg.unix_socket_dir = Some(sb.path().to_owned());
    let a = Running::start(cfg.clone());
    assert!(!a.handle().took_over);
    let port = a.rw();
    let admin = a.handle().admin_addr;

    // A transaction open on the old proxy, and clients coming all along.
    let open = a.rt.block_on(Running::client(port));
    a.rt.block_on(open.batch_execute("begin; insert into t values (1)"))
        .unwrap();
    let churn = Arc::new(Churn::default());
    let clients = churn.clone().run(port);
    churn.wait_for(20);

    // A successor that takes the sockets but dies before it serves them:
    // the old proxy goes on as if nothing happened.
    let died = pgha_proxy::handover::take(&path).unwrap().unwrap();
    assert_eq!(died.sockets.len(), 5, "rw, ro, admin and two Unix sockets");
    drop(died);
    churn.wait_for(20);
    assert!(!a.handle().handed_over.is_cancelled());
    assert_eq!(psql(port, "select 3", &[]).unwrap(), "3");

    let mut cfg_b = cfg.clone();
    cfg_b.id = "successor".into();
    let b = Running::start(cfg_b);
    assert!(b.handle().took_over);
    assert_eq!((b.rw(), b.ro()), (port, a.ro()), "the same sockets");
    assert_eq!(b.handle().admin_addr, admin);
    wait_until("the old proxy handed over", Duration::from_secs(10), || {
        Ok(a.handle().handed_over.is_cancelled().then_some(()))
    })
    .unwrap();
    churn.wait_for(20);
    // While the old one drains, only the new one answers admin requests.
    for _ in 0..20 {
        let status = http(admin.port(), "GET", "/status", None);
        assert!(status.contains("\"id\": \"successor\""), "{status}");
    }

    // The open transaction finishes on the old proxy, which then drains.
    a.rt.block_on(open.batch_execute("insert into t values (2); commit"))
        .unwrap();
    let mut a = a;
    let old = a.proxy.take().unwrap();
    a.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), old.drain(Duration::from_secs(15))).await
    })
    .expect("the drain ends once its clients left");

    // The new proxy alone serves the same port, TCP and Unix-domain.
    churn.wait_for(20);
    churn.stop.store(true, Ordering::Relaxed);
    clients.join().unwrap();
    let failed = churn.failed.lock().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connection attempts failed: {failed:?}",
        failed.len(),
        churn.ok.load(Ordering::Relaxed) + failed.len()
    );
    assert_eq!(psql(port, "select count(*) from t", &[]).unwrap(), "2");
    let dir = sb.path().to_str().unwrap();
    let via_unix = std::process::Command::new("psql")
        .args([
            "-XAtq",
            "-h",
            dir,
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
        ])
        .args(["-d", "postgres", "-c", "select 7"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&via_unix.stdout).trim(),
        "7",
        "{via_unix:?}"
    );
    // And it can hand over again.
    assert!(path.exists());
    let c = Running::start(cfg);
    assert!(c.handle().took_over);
    assert_eq!(c.rw(), port);
    assert_eq!(psql(port, "select 8", &[]).unwrap(), "8");
    eprintln!(
        "served {} clients, {} ended by the drain",
        churn.ok.load(Ordering::Relaxed),
        churn.drained.load(Ordering::Relaxed)
    );
}

/// A proxy with Unix sockets in `sb`/`name`, and a successor that holds
/// its sockets without having said READY: the proxy, its two socket
/// files, the exchange and the sockets taken.
fn mid_handover(
    sb: &pgha_local::Sandbox,
    pg: &pgha_local::PgInstance,
    name: &str,
) -> (
    Running,
    Vec<std::path::PathBuf>,
    pgha_proxy::handover::Taken,
    Vec<(pgha_proxy::handover::Role, std::os::fd::OwnedFd)>,
) {
    let dir = sb.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    let mut cfg = config(pg, PoolMode::Transaction);
    cfg.handover_socket = Some(dir.join("handover.sock"));
    cfg.unix_socket_dir = Some(dir.clone());
    let a = Running::start(cfg);
    let files = a.handle().unix_sockets.clone();
    assert_eq!(files.len(), 2);
    let mut taken = pgha_proxy::handover::take(&dir.join("handover.sock"))
        .unwrap()
        .unwrap();
    let sockets = std::mem::take(&mut taken.sockets);
    (a, files, taken, sockets)
}

/// A drain (SIGTERM) that comes while the old proxy hands its sockets
/// over waits for the outcome: its Unix socket files stay when the
/// successor took over (it serves them), and go when it failed. A stop
/// (SIGINT) leaves them.
#[test]
fn a_drain_during_a_handover_keeps_the_socket_files_only_if_the_successor_took_over() {
    let (sb, pg) = primary("px-handover-drain");
    for took_over in [true, false] {
        let (mut a, files, taken, sockets) = mid_handover(&sb, &pg, &format!("took-{took_over}"));
        let old = a.proxy.take().unwrap();
        let gate = old.handover.clone();
        let drain = a.rt.spawn(old.drain(Duration::from_secs(5)));
        wait_until(
            "the drain waits for the handover",
            Duration::from_secs(10),
            || Ok(gate.drain_waited().then_some(())),
        )
        .unwrap();
        assert!(files.iter().all(|f| f.exists()), "{files:?}");
        let served = if took_over {
            taken.ready().unwrap();
            Some(sockets)
        } else {
            drop((taken, sockets));
            None
        };
        a.rt.block_on(drain).unwrap();
        for f in &files {
            if took_over {
                // Still the name of the socket the successor serves.
                assert!(std::os::unix::net::UnixStream::connect(f).is_ok(), "{f:?}");
            } else {
                assert!(!f.exists(), "{f:?} left behind with nobody serving it");
            }
        }
        drop(served);
    }
    // A stop (SIGINT) leaves the files to the successor.
    let (mut a, files, taken, sockets) = mid_handover(&sb, &pg, "stopped");
    let old = a.proxy.take().unwrap();
    let kept = old.handed_over.clone();
    let stop = a.rt.spawn(old.stop());
    // Marked before the listeners close, not once READY came.
    wait_until("the files are kept", Duration::from_secs(10), || {
        Ok(kept.is_cancelled().then_some(()))
    })
    .unwrap();
    taken.ready().unwrap();
    a.rt.block_on(stop).unwrap();
    for f in &files {
        assert!(std::os::unix::net::UnixStream::connect(f).is_ok(), "{f:?}");
    }
    drop(sockets);
}

#[test]
fn the_binary_hands_over_and_the_old_process_exits() {
    let (sb, pg) = primary("px-handover-bin");
    let dir = sb.subdir("proxy").unwrap();
    let bin = binary_config(
        &dir,
        &pg,
        "handover_socket = \"handover.sock\"\nauth_method = \"trust\"\n",
    );
    let (conf, rw, admin) = (&bin.path, bin.rw.get(), bin.admin.get());
    let spawn = |name: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgha-proxy"));
        cmd.arg("--config").arg(conf);
        Proc::spawn(
            name,
            cmd,
            &dir.join(format!("{name}.log")),
            None,
            StopSignal::Term,
        )
        .unwrap()
    };
    let mut old = spawn("old");
    wait_until("the old proxy serves", Duration::from_secs(20), || {
        Ok(psql(rw, "select 1", &[]).ok().map(|_| ()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", old.log_tail(20)));
    let _new = spawn("new");
    // The old process exits by itself once the new one took the sockets.
    let status = old.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}: {}", old.log_tail(20));
    assert!(
        old.log_tail(20).contains("took the listeners: draining"),
        "{}",
        old.log_tail(20)
    );
    assert_eq!(psql(rw, "select 2", &[]).unwrap(), "2");
    assert!(http(admin, "GET", "/health", None).starts_with("HTTP/1.1 200"));
}
