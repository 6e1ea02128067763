//! Where a transaction goes: the routing table and the pure choice of a
//! backend for a route.
//!
//! The table is built from the cluster's records (or the static config) by
//! [`RoutingTable::from_members`]; the choice takes the table and a counter,
//! no I/O, so every rule here has a unit test. May call: `pgha_cluster`
//! records, `config`.

use std::collections::BTreeMap;
use std::sync::Arc;

use pgha_cluster::{Member, PgState, Role};

use crate::config::{BackendRole, StaticBackend};

/// Which listener a client came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    ReadWrite,
    ReadOnly,
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::ReadWrite => "rw",
            Route::ReadOnly => "ro",
        }
    }
}

/// A Postgres server the proxy may connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Backend {
    /// Member name.
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl Backend {
    /// `name@host:port`: pools and metrics are keyed by this.
    pub fn id(&self) -> String {
        format!("{}@{}:{}", self.name, self.host, self.port)
    }
}

/// One consistent view of the cluster, swapped atomically as a whole.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoutingTable {
    /// Bumped on every change; a session compares it to notice failovers.
    pub epoch: u64,
    /// The member holding the leader key, if any.
    pub leader: Option<Arc<Backend>>,
    /// Running replicas within the lag bound, not tagged noloadbalance.
    pub replicas: Vec<Arc<Backend>>,
    /// New transactions wait (planned switchover or admin pause).
    pub paused: bool,
}

impl RoutingTable {
    /// The table for a static configuration.
    pub fn from_static(backends: &[StaticBackend]) -> RoutingTable {
        let b = |s: &StaticBackend| {
            Arc::new(Backend {
                name: s.name.clone(),
                host: s.host.clone(),
                port: s.port,
            })
        };
        RoutingTable {
            epoch: 1,
            leader: backends
                .iter()
                .find(|s| s.role == BackendRole::Primary)
                .map(b),
            replicas: backends
                .iter()
                .filter(|s| s.role == BackendRole::Replica && !s.noloadbalance)
                .map(b)
                .collect(),
            paused: false,
        }
    }

    /// The table for the leader key and member records seen in etcd.
    pub fn from_members(
        epoch: u64,
        leader: Option<&str>,
        members: &BTreeMap<String, Member>,
        max_lag: u64,
    ) -> RoutingTable {
        let backend = |m: &Member| {
            Arc::new(Backend {
                name: m.name.clone(),
                host: m.host.clone(),
                port: m.port,
            })
        };
        let leader = leader.and_then(|l| members.get(l)).map(backend);
        let replicas = members
            .values()
            .filter(|m| {
                m.role == Role::Replica
                    && m.state == PgState::Running
                    && !m.tags.noloadbalance
                    && m.lag_bytes.is_some_and(|lag| lag <= max_lag)
                    && leader.as_ref().is_none_or(|l| l.name != m.name)
            })
            .map(backend)
            .collect();
        RoutingTable {
            epoch,
            leader,
            replicas,
            paused: false,
        }
    }

    /// The backend for a new transaction on `route`; `turn` spreads reads
    /// round robin. `None`: nothing may serve it now.
    pub fn choose(&self, route: Route, turn: usize, fallback: bool) -> Option<Arc<Backend>> {
        match route {
            Route::ReadWrite => self.leader.clone(),
            Route::ReadOnly if self.replicas.is_empty() => {
                if fallback {
                    self.leader.clone()
                } else {
                    None
                }
            }
            Route::ReadOnly => self.replicas.get(turn % self.replicas.len()).cloned(),
        }
    }

