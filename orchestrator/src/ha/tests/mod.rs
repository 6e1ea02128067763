//! Table tests of the HA decision: every scenario without a server.

use std::time::{Duration, Instant};

use pgha_cluster::{ClusterConfig, Lsn, Member, ProxyAck, Status, Switchover, SyncState, Tags};

use super::*;

mod switchover_sync;

const LEASE: i64 = 7;

fn tags(priority: u32) -> Tags {
    Tags {
        failover_priority: priority,
        ..Tags::default()
    }
}

fn member(name: &str) -> Member {
    Member {
        name: name.into(),
        tags: tags(1),
        ..Member::default()
    }
}

fn replica(lsn: u64, following: &str) -> Local {
    Local {
        data: DataDir::Standby,
        running: true,
        in_recovery: Some(true),
        timeline: Some(1),
        lsn: Some(Lsn(lsn)),
        following: Some(following.into()),
        ..Local::default()
    }
}

fn primary(lsn: u64) -> Local {
    Local {
        data: DataDir::WasPrimary,
        running: true,
        in_recovery: Some(false),
        timeline: Some(1),
        lsn: Some(Lsn(lsn)),
        ..Local::default()
    }
}

fn dcs(leader: Option<&str>) -> DcsView {
    DcsView {
        config: ClusterConfig::default(),
        initialize: Some("a".into()),
        leader: leader.map(str::to_owned),
        leader_lease: leader.map(|_| LEASE),
        members: ["a", "b", "c"].into_iter().map(member).collect(),
        ..DcsView::default()
    }
}

/// Member `me` seeing `local` and `dcs`, lease just renewed at `t0`.
fn obs(me: &str, local: Local, dcs: Option<DcsView>, t0: Instant) -> Observation {
    Observation {
        me: me.into(),
        tags: tags(1),
        config: ClusterConfig::default(),
        local,
        dcs,
        lease_renewed_at: Some(t0),
        lease_id: Some(LEASE),
        pg_down_since: None,
        switchover_seen_at: None,
        peers: Vec::new(),
        rewind_failed: false,
        clone_on_rewind_failure: true,
        requests: Requests::default(),
    }
}

fn peer(name: &str, lsn: Option<u64>, priority: u32) -> Peer {
    Peer {
        name: name.into(),
        lsn: lsn.map(Lsn),
        tags: tags(priority),
    }
}

