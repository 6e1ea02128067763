//! `pgha-loadtest`: benchmarks and workloads from the command line.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pgha_loadtest::bench::{self, Scenario, Target};
use pgha_loadtest::failover::{self, KillableCluster};
use pgha_loadtest::idle;
use pgha_loadtest::Writer;
use pgha_local::{
    sibling_binary, AgentNode, AgentOptions, EtcdCluster, PatroniNode, PatroniTiming, PgBouncer,
    PgInstance, PgOptions, PoolMode, ProxyBackends, ProxyNode, ProxyOptions, Sandbox,
    TEST_PASSWORD,
};

/// `LABEL=PATH` of `bench-poolers --proxy`.
fn proxy_build(s: &str) -> Result<(String, std::path::PathBuf), String> {
    let (label, path) = s
        .split_once('=')
        .ok_or_else(|| format!("--proxy {s:?}: expected LABEL=PATH"))?;
    let path = std::path::PathBuf::from(path);
    if !path.is_file() {
        return Err(format!("--proxy {s:?}: no file at {}", path.display()));
    }
    Ok((label.to_owned(), path))
}

fn pgha_cluster_defaults() -> pgha_cluster::ClusterConfig {
    pgha_cluster::ClusterConfig::default()
}

#[derive(Parser)]
#[command(version, about = "pgha load tests and benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum System {
    /// pgha-agent (found next to this binary), default dynamic settings.
    Pgha,
    Patroni,
}

#[derive(Subcommand)]
enum Cmd {
    /// pgbench -S against a direct connection, PgBouncer and pgha-proxy
    /// (both in transaction mode), side by side: 32 clients in each -M mode
    /// plus a 400-client connect-per-transaction storm. Medians of --runs
    /// runs. Then the proxy's memory with --idle idle clients.
    BenchPoolers {
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per pgbench run.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Server connections per pool for the poolers.
        #[arg(long, default_value_t = 32)]
        pool_size: u32,
        /// Idle clients to hold open through pgha-proxy at the end (0: skip).
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
        /// Run only the scenarios whose name contains this (e.g. `extended`).
        #[arg(long)]
        only: Option<String>,
        /// A pgha-proxy binary to measure, as LABEL=PATH (its target is
        /// `pgha-proxy-LABEL`); repeat to compare builds in one run, e.g.
        /// `--proxy pgo=target/pgo/use/release/pgha-proxy` (see
        /// scripts/build-proxy-pgo.sh). Default: the pgha-proxy next to
        /// this binary, as `pgha-proxy`. The idle-client check uses the
        /// first.
        #[arg(long, value_parser = proxy_build)]
        proxy: Vec<(String, std::path::PathBuf)>,
    },
    /// Kill the primary of a 3-node cluster --kills times and time each
    /// SIGKILL-to-first-accepted-write. `--system patroni` runs Debian's
    /// Patroni on the same harness etcd, with its defaults or, with
    /// `--fastest`, its smallest allowed ttl.
    BenchFailover {
        #[arg(long, value_enum)]
        system: System,
        #[arg(long, default_value_t = 20)]
        kills: usize,
        #[arg(long)]
        fastest: bool,
    },
    /// Insert unique ids through a connection string and report every
    /// acknowledged write and the write-unavailability windows.
    Write {
        #[arg(long)]
        conn: String,
        #[arg(long, default_value = "pgha_writes")]
        table: String,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        duration: Duration,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BenchPoolers {
            runs,
            secs,
            pool_size,
            idle,
            only,
            proxy,
        } => bench_poolers(runs, secs, pool_size, idle, only.as_deref(), proxy),
        Cmd::BenchFailover {
            system,
            kills,
            fastest,
        } => bench_failover(system, kills, fastest),
        Cmd::Write {
            conn,
            table,
            duration,
        } => write(conn, table, duration),
    }
}

