//! The HA decision itself: one pass from observation to actions.
//!
//! Read top to bottom it is the agent's whole policy: fencing first (safety
//! does not depend on etcd being reachable), then bootstrap, then what to do
//! as the leader, as a follower, or when nobody leads. Pure: no I/O.

use std::time::Instant;

use pgha_cluster::{Lsn, SwitchoverPhase};

use super::sync::sync_actions;
use super::{Action, DataDir, DcsView, Decision, Observation, StopMode};

/// Decides what this agent does now.
pub fn decide(obs: &Observation, now: Instant) -> Decision {
    let Some(dcs) = &obs.dcs else {
        return dcs_unreachable(obs, now);
    };
    if obs.local.is_writable() && lease_stale(obs, now) {
        return fence();
    }
    let me = obs.me.as_str();
    if dcs.config.pause {
        return Decision::wait("paused: observing only");
    }
    if obs.local.data == DataDir::Missing {
        return no_data(obs, dcs);
    }
    match dcs.leader.as_deref() {
        Some(l) if l == me && dcs.leader_lease == obs.lease_id && obs.lease_id.is_some() => {
            as_leader(obs, dcs, now)
        }
        // Our name, but on a lease we no longer hold (it expired while etcd
        // was unreachable and is about to be revoked): it cannot be renewed,
        // so it must not be acted on as leadership.
        Some(l) if l == me => stale_own_key(obs),
        Some(l) => as_follower(obs, dcs, l),
        None => no_leader(obs, dcs, now),
    }
}

/// etcd did not answer: a writable primary fences itself once its lease may
/// be about to expire, so that no other member can be promoted while it still
/// accepts writes.
fn dcs_unreachable(obs: &Observation, now: Instant) -> Decision {
    if !obs.local.is_writable() {
        return Decision::wait("etcd unreachable: keeping postgres as it is (not writable)");
    }
    if lease_stale(obs, now) {
        fence()
    } else {
        Decision::wait("etcd unreachable: retrying within retry_timeout")
    }
}

/// Not renewed within [`ClusterConfig::fence_after`], counted from when the
/// last renewal was sent (etcd renewed the lease no earlier than that).
///
/// [`ClusterConfig::fence_after`]: pgha_cluster::ClusterConfig::fence_after
fn lease_stale(obs: &Observation, now: Instant) -> bool {
    let limit = obs.config.fence_after();
    obs.lease_renewed_at
        .is_none_or(|t| now.saturating_duration_since(t) >= limit)
}

fn fence() -> Decision {
    Decision::new(
        vec![Action::Stop(StopMode::Immediate)],
        "fencing: lease not renewed within retry_timeout, stopping writes before it expires",
    )
}

/// No data directory: race to bootstrap, or clone from the leader.
fn no_data(obs: &Observation, dcs: &DcsView) -> Decision {
    match dcs.leader.as_deref() {
        Some(l) if l == obs.me => Decision::new(
            vec![Action::ReleaseLeader],
            "holding the leader key without a data directory",
        ),
        Some(l) => Decision::new(
            vec![Action::CloneFrom {
                leader: l.to_owned(),
            }],
            format!("cloning from leader {l}"),
        ),
        // A node that may never lead must not bootstrap either: it would
        // create the cluster and then have to stop its own primary.
        None if dcs.initialize.is_none()
            && (obs.tags.nofailover || obs.tags.failover_priority == 0) =>
        {
            Decision::wait("no cluster yet; not racing to initialize it: tagged nofailover")
        }
        None if dcs.initialize.is_none() => Decision::new(
            vec![Action::TakeInitialize, Action::Bootstrap],
            "no cluster yet: racing to initialize it",
        ),
        None => Decision::wait("waiting for the bootstrap leader"),
    }
}

fn stale_own_key(obs: &Observation) -> Decision {
    if obs.local.is_writable() {
        return Decision::new(
            vec![Action::Stop(StopMode::Immediate)],
            "the leader key is on a lease we lost: stopping writes",
        );
    }
    Decision::wait("the leader key is on a lease we lost: waiting for etcd to revoke it")
}

/// This agent holds the leader key.
fn as_leader(obs: &Observation, dcs: &DcsView, now: Instant) -> Decision {
    let local = &obs.local;
    // The key may expire any moment: never start or promote a primary on it.
    if lease_stale(obs, now) {
        return Decision::wait("leader, but the lease is not renewed: not starting a primary");
    }
    if !local.running {
        let down_for = obs
            .pg_down_since
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        if down_for < dcs.config.primary_start_timeout {
            return Decision::new(
                vec![Action::StartPrimary],
                "leader's postgres is down: restarting it in place",
            );
        }
        return Decision::new(
            vec![Action::Stop(StopMode::Immediate), Action::ReleaseLeader],
            "postgres did not come back within primary_start_timeout: releasing the leader key",
        );
    }
    if local.in_recovery == Some(true) {
        return Decision::new(
            vec![
                Action::Promote,
                Action::RecordHistory {
                    reason: "promoted while holding the leader key".into(),
                },
            ],
            "holding the leader key as a replica: promoting",
        );
    }
    if obs.requests.restart {
        return Decision::new(vec![Action::Restart], "restart requested");
    }
    if let Some(d) = leader_switchover(obs, dcs, now) {
        return d;
    }
    let others: Vec<String> = dcs
        .members
        .iter()
        .filter(|m| m.name != obs.me)
        .map(|m| m.name.clone())
        .collect();
    let mut actions = vec![Action::WriteStatus, Action::EnsureSlots { members: others }];
    actions.extend(sync_actions(obs, dcs));
    Decision::new(actions, "leader: holding the key")
}

