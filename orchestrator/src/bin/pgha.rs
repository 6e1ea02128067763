//! `pgha`: the operator CLI. Reaches the cluster through etcd and the agents'
//! REST APIs; see `pgha --help`.

use anyhow::Result;
use clap::{Parser, Subcommand};
use pgha_orchestrator::cli::{self, Target};

#[derive(Parser)]
#[command(about = "Operate a pgha cluster")]
struct Args {
    /// etcd client URLs, comma separated.
    #[arg(
        long,
        env = "PGHA_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379",
        value_delimiter = ','
    )]
    etcd: Vec<String>,
    #[arg(long, env = "PGHA_CLUSTER", default_value = "main")]
    cluster: String,
    /// User for the agents' REST API (mutating calls).
    #[arg(long, env = "PGHA_API_USER", default_value = "pgha")]
    api_user: String,
    #[arg(long, env = "PGHA_API_PASSWORD", hide_env_values = true)]
    api_password: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Members, roles, states, timelines and lag.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Planned switchover (waits for proxies to pause unless --force).
    Switchover {
        #[arg(long)]
        candidate: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Make CANDIDATE the leader now, also when there is no healthy leader.
    Failover {
        #[arg(long)]
        candidate: String,
    },
    /// Maintenance mode: agents observe but take no action.
    Pause,
    Resume,
    /// Restart a member's postgres.
    Restart {
        member: String,
    },
    /// Wipe a replica's data and clone it again from the leader.
    Reinit {
        member: String,
    },
    /// Timeline switches.
    History,
    /// Dynamic settings in etcd.
    ShowConfig,
    /// Change dynamic settings: --set ttl=20s --set synchronous_mode=true.
    EditConfig {
        #[arg(long = "set", required = true)]
        sets: Vec<String>,
    },
    /// Start a whole HA cluster on this machine: etcd, PostgreSQL nodes with
    /// their agents, and the proxy. Runs until Ctrl-C; again to resume.
    Up {
        /// State directory (data, logs, ports), reused by the next `pgha up`.
        /// Default `.pgha` under the working directory.
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// etcd members: 1 or 3.
        #[arg(long, default_value_t = 3)]
        etcd: usize,
        /// PostgreSQL nodes, each with its agent.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Run without a synchronous standby (an acknowledged commit can
        /// then be lost on failover).
        #[arg(long)]
        no_sync: bool,
        /// Proxy pooling: transaction or session.
        #[arg(long, default_value = "transaction", value_parser = ["transaction", "session"])]
        pool_mode: String,
        /// Free random ports instead of 6432/6433/9930/8008.. (for several stacks).
        #[arg(long)]
        random_ports: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    match run(args).await {
        Ok(out) => println!("{}", out.trim_end()),
        Err(e) => {
            eprintln!("pgha: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(a: Args) -> Result<String> {
    let t = Target {
        etcd: a.etcd,
        cluster: a.cluster,
        api_user: a.api_user,
        api_password: a.api_password,
    };
    match a.cmd {
        Cmd::List { json } => cli::list(&t, json).await,
        Cmd::Switchover { candidate, force } => {
            cli::switchover(&t, candidate.as_deref(), force).await
        }
        Cmd::Failover { candidate } => cli::failover(&t, &candidate).await,
        Cmd::Pause => cli::edit_config(&t, &["pause=true".into()]).await,
        Cmd::Resume => cli::edit_config(&t, &["pause=false".into()]).await,
        Cmd::Restart { member } => cli::member_request(&t, &member, "/restart").await,
        Cmd::Reinit { member } => cli::member_request(&t, &member, "/reinitialize").await,
        Cmd::History => cli::history(&t).await,
        Cmd::ShowConfig => cli::show_config(&t).await,
        Cmd::EditConfig { sets } => cli::edit_config(&t, &sets).await,
        Cmd::Up {
            dir,
            etcd,
            nodes,
            no_sync,
            pool_mode,
            random_ports,
        } => {
            let opts = pgha_orchestrator::up::UpOptions {
                dir,
                etcd_members: etcd,
                nodes,
                synchronous: !no_sync,
                pool_mode,
                random_ports,
            };
            pgha_orchestrator::up::up(opts).await?;
            Ok(String::new())
        }
    }
}
