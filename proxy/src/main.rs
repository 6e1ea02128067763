//! `pgha-proxy --config FILE`: runs the proxy. SIGTERM drains (clients
//! finish their transaction, up to `shutdown_drain_timeout`), SIGINT stops
//! at once, SIGHUP reloads the config file (see `pgha_proxy::reload`). With
//! `handover_socket`, a new proxy started alike takes the listening
//! sockets and this one drains as on SIGTERM (see `pgha_proxy::handover`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

/// mimalloc: a new client costs a dozen small allocations (its task, its
/// state, buffers) that glibc's allocator serves from shared bins with
/// aligned-allocation slow paths; mimalloc's per-thread free lists cost a
/// fraction and keep a returning client's memory hot.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// pgha's Postgres proxy: read-write and read-only ports with pooling.
#[derive(Parser)]
struct Args {
    /// Path to the TOML config file (see proxy/README.md).
    #[arg(long, env = "PGHA_PROXY_CONFIG")]
    config: PathBuf,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let cfg = pgha_proxy::Config::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    // A descriptor per client, per server connection (at least a pool's
    // worth, or the backend bound), and a few more.
    let servers = cfg.pool_size.max(cfg.max_backend_connections);
    let needed = cfg.max_client_conn as u64 + servers as u64 + 64;
    if let Some(limit) = pgha_proxy::accept::raise_nofile_limit(needed) {
        tracing::info!(limit, "open-file limit");
    }
    // One event loop by default, like PgBouncer: the least CPU per
    // transaction. `workers = N` trades CPU for throughput on many cores.
    let rt = if cfg.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cfg.workers)
            .enable_all()
            .build()?
    };
    rt.block_on(run(cfg, &args.config))
}

async fn run(cfg: pgha_proxy::Config, path: &std::path::Path) -> anyhow::Result<()> {
    let drain = cfg.shutdown_drain_timeout;
    let handle = pgha_proxy::Proxy::start(Arc::new(cfg)).await?;
    tracing::info!(
        rw = %handle.rw_addr,
        ro = %handle.ro_addr,
        admin = %handle.admin_addr,
        "pgha-proxy listening"
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match pgha_proxy::reload::reload(&handle.shared, path) {
                    Ok(r) => {
                        tracing::info!(applied = ?r.applied, "SIGHUP: configuration reloaded");
                        if !r.need_restart.is_empty() {
                            tracing::warn!(keys = ?r.need_restart, "SIGHUP: these keys changed but take effect only after a restart");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload refused; keeping the running configuration"),
                }
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining for up to {drain:?}");
                handle.drain(drain).await;
                return Ok(());
            }
            _ = handle.handed_over.cancelled() => {
                tracing::info!("a new pgha-proxy took the listeners: draining for up to {drain:?}");
                handle.drain(drain).await;
                return Ok(());
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                handle.stop().await;
                return Ok(());
            }
        }
    }
}
