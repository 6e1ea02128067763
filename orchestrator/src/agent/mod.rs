//! `agent`: the loop that glues observe -> decide -> act.
//!
//! Each pass gathers an [`Observation`] (etcd snapshot, local postgres probe,
//! peers' `/status` when nobody leads), asks [`ha::decide`] what to do, and
//! performs the actions in `act`. Passes run every `loop_wait`, and at once
//! when the etcd watch reports a change (a deleted leader key, a switchover)
//! or the REST API queues a request. The lease is renewed by its own task
//! (`lease`), so a long action never lets it lapse unnoticed. May call `dcs`,
//! `postgres`, `http` and `metrics`; decides nothing itself.

mod act;
mod fence;
pub mod keeper;
mod lease;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgha_cluster::{ClusterConfig, Keys, Lsn, Member, PgState, Role};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::dcs::{Dcs, DcsError, Snapshot};
use crate::ha::{self, DataDir, Local, Observation, Peer, Requests};
use crate::metrics;
use crate::postgres::{Postgres, Probe};

/// What `/status` reports: this member's record plus what peers need to
/// decide a failover.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusReport {
    pub member: Member,
    /// Furthest WAL position (see [`Probe::lsn`]).
    pub lsn: Option<Lsn>,
    pub leader: Option<String>,
    pub writable: bool,
    pub paused: bool,
    /// Listed in `sync` (may be promoted in synchronous mode).
    pub sync_standby: bool,
    /// The last decision's reason.
    pub reason: String,
}

/// State shared between the loop, the lease task and the REST API.
pub struct Shared {
    pub cfg: Arc<AgentConfig>,
    pub dcs: Dcs,
    pub wake: Arc<Notify>,
    pub status: Mutex<StatusReport>,
    pub snapshot: Mutex<Option<Snapshot>>,
    pub requests: Mutex<Requests>,
    pub lease: Mutex<lease::LeaseState>,
}

impl Shared {
    pub fn status(&self) -> StatusReport {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn snapshot(&self) -> Option<Snapshot> {
        self.snapshot.lock().ok().and_then(|s| s.clone())
    }

    /// The dynamic settings from the last etcd snapshot, else the bootstrap
    /// ones from the config file.
    pub fn cluster_config(&self) -> ClusterConfig {
        self.snapshot()
            .map(|s| s.view.config)
            .unwrap_or_else(|| self.cfg.bootstrap.clone())
    }

    /// Queues an operator request for the next pass and wakes the loop.
    pub fn request(&self, f: impl FnOnce(&mut Requests)) {
        if let Ok(mut r) = self.requests.lock() {
            f(&mut r);
        }
        self.wake.notify_one();
    }
}

/// Connects to etcd and builds the shared state.
pub async fn connect(cfg: Arc<AgentConfig>) -> Result<Arc<Shared>, DcsError> {
    let keys = Keys::new(&cfg.cluster).map_err(|e| DcsError::Invalid(e.to_string()))?;
    let dcs = Dcs::connect(
        &cfg.etcd_endpoints,
        keys,
        &cfg.name,
        cfg.bootstrap.retry_timeout,
    )
    .await?;
    Ok(Arc::new(Shared {
        cfg,
        dcs,
        wake: Arc::new(Notify::new()),
        status: Mutex::new(StatusReport::default()),
        snapshot: Mutex::new(None),
        requests: Mutex::new(Requests::default()),
        lease: Mutex::new(lease::LeaseState::default()),
    }))
}

/// The agent's loop state.
pub struct Agent {
    shared: Arc<Shared>,
    pg: Postgres,
    config: ClusterConfig,
    pg_down_since: Option<Instant>,
    switchover_seen: Option<(u64, Instant)>,
    rewind_failed: bool,
    last_probe: Option<Probe>,
    last_reason: String,
}

impl Agent {
    pub fn new(shared: Arc<Shared>) -> Agent {
        let cfg = shared.cfg.clone();
        Agent {
            pg: Postgres::new(cfg.clone()),
            config: cfg.bootstrap.clone(),
            shared,
            pg_down_since: None,
            switchover_seen: None,
            rewind_failed: false,
            last_probe: None,
            last_reason: String::new(),
        }
    }

