//! The admin HTTP endpoint (hyper 1): `/metrics` for Prometheus, `/status`
//! (routing table and pools as JSON), `/health`, and POST `/pause`,
//! `/resume` and `/reconnect[?database=NAME]`, which need
//! `Authorization: Bearer <admin_token>`.
//!
//! The request handling is a plain function of (method, path, query,
//! auth header) so it is tested without sockets. May call: `metrics`,
//! `switchover` (pause), `topology`, `pool` (snapshots, reconnect).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

#[derive(Serialize)]
struct PoolStatus {
    database: String,
    user: String,
    /// The clients' startup `options`, when they gave any.
    #[serde(skip_serializing_if = "String::is_empty")]
    options: String,
    backend: String,
    route: &'static str,
    /// Its size, minimum and mode (the top-level keys or a `[[pools]]`
    /// entry's).
    pool_size: usize,
    min_idle: usize,
    pool_mode: crate::config::PoolMode,
    idle: usize,
    active: usize,
    /// Of the active ones, those a session-mode client keeps between
    /// transactions during a pause (they run nothing until it ends).
    parked: usize,
    waiting: usize,
    /// Replaced (failover, reload, /reconnect): it is listed until its
    /// last connection, in use by a client, closes.
    retired: bool,
    /// Of those holding a pool slot, waiting for the backend to have room
    /// (`max_backend_connections`).
    waiting_for_backend: usize,
    /// Reserve slots the pool holds beyond pool_size (`reserve_pool_size`).
    reserve: usize,
}

#[derive(Serialize)]
struct Status<'a> {
    id: &'a str,
    clients: usize,
    routing: &'a crate::router::RoutingTable,
    pools: Vec<PoolStatus>,
}

fn status_json(shared: &Shared) -> String {
    let table = shared.topology.load();
    let pools = shared
        .pools
        .snapshot()
        .iter()
        .map(|p| {
            let (idle, active) = p.counts();
            let login = p.login();
            let settings = p.settings();
            PoolStatus {
                database: login.database.clone(),
                user: login.user.clone(),
                options: login.options.clone(),
                backend: p.backend.id(),
                route: p.route.label(),
                pool_size: settings.size,
                min_idle: settings.min_idle,
                pool_mode: settings.mode,
                idle,
                active,
                parked: p.parked(),
                waiting: p.waiting(),
                retired: p.is_retired(),
                waiting_for_backend: p.waiting_for_backend(),
                reserve: p.reserve_in_use(),
            }
        })
        .collect();
    let s = Status {
        id: &shared.cfg().id,
        clients: shared.client_count(),
        routing: &table,
        pools,
    };
    serde_json::to_string_pretty(&s).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Compares in constant time so the token cannot be guessed byte by byte.
fn token_ok(expected: &str, header: Option<&str>) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Answers one admin request: status code, content type, body.
pub fn respond(
    shared: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    auth: Option<&str>,
) -> (StatusCode, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match (method, path) {
        (&Method::GET, "/health") => (StatusCode::OK, TEXT, "ok\n".into()),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(shared),
        ),
        (&Method::GET, "/status") => (StatusCode::OK, "application/json", status_json(shared)),
        (&Method::POST, "/pause" | "/resume" | "/reconnect") => {
            let allowed = shared
                .cfg()
                .admin_token
                .as_deref()
                .is_some_and(|t| token_ok(t, auth));
            if !allowed {
                return (StatusCode::UNAUTHORIZED, TEXT, "unauthorized\n".into());
            }
            if path == "/reconnect" {
                let database = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                    .find(|(k, _)| k == "database")
                    .map(|(_, v)| v.into_owned());
                let n = shared.pools.reconnect(database.as_deref());
                tracing::info!(database, pools = n, "admin: reconnect");
                return (StatusCode::OK, TEXT, format!("reconnecting {n} pools\n"));
            }
            let pause = path == "/pause";
            crate::switchover::set_admin_pause(shared, pause);
            let word = if pause { "paused" } else { "resumed" };
            (StatusCode::OK, TEXT, format!("{word}\n"))
        }
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
    }
}

/// Serves the admin API on `listener` until `stop`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let mut failures = crate::accept::Failures::default();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                failures.accepted("admin");
                stream
            }
            Err(e) => {
                if let Some(pause) = failures.failed(&e, "admin", &shared.metrics) {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.cancelled() => return,
                    }
                }
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let shared = shared.clone();
                async move {
                    let auth = req
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    let (code, ctype, body) = respond(
                        &shared,
                        req.method(),
                        req.uri().path(),
                        req.uri().query(),
                        auth,
                    );
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = code;
                    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
                        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendRole, Config, StaticBackend};
    use crate::router::RoutingTable;

    fn shared(token: Option<&str>) -> Shared {
        let cfg = Config {
            admin_token: token.map(str::to_owned),
            backends: vec![StaticBackend {
                name: "pg1".into(),
                host: "127.0.0.1".into(),
                port: 5432,
                role: BackendRole::Primary,
                noloadbalance: false,
            }],
            ..Config::default()
        };
        let table = RoutingTable::from_static(&cfg.backends);
        Shared::new(Arc::new(cfg), None, table)
    }

    #[test]
    fn pause_and_resume_need_the_token() {
        let s = shared(Some("sekrit"));
        let (code, _, _) = respond(&s, &Method::POST, "/pause", None, None);
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        let (code, _, _) = respond(&s, &Method::POST, "/pause", None, Some("Bearer nope!!"));
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(!s.topology.load().paused);
        let (code, _, _) = respond(&s, &Method::POST, "/pause", None, Some("Bearer sekrit"));
        assert_eq!(code, StatusCode::OK);
        assert!(s.topology.load().paused);
        respond(&s, &Method::POST, "/resume", None, Some("Bearer sekrit"));
        assert!(!s.topology.load().paused);
        // Without a configured token nobody may pause.
        let open = shared(None);
        let (code, _, _) = respond(&open, &Method::POST, "/pause", None, Some("Bearer "));
        assert_eq!(code, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn reconnect_needs_the_token_and_says_how_many_pools() {
        let s = shared(Some("sekrit"));
        let (code, _, _) = respond(&s, &Method::POST, "/reconnect", None, None);
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        let auth = Some("Bearer sekrit");
        let (code, _, body) = respond(
            &s,
            &Method::POST,
            "/reconnect",
            Some("database=a%20b"),
            auth,
        );
        assert_eq!(
            (code, body.as_str()),
            (StatusCode::OK, "reconnecting 0 pools\n")
        );
        let (code, _, _) = respond(&s, &Method::GET, "/reconnect", None, auth);
        assert_eq!(code, StatusCode::NOT_FOUND);
    }

    #[test]
    fn status_health_and_metrics_answer() {
        let s = shared(None);
        let (code, ctype, body) = respond(&s, &Method::GET, "/status", None, None);
        assert_eq!((code, ctype), (StatusCode::OK, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["routing"]["leader"]["name"], "pg1");
        assert_eq!(
            respond(&s, &Method::GET, "/health", None, None).0,
            StatusCode::OK
        );
        s.metrics
            .route(crate::router::Route::ReadWrite)
            .transactions
            .increment(3);
        let (_, _, text) = respond(&s, &Method::GET, "/metrics", None, None);
        assert!(
            text.contains("pgha_proxy_transactions_total{route=\"rw\"} 3"),
            "{text}"
        );
        assert_eq!(
            respond(&s, &Method::GET, "/nope", None, None).0,
            StatusCode::NOT_FOUND
        );
    }
}
