//! The proxy's Prometheus metrics, one typed struct per proxy.
//!
//! Each proxy owns its recorder (no global state, so tests can run several
//! proxies in one process); handles are registered once and incremented
//! with one atomic operation on the hot path. Connection gauges are
//! computed from the pools when `/metrics` is scraped. May call: `metrics`,
//! `metrics_exporter_prometheus`, `pool` (for the gauges).

use std::time::Duration;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
    /// A client idle past client_idle_timeout or idle_transaction_timeout.
    IdleTimeout,
    /// A listener could not accept: out of file descriptors or memory.
    Accept,
}

const ERROR_KINDS: [(ErrorKind, &str); 9] = [
    (ErrorKind::Auth, "auth"),
    (ErrorKind::Protocol, "protocol"),
    (ErrorKind::CheckoutTimeout, "checkout_timeout"),
    (ErrorKind::NoServer, "no_server"),
    (ErrorKind::ServerLost, "server_lost"),
    (ErrorKind::LeaderChange, "leader_change"),
    (ErrorKind::TooManyClients, "too_many_clients"),
    (ErrorKind::IdleTimeout, "idle_timeout"),
    (ErrorKind::Accept, "accept"),
];

/// A counter the hot path bumps with one relaxed add, rendered by
/// [`Metrics::render`] itself: the `metrics` crate's handles cost a dynamic
/// call and a second atomic (a generation) per increment, and these are
/// bumped several times per transaction.
#[derive(Debug, Default)]
pub struct HotCounter(AtomicU64);

