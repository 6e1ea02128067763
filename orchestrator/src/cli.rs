//! `cli`: the commands of `pgha`, the operator CLI.
//!
//! Reads the cluster from etcd (one snapshot), changes dynamic settings in
//! etcd with compare-and-set, and asks agents to act through their REST API
//! (switchover, failover, restart, reinitialize). Errors name what could not
//! be reached. May call `dcs`, `http` and `api`'s pure helpers; never postgres.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pgha_cluster::{ClusterConfig, Keys, Member};
use serde_json::{json, Value};

use crate::api::{cluster_json, merge_config};
use crate::dcs::{Dcs, Snapshot};
use crate::http;

/// Where the cluster is and how to authenticate to the agents.
pub struct Target {
    pub etcd: Vec<String>,
    pub cluster: String,
    pub api_user: String,
    pub api_password: Option<String>,
}

const TIMEOUT: Duration = Duration::from_secs(5);

impl Target {
    async fn dcs(&self) -> Result<Dcs> {
        let keys = Keys::new(&self.cluster).map_err(|e| anyhow!("cluster name: {e}"))?;
        Dcs::connect(&self.etcd, keys, "pgha-cli", TIMEOUT)
            .await
            .with_context(|| format!("cannot reach etcd at {}", self.etcd.join(",")))
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let snap = self
            .dcs()
            .await?
            .snapshot()
            .await
            .with_context(|| format!("cannot reach etcd at {}", self.etcd.join(",")))?;
        if snap.view.members.is_empty() && snap.view.initialize.is_none() {
            bail!(
                "no cluster {:?} in etcd ({})",
                self.cluster,
                self.etcd.join(",")
            );
        }
        Ok(snap)
    }

    fn auth(&self) -> Result<(&str, &str)> {
        let pw = self.api_password.as_deref().ok_or_else(|| {
            anyhow!(
                "this command needs the agents' API password: --api-password or PGHA_API_PASSWORD"
            )
        })?;
        Ok((self.api_user.as_str(), pw))
    }

    /// Sends a mutating call to `member`'s REST API; fails on non-2xx.
    async fn call(&self, member: &Member, method: &str, path: &str, body: Value) -> Result<Value> {
        let r = http::call(
            method,
            &member.api_url,
            path,
            Some(body.to_string()),
            Some(self.auth()?),
            Duration::from_secs(10),
        )
        .await
        .with_context(|| format!("cannot reach the agent of {}", member.name))?;
        let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body.clone()));
        if !(200..300).contains(&r.status) {
            let msg = v.get("error").and_then(Value::as_str).unwrap_or(&r.body);
            bail!("{} refused ({}): {msg}", member.name, r.status);
        }
        Ok(v)
    }
}

fn member<'a>(snap: &'a Snapshot, name: &str) -> Result<&'a Member> {
    snap.view
        .member(name)
        .ok_or_else(|| anyhow!("{name} is not a member of the cluster"))
}

fn leader(snap: &Snapshot) -> Result<&Member> {
    let name = snap
        .view
        .leader
        .as_deref()
        .ok_or_else(|| anyhow!("the cluster has no leader"))?;
    member(snap, name)
}

/// `pgha list`: a table, or JSON.
pub async fn list(t: &Target, as_json: bool) -> Result<String> {
    let snap = t.snapshot().await?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&cluster_json(&snap.view))?);
    }
    let mut members = snap.view.members.clone();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = format!(
        "{:<12} {:<22} {:<8} {:<9} {:>3} {:>10}\n",
        "MEMBER", "HOST", "ROLE", "STATE", "TL", "LAG(B)"
    );
    for m in &members {
        let is_leader = snap.view.leader.as_deref() == Some(m.name.as_str());
        let role = match (is_leader, m.role) {
            (true, _) => "leader".to_owned(),
            (false, r) => format!("{r:?}").to_lowercase(),
        };
        out.push_str(&format!(
            "{:<12} {:<22} {:<8} {:<9} {:>3} {:>10}\n",
            m.name,
            format!("{}:{}", m.host, m.port),
            role,
            format!("{:?}", m.state).to_lowercase(),
            m.timeline.map(|t| t.to_string()).unwrap_or_default(),
            m.lag_bytes.map(|l| l.to_string()).unwrap_or_default(),
        ));
    }
    if snap.view.config.pause {
        out.push_str("maintenance mode: paused\n");
    }
    Ok(out)
}