fn bench_poolers(
    runs: usize,
    secs: u64,
    pool_size: u32,
    idle: usize,
    only: Option<&str>,
    mut proxies: Vec<(String, std::path::PathBuf)>,
) -> anyhow::Result<()> {
    if proxies.is_empty() {
        proxies.push((String::new(), sibling_binary("pgha-proxy")?));
    }
    for (i, (label, _)) in proxies.iter().enumerate() {
        anyhow::ensure!(
            proxies[..i].iter().all(|(l, _)| l != label),
            "--proxy: the label {label:?} is given twice"
        );
    }
    let sb = Sandbox::new("bench")?;
    let opts = PgOptions::default()
        .set("max_connections", "600")
        .set("shared_buffers", "256MB");
    let pg = PgInstance::primary(&sb, "pg", &opts)?;
    let init = std::process::Command::new("pgbench")
        .args(["-i", "-q", "-s", "10", &pg.conn_str("postgres")])
        .output()
        .context("run pgbench -i")?;
    anyhow::ensure!(init.status.success(), "pgbench -i failed: {init:?}");
    let bouncer = PgBouncer::start(&sb, "pgbouncer", &pg, PoolMode::Transaction, pool_size)?;
    let mut targets = vec![
        Target {
            name: "direct".into(),
            conn_str: pg.conn_str("postgres"),
            pid: None,
        },
        Target {
            name: "pgbouncer".into(),
            conn_str: bouncer.conn_str(),
            pid: Some(bouncer.proc().pid()),
        },
    ];
    let mut nodes = Vec::new();
    for (label, path) in &proxies {
        let name = match label.as_str() {
            "" => "pgha-proxy".to_owned(),
            l => format!("pgha-proxy-{l}"),
        };
        println!("{name}: {}", path.display());
        let proxy = ProxyNode::start(
            &sb,
            &name,
            path,
            &ProxyOptions {
                id: "bench".into(),
                backends: ProxyBackends::StaticPrimary { port: pg.port() },
                pool_mode: "transaction".into(),
                pool_size,
                auth_method: "trust".into(),
                users: Vec::new(),
                ports: None,
                extra_config: vec!["max_client_conn = 20000".into()],
            },
        )?;
        let pid = proxy.proc().map(|p| p.pid()).context("proxy not running")?;
        targets.push(Target {
            name: name.clone(),
            conn_str: format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                proxy.rw_port()
            ),
            pid: Some(pid),
        });
        nodes.push((name, proxy, pid));
    }
    let scenarios = vec![
        Scenario::select_only("simple c32", "simple", 32, secs, false),
        Scenario::select_only("extended c32", "extended", 32, secs, false),
        Scenario::select_only("prepared c32", "prepared", 32, secs, false),
        Scenario::select_only("storm c400 -C", "simple", 400, secs, true),
    ];
    let scenarios: Vec<Scenario> = scenarios
        .into_iter()
        .filter(|s| only.is_none_or(|o| s.name.contains(o)))
        .collect();
    anyhow::ensure!(!scenarios.is_empty(), "--only {only:?} matches no scenario");
    let rows = bench::run_matrix(&targets, &scenarios, runs, &sb.subdir("pgbench-logs")?);
    println!("pgbench -S, {runs} runs of {secs}s each, medians; ratios against pgbouncer");
    println!("avg: pgbench's (with -C it includes connecting); p99: per-transaction log (excludes connecting)");
    print!("{}", bench::render(&rows, "pgbouncer"));
    println!("paired by round (each pair ran back to back): median (lowest-highest)");
    print!("{}", bench::render_paired(&rows, "pgbouncer"));
    if let (true, Some((name, proxy, proxy_pid))) = (idle > 0, nodes.first()) {
        let proxy_pid = *proxy_pid;
        let before = idle::rss_bytes(proxy_pid).map_err(anyhow::Error::msg)?;
        let clients = idle::open_idle_clients(proxy.rw_port(), "postgres", "postgres", idle)
            .map_err(anyhow::Error::msg)?;
        let after = idle::rss_bytes(proxy_pid).map_err(anyhow::Error::msg)?;
        println!(
            "{} idle clients held by {}: RSS {:.1} MB before, {:.1} MB with them",
            clients.len(),
            name,
            before as f64 / 1e6,
            after as f64 / 1e6
        );
    }
    Ok(())
}

struct PatroniCluster {
    nodes: Vec<PatroniNode>,
}

impl KillableCluster for PatroniCluster {
    fn pg_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(PatroniNode::pg_port).collect()
    }
    fn password(&self) -> String {
        "postgres".into()
    }
    fn kill(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].kill().map_err(|e| e.to_string())
    }
    fn restart(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].restart().map_err(|e| e.to_string())
    }
}

struct PghaCluster {
    nodes: Vec<AgentNode>,
}

