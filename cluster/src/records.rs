//! The values stored under the cluster's keys, as JSON.
//!
//! Unknown fields are accepted on read (so a newer agent can add fields
//! without breaking an older proxy during a rolling upgrade); the `leader`
//! key holds the bare member name, not JSON, so `etcdctl get` shows it plainly.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::Lsn;

/// A stored value could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("invalid {what} record: {source}")]
pub struct RecordError {
    what: &'static str,
    #[source]
    source: serde_json::Error,
}

/// Encodes a record as the JSON bytes stored in etcd.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain structs with string keys: serialization cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes the JSON bytes stored in etcd; `what` names the record in errors.
pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, RecordError> {
    serde_json::from_slice(bytes).map_err(|source| RecordError { what, source })
}

/// What a member's postgres is doing for the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
    /// No data directory yet (before bootstrap or clone).
    #[default]
    Uninitialized,
}

/// The state of a member's postgres process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PgState {
    Running,
    Starting,
    Stopping,
    #[default]
    Stopped,
    /// Died without being asked to.
    Crashed,
    /// Being created (initdb, pg_basebackup, pg_rewind).
    Creating,
    Rewinding,
}

/// Operator tags on a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Tags {
    /// Never promote this member.
    pub nofailover: bool,
    /// Do not send read-only traffic here.
    pub noloadbalance: bool,
    /// Never make this member a synchronous standby.
    pub nosync: bool,
    /// Higher wins when candidates are equally advanced; 0 means never.
    pub failover_priority: u32,
}

/// `members/<name>`: one agent's report on its own node, kept on its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Member {
    pub name: String,
    pub role: Role,
    pub state: PgState,
    /// Postgres host and port clients and replicas connect to.
    pub host: String,
    pub port: u16,
    /// Base URL of the agent's REST API, e.g. `http://127.0.0.1:8008`.
    pub api_url: String,
    pub timeline: Option<u32>,
    /// Primary: current WAL write position.
    pub wal_lsn: Option<Lsn>,
    /// Replica: WAL received and replayed.
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// Replica: bytes behind the leader's last known position.
    pub lag_bytes: Option<u64>,
    pub tags: Tags,
    /// pgha version of the agent.
    pub version: String,
}

/// `sync`: who may be promoted without losing an acknowledged commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SyncState {
    pub leader: String,
    pub sync_standbys: Vec<String>,
}

impl SyncState {
    /// Whether `member` may be promoted under synchronous mode.
    pub fn may_promote(&self, member: &str) -> bool {
        self.sync_standbys.iter().any(|s| s == member)
    }

    /// Whether `member` holds every acknowledged commit: a listed standby, or
    /// the leader that wrote this record (after the whole cluster stopped,
    /// it is the one to start again as leader).
    pub fn has_all_commits(&self, member: &str) -> bool {
        self.leader == member || self.may_promote(member)
    }
}

/// `status`: the leader's last known WAL position (optime).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Status {
    pub optime: Lsn,
    pub timeline: u32,
}

/// Where a planned switchover is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchoverPhase {
    /// Written by the operator: proxies pause new transactions and acknowledge.
    Requested,
    /// Proxies acknowledged (or the wait timed out): the leader checkpoints and stops.
    Demoting,
    /// The old leader released the key: the candidate catches up and promotes.
    Promoting,
}

/// `switchover`: a pending planned switchover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// Unique per request; proxies acknowledge this id.
    pub id: u64,
    /// The leader at request time; the switchover is void if it changed.
    pub leader: String,
    /// Target member, or `None` for "the best eligible replica".
    pub candidate: Option<String>,
    pub phase: SwitchoverPhase,
    /// Unix milliseconds when it was requested.
    pub requested_at_ms: u64,
}

/// `proxies/<id>`: what routing state a proxy has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProxyAck {
    /// The switchover id this proxy has paused for, if any.
    pub paused_for: Option<u64>,
    /// Transactions still in flight on the old leader at the time of writing.
    pub in_flight: u64,
    /// The leader the proxy currently routes writes to.
    pub leader: Option<String>,
}

/// One timeline switch, appended to `history` by the new leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub timeline: u32,
    /// Where the previous timeline ended.
    pub lsn: Lsn,
    pub reason: String,
    /// Unix milliseconds.
    pub time_ms: u64,
    pub new_leader: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
        let back: T = decode("test", &encode(&v)).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn records_round_trip() {
        round_trip(Member {
            name: "n1".into(),
            role: Role::Replica,
            state: PgState::Running,
            host: "127.0.0.1".into(),
            port: 5432,
            api_url: "http://127.0.0.1:8008".into(),
            timeline: Some(3),
            wal_lsn: None,
            receive_lsn: Some(Lsn(0x3000060)),
            replay_lsn: Some(Lsn(0x3000000)),
            lag_bytes: Some(96),
            tags: Tags {
                nofailover: true,
                failover_priority: 2,
                ..Tags::default()
            },
            version: "0.1.0".into(),
        });
        round_trip(SyncState {
            leader: "n1".into(),
            sync_standbys: vec!["n2".into()],
        });
        round_trip(Status {
            optime: Lsn(42),
            timeline: 2,
        });
        round_trip(Switchover {
            id: 7,
            leader: "n1".into(),
            candidate: Some("n2".into()),
            phase: SwitchoverPhase::Demoting,
            requested_at_ms: 1,
        });
        round_trip(ProxyAck {
            paused_for: Some(7),
            in_flight: 0,
            leader: Some("n1".into()),
        });
        round_trip(vec![HistoryEntry {
            timeline: 2,
            lsn: Lsn(0x5000000),
            reason: "failover".into(),
            time_ms: 1,
            new_leader: "n2".into(),
        }]);
    }

    #[test]
    fn unknown_fields_from_newer_agents_are_ignored() {
        let m: Member = decode("member", br#"{"name":"n1","role":"primary","future":1}"#).unwrap();
        assert_eq!(m.role, Role::Primary);
        assert_eq!(m.state, PgState::Stopped);
    }

    #[test]
    fn bad_records_name_what_failed() {
        let err = decode::<Member>("member", b"{not json").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid member record"),
            "{err}"
        );
        let err = decode::<Member>("member", br#"{"wal_lsn":"zz"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid LSN"), "{err}");
    }

    #[test]
    fn only_listed_standbys_may_promote() {
        let s = SyncState {
            leader: "a".into(),
            sync_standbys: vec!["b".into()],
        };
        assert!(s.may_promote("b"));
        assert!(!s.may_promote("c"));
        assert!(!s.may_promote("a"));
        assert!(s.has_all_commits("a"));
        assert!(s.has_all_commits("b"));
        assert!(!s.has_all_commits("c"));
    }
}
