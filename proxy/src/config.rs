//! The proxy's configuration file (TOML), typed and validated at start.
//!
//! Every field has a documented default; unknown keys are rejected so a typo
//! is not silently ignored, and [`Config::validate`] names the key and the
//! reason for anything unusable. Passed around as `Arc<Config>`. May call:
//! `serde`, `toml`, the filesystem (to read the file).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use pools::{PoolRule, PoolSettings};

/// The configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    /// A key of one entry of an array of tables (`[[pools]]`), counted
    /// from 1 in file order.
    #[error("config key `{key}` of [[{table}]] entry {entry}: {reason}")]
    InvalidEntry {
        table: &'static str,
        entry: usize,
        key: &'static str,
        reason: String,
    },
}

/// Keys a reload (SIGHUP) cannot apply: the listeners, threads, pool mode,
/// identity and where the topology comes from. A change is logged and
/// waits for a restart.
pub const RESTART_KEYS: [&str; 9] = [
    "id",
    "listen_rw",
    "listen_ro",
    "unix_socket_dir",
    "handover_socket",
    "listen_admin",
    "workers",
    "pool_mode",
    "etcd",
];

/// Keys that shape server connections: a reload that changes one replaces
/// the pools (idle connections close now, busy ones when released).
pub const POOL_KEYS: [&str; 12] = [
    "max_backend_connections",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "server_tls_mode",
    "server_tls_ca_file",
    "pool_size",
    "min_idle",
    "pools",
    "server_idle_timeout",
    "server_lifetime",
    "server_connect_timeout",
    "prepared_cache_size",
];

/// How long a client keeps a server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// For one transaction; the client may run its next one elsewhere.
    Transaction,
    /// For the whole client connection; reset with `DISCARD ALL` afterwards.
    Session,
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// `scram-sha-256`, as PostgreSQL spells it.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    Md5,
    /// Anyone named in the users file (or anyone, without one) is let in.
    Trust,
}

/// TLS towards the PostgreSQL servers, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, else plain.
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS with a certificate signed by `server_tls_ca_file` for the
    /// backend's host name or address.
    VerifyFull,
}

/// Whether TCP clients must use TLS, as PostgreSQL's `hostssl` lines and
/// PgBouncer's `client_tls_sslmode = require`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTlsMode {
    /// TLS when the client asks and a certificate is set; plain otherwise.
    Allow,
    /// A TCP client that logs in without TLS is refused (28000). Unix
    /// sockets are local and exempt, as PostgreSQL's `local` lines; cancel
    /// requests too (libpq sends them without TLS).
    Require,
}

/// Role of a static backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendRole {
    Primary,
    Replica,
}

/// A backend named in the config (static mode, no etcd).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StaticBackend {
    pub name: String,
    /// Default `127.0.0.1`.
    #[serde(default = "default_host")]
    pub host: String,
    pub port: u16,
    pub role: BackendRole,
    /// Exclude from read-only balancing. Default false.
    #[serde(default)]
    pub noloadbalance: bool,
}

fn default_host() -> String {
    "127.0.0.1".into()
}

