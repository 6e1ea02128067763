//! `pgha-agent`: keeps one PostgreSQL node in the cluster.
//!
//! Reads the config file (`--config` or `$PGHA_CONFIG`) plus `PGHA_*`
//! overrides, rejects a bad one naming the key, then runs the HA loop and the
//! REST API until SIGTERM (drain: stop postgres, release the leader key) or
//! SIGINT (the same, it is the safe way to stop).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use pgha_orchestrator::config::{AgentConfig, LogFormat};
use pgha_orchestrator::{agent, api};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "pgha node agent: one per PostgreSQL node")]
struct Args {
    /// Agent configuration file (TOML).
    #[arg(long, short, env = "PGHA_CONFIG")]
    config: PathBuf,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args_os().skip(1);
    if argv.next().is_some_and(|a| a == agent::keeper::KEEPER_ARG) {
        let data_dir = argv
            .next()
            .context("--fence-keeper needs the data directory")?;
        let format = argv
            .next()
            .and_then(|f| LogFormat::parse(&f.to_string_lossy()));
        init_logs(format.unwrap_or_default());
        return agent::keeper::run(data_dir.as_ref()).context("fence keeper");
    }
    agent_main()
}

#[tokio::main]
async fn agent_main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = match AgentConfig::load(&args.config) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("pgha-agent: invalid configuration: {e}");
            std::process::exit(2);
        }
    };
    init_logs(cfg.log_format);
    let prom = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok();
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .with_context(|| format!("bind REST API on {}", cfg.api.listen))?;
    let shared = agent::connect(cfg.clone())
        .await
        .context("connect to etcd")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(api::serve(listener, shared.clone(), prom, shutdown.clone()));
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals.cancel();
    });
    tracing::info!(name = %cfg.name, cluster = %cfg.cluster, "pgha-agent starting");
    agent::Agent::new(shared).run(shutdown).await;
    Ok(())
}
