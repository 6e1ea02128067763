//! Performs a decision's actions in order; the first failure (or a lost race)
//! stops the rest, so a member that did not get the leader key never promotes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgha_cluster::{HistoryEntry, Status, SyncState};

use super::{lease, Agent};
use crate::ha::{Action, Observation, StopMode};
use crate::metrics;
use crate::postgres::{ReplicaMethod, RunRole, Upstream};

/// Why an action did not complete.
#[derive(Debug, thiserror::Error)]
pub(super) enum ActError {
    #[error(transparent)]
    Dcs(#[from] crate::dcs::DcsError),
    #[error(transparent)]
    Pg(#[from] crate::postgres::PgError),
    #[error("lost the race for {0}")]
    Lost(&'static str),
    #[error("{0}")]
    Missing(String),
}

const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    pub(super) async fn act(&mut self, obs: &Observation, actions: &[Action]) {
        for a in actions {
            if let Err(e) = self.perform(obs, a).await {
                match e {
                    ActError::Lost(_) => tracing::info!(action = ?a, "{e}"),
                    _ => tracing::warn!(action = ?a, error = %e, "action failed"),
                }
                return;
            }
        }
    }

    fn upstream(&self, obs: &Observation, leader: &str) -> Result<Upstream, ActError> {
        let m = obs
            .dcs
            .as_ref()
            .and_then(|v| v.member(leader))
            .ok_or_else(|| ActError::Missing(format!("no member record for leader {leader}")))?;
        Ok(Upstream {
            leader: leader.to_owned(),
            host: m.host.clone(),
            port: m.port,
        })
    }

    fn lease_id(&self) -> Result<i64, ActError> {
        lease::current(&self.shared).ok_or_else(|| ActError::Missing("no etcd lease yet".into()))
    }

    async fn perform(&mut self, obs: &Observation, action: &Action) -> Result<(), ActError> {
        match action {
            Action::TakeInitialize
            | Action::TakeLeader
            | Action::ReleaseLeader
            | Action::RecordHistory { .. }
            | Action::WriteSync { .. }
            | Action::WriteStatus
            | Action::SetSwitchoverPhase(_)
            | Action::ClearSwitchover => self.perform_etcd(obs, action).await,
            _ => self.perform_postgres(obs, action).await,
        }
    }

    /// Actions that write etcd.
    async fn perform_etcd(&mut self, obs: &Observation, action: &Action) -> Result<(), ActError> {
        let dcs = self.shared.dcs.clone();
        let cfg = self.shared.cfg.clone();
        match action {
            Action::TakeInitialize => {
                if !dcs.take_initialize(&cfg.bootstrap).await? {
                    return Err(ActError::Lost("initialize"));
                }
                self.config = cfg.bootstrap.clone();
                self.pg.set_params(&self.config);
            }
            Action::TakeLeader => {
                if !dcs.take_leader(self.lease_id()?).await? {
                    return Err(ActError::Lost("leader"));
                }
                tracing::info!("took the leader key");
            }
            Action::ReleaseLeader => dcs.release_leader().await?,
            Action::RecordHistory { reason } => {
                metrics::promotion(reason);
                self.record_history(obs, reason).await?;
            }
            Action::WriteSync { standbys } => {
                let sync = SyncState {
                    leader: cfg.name.clone(),
                    sync_standbys: standbys.clone(),
                };
                dcs.put_sync(&sync).await?;
            }
            Action::WriteStatus => {
                if let (Some(optime), Some(timeline)) = (obs.local.lsn, obs.local.timeline) {
                    dcs.put_status(&Status { optime, timeline }).await?;
                }
            }
            Action::SetSwitchoverPhase(phase) => {
                if let Some(mut sw) = obs.dcs.as_ref().and_then(|v| v.switchover.clone()) {
                    sw.phase = *phase;
                    dcs.put_switchover(&sw).await?;
                }
            }
            Action::ClearSwitchover => dcs.clear_switchover().await?,
            _ => {}
        }
        Ok(())
    }

    /// Actions on the local postgres.
    async fn perform_postgres(
        &mut self,
        obs: &Observation,
        action: &Action,
    ) -> Result<(), ActError> {
        match action {
            Action::Bootstrap => {
                if let Err(e) = self.pg.bootstrap(START_TIMEOUT).await {
                    let _ = self.pg.stop(StopMode::Immediate).await;
                    let _ = self.shared.dcs.clear_initialize().await;
                    return Err(e.into());
                }
            }
            Action::CloneFrom { leader } => {
                let up = self.upstream(obs, leader)?;
                self.pg
                    .create_replica(ReplicaMethod::Basebackup, &up)
                    .await?;
                let role = RunRole::Replica { upstream: Some(up) };
                self.pg.start(role, START_TIMEOUT).await?;
            }
            Action::StartPrimary => {
                let t = obs.config.primary_start_timeout.max(Duration::from_secs(1));
                self.pg.start(RunRole::Primary, t).await?;
            }
            Action::StartReplica { leader } => {
                let upstream = self.maybe_upstream(obs, leader.as_deref())?;
                self.pg
                    .start(RunRole::Replica { upstream }, START_TIMEOUT)
                    .await?;
            }
            Action::Follow { leader } => {
                let up = self.upstream(obs, leader)?;
                self.pg.follow(up).await?;
            }
            Action::Rewind { leader } => {
                let up = self.upstream(obs, leader)?;
                self.rewind_failed = true;
                self.pg.rewind(&up).await?;
                self.rewind_failed = false;
            }
            Action::Reinitialize { leader } => self.reinitialize(obs, leader).await?,
            Action::Stop(mode) => self.pg.stop(*mode).await?,
            Action::Restart => {
                self.shared.request(|r| r.restart = false);
                let role = if obs.local.is_writable() {
                    RunRole::Primary
                } else {
                    let leader = obs.dcs.as_ref().and_then(|v| v.leader.as_deref());
                    RunRole::Replica {
                        upstream: self.maybe_upstream(obs, leader)?,
                    }
                };
                self.pg.stop(StopMode::Fast).await?;
                self.pg.start(role, START_TIMEOUT).await?;
            }
            Action::Promote => {
                self.pg.promote().await?;
                tracing::info!("promoted");
            }
            Action::EnsureSlots { members } => self.pg.ensure_slots(members).await?,
            Action::SetSyncStandbys { members } => {
                self.pg.set_sync_names(members.clone()).await?;
            }
            Action::Checkpoint => self.pg.checkpoint().await?,
            _ => {}
        }
        Ok(())
    }

    fn maybe_upstream(
        &self,
        obs: &Observation,
        leader: Option<&str>,
    ) -> Result<Option<Upstream>, ActError> {
        leader.map(|l| self.upstream(obs, l)).transpose()
    }

    /// Wipes the data directory and clones afresh from the leader.
    async fn reinitialize(&mut self, obs: &Observation, leader: &str) -> Result<(), ActError> {
        let up = self.upstream(obs, leader)?;
        self.shared.request(|r| r.reinitialize = false);
        self.pg.stop(StopMode::Immediate).await?;
        self.pg.remove_data()?;
        self.pg
            .create_replica(ReplicaMethod::Basebackup, &up)
            .await?;
        self.rewind_failed = false;
        let role = RunRole::Replica { upstream: Some(up) };
        self.pg.start(role, START_TIMEOUT).await?;
        Ok(())
    }

    async fn record_history(&mut self, obs: &Observation, reason: &str) -> Result<(), ActError> {
        let probe = self.pg.probe().await?;
        let mut history = self
            .shared
            .snapshot()
            .map(|s| s.view.history)
            .unwrap_or_default();
        let timeline = probe.timeline.unwrap_or_default();
        // The exact end of the old timeline, which replicas compare their
        // WAL with to see whether they branched off (our position before
        // promotion is only an estimate of it).
        let switched_at = match self.pg.switch_point(timeline).await {
            Ok(Some(lsn)) => lsn,
            Ok(None) | Err(_) => obs.local.lsn.unwrap_or_default(),
        };
        history.push(HistoryEntry {
            timeline,
            lsn: switched_at,
            reason: reason.to_owned(),
            time_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            new_leader: self.shared.cfg.name.clone(),
        });
        self.shared.dcs.put_history(&history).await?;
        Ok(())
    }
}