/// Where the routing table comes from in etcd mode.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `["http://127.0.0.1:2379"]`.
    pub endpoints: Vec<String>,
    /// Cluster name: keys live under `/pgha/<cluster>/`.
    pub cluster: String,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This proxy's id (acknowledgements in `proxies/<id>`). Default `proxy`.
    pub id: String,
    /// Read-write listener. Default `127.0.0.1:6432`; port 0 picks a free one.
    pub listen_rw: SocketAddr,
    /// Read-only listener. Default `127.0.0.1:6433`.
    pub listen_ro: SocketAddr,
    /// Also listen on Unix-domain sockets in this directory, named as
    /// PostgreSQL names its own: `.s.PGSQL.<port>` for the read-write and
    /// the read-only port (libpq: `host=<dir> port=6432`). Default none.
    pub unix_socket_dir: Option<PathBuf>,
    /// Rolling restart: a proxy started while another runs with the same
    /// path takes its listening sockets (see `handover`), and the other
    /// drains and exits. Default none.
    pub handover_socket: Option<PathBuf>,
    /// Admin HTTP (/metrics, /status, /health, POST /pause /resume).
    /// Default `127.0.0.1:9930`.
    pub listen_admin: SocketAddr,
    /// Bearer token required by POST /pause and /resume; without one they
    /// are refused. Default none.
    pub admin_token: Option<String>,
    /// On SIGTERM, in-flight transactions get this long to finish. Default 10s.
    #[serde(with = "humantime_serde")]
    pub shutdown_drain_timeout: Duration,
    /// Threads serving clients (the `pgha-proxy` binary only). 1 runs one
    /// event loop, like PgBouncer: the least CPU per transaction; more
    /// threads add throughput on many cores at some CPU cost. Default 1.
    pub workers: usize,
    /// Pool mode. Default `transaction`.
    pub pool_mode: PoolMode,
    /// Server connections per (database, user, backend). Default 20.
    pub pool_size: usize,
    /// Server connections kept open per pool once it is used (idle or in
    /// use, like PgBouncer's min_pool_size), made ahead of demand. Default 0.
    pub min_idle: usize,
    /// `pool_size`, `min_idle` and `pool_mode` for the pools of some
    /// databases or users (see [`PoolRule`]). Default none.
    pub pools: Vec<PoolRule>,
    /// Server connections a pool may open beyond its size for clients
    /// that waited `reserve_pool_timeout` (PgBouncer's reserve_pool_size):
    /// a burst gets served instead of queueing to checkout_timeout. The
    /// extra capacity goes once nobody waits and connections close (idle
    /// timeout, lifetime). Default 0.
    pub reserve_pool_size: usize,
    /// How long a client waits for a server before its pool opens a
    /// reserve connection. Default 5s.
    #[serde(with = "humantime_serde")]
    pub reserve_pool_timeout: Duration,
    /// Client connections accepted at once; more are refused with SQLSTATE
    /// 53300. Default 10000.
    pub max_client_conn: usize,
    /// Server connections to one backend, all its pools (databases, users,
    /// routes) together; keep it under the node's max_connections. A pool
    /// that needs one more closes another pool's idle connection, or
    /// waits (within checkout_timeout). 0: no bound. Default 0.
    pub max_backend_connections: usize,
    /// Idle server connections older than this are closed. Default 60s.
    #[serde(with = "humantime_serde")]
    pub server_idle_timeout: Duration,
    /// Server connections are closed at their next release after this. Default 1h.
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// Connecting and authenticating to a server may take this long. Default 5s.
    #[serde(with = "humantime_serde")]
    pub server_connect_timeout: Duration,
    /// A client waits this long for a pooled server, then gets an error. Default 10s.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// With no leader, a read-write transaction waits this long. Default 5s.
    #[serde(with = "humantime_serde")]
    pub leader_wait_timeout: Duration,
    /// A client must finish startup and authentication within this. Default 10s.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// A client idle between transactions longer than this is closed
    /// (FATAL 57P05, as PostgreSQL's idle_session_timeout). 0s: never.
    /// Default 0s.
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// A client idle inside a transaction longer than this is closed
    /// (FATAL 25P03, as PostgreSQL's idle_in_transaction_session_timeout)
    /// and its server connection with it, which rolls the transaction
    /// back and frees the server for others. 0s: never. Default 0s.
    #[serde(with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    /// Largest message accepted from a client, bytes. Default 64 MiB.
    pub max_message_size: usize,
    /// Replicas further behind than this many bytes get no reads. Default 1 MiB.
    pub max_replica_lag: u64,
    /// Send reads to the leader when no replica qualifies. Default true.
    pub ro_fallback_to_leader: bool,
    /// In a planned switchover, in-flight transactions get this long to
    /// finish before the proxy acknowledges. Default 3s.
    #[serde(with = "humantime_serde")]
    pub switchover_drain_timeout: Duration,
    /// Prepared statements kept per server connection (transaction mode). Default 256.
    pub prepared_cache_size: usize,
    /// TCP keepalive on client and server sockets, so a peer that vanished
    /// without closing (power-off, partition) is noticed: a vanished
    /// client's server connection goes back to the pool, a vanished
    /// server's client gets an error. Default true.
    pub tcp_keepalive: bool,
    /// A connection quiet this long gets its first keepalive probe. Whole
    /// seconds, at least 1s (the kernel counts in seconds). Default 30s.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive_idle: Duration,
    /// Between unanswered keepalive probes. Whole seconds, at least 1s.
    /// Default 10s.
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive_interval: Duration,
    /// Unanswered probes after which the connection is dropped: a dead
    /// quiet peer is noticed after idle + interval x count (default
    /// 30s + 3 x 10s = 1 minute). Default 3.
    pub tcp_keepalive_count: u32,
    /// TCP_USER_TIMEOUT (whole milliseconds): a connection whose sent data
    /// stays unacknowledged this long is dropped, so a request sent to a
    /// server that vanished fails after this instead of ~15 minutes of
    /// retransmissions (keepalive does not probe while data is in flight).
    /// With keepalive on it replaces tcp_keepalive_count: a quiet
    /// connection is dropped once it was silent this long with a probe
    /// unanswered, so keep it above idle + interval x count. Off by default
    /// (`0s`, the kernel's default) because it also drops a live peer
    /// whose receive window stays closed that long, e.g. a client that
    /// does not read a large result; set it well above the longest such
    /// pause you accept. Default 0s.
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// Client authentication. Default `scram-sha-256`.
    pub auth_method: AuthMethod,
    /// PgBouncer-style users file: lines of `"user" "password"`. The
    /// plaintext password is also used to log in to the servers.
    pub users_file: Option<PathBuf>,
    /// Looks up users missing from the users file on the leader; `$1` is
    /// the user name, the last column the `pg_shadow.passwd` value. Only
    /// SCRAM verifiers work (the proxy then logs in to servers with the
    /// key recovered from the client's own SCRAM proof). Default none;
    /// PgBouncer's is `SELECT usename, passwd FROM pg_shadow WHERE usename = $1`.
    pub auth_query: Option<String>,
    /// The user auth_query runs as (its password from the users file, or
    /// trust). Default `postgres`.
    pub auth_user: String,
    /// The database auth_query runs in. Default `postgres`.
    pub auth_database: String,
    /// PEM certificate chain for TLS to clients; with `tls_key_file`
    /// enables SSLRequest. Default none (clients get `N`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// `allow` or `require` (TCP clients must use TLS; needs a
    /// certificate). Default `allow`.
    pub client_tls_mode: ClientTlsMode,
    /// TLS to the servers: `disable`, `prefer`, `require`, `verify-full`.
    /// Default `disable`.
    pub server_tls_mode: ServerTlsMode,
    /// PEM CA certificates that sign the servers' certificates; required
    /// by `verify-full`. Default none.
    pub server_tls_ca_file: Option<PathBuf>,
    /// Static backends (no etcd).
    pub backends: Vec<StaticBackend>,
    /// etcd topology; mutually exclusive with `backends`.
    pub etcd: Option<EtcdConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: "proxy".into(),
            listen_rw: SocketAddr::from(([127, 0, 0, 1], 6432)),
            listen_ro: SocketAddr::from(([127, 0, 0, 1], 6433)),
            unix_socket_dir: None,
            handover_socket: None,
            listen_admin: SocketAddr::from(([127, 0, 0, 1], 9930)),
            admin_token: None,
            shutdown_drain_timeout: Duration::from_secs(10),
            workers: 1,
            pool_mode: PoolMode::Transaction,
            pool_size: 20,
            min_idle: 0,
            pools: Vec::new(),
            reserve_pool_size: 0,
            reserve_pool_timeout: Duration::from_secs(5),
            max_client_conn: 10_000,
            server_idle_timeout: Duration::from_secs(60),
            server_lifetime: Duration::from_secs(3600),
            server_connect_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(10),
            leader_wait_timeout: Duration::from_secs(5),
            startup_timeout: Duration::from_secs(10),
            max_backend_connections: 0,
            client_idle_timeout: Duration::ZERO,
            idle_transaction_timeout: Duration::ZERO,
            max_message_size: 64 << 20,
            max_replica_lag: 1 << 20,
            ro_fallback_to_leader: true,
            switchover_drain_timeout: Duration::from_secs(3),
            prepared_cache_size: 256,
            tcp_keepalive: true,
            tcp_keepalive_idle: Duration::from_secs(30),
            tcp_keepalive_interval: Duration::from_secs(10),
            tcp_keepalive_count: 3,
            tcp_user_timeout: Duration::ZERO,
            auth_method: AuthMethod::ScramSha256,
            users_file: None,
            auth_query: None,
            auth_user: "postgres".into(),
            auth_database: "postgres".into(),
            tls_cert_file: None,
            tls_key_file: None,
            client_tls_mode: ClientTlsMode::Allow,
            server_tls_mode: ServerTlsMode::Disable,
            server_tls_ca_file: None,
            backends: Vec::new(),
            etcd: None,
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file; relative paths inside it
    /// are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut c = Config::parse(&text)?;
        if let Some(dir) = path.parent() {
            for f in [
                &mut c.users_file,
                &mut c.tls_cert_file,
                &mut c.tls_key_file,
                &mut c.server_tls_ca_file,
                &mut c.unix_socket_dir,
                &mut c.handover_socket,
            ]
            .into_iter()
            .flatten()
            {
                if f.is_relative() {
                    *f = dir.join(&*f);
                }
            }
        }
        Ok(c)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Top-level keys whose values differ from `other`'s.
    pub fn changed_keys(&self, other: &Config) -> Vec<String> {
        let table = |c: &Config| toml::Table::try_from(c).unwrap_or_default();
        let (a, b) = (table(self), table(other));
        let mut keys: Vec<String> = a
            .keys()
            .chain(b.keys())
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// Puts back `old`'s values of the [`RESTART_KEYS`].
    pub fn keep_restart_keys(&mut self, old: &Config) {
        self.id.clone_from(&old.id);
        self.listen_rw = old.listen_rw;
        self.listen_ro = old.listen_ro;
        self.unix_socket_dir.clone_from(&old.unix_socket_dir);
        self.handover_socket.clone_from(&old.handover_socket);
        self.listen_admin = old.listen_admin;
        self.workers = old.workers;
        self.pool_mode = old.pool_mode;
        self.etcd.clone_from(&old.etcd);
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.pool_size == 0 {
            return err("pool_size", "must be at least 1");
        }
        if self.min_idle > self.pool_size {
            return err("min_idle", "cannot exceed pool_size");
        }
        if self.max_client_conn == 0 {
            return err("max_client_conn", "must be at least 1");
        }
        if self.max_message_size < 1024 {
            return err("max_message_size", "must be at least 1024 bytes");
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return err(
                "tls_cert_file",
                "tls_cert_file and tls_key_file go together",
            );
        }
        if self.client_tls_mode == ClientTlsMode::Require && self.tls_cert_file.is_none() {
            return err(
                "client_tls_mode",
                "\"require\" needs a certificate: set tls_cert_file and tls_key_file",
            );
        }
        if self.server_tls_mode == ServerTlsMode::VerifyFull && self.server_tls_ca_file.is_none() {
            return err(
                "server_tls_ca_file",
                "is required by server_tls_mode = \"verify-full\"",
            );
        }
        for (key, d) in [
            ("client_idle_timeout", self.client_idle_timeout),
            ("idle_transaction_timeout", self.idle_transaction_timeout),
        ] {
            let tick = crate::bell::SWEEP_TICK;
            if !d.is_zero() && d < tick {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "must be 0s (off) or at least {tick:?} (idle clients are checked every {tick:?})"
                    ),
                });
            }
        }
        if let Some(dir) = &self.unix_socket_dir {
            let (rw, ro) = (self.listen_rw.port(), self.listen_ro.port());
            if rw == ro && rw != 0 {
                return err(
                    "unix_socket_dir",
                    "needs listen_rw and listen_ro on different ports: the socket files are named after them",
                );
            }
            // sun_path holds 107 bytes and a NUL.
            let longest = dir.join(".s.PGSQL.65535");
            if longest.as_os_str().len() > 107 {
                return err(
                    "unix_socket_dir",
                    "is too long: a socket path in it would pass the 107 bytes Unix allows",
                );
            }
        }
        if let Some(path) = &self.handover_socket {
            // sun_path holds 107 bytes and a NUL.
            if path.as_os_str().len() > 107 {
                return err(
                    "handover_socket",
                    "is too long: a socket path may have 107 bytes at most",
                );
            }
        }
        self.validate_tcp()?;
        self.validate_pools()?;
        if pgha_cluster::validate_name(&self.id).is_err() {
            return err("id", "may only contain letters, digits, '-', '_' and '.'");
        }
        match (&self.etcd, self.backends.is_empty()) {
            (Some(_), false) => err("backends", "cannot be combined with [etcd]"),
            (None, true) => err("backends", "name at least one backend, or configure [etcd]"),
            (Some(e), true) if e.endpoints.is_empty() => err("etcd.endpoints", "is empty"),
            (Some(e), true) if pgha_cluster::validate_name(&e.cluster).is_err() => {
                err("etcd.cluster", "is not a valid cluster name")
            }
            _ => Ok(()),
        }
    }

    /// The `tcp_*` keys: what the kernel accepts (Linux's limits), so a
    /// socket option never fails on a value the file allowed.
    fn validate_tcp(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.tcp_keepalive {
            for (key, d) in [
                ("tcp_keepalive_idle", self.tcp_keepalive_idle),
                ("tcp_keepalive_interval", self.tcp_keepalive_interval),
            ] {
                if d < Duration::from_secs(1) {
                    return invalid(key, "must be at least 1s when tcp_keepalive is on".into());
                }
                if d.subsec_nanos() != 0 {
                    return invalid(
                        key,
                        "must be whole seconds (the kernel counts keepalive in seconds)".into(),
                    );
                }
                if d > Duration::from_secs(MAX_KEEPALIVE_SECS) {
                    return invalid(key, format!("must be at most {MAX_KEEPALIVE_SECS}s"));
                }
            }
            if !(1..=MAX_KEEPALIVE_COUNT).contains(&self.tcp_keepalive_count) {
                return invalid(
                    "tcp_keepalive_count",
                    format!("must be between 1 and {MAX_KEEPALIVE_COUNT}"),
                );
            }
        }
        let t = self.tcp_user_timeout;
        if !t.subsec_nanos().is_multiple_of(1_000_000) {
            return invalid("tcp_user_timeout", "must be whole milliseconds".into());
        }
        if t.as_millis() > i32::MAX as u128 {
            return invalid(
                "tcp_user_timeout",
                format!("must be at most {}ms", i32::MAX),
            );
        }
        Ok(())
    }
}

/// Linux's limits for TCP_KEEPIDLE / TCP_KEEPINTVL and TCP_KEEPCNT.
const MAX_KEEPALIVE_SECS: u64 = 32_767;
const MAX_KEEPALIVE_COUNT: u32 = 127;

mod pools;
#[cfg(test)]
mod tests;