/// A planned switchover away from this leader: wait for the proxies to pause
/// (bounded by `switchover_timeout`), then stop cleanly and hand over.
fn leader_switchover(obs: &Observation, dcs: &DcsView, now: Instant) -> Option<Decision> {
    let sw = dcs.switchover.as_ref()?;
    if sw.leader != obs.me {
        return Some(Decision::new(
            vec![Action::ClearSwitchover],
            format!(
                "switchover was requested for leader {}, not us: void",
                sw.leader
            ),
        ));
    }
    if let Some(c) = &sw.candidate {
        let ok = dcs
            .member(c)
            .is_some_and(|m| !m.tags.nofailover && m.tags.failover_priority > 0 && c != &obs.me);
        if !ok {
            return Some(Decision::new(
                vec![Action::ClearSwitchover],
                format!("switchover candidate {c} is not an eligible member: cancelled"),
            ));
        }
    }
    // With no proxy registered there is nobody to wait for.
    let acked = dcs
        .proxies
        .iter()
        .all(|p| p.paused_for == Some(sw.id) && p.in_flight == 0);
    let waited = obs
        .switchover_seen_at
        .map(|t| now.saturating_duration_since(t) >= dcs.config.switchover_timeout)
        .unwrap_or(false);
    if sw.phase == SwitchoverPhase::Requested && !acked && !waited {
        return Some(Decision::wait("switchover: waiting for proxies to pause"));
    }
    Some(Decision::new(
        vec![
            Action::SetSwitchoverPhase(SwitchoverPhase::Demoting),
            Action::Checkpoint,
            Action::Stop(StopMode::Fast),
            Action::ReleaseLeader,
            Action::SetSwitchoverPhase(SwitchoverPhase::Promoting),
        ],
        "switchover: stopping cleanly and releasing the leader key",
    ))
}

/// Another member leads: be its replica.
fn as_follower(obs: &Observation, dcs: &DcsView, leader: &str) -> Decision {
    let local = &obs.local;
    let leader_owned = leader.to_owned();
    if local.is_writable() {
        return Decision::new(
            vec![Action::Stop(StopMode::Immediate)],
            format!("{leader} holds the leader key but we are writable: demoting"),
        );
    }
    if obs.requests.reinitialize {
        return Decision::new(
            vec![Action::Reinitialize {
                leader: leader_owned,
            }],
            "reinitialize requested",
        );
    }
    let Some(leader_member) = dcs.member(leader) else {
        return Decision::wait(format!("leader {leader} has no member record yet"));
    };
    // pg_rewind against a leader still promoting sees "no rewind required".
    if !local.running
        && local.data == DataDir::WasPrimary
        && leader_member.role != pgha_cluster::Role::Primary
    {
        return Decision::wait(format!(
            "waiting for {leader} to finish promoting before rewinding"
        ));
    }
    if !local.running {
        return match local.data {
            DataDir::WasPrimary if obs.rewind_failed && obs.clone_on_rewind_failure => {
                Decision::new(
                    vec![Action::Reinitialize {
                        leader: leader_owned,
                    }],
                    "pg_rewind failed: cloning afresh",
                )
            }
            DataDir::WasPrimary if obs.rewind_failed => {
                Decision::wait("pg_rewind failed and cloning afresh is disabled: staying down")
            }
            DataDir::WasPrimary => Decision::new(
                vec![
                    Action::Rewind {
                        leader: leader_owned.clone(),
                    },
                    Action::StartReplica {
                        leader: Some(leader_owned),
                    },
                ],
                format!("former primary: rewinding from {leader} before following it"),
            ),
            _ => Decision::new(
                vec![Action::StartReplica {
                    leader: Some(leader_owned),
                }],
                format!("starting as a replica of {leader}"),
            ),
        };
    }
    if obs.requests.restart {
        return Decision::new(vec![Action::Restart], "restart requested");
    }
    if local.following.as_deref() != Some(leader) {
        return Decision::new(
            vec![Action::Follow {
                leader: leader_owned,
            }],
            format!("re-pointing replication to new leader {leader}"),
        );
    }
    if let Some(end) = diverged(local, dcs) {
        return Decision::new(
            vec![
                Action::Stop(StopMode::Fast),
                Action::Rewind {
                    leader: leader_owned.clone(),
                },
                Action::StartReplica {
                    leader: Some(leader_owned),
                },
            ],
            format!(
                "our WAL went past {end}, where our timeline ended on {leader}'s history: rewinding"
            ),
        );
    }
    Decision::wait(format!("replica of {leader}"))
}