impl KillableCluster for PghaCluster {
    fn pg_ports(&self) -> Vec<u16> {
        self.nodes.iter().map(AgentNode::pg_port).collect()
    }
    fn password(&self) -> String {
        TEST_PASSWORD.into()
    }
    fn kill(&mut self, i: usize) -> Result<(), String> {
        let n = &mut self.nodes[i];
        // The agent first, so it cannot restart its postgres; the postmaster
        // may already have gone with it.
        n.kill_agent().map_err(|e| e.to_string())?;
        if n.postmaster_pid().is_some() {
            n.kill_postgres().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    fn restart(&mut self, i: usize) -> Result<(), String> {
        self.nodes[i].restart_agent().map_err(|e| e.to_string())
    }
}

fn bench_failover(system: System, kills: usize, fastest: bool) -> anyhow::Result<()> {
    let sb = Sandbox::new("failover")?;
    let etcd = EtcdCluster::start(&sb, 3)?;
    let rt = tokio::runtime::Runtime::new()?;
    let (label, mut cluster): (String, Box<dyn KillableCluster>) = match system {
        System::Pgha => {
            let bin = sibling_binary("pgha-agent")?;
            let nodes = (1..=3)
                .map(|i| {
                    AgentNode::start(
                        &sb,
                        &etcd,
                        &format!("node{i}"),
                        &bin,
                        &AgentOptions::default(),
                    )
                })
                .collect::<Result<Vec<_>, _>>()?;
            let d = pgha_cluster_defaults();
            (
                format!(
                    "pgha-agent ttl={:?} loop_wait={:?} retry_timeout={:?}",
                    d.ttl, d.loop_wait, d.retry_timeout
                ),
                Box::new(PghaCluster { nodes }),
            )
        }
        System::Patroni => {
            let timing = if fastest {
                PatroniTiming::FASTEST
            } else {
                PatroniTiming::DEFAULTS
            };
            let mut nodes = Vec::new();
            for i in 1..=3 {
                nodes.push(PatroniNode::start(
                    &sb,
                    &format!("patroni{i}"),
                    "bench",
                    &etcd,
                    timing,
                )?);
            }
            (
                format!(
                    "patroni 3.0.2 ttl={} loop_wait={} retry_timeout={}",
                    timing.ttl, timing.loop_wait, timing.retry_timeout
                ),
                Box::new(PatroniCluster { nodes }),
            )
        }
    };
    let heal = Duration::from_secs(180);
    let times = rt
        .block_on(failover::measure(cluster.as_mut(), kills, heal))
        .map_err(anyhow::Error::msg)?;
    let (median, worst) = failover::median_and_worst(&times);
    println!(
        "{label}: {} kills, SIGKILL to first accepted write: median {:.1}s, worst {:.1}s",
        times.len(),
        median.as_secs_f64(),
        worst.as_secs_f64()
    );
    Ok(())
}

fn write(conn: String, table: String, duration: Duration) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let w = Writer::new(conn, table);
        w.prepare()
            .await
            .map_err(anyhow::Error::msg)
            .context("create the table")?;
        let out = w.run(tokio::time::sleep(duration)).await;
        println!(
            "acknowledged {} writes, {} failed attempts, {} reconnects",
            out.acked.len(),
            out.failures,
            out.reconnects
        );
        println!("latency: {}", out.latency.summary());
        println!("write-unavailability windows: {:?}", out.unavailable);
        for e in &out.last_errors {
            println!("error: {e}");
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_build_is_a_label_and_an_existing_file() {
        let exe = std::env::current_exe().unwrap();
        let (label, path) = proxy_build(&format!("pgo={}", exe.display())).unwrap();
        assert_eq!((label.as_str(), path.as_path()), ("pgo", exe.as_path()));
        let e = proxy_build("target/pgo/use/release/pgha-proxy").unwrap_err();
        assert!(e.contains("expected LABEL=PATH"), "{e}");
        let e = proxy_build("pgo=/nonexistent/pgha-proxy").unwrap_err();
        assert!(e.contains("no file at /nonexistent/pgha-proxy"), "{e}");
        // Through clap: the flag repeats, in order.
        let cli = Cli::try_parse_from([
            "pgha-loadtest".into(),
            "bench-poolers".into(),
            "--proxy".into(),
            format!("a={}", exe.display()),
            "--proxy".into(),
            format!("b={}", exe.display()),
        ])
        .unwrap();
        let Cmd::BenchPoolers { proxy, .. } = cli.cmd else {
            panic!("parsed as another command");
        };
        let labels: Vec<&str> = proxy.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["a", "b"]);
    }
}