fn promote() -> Vec<Action> {
    vec![
        Action::TakeLeader,
        Action::Promote,
        Action::RecordHistory {
            reason: "failover".into(),
        },
    ]
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn bootstrap_race_and_clone() {
    let t0 = Instant::now();
    let mut empty = dcs(None);
    empty.initialize = None;
    let fresh = Local::default();
    let cases: Vec<(&str, Observation, Vec<Action>)> = vec![
        (
            "empty cluster: race to initialize and bootstrap",
            obs("a", fresh.clone(), Some(empty.clone()), t0),
            vec![Action::TakeInitialize, Action::Bootstrap],
        ),
        (
            "empty cluster, tagged nofailover: never bootstraps",
            Observation {
                tags: Tags {
                    nofailover: true,
                    ..tags(1)
                },
                ..obs("c", fresh.clone(), Some(empty.clone()), t0)
            },
            vec![],
        ),
        (
            "empty cluster, failover priority 0: never bootstraps",
            Observation {
                tags: tags(0),
                ..obs("c", fresh.clone(), Some(empty.clone()), t0)
            },
            vec![],
        ),
        (
            "initialized, no leader yet: wait",
            obs("b", fresh.clone(), Some(dcs(None)), t0),
            vec![],
        ),
        (
            "leader exists, no data: clone",
            obs("b", fresh.clone(), Some(dcs(Some("a"))), t0),
            vec![Action::CloneFrom { leader: "a".into() }],
        ),
        (
            "bootstrapped primary without the key takes it",
            obs("a", primary(100), Some(dcs(None)), t0),
            vec![Action::TakeLeader],
        ),
    ];
    for (name, o, want) in cases {
        assert_eq!(decide(&o, t0).actions, want, "{name}");
    }
}

#[test]
fn leader_keeps_the_key_and_manages_slots() {
    let t0 = Instant::now();
    let d = decide(&obs("a", primary(100), Some(dcs(Some("a"))), t0), t0);
    assert_eq!(
        d.actions,
        vec![
            Action::WriteStatus,
            Action::EnsureSlots {
                members: vec!["b".into(), "c".into()]
            }
        ]
    );
}

#[test]
fn leader_that_lost_the_key_demotes_and_rejoins_with_rewind() {
    let t0 = Instant::now();
    let o = obs("a", primary(100), Some(dcs(Some("b"))), t0);
    assert_eq!(
        decide(&o, t0).actions,
        vec![Action::Stop(StopMode::Immediate)]
    );
    let stopped = Local {
        data: DataDir::WasPrimary,
        ..Local::default()
    };
    let mut o = obs("a", stopped, Some(dcs(Some("b"))), t0);
    assert_eq!(
        decide(&o, t0).actions,
        vec![],
        "b has not finished promoting"
    );
    if let Some(v) = o.dcs.as_mut() {
        v.members[1].role = pgha_cluster::Role::Primary;
    }
    let want = vec![
        Action::Rewind { leader: "b".into() },
        Action::StartReplica {
            leader: Some("b".into()),
        },
    ];
    assert_eq!(decide(&o, t0).actions, want, "never starts writable");
    o.rewind_failed = true;
    assert_eq!(
        decide(&o, t0).actions,
        vec![Action::Reinitialize { leader: "b".into() }]
    );
    o.clone_on_rewind_failure = false;
    assert_eq!(decide(&o, t0).actions, vec![]);
}

#[test]
fn leader_fences_itself_when_the_lease_cannot_be_renewed() {
    let t0 = Instant::now();
    let fence = vec![Action::Stop(StopMode::Immediate)];
    let cases = [
        ("etcd down, renewed 1s ago: keep retrying", None, 1, vec![]),
        (
            "etcd down, one renewal late by less than retry_timeout: keep retrying",
            None,
            4,
            vec![],
        ),
        (
            "etcd down past loop_wait + retry_timeout: fence",
            None,
            5,
            fence.clone(),
        ),
        (
            "etcd answers but renewal failed past loop_wait + retry_timeout: fence",
            Some(dcs(Some("a"))),
            6,
            fence.clone(),
        ),
    ];
    for (name, view, after, want) in cases {
        let o = obs("a", primary(100), view, t0);
        assert_eq!(decide(&o, t0 + secs(after)).actions, want, "{name}");
    }
    // A replica cut off from etcd does nothing: it is read-only anyway.
    let o = obs("b", replica(100, "a"), None, t0);
    assert_eq!(decide(&o, t0 + secs(30)).actions, vec![]);
}

#[test]
fn crashed_leader_postgres_restarts_in_place_then_releases_the_key() {
    let t0 = Instant::now();
    let down = Local {
        data: DataDir::WasPrimary,
        ..Local::default()
    };
    let mut o = obs("a", down, Some(dcs(Some("a"))), t0);
    o.pg_down_since = Some(t0);
    assert_eq!(decide(&o, t0 + secs(1)).actions, vec![Action::StartPrimary]);
    o.lease_renewed_at = Some(t0 + secs(6));
    assert_eq!(
        decide(&o, t0 + secs(6)).actions,
        vec![Action::Stop(StopMode::Immediate), Action::ReleaseLeader]
    );
}

#[test]
fn failover_eligibility() {
    let t0 = Instant::now();
    let mut sync_on = dcs(None);
    sync_on.config.synchronous_mode = true;
    sync_on.sync = Some(SyncState {
        leader: "a".into(),
        sync_standbys: vec!["c".into()],
    });
    let mut lagging = dcs(None);
    lagging.status = Some(Status {
        optime: Lsn(100 + (2 << 20)),
        timeline: 1,
    });
    let no_fail = Tags {
        nofailover: true,
        ..tags(1)
    };
    type Case = (&'static str, Vec<Peer>, DcsView, Tags, Vec<Action>);
    let cases: Vec<Case> = vec![
        (
            "most advanced: promote",
            vec![peer("c", Some(90), 1)],
            dcs(None),
            tags(1),
            promote(),
        ),
        (
            "peer further ahead: wait",
            vec![peer("c", Some(110), 1)],
            dcs(None),
            tags(1),
            vec![],
        ),
        (
            "unreachable peer is ignored",
            vec![peer("c", None, 1)],
            dcs(None),
            tags(1),
            promote(),
        ),
        (
            "tie, peer has higher priority: wait",
            vec![peer("c", Some(100), 5)],
            dcs(None),
            tags(1),
            vec![],
        ),
        (
            "tie, we have higher priority: promote",
            vec![peer("c", Some(100), 1)],
            dcs(None),
            tags(5),
            promote(),
        ),
        (
            "tie, equal priority: both race",
            vec![peer("c", Some(100), 1)],
            dcs(None),
            tags(1),
            promote(),
        ),
        (
            "tie, better peer is nofailover: promote",
            vec![Peer {
                tags: Tags {
                    nofailover: true,
                    ..tags(9)
                },
                ..peer("c", Some(100), 9)
            }],
            dcs(None),
            tags(1),
            promote(),
        ),
        ("nofailover: never", vec![], dcs(None), no_fail, vec![]),
        ("priority 0: never", vec![], dcs(None), tags(0), vec![]),
        (
            "lag over maximum_lag_on_failover: wait",
            vec![],
            lagging,
            tags(1),
            vec![],
        ),
        (
            "sync mode, not listed: wait",
            vec![],
            sync_on.clone(),
            tags(1),
            vec![],
        ),
    ];
    for (name, peers, view, t, want) in cases {
        let mut o = obs("b", replica(100, "a"), Some(view), t0);
        o.peers = peers;
        o.tags = t;
        assert_eq!(decide(&o, t0).actions, want, "{name}");
    }
    let mut o = obs("c", replica(100, "a"), Some(sync_on.clone()), t0);
    o.peers = vec![peer("b", Some(100), 9)];
    assert_eq!(
        decide(&o, t0).actions,
        promote(),
        "sync mode, listed: promote"
    );
    // An unlisted standby may have received more WAL than was ever
    // acknowledged; it can never lead, so it must not hold the listed one back.
    o.peers = vec![peer("b", Some(150), 9)];
    assert_eq!(
        decide(&o, t0).actions,
        promote(),
        "sync mode, listed, an unlisted peer further ahead: promote"
    );
    let mut o = obs("b", replica(100, "a"), Some(dcs(None)), t0);
    o.peers = vec![Peer {
        tags: Tags {
            nofailover: true,
            ..tags(1)
        },
        ..peer("c", Some(150), 1)
    }];
    assert_eq!(
        decide(&o, t0).actions,
        promote(),
        "a nofailover peer further ahead does not hold us back"
    );
    // The whole cluster stopped cleanly and starts again: the leader that
    // wrote the sync key holds every acknowledged commit and may lead again.
    let stopped_primary = Local {
        data: DataDir::WasPrimary,
        lsn: Some(Lsn(100)),
        ..Local::default()
    };
    let mut o = obs("a", stopped_primary, Some(sync_on), t0);
    o.peers = vec![peer("b", Some(100), 1), peer("c", Some(100), 1)];
    assert_eq!(
        decide(&o, t0).actions,
        vec![Action::TakeLeader, Action::StartPrimary],
        "sync mode, former leader named in sync: starts as leader"
    );
}

#[test]
fn stopped_replica_without_leader_starts_read_only_first() {
    let t0 = Instant::now();
    let stopped = Local {
        data: DataDir::Standby,
        ..Local::default()
    };
    let o = obs("b", stopped, Some(dcs(None)), t0);
    assert_eq!(
        decide(&o, t0).actions,
        vec![Action::StartReplica { leader: None }]
    );
}

#[test]
fn replica_re_points_to_a_new_leader_without_restart() {
    let t0 = Instant::now();
    let o = obs("b", replica(100, "a"), Some(dcs(Some("c"))), t0);
    assert_eq!(
        decide(&o, t0).actions,
        vec![Action::Follow { leader: "c".into() }]
    );
    let o = obs("b", replica(100, "c"), Some(dcs(Some("c"))), t0);
    assert_eq!(decide(&o, t0).actions, vec![]);
}

#[test]
fn pause_mode_takes_no_action() {
    let t0 = Instant::now();
    let mut paused = dcs(None);
    paused.config.pause = true;
    let o = obs("b", replica(100, "a"), Some(paused.clone()), t0);
    assert_eq!(decide(&o, t0).actions, vec![], "no promotion while paused");
    paused.leader = Some("a".into());
    let mut o = obs("a", Local::default(), Some(paused), t0);
    o.local.data = DataDir::WasPrimary;
    o.pg_down_since = Some(t0);
    assert_eq!(decide(&o, t0 + secs(60)).actions, vec![], "no restart");
}

#[test]
fn operator_requests_restart_and_reinitialize() {
    let t0 = Instant::now();
    let mut o = obs("b", replica(100, "a"), Some(dcs(Some("a"))), t0);
    o.requests.reinitialize = true;
    assert_eq!(
        decide(&o, t0).actions,
        vec![Action::Reinitialize { leader: "a".into() }]
    );
    o.requests = Requests {
        restart: true,
        reinitialize: false,
    };
    assert_eq!(decide(&o, t0).actions, vec![Action::Restart]);
}

#[test]
fn own_leader_key_on_a_lost_lease_is_not_leadership() {
    // etcd came back after a freeze: the key still names us but lives on the
    // lease that expired meanwhile; restarting writable would be split brain.
    let t0 = Instant::now();
    let mut view = dcs(Some("a"));
    view.leader_lease = Some(LEASE - 1);
    let down = Local {
        data: DataDir::WasPrimary,
        ..Local::default()
    };
    let mut o = obs("a", down, Some(view.clone()), t0);
    o.pg_down_since = Some(t0);
    assert_eq!(decide(&o, t0).actions, vec![], "no restart in place");
    let o = obs("a", primary(100), Some(view), t0);
    assert_eq!(
        decide(&o, t0).actions,
        vec![Action::Stop(StopMode::Immediate)]
    );
}

#[test]
fn a_replica_past_the_new_leaders_branch_point_rewinds_and_others_stay() {
    let t0 = Instant::now();
    let mut view = dcs(Some("b"));
    view.history = vec![pgha_cluster::HistoryEntry {
        timeline: 2,
        lsn: Lsn(100),
        reason: "failover".into(),
        time_ms: 0,
        new_leader: "b".into(),
    }];
    let rewind = vec![
        Action::Stop(StopMode::Fast),
        Action::Rewind { leader: "b".into() },
        Action::StartReplica {
            leader: Some("b".into()),
        },
    ];
    let stuck = replica(150, "b");
    assert_eq!(
        decide(&obs("c", stuck.clone(), Some(view.clone()), t0), t0).actions,
        rewind,
        "timeline 1 went past the branch point at 100 and cannot stream"
    );
    let behind = replica(90, "b");
    assert_eq!(
        decide(&obs("c", behind, Some(view.clone()), t0), t0).actions,
        vec![],
        "behind the branch point: postgres follows the new timeline itself"
    );
    let streaming = Local {
        receiving: true,
        ..stuck.clone()
    };
    assert_eq!(
        decide(&obs("c", streaming, Some(view.clone()), t0), t0).actions,
        vec![],
        "a replica that streams has not diverged"
    );
    let on_new_timeline = Local {
        timeline: Some(2),
        ..stuck
    };
    assert_eq!(
        decide(&obs("c", on_new_timeline, Some(view), t0), t0).actions,
        vec![],
        "already on the leader's timeline"
    );
}

#[test]
fn a_leader_whose_lease_is_stale_neither_starts_nor_promotes_postgres() {
    let t0 = Instant::now();
    let down = Local {
        data: DataDir::WasPrimary,
        ..Local::default()
    };
    for (name, local) in [("postgres down", down), ("a replica", replica(100, "a"))] {
        let mut o = obs("a", local, Some(dcs(Some("a"))), t0);
        o.pg_down_since = Some(t0);
        assert_eq!(decide(&o, t0 + secs(6)).actions, vec![], "{name}");
    }
}
