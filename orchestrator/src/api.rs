//! `api`: the agent's REST API on hyper.
//!
//! Health endpoints answer 200 or 503 like Patroni's, so HAProxy checks keep
//! working; `/status` is what peers compare during failover. Mutating calls
//! need basic auth with the configured credentials (401 without) and a
//! well-formed JSON body (400 with a JSON error otherwise). Requests that
//! change the cluster are written to etcd (`switchover`, `config`); local ones
//! (restart, reinitialize) are queued for the agent loop. May read the shared
//! agent state and write etcd through `dcs`; reads postgres only for the live
//! WAL position in `/status`, never changes it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use pgha_cluster::{ClusterConfig, Switchover, SwitchoverPhase};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Shared;
use crate::ha::DcsView;

type Resp = Response<Full<Bytes>>;

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    prom: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "api accept");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        let prom = prom.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let prom = prom.clone();
                async move { Ok::<_, Infallible>(handle(req, &shared, prom.as_ref()).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Resp {
    reply(status, json!({ "error": msg.to_string() }))
}

fn check(ok: bool, body: Value) -> Resp {
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    reply(code, body)
}

async fn handle(req: Request<Incoming>, shared: &Shared, prom: Option<&PrometheusHandle>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    if method == Method::GET && path == "/status" {
        return status(shared).await;
    }
    if method == Method::GET && matches!(path.as_str(), "/cluster" | "/history" | "/config") {
        return from_etcd(&path, shared).await;
    }
    if method == Method::GET {
        return get(&path, &query, shared, prom);
    }
    if !authorized(&req, shared) {
        let mut r = error(StatusCode::UNAUTHORIZED, "authentication required");
        r.headers_mut().insert(
            "www-authenticate",
            hyper::header::HeaderValue::from_static("Basic realm=\"pgha\""),
        );
        return r;
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match (method, path.as_str()) {
        (Method::POST, "/switchover") => switchover(shared, &body, false).await,
        (Method::POST, "/failover") => switchover(shared, &body, true).await,
        (Method::POST, "/restart") => {
            shared.request(|r| r.restart = true);
            reply(StatusCode::ACCEPTED, json!({"queued": "restart"}))
        }
        (Method::POST, "/reinitialize") => {
            let leader = match shared.dcs.snapshot().await {
                Ok(snap) => snap.view.leader,
                Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
            };
            if leader.as_deref() == Some(shared.cfg.name.as_str()) {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the leader cannot be reinitialized",
                );
            }
            shared.request(|r| r.reinitialize = true);
            reply(StatusCode::ACCEPTED, json!({"queued": "reinitialize"}))
        }
        (Method::POST, "/reload") => {
            shared.wake.notify_one();
            reply(
                StatusCode::OK,
                json!({"reloaded": "dynamic settings are re-read from etcd"}),
            )
        }
        (Method::PATCH, "/config") => patch_config(shared, &body).await,
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    }
}

fn authorized(req: &Request<Incoming>, shared: &Shared) -> bool {
    use base64::Engine;
    let Some(h) = req
        .headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let Some(token) = h.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(token.trim()) else {
        return false;
    };
    let api = &shared.cfg.api;
    raw == format!("{}:{}", api.username, api.password).as_bytes()
}

fn get(path: &str, query: &str, shared: &Shared, prom: Option<&PrometheusHandle>) -> Resp {
    let s = shared.status();
    let me = shared.cfg.name.as_str();
    let running = s.member.state == pgha_cluster::PgState::Running;
    let is_leader = s.leader.as_deref() == Some(me) && s.writable;
    let is_replica = running && !s.writable && s.member.role == pgha_cluster::Role::Replica;
    let body = serde_json::to_value(&s).unwrap_or(Value::Null);
    match path {
        "/liveness" => reply(StatusCode::OK, json!({"alive": true})),
        "/health" => check(running, body),
        "/readiness" => check(is_leader || (is_replica && s.leader.is_some()), body),
        "/primary" | "/master" | "/leader" => check(is_leader, body),
        "/replica" => {
            let lag_ok = match lag_limit(query) {
                Some(max) => s.member.lag_bytes.is_some_and(|l| l <= max),
                None => true,
            };
            check(is_replica && lag_ok && !s.member.tags.noloadbalance, body)
        }
        "/read-only" => check(running, body),
        "/sync" => check(is_replica && s.sync_standby, body),
        "/async" => check(is_replica && !s.sync_standby, body),
        "/status" | "/" => reply(StatusCode::OK, body),
        "/metrics" => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(
                prom.map(PrometheusHandle::render).unwrap_or_default(),
            )))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
        _ => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    }
}

