//! Shared setup for the real-cluster tests: etcd plus N agents through the
//! `pgha-local` harness, and bounded waits on what the cluster reports.

#![allow(dead_code)] // each test binary uses a different part

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgha_local::{psql_with_password, wait_until, AgentNode, AgentOptions, EtcdCluster, Sandbox};

pub const AGENT: &str = env!("CARGO_BIN_EXE_pgha-agent");
pub const CLI: &str = env!("CARGO_BIN_EXE_pgha");

/// Generous but bounded: a 2-core machine shared with other builds.
pub const SETTLE: Duration = Duration::from_secs(180);

pub struct Cluster {
    pub nodes: Vec<AgentNode>,
    pub etcd: EtcdCluster,
    pub sb: Sandbox,
}

impl Cluster {
    /// etcd of `etcd_size` members and one agent per entry of `opts`.
    pub fn start(label: &str, etcd_size: usize, opts: &[AgentOptions]) -> Cluster {
        let sb = Sandbox::new(label).unwrap();
        let etcd = EtcdCluster::start(&sb, etcd_size).unwrap();
        let mut nodes = Vec::new();
        for (i, o) in opts.iter().enumerate() {
            let name = format!("node{}", i + 1);
            nodes.push(AgentNode::start(&sb, &etcd, &name, AGENT.as_ref(), o).unwrap());
        }
        Cluster { nodes, etcd, sb }
    }

    /// Starts `n` agents with default options.
    pub fn start_n(label: &str, n: usize) -> Cluster {
        Cluster::start(label, 1, &vec![AgentOptions::default(); n])
    }

    /// Index of the node answering `/primary` 200 once all others answer
    /// `/replica` 200 (and at most one primary exists).
    pub fn wait_healthy(&self, timeout: Duration) -> usize {
        wait_until("one primary and streaming replicas", timeout, || {
            let mut primaries = Vec::new();
            let mut replicas = 0;
            for (i, n) in self.nodes.iter().enumerate() {
                if n.api_get("/primary").is_ok_and(|r| r.0 == 200) {
                    primaries.push(i);
                } else if n.api_get("/replica").is_ok_and(|r| r.0 == 200) && streaming(n) {
                    replicas += 1;
                }
            }
            assert!(primaries.len() <= 1, "two primaries: {primaries:?}");
            let ok = primaries.len() == 1 && replicas + 1 == self.nodes.len();
            Ok(ok.then(|| primaries[0]))
        })
        .unwrap()
    }

    /// Index of a node (not in `except`) that accepts a write into the
    /// `probe` table, and when.
    pub fn wait_writable(&self, except: &[usize], timeout: Duration) -> (usize, Instant) {
        self.wait_writable_sql(except, "insert into probe default values", timeout)
    }

    /// Index of a writable node (not in `except`) where `sql` succeeds, and when.
    pub fn wait_writable_sql(
        &self,
        except: &[usize],
        sql: &str,
        timeout: Duration,
    ) -> (usize, Instant) {
        wait_until("a writable primary", timeout, || {
            for (i, n) in self.nodes.iter().enumerate() {
                if except.contains(&i) || !n.is_writable().unwrap_or(false) {
                    continue;
                }
                if n.psql(sql).is_ok() {
                    return Ok(Some((i, Instant::now())));
                }
            }
            Ok(None)
        })
        .unwrap()
    }

    /// Waits until `sql` returns `want` on node `i`.
    pub fn wait_value(&self, i: usize, sql: &str, want: &str, timeout: Duration) {
        let n = &self.nodes[i];
        wait_until(
            &format!("{sql} = {want} on {}", n.name()),
            timeout,
            || match n.psql(sql) {
                Ok(v) if v == want => Ok(Some(())),
                Ok(v) => Err(format!("got {v:?}").into()),
                Err(e) => Err(e.to_string().into()),
            },
        )
        .unwrap()
    }

    /// Writable primaries right now (by asking every postgres).
    pub fn writable_now(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_writable().unwrap_or(false))
            .collect()
    }
}

/// The replica's WAL receiver is streaming.
pub fn streaming(n: &AgentNode) -> bool {
    n.psql("select count(*) from pg_stat_wal_receiver where status = 'streaming'")
        .map(|v| v == "1")
        .unwrap_or(false)
}

/// Polls every node in the background and records the most writable
/// primaries seen at one moment.
pub struct SplitBrainWatch {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl SplitBrainWatch {
    pub fn start(ports: Vec<u16>) -> SplitBrainWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let writable = ports
                    .iter()
                    .filter(|&&port| {
                        psql_with_password(port, "select not pg_is_in_recovery()")
                            .is_ok_and(|v| v == "t")
                    })
                    .count();
                m.fetch_max(writable, Ordering::SeqCst);
            }
        });
        SplitBrainWatch {
            stop,
            max,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.max.load(Ordering::SeqCst)
    }
}