    /// Runs until `shutdown` is cancelled, then stops postgres and releases
    /// the leader key and lease, so failover elsewhere is immediate.
    pub async fn run(mut self, shutdown: CancellationToken) {
        if let Err(e) = self.pg.stop_stray().await {
            tracing::warn!(error = %e, "could not stop a stray postmaster");
        }
        tokio::spawn(lease::keep_alive(self.shared.clone(), shutdown.clone()));
        let data_dir = self.shared.cfg.postgres.data_dir.clone();
        let keeper = keeper::Keeper::new(&data_dir, self.shared.cfg.log_format);
        tokio::spawn(fence::watchdog(
            self.shared.clone(),
            data_dir,
            keeper,
            shutdown.clone(),
        ));
        let mut watching = false;
        loop {
            let obs = self.observe().await;
            if !watching {
                if let Some(snap) = self.shared.snapshot() {
                    let dcs = self.shared.dcs.clone();
                    tokio::spawn(dcs.watch(snap.revision, self.shared.wake.clone()));
                    watching = true;
                }
            }
            let decision = ha::decide(&obs, Instant::now());
            if decision.reason != self.last_reason {
                tracing::info!(actions = ?decision.actions, "{}", decision.reason);
                self.last_reason = decision.reason.clone();
            }
            self.act(&obs, &decision.actions).await;
            self.publish(&obs, &decision.reason).await;
            // Postgres died (or came up) after we observed it: decide again now.
            if self.pg.is_running() != obs.local.running {
                continue;
            }
            let wake = self.shared.wake.clone();
            tokio::select! {
                _ = tokio::time::sleep(self.config.loop_wait) => {}
                _ = wake.notified() => {}
                // A crashed postgres is handled at once, not on the next tick.
                _ = self.pg.exited() => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        tracing::info!("shutting down: stopping postgres, releasing the leader key");
        if let Err(e) = self.pg.stop(ha::StopMode::Fast).await {
            tracing::warn!(error = %e, "stopping postgres");
        }
        let dcs = &self.shared.dcs;
        if let Err(e) = dcs.release_leader().await {
            tracing::warn!(error = %e, "releasing the leader key");
        }
        if let Some(id) = lease::current(&self.shared) {
            let _ = dcs.revoke(id).await;
        }
    }

    /// Gathers everything the decision needs.
    async fn observe(&mut self) -> Observation {
        let snap = self.shared.dcs.snapshot().await;
        let snap = match snap {
            Ok(s) => {
                if s.view.config != ClusterConfig::default() || s.view.initialize.is_some() {
                    self.config = s.view.config.clone();
                }
                self.pg.set_params(&self.config);
                if let Ok(mut g) = self.shared.snapshot.lock() {
                    *g = Some(s.clone());
                }
                Some(s)
            }
            Err(e) => {
                tracing::warn!(error = %e, "etcd snapshot failed");
                None
            }
        };
        let me = self.shared.cfg.name.clone();
        let local = self.observe_local().await;
        let view = snap.as_ref().map(|s| s.view.clone());
        let now = Instant::now();
        let leader_is_me = view.as_ref().and_then(|v| v.leader.as_deref()) == Some(me.as_str());
        let paused = view.as_ref().is_some_and(|v| v.config.pause);
        self.pg_down_since = match (
            leader_is_me && !local.running && !paused,
            self.pg_down_since,
        ) {
            (true, Some(t)) => Some(t),
            (true, None) => Some(now),
            (false, _) => None,
        };
        self.switchover_seen = match view.as_ref().and_then(|v| v.switchover.as_ref()) {
            Some(sw) => match self.switchover_seen {
                Some((id, t)) if id == sw.id => Some((id, t)),
                _ => Some((sw.id, now)),
            },
            None => None,
        };
        let peers = match &view {
            Some(v) if v.leader.is_none() && local.data != DataDir::Missing => {
                fetch_peers(v, &me).await
            }
            _ => Vec::new(),
        };
        if leader_is_me {
            // Reinitializing the leader would destroy the cluster's data.
            if let Ok(mut r) = self.shared.requests.lock() {
                r.reinitialize = false;
            }
        }
        let requests = self.shared.requests.lock().map(|r| *r).unwrap_or_default();
        Observation {
            me,
            tags: self.shared.cfg.tags.clone(),
            config: self.config.clone(),
            local,
            dcs: view,
            lease_renewed_at: lease::renewed_at(&self.shared),
            lease_id: lease::current(&self.shared),
            pg_down_since: self.pg_down_since,
            switchover_seen_at: self.switchover_seen.map(|(_, t)| t),
            peers,
            rewind_failed: self.rewind_failed,
            clone_on_rewind_failure: self.shared.cfg.postgres.clone_on_rewind_failure,
            requests,
        }
    }

    async fn observe_local(&mut self) -> Local {
        let running = self.pg.is_running();
        metrics::postgres_up(running);
        if !running {
            self.last_probe = None;
            let data = self.pg.data_state().await;
            let cd = match data {
                DataDir::Missing => None,
                _ => self.pg.controldata().await.ok(),
            };
            return Local {
                data,
                running,
                timeline: cd.as_ref().and_then(|c| c.timeline),
                lsn: cd.and_then(|c| c.checkpoint),
                ..Local::default()
            };
        }
        match self.pg.probe().await {
            Ok(p) => self.last_probe = Some(p),
            Err(e) => tracing::warn!(error = %e, "postgres probe failed"),
        }
        let p = self.last_probe.clone();
        Local {
            data: match p.as_ref().map(|p| p.in_recovery) {
                Some(false) => DataDir::WasPrimary,
                _ => DataDir::Standby,
            },
            running,
            in_recovery: p.as_ref().map(|p| p.in_recovery),
            timeline: p.as_ref().and_then(|p| p.timeline),
            lsn: p.as_ref().and_then(|p| p.lsn),
            following: self.pg.following(),
            sync_standby_names: self.pg.sync_names().to_vec(),
            receiving: p.as_ref().is_some_and(|p| p.receiving),
            streaming: p.map(|p| p.streaming).unwrap_or_default(),
        }
    }

    /// Writes our member record and the `/status` report.
    async fn publish(&mut self, obs: &Observation, reason: &str) {
        let running = self.pg.is_running();
        let local = if running {
            self.observe_local().await
        } else {
            obs.local.clone()
        };
        let cfg = &self.shared.cfg;
        let (host, port) = cfg.pg_advertise();
        let view = obs.dcs.as_ref();
        let optime = view.and_then(|v| v.status.as_ref()).map(|s| s.optime);
        let probe = self.last_probe.clone().unwrap_or_default();
        let member = Member {
            name: cfg.name.clone(),
            role: match (local.data, local.in_recovery) {
                (DataDir::Missing, _) => Role::Uninitialized,
                (_, Some(false)) => Role::Primary,
                _ => Role::Replica,
            },
            state: if running {
                PgState::Running
            } else {
                PgState::Stopped
            },
            host,
            port,
            api_url: cfg.api_url(),
            timeline: local.timeline,
            wal_lsn: (!probe.in_recovery).then_some(local.lsn).flatten(),
            receive_lsn: probe.receive_lsn,
            replay_lsn: probe.replay_lsn,
            lag_bytes: match (local.in_recovery, optime, local.lsn) {
                (Some(true), Some(o), Some(l)) => Some(o.bytes_after(l)),
                _ => None,
            },
            tags: cfg.tags.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        metrics::member(&member);
        if let Some(id) = lease::current(&self.shared) {
            if let Err(e) = self.shared.dcs.put_member(&member, id).await {
                tracing::debug!(error = %e, "writing member record");
            }
        }
        let report = StatusReport {
            lsn: local.lsn,
            leader: view.and_then(|v| v.leader.clone()),
            writable: local.is_writable(),
            paused: view.is_some_and(|v| v.config.pause),
            sync_standby: view
                .and_then(|v| v.sync.as_ref())
                .is_some_and(|s| s.may_promote(&cfg.name)),
            reason: reason.to_owned(),
            member,
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = report;
        }
    }
}

/// Asks every other member's `/status` for its WAL position, in parallel.
async fn fetch_peers(view: &ha::DcsView, me: &str) -> Vec<Peer> {
    let asks = view
        .members
        .iter()
        .filter(|m| m.name != me)
        .map(|m| async move {
            let r = crate::http::call(
                "GET",
                &m.api_url,
                "/status",
                None,
                None,
                Duration::from_secs(1),
            )
            .await;
            let lsn = r
                .ok()
                .filter(|r| r.status == 200)
                .and_then(|r| serde_json::from_str::<StatusReport>(&r.body).ok())
                .and_then(|s| s.lsn);
            Peer {
                name: m.name.clone(),
                lsn,
                tags: m.tags.clone(),
            }
        });
    futures::future::join_all(asks).await
}
