//! `metrics`: the agent's Prometheus metrics, one typed function per metric.
//!
//! Names follow Prometheus conventions (`pgha_agent_*`, units in the name,
//! `_total` for counters). The recorder is installed once in `main`; without
//! it (unit tests) these calls are no-ops.

use std::time::Duration;

use pgha_cluster::{Member, Role};

/// Role (1 primary, 0 replica, -1 uninitialized), timeline and lag.
pub fn member(m: &Member) {
    let role = match m.role {
        Role::Primary => 1.0,
        Role::Replica => 0.0,
        Role::Uninitialized => -1.0,
    };
    metrics::gauge!("pgha_agent_role").set(role);
    if let Some(t) = m.timeline {
        metrics::gauge!("pgha_agent_timeline").set(f64::from(t));
    }
    metrics::gauge!("pgha_agent_replication_lag_bytes").set(m.lag_bytes.unwrap_or(0) as f64);
}

pub fn postgres_up(up: bool) {
    metrics::gauge!("pgha_agent_postgres_up").set(if up { 1.0 } else { 0.0 });
}

/// Whether the fencing keeper process runs (see `agent::keeper`).
pub fn fence_keeper_up(up: bool) {
    metrics::gauge!("pgha_agent_fence_keeper_up").set(if up { 1.0 } else { 0.0 });
}

pub fn lease_renewal(took: Duration) {
    metrics::gauge!("pgha_agent_lease_renewal_seconds").set(took.as_secs_f64());
}

/// A promotion of this member, counted as a switchover or a failover.
pub fn promotion(reason: &str) {
    if reason == "switchover" {
        metrics::counter!("pgha_agent_switchovers_total").increment(1);
    } else {
        metrics::counter!("pgha_agent_failovers_total").increment(1);
    }
}