/// `pgha switchover` (`force`: hand over at once, without waiting for proxies)
/// and `pgha failover`.
pub async fn switchover(t: &Target, candidate: Option<&str>, force: bool) -> Result<String> {
    let snap = t.snapshot().await?;
    if let Some(c) = candidate {
        member(&snap, c)?;
    }
    let lead = leader(&snap)?;
    let path = if force { "/failover" } else { "/switchover" };
    t.call(lead, "POST", path, json!({ "candidate": candidate }))
        .await?;
    wait_new_leader(t, &lead.name, candidate).await
}

pub async fn failover(t: &Target, candidate: &str) -> Result<String> {
    let snap = t.snapshot().await?;
    let cand = member(&snap, candidate)?;
    let via = snap
        .view
        .leader
        .as_deref()
        .and_then(|l| snap.view.member(l))
        .unwrap_or(cand);
    t.call(via, "POST", "/failover", json!({ "candidate": candidate }))
        .await?;
    let old = snap.view.leader.clone().unwrap_or_default();
    wait_new_leader(t, &old, Some(candidate)).await
}

async fn wait_new_leader(t: &Target, old: &str, want: Option<&str>) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let snap = t.snapshot().await?;
        if let Some(l) = snap.view.leader.as_deref() {
            if l != old && want.is_none_or(|w| w == l) {
                return Ok(format!("{l} is the new leader"));
            }
        }
        if snap.view.switchover.is_none() && snap.view.leader.as_deref() == Some(old) {
            bail!("the switchover was cancelled; {old} is still the leader (see its agent log)");
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("no new leader after 60s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `pgha restart M` / `pgha reinit M`.
pub async fn member_request(t: &Target, name: &str, path: &str) -> Result<String> {
    let snap = t.snapshot().await?;
    let m = member(&snap, name)?;
    let v = t.call(m, "POST", path, json!({})).await?;
    Ok(format!("{name}: {v}"))
}

/// `pgha history`.
pub async fn history(t: &Target) -> Result<String> {
    let snap = t.snapshot().await?;
    let mut out = format!(
        "{:>3} {:<14} {:<12} {:<14} REASON\n",
        "TL", "LSN", "NEW LEADER", "TIME(ms)"
    );
    for h in &snap.view.history {
        out.push_str(&format!(
            "{:>3} {:<14} {:<12} {:<14} {}\n",
            h.timeline,
            h.lsn.to_string(),
            h.new_leader,
            h.time_ms,
            h.reason
        ));
    }
    Ok(out)
}

/// `pgha show-config`.
pub async fn show_config(t: &Target) -> Result<String> {
    let snap = t.snapshot().await?;
    Ok(serde_json::to_string_pretty(&snap.view.config)?)
}

/// `pgha edit-config --set k=v...`, `pause`, `resume`: compare-and-set in etcd.
pub async fn edit_config(t: &Target, sets: &[String]) -> Result<String> {
    let mut patch = serde_json::Map::new();
    for s in sets {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("--set {s:?}: expected key=value"))?;
        // Numbers and booleans as JSON, anything else as a string ("10s").
        let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::String(v.into()));
        patch.insert(k.trim().to_owned(), value);
    }
    let dcs = t.dcs().await?;
    let snap = t.snapshot().await?;
    let old: ClusterConfig = snap.view.config.clone();
    let new = merge_config(&old, &Value::Object(patch)).map_err(|e| anyhow!("{e}"))?;
    if !dcs.replace_config(&old, &new).await? {
        bail!("the config changed concurrently; run the command again");
    }
    Ok(serde_json::to_string_pretty(&new)?)
}
