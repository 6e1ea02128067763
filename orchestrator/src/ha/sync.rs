//! Synchronous mode on the leader: `synchronous_standby_names` and the `sync`
//! key change in an order that keeps "only a listed sync standby may be
//! promoted" true at every moment.
//!
//! Removing a standby: first from `sync` (it may no longer be promoted), then
//! from `synchronous_standby_names`. Adding one: first to
//! `synchronous_standby_names`, and only once postgres reports it `sync`
//! (it has every acknowledged commit) to `sync`. Pure: no I/O.

use super::{Action, DcsView, Observation};

/// The actions that move the leader one step towards the desired sync state.
pub(super) fn sync_actions(obs: &Observation, dcs: &DcsView) -> Vec<Action> {
    let local = &obs.local;
    let key: Vec<String> = dcs
        .sync
        .as_ref()
        .filter(|s| s.leader == obs.me)
        .map(|s| s.sync_standbys.clone())
        .unwrap_or_default();
    let key_is_ours = dcs.sync.as_ref().is_some_and(|s| s.leader == obs.me);
    if !dcs.config.synchronous_mode {
        // The key only matters in synchronous mode; clear leftovers once.
        let mut a = Vec::new();
        if dcs
            .sync
            .as_ref()
            .is_some_and(|s| !s.sync_standbys.is_empty())
        {
            a.push(Action::WriteSync {
                standbys: Vec::new(),
            });
        }
        if !local.sync_standby_names.is_empty() {
            a.push(Action::SetSyncStandbys {
                members: Vec::new(),
            });
        }
        return a;
    }
    let desired = desired_standby(obs, dcs);
    let mut actions = Vec::new();
    // 1. Shrink the promotable set first.
    let kept: Vec<String> = key
        .iter()
        .filter(|k| desired.as_deref() == Some(k.as_str()))
        .cloned()
        .collect();
    if kept != key || !key_is_ours {
        actions.push(Action::WriteSync {
            standbys: kept.clone(),
        });
    }
    // 2. Then what postgres waits for.
    let want_names = match &desired {
        Some(d) => vec![d.clone()],
        None if dcs.config.synchronous_mode_strict => vec!["*".to_owned()],
        None => Vec::new(),
    };
    if local.sync_standby_names != want_names {
        actions.push(Action::SetSyncStandbys {
            members: want_names,
        });
        return actions;
    }
    // 3. Grow the promotable set once postgres confirms the standby is sync.
    if let Some(d) = desired {
        let confirmed = local.streaming.iter().any(|s| s.member == d && s.sync);
        if confirmed && !kept.contains(&d) {
            actions.push(Action::WriteSync { standbys: vec![d] });
        }
    }
    actions
}

/// Keep the current synchronous standby while it streams; else pick the first
/// streaming member (by name) that is not tagged `nosync`.
fn desired_standby(obs: &Observation, dcs: &DcsView) -> Option<String> {
    let usable = |name: &str| {
        name != obs.me
            && dcs.member(name).is_some_and(|m| !m.tags.nosync)
            && obs.local.streaming.iter().any(|s| s.member == name)
    };
    if let Some(cur) = obs.local.sync_standby_names.first() {
        if usable(cur) {
            return Some(cur.clone());
        }
    }
    let mut names: Vec<&str> = obs
        .local
        .streaming
        .iter()
        .map(|s| s.member.as_str())
        .filter(|n| usable(n))
        .collect();
    names.sort_unstable();
    names.first().map(|n| (*n).to_owned())
}
