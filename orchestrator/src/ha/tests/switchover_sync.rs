//! Table tests of the planned changes: the switchover phases and the
//! synchronous-mode bookkeeping of `sync.rs`.

use super::*;

fn switchover(phase: SwitchoverPhase, candidate: &str) -> Switchover {
    Switchover {
        id: 7,
        leader: "a".into(),
        candidate: Some(candidate.into()),
        phase,
        requested_at_ms: 0,
    }
}

#[test]
fn switchover_phases() {
    let t0 = Instant::now();
    let hand_over = vec![
        Action::SetSwitchoverPhase(SwitchoverPhase::Demoting),
        Action::Checkpoint,
        Action::Stop(StopMode::Fast),
        Action::ReleaseLeader,
        Action::SetSwitchoverPhase(SwitchoverPhase::Promoting),
    ];
    let mut view = dcs(Some("a"));
    view.switchover = Some(switchover(SwitchoverPhase::Requested, "b"));
    view.proxies = vec![ProxyAck::default()];
    let mut o = obs("a", primary(100), Some(view.clone()), t0);
    o.switchover_seen_at = Some(t0);
    assert_eq!(decide(&o, t0).actions, vec![], "waits for proxies");
    o.lease_renewed_at = Some(t0 + secs(3));
    assert_eq!(
        decide(&o, t0 + secs(3)).actions,
        hand_over,
        "proceeds after switchover_timeout"
    );
    o.lease_renewed_at = Some(t0);
    view.proxies[0].paused_for = Some(7);
    o.dcs = Some(view.clone());
    assert_eq!(decide(&o, t0).actions, hand_over, "proceeds when acked");
    view.proxies.clear();
    o.dcs = Some(view.clone());
    assert_eq!(
        decide(&o, t0).actions,
        hand_over,
        "no proxy registered: nobody to wait for"
    );

    let mut bad = view.clone();
    bad.members[1].tags.nofailover = true;
    o.dcs = Some(bad);
    assert_eq!(decide(&o, t0).actions, vec![Action::ClearSwitchover]);

    // Promoting phase: only the candidate races, and it skips the tie-break.
    let mut view = dcs(None);
    view.switchover = Some(switchover(SwitchoverPhase::Promoting, "b"));
    let mut c = obs("c", replica(100, "a"), Some(view.clone()), t0);
    c.switchover_seen_at = Some(t0);
    assert_eq!(decide(&c, t0).actions, vec![], "non-candidate waits");
    let mut b = obs("b", replica(100, "a"), Some(view), t0);
    b.peers = vec![peer("c", Some(100), 9)];
    let mut want = promote();
    want[2] = Action::RecordHistory {
        reason: "switchover".into(),
    };
    want.push(Action::ClearSwitchover);
    assert_eq!(decide(&b, t0).actions, want);
}

fn sync_leader(standbys_key: &[&str], ssn: &[&str], streaming: &[(&str, bool)]) -> Observation {
    let t0 = Instant::now();
    let mut view = dcs(Some("a"));
    view.config.synchronous_mode = true;
    view.sync = Some(SyncState {
        leader: "a".into(),
        sync_standbys: standbys_key.iter().map(|s| s.to_string()).collect(),
    });
    let mut local = primary(100);
    local.sync_standby_names = ssn.iter().map(|s| s.to_string()).collect();
    local.streaming = streaming
        .iter()
        .map(|(m, s)| Streaming {
            member: m.to_string(),
            sync: *s,
        })
        .collect();
    obs("a", local, Some(view), t0)
}

fn sync_part(o: &Observation) -> Vec<Action> {
    decide(o, Instant::now())
        .actions
        .into_iter()
        .filter(|a| matches!(a, Action::WriteSync { .. } | Action::SetSyncStandbys { .. }))
        .collect()
}

#[test]
fn synchronous_mode_keeps_the_promotable_set_safe() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let cases = [
        (
            "new standby: set synchronous_standby_names first",
            sync_leader(&[], &[], &[("b", false)]),
            vec![Action::SetSyncStandbys {
                members: names(&["b"]),
            }],
        ),
        (
            "standby confirmed sync: list it in the key",
            sync_leader(&[], &["b"], &[("b", true)]),
            vec![Action::WriteSync {
                standbys: names(&["b"]),
            }],
        ),
        (
            "not yet confirmed: key stays empty",
            sync_leader(&[], &["b"], &[("b", false)]),
            vec![],
        ),
        (
            "standby gone: key shrinks before postgres stops waiting",
            sync_leader(&["b"], &["b"], &[]),
            vec![
                Action::WriteSync { standbys: vec![] },
                Action::SetSyncStandbys { members: vec![] },
            ],
        ),
        (
            "switch to another standby: drop from key, then replace",
            sync_leader(&["b"], &["b"], &[("c", false)]),
            vec![
                Action::WriteSync { standbys: vec![] },
                Action::SetSyncStandbys {
                    members: names(&["c"]),
                },
            ],
        ),
        (
            "steady",
            sync_leader(&["b"], &["b"], &[("b", true), ("c", false)]),
            vec![],
        ),
    ];
    for (name, o, want) in cases {
        assert_eq!(sync_part(&o), want, "{name}");
    }
    let mut strict = sync_leader(&["b"], &["b"], &[]);
    if let Some(d) = strict.dcs.as_mut() {
        d.config.synchronous_mode_strict = true;
    }
    assert_eq!(
        sync_part(&strict),
        vec![
            Action::WriteSync { standbys: vec![] },
            Action::SetSyncStandbys {
                members: names(&["*"])
            },
        ],
        "strict: keep blocking writes"
    );
}
