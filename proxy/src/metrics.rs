//! The proxy's Prometheus metrics, one typed struct per proxy.
//!
//! Each proxy owns its recorder (no global state, so tests can run several
//! proxies in one process); handles are registered once and incremented
//! with one atomic operation on the hot path. Connection gauges are
//! computed from the pools when `/metrics` is scraped. May call: `metrics`,
//! `metrics_exporter_prometheus`, `pool` (for the gauges).

use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::router::Route;
use crate::Shared;

/// What went wrong, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Auth,
    Protocol,
    CheckoutTimeout,
    NoServer,
    ServerLost,
    LeaderChange,
    TooManyClients,
}

const ERROR_KINDS: [(ErrorKind, &str); 7] = [
    (ErrorKind::Auth, "auth"),
    (ErrorKind::Protocol, "protocol"),
    (ErrorKind::CheckoutTimeout, "checkout_timeout"),
    (ErrorKind::NoServer, "no_server"),
    (ErrorKind::ServerLost, "server_lost"),
    (ErrorKind::LeaderChange, "leader_change"),
    (ErrorKind::TooManyClients, "too_many_clients"),
];

/// Counters for one route.
#[derive(Debug)]
pub struct RouteMetrics {
    pub transactions: Counter,
    pub queries: Counter,
    pub wait: Histogram,
}

/// Every metric of one proxy.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    rw: RouteMetrics,
    ro: RouteMetrics,
    pub routing_changes: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    errors: Vec<Counter>,
    clients: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let buckets = [
            0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
        ];
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets(&buckets) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        let (rw, ro, routing_changes, bytes_in, bytes_out, errors, clients) =
            metrics::with_local_recorder(&recorder, || {
                let route = |r: &'static str| RouteMetrics {
                    transactions: metrics::counter!("pgha_proxy_transactions_total", "route" => r),
                    queries: metrics::counter!("pgha_proxy_queries_total", "route" => r),
                    wait: metrics::histogram!("pgha_proxy_wait_seconds", "route" => r),
                };
                (
                    route("rw"),
                    route("ro"),
                    metrics::counter!("pgha_proxy_routing_changes_total"),
                    metrics::counter!("pgha_proxy_client_bytes_in_total"),
                    metrics::counter!("pgha_proxy_client_bytes_out_total"),
                    ERROR_KINDS
                        .iter()
                        .map(|(_, k)| metrics::counter!("pgha_proxy_errors_total", "kind" => *k))
                        .collect(),
                    metrics::gauge!("pgha_proxy_client_connections"),
                )
            });
        Metrics {
            recorder,
            handle,
            rw,
            ro,
            routing_changes,
            bytes_in,
            bytes_out,
            errors,
            clients,
        }
    }

    pub fn route(&self, r: Route) -> &RouteMetrics {
        match r {
            Route::ReadWrite => &self.rw,
            Route::ReadOnly => &self.ro,
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        if let Some(i) = ERROR_KINDS.iter().position(|(k, _)| *k == kind) {
            if let Some(c) = self.errors.get(i) {
                c.increment(1);
            }
        }
    }

    pub fn wait(&self, r: Route, d: Duration) {
        self.route(r).wait.record(d.as_secs_f64());
    }

    /// Drains histogram samples into their buckets; run periodically so an
    /// unscraped proxy does not accumulate samples.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text, with connection gauges computed now.
    pub fn render(&self, shared: &Shared) -> String {
        self.clients.set(shared.client_count() as f64);
        metrics::with_local_recorder(&self.recorder, || {
            for pool in shared.pools.snapshot() {
                let (idle, active) = pool.counts();
                let backend = pool.backend.id();
                let route = pool.route.label();
                metrics::gauge!(
                    "pgha_proxy_waiting_clients",
                    "backend" => backend.clone(), "route" => route
                )
                .set(pool.waiting() as f64);
                for (state, n) in [("idle", idle), ("active", active)] {
                    metrics::gauge!(
                        "pgha_proxy_server_connections",
                        "state" => state, "backend" => backend.clone(), "route" => route
                    )
                    .set(n as f64);
                }
            }
        });
        self.handle.render()
    }
}
