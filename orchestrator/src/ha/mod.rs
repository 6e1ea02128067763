//! `ha`: what the agent saw, what it should do about it, and why.
//!
//! [`decide`] is a pure function from an [`Observation`] (local postgres,
//! the etcd snapshot, peers' reported WAL positions, the agent's own timers)
//! and the current instant to a [`Decision`]: an ordered list of [`Action`]s
//! and a human-readable reason. It performs no I/O and may call nothing
//! outside this module and `pgha_cluster`'s plain data types; the agent loop
//! (`agent`) gathers the observation and executes the actions, stopping at
//! the first one that fails (a lost leader race must not be followed by a
//! promotion).

mod decide;
mod sync;
#[cfg(test)]
mod tests;

use std::time::Instant;

use pgha_cluster::{
    ClusterConfig, HistoryEntry, Lsn, Member, ProxyAck, Status, Switchover, SwitchoverPhase,
    SyncState, Tags,
};

pub use decide::decide;

/// What the data directory says about this node, read while postgres is down
/// (pg_controldata) or from the running server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataDir {
    /// No data directory: bootstrap or clone.
    #[default]
    Missing,
    /// Last ran as a primary (in production or shut down): must not follow
    /// another leader without pg_rewind, the timelines may have diverged.
    WasPrimary,
    /// Last ran as a standby: may follow a leader as it is.
    Standby,
}

/// One standby connected to this node, from `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streaming {
    /// `application_name`, which the agent sets to the member name.
    pub member: String,
    /// `sync_state = 'sync'`: commits wait for it.
    pub sync: bool,
}

/// The local postgres.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Local {
    pub data: DataDir,
    pub running: bool,
    /// `pg_is_in_recovery()` when running and reachable.
    pub in_recovery: Option<bool>,
    pub timeline: Option<u32>,
    /// Primary: current write position; replica: the furthest of received and
    /// replayed; stopped: the last checkpoint.
    pub lsn: Option<Lsn>,
    /// The leader this replica's `primary_conninfo` points at.
    pub following: Option<String>,
    /// `synchronous_standby_names` as the agent last set it (member names).
    pub sync_standby_names: Vec<String>,
    /// Standbys streaming from this node (leader only).
    pub streaming: Vec<Streaming>,
    /// Replica: its WAL receiver is streaming from the upstream.
    pub receiving: bool,
}

impl Local {
    /// Running and answering as a primary: it accepts writes.
    pub fn is_writable(&self) -> bool {
        self.running && self.in_recovery == Some(false)
    }

    /// Running as a standby.
    pub fn is_replica(&self) -> bool {
        self.running && self.in_recovery == Some(true)
    }
}

/// The cluster's state in etcd, read in one consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DcsView {
    pub config: ClusterConfig,
    /// Who won the bootstrap race.
    pub initialize: Option<String>,
    pub leader: Option<String>,
    /// The lease the leader key lives on.
    pub leader_lease: Option<i64>,
    pub members: Vec<Member>,
    pub sync: Option<SyncState>,
    pub status: Option<Status>,
    pub switchover: Option<Switchover>,
    pub proxies: Vec<ProxyAck>,
    /// Timeline switches, oldest first.
    pub history: Vec<HistoryEntry>,
}

impl DcsView {
    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    /// Where timeline `tl` ended on the cluster's current line of history:
    /// the switch point recorded for the first timeline after it.
    pub fn end_of_timeline(&self, tl: u32) -> Option<Lsn> {
        self.history
            .iter()
            .filter(|h| h.timeline > tl)
            .min_by_key(|h| h.timeline)
            .map(|h| h.lsn)
    }
}

/// A peer's answer to `GET /status`, asked when the leader is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Its furthest WAL position, `None` when it did not answer.
    pub lsn: Option<Lsn>,
    pub tags: Tags,
}

/// Operator requests that reached this agent through its REST API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requests {
    pub restart: bool,
    pub reinitialize: bool,
}

/// Everything [`decide`] may look at.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub me: String,
    pub tags: Tags,
    /// Last known dynamic settings (kept when etcd is unreachable).
    pub config: ClusterConfig,
    pub local: Local,
    /// `None` when etcd could not be read within `retry_timeout`.
    pub dcs: Option<DcsView>,
    /// Last successful lease renewal: the leader key lives on this lease.
    pub lease_renewed_at: Option<Instant>,
    /// Our current lease: the leader key is only ours if it lives on it.
    pub lease_id: Option<i64>,
    /// Since when postgres is down while this agent holds the leader key.
    pub pg_down_since: Option<Instant>,
    /// When this agent first saw the pending switchover.
    pub switchover_seen_at: Option<Instant>,
    /// Peers' WAL positions (gathered only when there is no leader).
    pub peers: Vec<Peer>,
    /// pg_rewind failed on the last attempt.
    pub rewind_failed: bool,
    /// Policy: after a failed rewind, wipe the data and clone afresh.
    pub clone_on_rewind_failure: bool,
    pub requests: Requests,
}

/// How to stop postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: roll back sessions, checkpoint, exit. Standbys get all WAL.
    Fast,
    /// SIGQUIT: exit at once, crash recovery on next start. For fencing.
    Immediate,
}

/// One step for the agent to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Race for `initialize` (create-if-absent); losing stops the list.
    TakeInitialize,
    /// initdb, configure, start as primary, create roles and database.
    Bootstrap,
    /// Create a replica from the leader (pg_basebackup) and start it.
    CloneFrom {
        leader: String,
    },
    /// Start postgres writable (only ever while holding the leader key).
    StartPrimary,
    /// Start postgres read-only, following `leader` if any.
    StartReplica {
        leader: Option<String>,
    },
    /// Re-point a running replica's `primary_conninfo` and reload.
    Follow {
        leader: String,
    },
    /// pg_rewind from the leader; the data directory then is a standby's.
    Rewind {
        leader: String,
    },
    /// Remove the data directory and clone afresh.
    Reinitialize {
        leader: String,
    },
    Stop(StopMode),
    Restart,
    /// Race for `leader` (create-if-absent on our lease); losing stops the list.
    TakeLeader,
    /// Delete `leader` if it is still ours.
    ReleaseLeader,
    Promote,
    /// Append a timeline switch to `history`.
    RecordHistory {
        reason: String,
    },
    /// Leader: one physical slot per other member; drop the rest.
    EnsureSlots {
        members: Vec<String>,
    },
    /// Leader: set `synchronous_standby_names` to these members ("*" = any).
    SetSyncStandbys {
        members: Vec<String>,
    },
    /// Leader: write `sync` with these standbys.
    WriteSync {
        standbys: Vec<String>,
    },
    /// Leader: publish its WAL position in `status`.
    WriteStatus,
    Checkpoint,
    SetSwitchoverPhase(SwitchoverPhase),
    ClearSwitchover,
}

/// The outcome of one HA step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// Why, in words for the log and `/status`.
    pub reason: String,
}

impl Decision {
    fn new(actions: Vec<Action>, reason: impl Into<String>) -> Decision {
        Decision {
            actions,
            reason: reason.into(),
        }
    }

    fn wait(reason: impl Into<String>) -> Decision {
        Decision::new(Vec::new(), reason)
    }
}