    /// Whether `backend` may still serve `route` (false after a failover
    /// moved it out).
    pub fn still_serves(&self, route: Route, backend: &Backend, fallback: bool) -> bool {
        let is_leader = self.leader.as_deref() == Some(backend);
        match route {
            Route::ReadWrite => is_leader,
            Route::ReadOnly => {
                self.replicas.iter().any(|r| **r == *backend) || (fallback && is_leader)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgha_cluster::Tags;

    fn member(name: &str, role: Role, lag: Option<u64>) -> Member {
        Member {
            name: name.into(),
            role,
            state: PgState::Running,
            host: "127.0.0.1".into(),
            port: 5000,
            lag_bytes: lag,
            ..Member::default()
        }
    }

    fn members(ms: Vec<Member>) -> BTreeMap<String, Member> {
        ms.into_iter().map(|m| (m.name.clone(), m)).collect()
    }

    #[test]
    fn writes_go_only_to_the_member_named_by_the_leader_key() {
        let ms = members(vec![
            member("a", Role::Primary, None),
            member("b", Role::Replica, Some(0)),
        ]);
        let t = RoutingTable::from_members(1, Some("a"), &ms, 100);
        assert_eq!(t.choose(Route::ReadWrite, 0, true).unwrap().name, "a");
        // A member that says it is primary but does not hold the key gets nothing.
        let t = RoutingTable::from_members(2, None, &ms, 100);
        assert_eq!(t.choose(Route::ReadWrite, 0, true), None);
        let t = RoutingTable::from_members(3, Some("b"), &ms, 100);
        assert_eq!(t.choose(Route::ReadWrite, 0, true).unwrap().name, "b");
        assert!(t.replicas.is_empty(), "the leader is not a read replica");
    }

    #[test]
    fn reads_skip_lagging_stopped_and_noloadbalance_replicas() {
        let mut stopped = member("c", Role::Replica, Some(0));
        stopped.state = PgState::Stopped;
        let mut tagged = member("d", Role::Replica, Some(0));
        tagged.tags = Tags {
            noloadbalance: true,
            ..Tags::default()
        };
        let ms = members(vec![
            member("a", Role::Primary, None),
            member("b", Role::Replica, Some(5000)),
            stopped,
            tagged,
            member("e", Role::Replica, Some(10)),
            member("f", Role::Replica, None),
        ]);
        let t = RoutingTable::from_members(1, Some("a"), &ms, 100);
        let names: Vec<_> = t.replicas.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, vec!["e"]);
    }

    #[test]
    fn reads_round_robin_and_fall_back_to_the_leader_only_if_allowed() {
        let ms = members(vec![
            member("a", Role::Primary, None),
            member("b", Role::Replica, Some(0)),
            member("c", Role::Replica, Some(0)),
        ]);
        let t = RoutingTable::from_members(1, Some("a"), &ms, 100);
        let picks: Vec<_> = (0..4)
            .map(|i| t.choose(Route::ReadOnly, i, true).unwrap().name.clone())
            .collect();
        assert_eq!(picks, vec!["b", "c", "b", "c"]);
        let t = RoutingTable::from_members(
            1,
            Some("a"),
            &members(vec![member("a", Role::Primary, None)]),
            100,
        );
        assert_eq!(t.choose(Route::ReadOnly, 0, true).unwrap().name, "a");
        assert_eq!(t.choose(Route::ReadOnly, 0, false), None);
    }

    #[test]
    fn a_demoted_leader_no_longer_serves_writes() {
        let ms = members(vec![
            member("a", Role::Primary, None),
            member("b", Role::Replica, Some(0)),
        ]);
        let before = RoutingTable::from_members(1, Some("a"), &ms, 100);
        let a = before.leader.clone().unwrap();
        assert!(before.still_serves(Route::ReadWrite, &a, false));
        let after = RoutingTable::from_members(2, Some("b"), &ms, 100);
        assert!(!after.still_serves(Route::ReadWrite, &a, false));
    }

    #[test]
    fn static_config_names_leader_and_replicas() {
        let sb = |name: &str, role| StaticBackend {
            name: name.into(),
            host: "h".into(),
            port: 1,
            role,
            noloadbalance: false,
        };
        let t = RoutingTable::from_static(&[
            sb("p", BackendRole::Primary),
            sb("r", BackendRole::Replica),
        ]);
        assert_eq!(t.leader.unwrap().name, "p");
        assert_eq!(t.replicas[0].name, "r");
    }
}