/// `/cluster`, `/history`, `/config`: read from etcd now, so an answer right
/// after a change already shows it; the agent's last snapshot if etcd is down.
async fn from_etcd(path: &str, shared: &Shared) -> Resp {
    let snap = match shared.dcs.snapshot().await {
        Ok(s) => s,
        Err(e) => match shared.snapshot() {
            Some(s) => s,
            None => return error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
    };
    let body = match path {
        "/cluster" => cluster_json(&snap.view),
        "/history" => json!(snap.view.history),
        _ => json!(snap.view.config),
    };
    reply(StatusCode::OK, body)
}

/// `/status` with the WAL position read from postgres now (peers compare it
/// during failover); the cached one if postgres does not answer.
async fn status(shared: &Shared) -> Resp {
    let mut s = shared.status();
    if s.member.state == pgha_cluster::PgState::Running {
        if let Ok(Some(lsn)) = crate::postgres::current_lsn(&shared.cfg).await {
            s.lsn = Some(lsn);
        }
    }
    reply(
        StatusCode::OK,
        serde_json::to_value(&s).unwrap_or(Value::Null),
    )
}

/// `lag=<bytes>` (a plain number, or with kB/MB suffix).
fn lag_limit(query: &str) -> Option<u64> {
    let v = query.split('&').find_map(|kv| kv.strip_prefix("lag="))?;
    let v = v.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = v.strip_suffix("mb") {
        (n, 1 << 20)
    } else if let Some(n) = v.strip_suffix("kb") {
        (n, 1 << 10)
    } else {
        (v.as_str(), 1)
    };
    num.trim().parse::<u64>().ok().map(|n| n * mult)
}

/// `/cluster`: leader, members, sync and pending switchover.
pub fn cluster_json(v: &DcsView) -> Value {
    json!({
        "leader": v.leader,
        "members": v.members,
        "sync": v.sync,
        "switchover": v.switchover,
        "paused": v.config.pause,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchoverBody {
    leader: Option<String>,
    candidate: Option<String>,
}

/// Checks a switchover or failover request against the cluster.
pub fn plan_switchover(
    v: &DcsView,
    leader: Option<&str>,
    candidate: Option<&str>,
    failover: bool,
) -> Result<Switchover, String> {
    if v.switchover.is_some() {
        return Err("a switchover is already pending".into());
    }
    let current = v.leader.clone().unwrap_or_default();
    if let Some(l) = leader {
        if l != current {
            return Err(format!("{l} is not the leader (leader: {current:?})"));
        }
    }
    if !failover && current.is_empty() {
        return Err("no leader: use failover".into());
    }
    if failover && candidate.is_none() {
        return Err("failover needs a candidate".into());
    }
    if let Some(c) = candidate {
        let m = v
            .member(c)
            .ok_or_else(|| format!("candidate {c} is not a member of the cluster"))?;
        if c == current {
            return Err(format!("candidate {c} is already the leader"));
        }
        if m.tags.nofailover || m.tags.failover_priority == 0 {
            return Err(format!("candidate {c} is tagged nofailover"));
        }
        // Only a listed synchronous standby is known to hold every
        // acknowledged commit (invariant 3): it would never take over.
        if v.config.synchronous_mode && !v.sync.as_ref().is_some_and(|s| s.may_promote(c)) {
            let listed = v
                .sync
                .as_ref()
                .map(|s| s.sync_standbys.join(", "))
                .unwrap_or_default();
            return Err(format!(
                "candidate {c} is not a synchronous standby (synchronous mode; listed: [{listed}])"
            ));
        }
    }
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    Ok(Switchover {
        id: now_ms,
        leader: current.clone(),
        candidate: candidate.map(str::to_owned),
        phase: match (failover, current.is_empty()) {
            (false, _) => SwitchoverPhase::Requested,
            (true, false) => SwitchoverPhase::Demoting,
            (true, true) => SwitchoverPhase::Promoting,
        },
        requested_at_ms: now_ms,
    })
}

async fn switchover(shared: &Shared, body: &[u8], failover: bool) -> Resp {
    let req: SwitchoverBody = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
    };
    let view = match shared.dcs.snapshot().await {
        Ok(s) => s.view,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let plan = match plan_switchover(
        &view,
        req.leader.as_deref(),
        req.candidate.as_deref(),
        failover,
    ) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match shared.dcs.put_switchover(&plan).await {
        Ok(()) => reply(StatusCode::ACCEPTED, json!(plan)),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Merges a JSON object into the current config, validates, writes.
pub fn merge_config(current: &ClusterConfig, patch: &Value) -> Result<ClusterConfig, String> {
    let Value::Object(patch) = patch else {
        return Err("body must be a JSON object".into());
    };
    let mut merged = serde_json::to_value(current).map_err(|e| e.to_string())?;
    if let Value::Object(m) = &mut merged {
        for (k, v) in patch {
            m.insert(k.clone(), v.clone());
        }
    }
    let cfg: ClusterConfig = serde_json::from_value(merged).map_err(|e| e.to_string())?;
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

async fn patch_config(shared: &Shared, body: &[u8]) -> Resp {
    let patch: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid body: {e}")),
    };
    let current = match shared.dcs.snapshot().await {
        Ok(s) => s.view.config,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e),
    };
    let cfg = match merge_config(&current, &patch) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match shared.dcs.put_config(&cfg).await {
        Ok(()) => reply(StatusCode::OK, json!(cfg)),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgha_cluster::{Member, Tags};

    fn view() -> DcsView {
        let m = |n: &str, nofailover| Member {
            name: n.into(),
            tags: Tags {
                nofailover,
                failover_priority: 1,
                ..Tags::default()
            },
            ..Member::default()
        };
        DcsView {
            leader: Some("a".into()),
            members: vec![m("a", false), m("b", false), m("c", true)],
            ..DcsView::default()
        }
    }

    #[test]
    fn switchover_requests_are_checked_against_the_cluster() {
        let v = view();
        let ok = plan_switchover(&v, None, Some("b"), false).unwrap();
        assert_eq!(ok.phase, SwitchoverPhase::Requested);
        assert_eq!(ok.leader, "a");
        for (cand, want) in [
            ("zz", "not a member"),
            ("c", "nofailover"),
            ("a", "already the leader"),
        ] {
            let e = plan_switchover(&v, None, Some(cand), false).unwrap_err();
            assert!(e.contains(want), "{cand}: {e}");
        }
        let mut sync = v.clone();
        sync.config.synchronous_mode = true;
        sync.members.push(Member {
            name: "d".into(),
            ..v.members[1].clone()
        });
        sync.sync = Some(pgha_cluster::SyncState {
            leader: "a".into(),
            sync_standbys: vec!["b".into()],
        });
        assert!(plan_switchover(&sync, None, Some("b"), false).is_ok());
        let e = plan_switchover(&sync, None, Some("d"), false).unwrap_err();
        assert!(
            e.contains("not a synchronous standby") && e.contains("[b]"),
            "{e}"
        );
        let e = plan_switchover(&v, Some("b"), None, false).unwrap_err();
        assert!(e.contains("not the leader"), "{e}");
        assert!(plan_switchover(&v, None, None, true).is_err());
    }

    #[test]
    fn config_patches_are_merged_and_validated() {
        let c = ClusterConfig::default();
        let m = merge_config(&c, &json!({"pause": true, "ttl": "20s"})).unwrap();
        assert!(m.pause);
        assert_eq!(m.ttl.as_secs(), 20);
        assert!(merge_config(&c, &json!({"ttl": "3s"}))
            .unwrap_err()
            .contains("ttl"));
        assert!(merge_config(&c, &json!({"bogus": 1}))
            .unwrap_err()
            .contains("bogus"));
        assert!(merge_config(&c, &json!([1])).is_err());
    }

    #[test]
    fn replica_lag_limits_parse() {
        assert_eq!(lag_limit("lag=100"), Some(100));
        assert_eq!(lag_limit("x=1&lag=1MB"), Some(1 << 20));
        assert_eq!(lag_limit(""), None);
    }
}