impl HotCounter {
    #[inline]
    pub fn increment(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Appends one counter family in Prometheus text format: `(labels, counter)`
/// per series, labels already formatted (`route="rw"`, or empty).
fn render_counter(out: &mut String, name: &str, help: &str, series: &[(&str, &HotCounter)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
    for (labels, c) in series {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {}", c.get());
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {}", c.get());
        }
    }
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

/// Server connections by state and waiting clients, per database, user,
/// backend and route (pools that differ only in startup options summed),
/// computed at each scrape from the pools there are: a pool that is gone
/// (its backend left its role, a reload replaced it) leaves no series.
fn render_pools(out: &mut String, shared: &Shared) {
    type Labels = (String, String, String, &'static str);
    let mut pools: BTreeMap<Labels, [usize; 3]> = BTreeMap::new();
    for pool in shared.pools.snapshot() {
        let (idle, active) = pool.counts();
        let login = pool.login();
        let key = (
            login.database.clone(),
            login.user.clone(),
            pool.backend.id(),
            pool.route.label(),
        );
        let n = pools.entry(key).or_default();
        n[0] += idle;
        n[1] += active;
        n[2] += pool.waiting();
    }
    let families = [
        (
            "pgha_proxy_server_connections",
            "Server connections by state (idle, active), per database, user, backend and route.",
            &[("idle", 0), ("active", 1)][..],
        ),
        (
            "pgha_proxy_waiting_clients",
            "Clients waiting for a server connection, per database, user, backend and route.",
            &[("", 2)][..],
        ),
    ];
    for (name, help, series) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for ((database, user, backend, route), n) in &pools {
            for (state, i) in series {
                let state = if state.is_empty() {
                    String::new()
                } else {
                    format!("state=\"{state}\",")
                };
                let _ = writeln!(
                    out,
                    "{name}{{{state}database=\"{}\",user=\"{}\",backend=\"{}\",route=\"{route}\"}} {}",
                    label(database),
                    label(user),
                    label(backend),
                    n[*i]
                );
            }
        }
    }
}

/// Counters for one route.
#[derive(Debug, Default)]
pub struct RouteMetrics {
    pub transactions: HotCounter,
    pub queries: HotCounter,
    pub wait: WaitHistogram,
}

impl RouteMetrics {
    /// A ReadyForQuery reached the client: one query done, and a
    /// transaction when the server is idle again.
    pub fn ready(&self, status: u8) {
        self.queries.increment(1);
        if status == b'I' {
            self.transactions.increment(1);
        }
    }
}

/// Upper bounds of the wait-time buckets, seconds.
const WAIT_BUCKETS: [f64; 11] = [
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0,
];

/// The time clients wait for a server connection, as a Prometheus
/// histogram with fixed buckets on relaxed atomics: a sample costs three
/// adds on the hot path, and nothing grows between scrapes (the `metrics`
/// crate's histograms buffer every sample until the next scrape).
#[derive(Debug, Default)]
pub struct WaitHistogram {
    /// Samples per bucket (not cumulative); past the last bound: none.
    buckets: [AtomicU64; WAIT_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl WaitHistogram {
    pub fn record(&self, d: Duration) {
        if d.is_zero() {
            // A connection handed out at once: the common case.
            self.buckets[0].fetch_add(1, Ordering::Relaxed);
            self.count.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let secs = d.as_secs_f64();
        if let Some(i) = WAIT_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Appends the histogram in Prometheus text format.
    fn render(&self, name: &str, route: &str, out: &mut String) {
        let mut cumulative = 0;
        for (bound, n) in WAIT_BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(
            out,
            "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "{name}_sum{{route=\"{route}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{route=\"{route}\"}} {count}");
    }
}

/// Every metric of one proxy.
pub struct Metrics {
    /// Renders what the `metrics` handles below count (the recorder that
    /// made them is not needed after that).
    handle: PrometheusHandle,
    rw: RouteMetrics,
    ro: RouteMetrics,
    pub routing_changes: Counter,
    pub bytes_in: HotCounter,
    pub bytes_out: HotCounter,
    /// Hidden SETs sent to give a server a client's session settings.
    pub settings_synced: Counter,
    /// Transaction-mode clients that kept their server for good (see
    /// `session::relay::pins`).
    pub pinned: Counter,
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
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let (settings_synced, pinned) = metrics::with_local_recorder(&recorder, || {
            (
                metrics::counter!("pgha_proxy_session_settings_synced_total"),
                metrics::counter!("pgha_proxy_clients_pinned_total"),
            )
        });
        let (routing_changes, errors, clients) = metrics::with_local_recorder(&recorder, || {
            (
                metrics::counter!("pgha_proxy_routing_changes_total"),
                ERROR_KINDS
                    .iter()
                    .map(|(_, k)| metrics::counter!("pgha_proxy_errors_total", "kind" => *k))
                    .collect(),
                metrics::gauge!("pgha_proxy_client_connections"),
            )
        });
        Metrics {
            handle,
            rw: RouteMetrics::default(),
            ro: RouteMetrics::default(),
            routing_changes,
            bytes_in: HotCounter::default(),
            bytes_out: HotCounter::default(),
            settings_synced,
            pinned,
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
        self.route(r).wait.record(d);
    }

    /// Drains histogram samples into their buckets; run periodically so an
    /// unscraped proxy does not accumulate samples.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// The Prometheus text, with connection gauges computed now.
    pub fn render(&self, shared: &Shared) -> String {
        self.clients.set(shared.client_count() as f64);
        let mut out = self.handle.render();
        render_pools(&mut out, shared);
        let routes = |f: fn(&RouteMetrics) -> &HotCounter| {
            [("route=\"rw\"", f(&self.rw)), ("route=\"ro\"", f(&self.ro))]
        };
        render_counter(
            &mut out,
            "pgha_proxy_transactions_total",
            "Transactions completed (ReadyForQuery idle), by route.",
            &routes(|m| &m.transactions),
        );
        render_counter(
            &mut out,
            "pgha_proxy_queries_total",
            "Requests completed (ReadyForQuery), by route.",
            &routes(|m| &m.queries),
        );
        render_counter(
            &mut out,
            "pgha_proxy_client_bytes_in_total",
            "Bytes read from clients.",
            &[("", &self.bytes_in)],
        );
        render_counter(
            &mut out,
            "pgha_proxy_client_bytes_out_total",
            "Bytes written to clients.",
            &[("", &self.bytes_out)],
        );
        let name = "pgha_proxy_wait_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time clients waited for a server connection."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (route, m) in [("rw", &self.rw), ("ro", &self.ro)] {
            m.wait.render(name, route, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("app"), "app");
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("a\nb"), "a\\nb");
    }

    #[test]
    fn hot_counters_render_as_prometheus_counters() {
        let m = Metrics::new();
        m.route(Route::ReadOnly).queries.increment(5);
        m.route(Route::ReadOnly).transactions.increment(2);
        m.bytes_in.increment(100);
        m.bytes_out.increment(7);
        let mut out = String::new();
        let routes = [
            ("route=\"rw\"", &m.rw.queries),
            ("route=\"ro\"", &m.ro.queries),
        ];
        render_counter(&mut out, "q_total", "Queries.", &routes);
        render_counter(&mut out, "b_total", "Bytes.", &[("", &m.bytes_in)]);
        let expected = "# HELP q_total Queries.\n# TYPE q_total counter\n\
                        q_total{route=\"rw\"} 0\nq_total{route=\"ro\"} 5\n\
                        # HELP b_total Bytes.\n# TYPE b_total counter\nb_total 100\n";
        assert_eq!(out, expected);
        assert_eq!(m.ro.transactions.get(), 2);
        assert_eq!(m.bytes_out.get(), 7);
    }

    #[test]
    fn wait_histogram_renders_cumulative_buckets_sum_and_count() {
        let h = WaitHistogram::default();
        h.record(Duration::ZERO);
        h.record(Duration::from_micros(300));
        h.record(Duration::from_millis(2));
        h.record(Duration::from_secs(60));
        let mut out = String::new();
        h.render("w", "rw", &mut out);
        let line = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} missing in {out}"))
                .rsplit(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        assert_eq!(line("w_bucket{route=\"rw\",le=\"0.0001\"}"), "1");
        assert_eq!(line("w_bucket{route=\"rw\",le=\"0.0005\"}"), "2");
        assert_eq!(line("w_bucket{route=\"rw\",le=\"0.005\"}"), "3");
        assert_eq!(line("w_bucket{route=\"rw\",le=\"10\"}"), "3");
        assert_eq!(line("w_bucket{route=\"rw\",le=\"+Inf\"}"), "4");
        assert_eq!(line("w_count{route=\"rw\"}"), "4");
        assert_eq!(line("w_sum{route=\"rw\"}"), "60.0023");
    }
}