/// A replica that cannot stream because it holds WAL of its old timeline
/// beyond the point where the new leader branched off (an asynchronous
/// standby can be ahead of the promoted synchronous one): the switch point
/// it went past.
fn diverged(local: &super::Local, dcs: &DcsView) -> Option<Lsn> {
    if !local.is_replica() || local.receiving {
        return None;
    }
    let end = dcs.end_of_timeline(local.timeline?)?;
    (local.lsn? > end).then_some(end)
}

/// Nobody holds the leader key: race for it if we are the best candidate.
fn no_leader(obs: &Observation, dcs: &DcsView, now: Instant) -> Decision {
    let local = &obs.local;
    if let Some(sw) = &dcs.switchover {
        let fresh = obs.switchover_seen_at.is_some_and(|t| {
            now.saturating_duration_since(t) < dcs.config.switchover_timeout + dcs.config.ttl
        });
        match &sw.candidate {
            Some(c) if c != &obs.me && fresh => {
                return Decision::wait(format!("switchover: waiting for candidate {c}"));
            }
            _ => {}
        }
    }
    if let Err(why) = eligible(obs, dcs) {
        if local.is_writable() {
            return Decision::new(
                vec![Action::Stop(StopMode::Immediate)],
                format!("writable without the leader key and not eligible ({why}): stopping"),
            );
        }
        return Decision::wait(format!("no leader; not racing: {why}"));
    }
    let clear = dcs
        .switchover
        .as_ref()
        .map(|_| Action::ClearSwitchover)
        .into_iter();
    if local.is_writable() {
        let mut a = vec![Action::TakeLeader];
        a.extend(clear);
        return Decision::new(a, "writable primary without the key: taking it");
    }
    if local.is_replica() {
        let mut a = vec![
            Action::TakeLeader,
            Action::Promote,
            Action::RecordHistory {
                reason: if dcs.switchover.is_some() {
                    "switchover".into()
                } else {
                    "failover".into()
                },
            },
        ];
        a.extend(clear);
        return Decision::new(a, "leader gone and we are the best candidate: promoting");
    }
    match local.data {
        DataDir::WasPrimary => Decision::new(
            vec![Action::TakeLeader, Action::StartPrimary],
            "no leader and our former primary data is the most advanced: starting as leader",
        ),
        _ => Decision::new(
            vec![Action::StartReplica { leader: None }],
            "no leader: starting read-only to find our WAL position",
        ),
    }
}

/// Whether this member may race for the leader key now (invariant 3).
fn eligible(obs: &Observation, dcs: &DcsView) -> Result<(), String> {
    if obs.tags.nofailover || obs.tags.failover_priority == 0 {
        return Err("tagged nofailover".into());
    }
    let forced =
        dcs.switchover.as_ref().and_then(|s| s.candidate.as_deref()) == Some(obs.me.as_str());
    if dcs.config.synchronous_mode && !obs.local.is_writable() {
        let listed = dcs
            .sync
            .as_ref()
            .is_some_and(|s| s.has_all_commits(&obs.me));
        if !listed {
            return Err("synchronous mode and not listed in sync".into());
        }
    }
    let Some(mine) = obs.local.lsn else {
        if obs.local.running || obs.local.data == DataDir::WasPrimary {
            return Err("our WAL position is unknown".into());
        }
        // Stopped standby: start it read-only first, then compare.
        return Ok(());
    };
    if let Some(st) = &dcs.status {
        let lag = st.optime.bytes_after(mine);
        if lag > dcs.config.maximum_lag_on_failover {
            return Err(format!(
                "{lag} bytes behind the last leader position, over maximum_lag_on_failover"
            ));
        }
    }
    // Only a peer that could itself take over may hold us back: deferring
    // to one that never will (nofailover, or not a synchronous standby in
    // synchronous mode) would leave the cluster without a leader.
    for p in &obs.peers {
        if p.name == obs.me || !peer_may_lead(dcs, p) {
            continue;
        }
        let Some(theirs) = p.lsn else { continue };
        if theirs > mine {
            return Err(format!("{} is further ahead ({theirs} > {mine})", p.name));
        }
        if !forced && theirs == mine && better_tiebreak(obs, p) {
            return Err(format!("{} is as far ahead with a higher priority", p.name));
        }
    }
    Ok(())
}

/// Whether peer `p` could win the leader race by the same rules as
/// [`eligible`] applies to us.
fn peer_may_lead(dcs: &DcsView, p: &super::Peer) -> bool {
    !p.tags.nofailover
        && p.tags.failover_priority > 0
        && (!dcs.config.synchronous_mode
            || dcs
                .sync
                .as_ref()
                .is_some_and(|s| s.has_all_commits(&p.name)))
}

/// An equally advanced peer wins the tie when it has a higher failover
/// priority (the caller checked that it may lead).
fn better_tiebreak(obs: &Observation, p: &super::Peer) -> bool {
    p.tags.failover_priority > obs.tags.failover_priority
}
