//! `pgha up`: a whole HA cluster on this machine in one command.
//!
//! Starts etcd, one `pgha-agent` per PostgreSQL node and a `pgha-proxy` as
//! local processes through `pgha_local::LocalStack` (the same code the
//! end-to-end tests use), prints how to connect, then redraws the cluster
//! table (as `pgha list`) whenever it changes, until SIGINT or SIGTERM stop
//! everything. State lives in one directory, so a second run resumes the
//! same cluster with its data. May call `cli` for the table; never touches
//! postgres itself.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pgha_local::{pg_bin_dir, sibling_binary, LocalStack, RunAs, StackOptions};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{self, Target};

/// What `pgha up` was asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// State directory; `None`: `.pgha` under the working directory.
    pub dir: Option<PathBuf>,
    pub etcd_members: usize,
    pub nodes: usize,
    pub synchronous: bool,
    pub pool_mode: String,
    /// Free random ports instead of the conventional 6432/6433/9930/8008...
    pub random_ports: bool,
}

/// Runs the stack until a stop signal.
pub async fn up(o: UpOptions) -> Result<()> {
    preflight()?;
    let dir = match &o.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    if !(o.etcd_members == 1 || o.etcd_members == 3) {
        bail!("--etcd must be 1 or 3, not {}", o.etcd_members);
    }
    if o.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let opts = StackOptions {
        dir: Some(dir.clone()),
        etcd_members: o.etcd_members,
        nodes: o.nodes,
        synchronous: o.synchronous,
        pool_mode: o.pool_mode.clone(),
        conventional_ports: !o.random_ports,
        agent_bin: sibling_binary("pgha-agent")?,
        proxy_bin: sibling_binary("pgha-proxy")?,
    };
    let started = Instant::now();
    println!(
        "pgha: starting etcd, {} nodes and the proxy in {}",
        o.nodes,
        dir.display()
    );
    // Spawned from this (the main) thread: the children die with it.
    let stack = LocalStack::up(&opts).context("starting the local stack")?;
    let banner = banner(&stack, started.elapsed());
    let target = Target {
        etcd: stack.etcd().endpoints(),
        cluster: stack.state().cluster.clone(),
        api_user: "pgha".into(),
        api_password: Some(stack.state().password.clone()),
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let tty = std::io::stdout().is_terminal();
    if !tty {
        println!("{banner}");
    }
    let mut last = String::new();
    loop {
        let table = cli::list(&target, false)
            .await
            .unwrap_or_else(|e| format!("(cluster state unavailable: {e:#})\n"));
        if table != last {
            if tty {
                println!("\x1b[2J\x1b[H{banner}");
            } else {
                println!("-- {:.0?} after start", started.elapsed());
            }
            print!("{table}");
            let _ = std::io::stdout().flush();
            last = table;
        }
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    println!("pgha: stopping the proxy, the agents and etcd");
    drop(stack);
    println!(
        "pgha: stopped; the cluster's data stays in {} (`pgha up` resumes it)",
        dir.display()
    );
    Ok(())
}

/// `.pgha` under the working directory, unless postgres (run as an
/// unprivileged user when we are root) cannot reach it there, as under
/// `/root`: then `/var/lib/pgha/local`.
fn default_dir() -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the working directory")?;
    if RunAs::for_postgres()?.can_enter(&cwd) {
        return Ok(cwd.join(".pgha"));
    }
    let fallback = PathBuf::from("/var/lib/pgha/local");
    println!(
        "pgha: the postgres user cannot enter {}; keeping state in {} instead (--dir to choose)",
        cwd.display(),
        fallback.display()
    );
    Ok(fallback)
}

/// One clear message naming every missing system dependency.
fn preflight() -> Result<()> {
    let mut missing = Vec::new();
    if pg_bin_dir().is_err() {
        missing.push("PostgreSQL 15 server (postgresql-15)");
    }
    let on_path = |p: &str| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain([PathBuf::from("/usr/bin")])
            .any(|d| d.join(p).is_file())
    };
    if !on_path("etcd") {
        missing.push("etcd (etcd-server)");
    }
    if !on_path("psql") {
        missing.push("psql (postgresql-client-15)");
    }
    if !missing.is_empty() {
        bail!(
            "missing {}; install what is missing with: scripts/install-deps.sh",
            missing.join(", ")
        );
    }
    Ok(())
}

fn banner(stack: &LocalStack, took: Duration) -> String {
    let s = stack.state();
    let agents: Vec<String> = stack
        .agents()
        .iter()
        .map(|a| format!("{} {}", a.name(), a.api_url()))
        .collect();
    let etcd = stack.etcd().endpoints_csv();
    format!(
        "pgha: cluster {cluster:?} {how} in {took:.1?} ({mode} pooling{sync})\n\
         \x20 read-write  {rw}\n\
         \x20 read-only   {ro}\n\
         \x20 proxy       {admin}/status  metrics {admin}/metrics\n\
         \x20 agents      {agents}\n\
         \x20 etcd        {etcd}\n\
         \x20 logs        {dir}/<component>/*.log\n\
         \x20 operate     PGHA_API_PASSWORD={pw} pgha --etcd {etcd} --cluster {cluster} list\n\
         Ctrl-C stops everything; `pgha up` again resumes this cluster.\n",
        cluster = s.cluster,
        how = if stack.resumed() {
            "resumed"
        } else {
            "created"
        },
        mode = s.pool_mode,
        sync = if s.synchronous {
            ", synchronous mode"
        } else {
            ""
        },
        rw = stack.rw_url(),
        ro = stack.ro_url(),
        admin = stack.proxy_admin_url(),
        agents = agents.join(", "),
        dir = stack.dir().display(),
        pw = s.password,
    )
}
