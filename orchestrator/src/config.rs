//! `config`: the agent's own settings, read once at start from one TOML file
//! plus `PGHA_*` environment overrides.
//!
//! Cluster-wide dynamic settings (ttl, loop_wait, synchronous mode...) are not
//! here: they live in etcd as [`pgha_cluster::ClusterConfig`]; the `[bootstrap]`
//! table only seeds them when this agent initializes a new cluster. This module
//! does no I/O besides reading the file and the environment it is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use pgha_cluster::{validate_name, ClusterConfig, Tags};
use serde::{Deserialize, Serialize};

/// The configuration cannot be used; names the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path:?}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// A login role the agent creates at bootstrap and uses afterwards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    /// Required; stored by postgres as a SCRAM-SHA-256 verifier.
    #[serde(default)]
    pub password: String,
}

/// The application's own user and database, created at bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppCredentials {
    pub username: String,
    #[serde(default)]
    pub password: String,
    /// Default `app`.
    #[serde(default = "default_app_db")]
    pub database: String,
}

fn default_app_db() -> String {
    "app".into()
}

/// Roles and passwords.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// Default user `postgres`.
    pub superuser: Credentials,
    /// Streaming replication and pg_basebackup. Default user `replicator`.
    pub replication: Credentials,
    /// pg_rewind's source connection; only the grants it needs. Default `rewind_user`.
    pub rewind: Credentials,
    /// Default user `app`, database `app`.
    pub app: AppCredentials,
}

impl Default for Auth {
    fn default() -> Self {
        let c = |u: &str| Credentials {
            username: u.into(),
            password: String::new(),
        };
        Auth {
            superuser: c("postgres"),
            replication: c("replicator"),
            rewind: c("rewind_user"),
            app: AppCredentials {
                username: "app".into(),
                password: String::new(),
                database: default_app_db(),
            },
        }
    }
}

/// The local postgres server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Data directory. Default `/var/lib/pgha/data`.
    pub data_dir: PathBuf,
    /// Server binaries. Default `/usr/lib/postgresql/15/bin`.
    pub bin_dir: PathBuf,
    /// Address postgres listens on. Default `127.0.0.1:5432`.
    pub listen: SocketAddr,
    /// host:port other members and clients use. Default: `listen`.
    pub advertise: Option<String>,
    /// A former primary whose pg_rewind fails is wiped and cloned afresh
    /// from the leader. Default true; false leaves it stopped for an operator.
    pub clone_on_rewind_failure: bool,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            data_dir: "/var/lib/pgha/data".into(),
            bin_dir: "/usr/lib/postgresql/15/bin".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 5432)),
            advertise: None,
            clone_on_rewind_failure: true,
        }
    }
}

/// The agent's REST API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Default `127.0.0.1:8008`.
    pub listen: SocketAddr,
    /// Base URL peers and the CLI use. Default `http://<listen>`.
    pub advertise: Option<String>,
    /// Basic-auth user for POST/PATCH calls. Default `pgha`.
    pub username: String,
    /// Required: mutating calls are refused without it.
    pub password: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            advertise: None,
            username: "pgha".into(),
            password: String::new(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// Its name in the config and on a command line.
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }

    pub fn parse(name: &str) -> Option<LogFormat> {
        [LogFormat::Text, LogFormat::Json]
            .into_iter()
            .find(|f| f.name() == name)
    }
}

/// Everything one agent needs to know about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// This member's name (a key segment). Required.
    pub name: String,
    /// Cluster name. Default `main`.
    pub cluster: String,
    /// etcd client URLs; several give resilience to member loss.
    /// Default `["http://127.0.0.1:2379"]`.
    pub etcd_endpoints: Vec<String>,
    pub log_format: LogFormat,
    pub postgres: PostgresConfig,
    pub api: ApiConfig,
    pub auth: Auth,
    /// nofailover, noloadbalance, nosync, failover_priority (default 1).
    pub tags: Tags,
    /// Dynamic settings written to etcd if this agent initializes the cluster.
    pub bootstrap: ClusterConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            name: String::new(),
            cluster: "main".into(),
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            log_format: LogFormat::Text,
            postgres: PostgresConfig::default(),
            api: ApiConfig::default(),
            auth: Auth::default(),
            tags: Tags {
                failover_priority: 1,
                ..Tags::default()
            },
            bootstrap: ClusterConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Reads `path`, applies the process environment, validates.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg = Self::parse(path, &text)?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no environment, no validation).
    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Applies `PGHA_*` overrides read through `env`.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let s = |k: &str| env(k);
        if let Some(v) = s("PGHA_NAME") {
            self.name = v;
        }
        if let Some(v) = s("PGHA_CLUSTER") {
            self.cluster = v;
        }
        if let Some(v) = s("PGHA_ETCD_ENDPOINTS") {
            self.etcd_endpoints = v.split(',').map(|e| e.trim().to_owned()).collect();
        }
        if let Some(v) = s("PGHA_DATA_DIR") {
            self.postgres.data_dir = v.into();
        }
        if let Some(v) = s("PGHA_BIN_DIR") {
            self.postgres.bin_dir = v.into();
        }
        if let Some(v) = s("PGHA_PG_LISTEN") {
            self.postgres.listen = parse_addr("postgres.listen", &v)?;
        }
        if let Some(v) = s("PGHA_PG_ADVERTISE") {
            self.postgres.advertise = Some(v);
        }
        if let Some(v) = s("PGHA_API_LISTEN") {
            self.api.listen = parse_addr("api.listen", &v)?;
        }
        if let Some(v) = s("PGHA_API_ADVERTISE") {
            self.api.advertise = Some(v);
        }
        for (k, slot) in [
            ("PGHA_API_PASSWORD", &mut self.api.password),
            ("PGHA_SUPERUSER_PASSWORD", &mut self.auth.superuser.password),
            (
                "PGHA_REPLICATION_PASSWORD",
                &mut self.auth.replication.password,
            ),
            ("PGHA_REWIND_PASSWORD", &mut self.auth.rewind.password),
            ("PGHA_APP_PASSWORD", &mut self.auth.app.password),
        ] {
            if let Some(v) = s(k) {
                *slot = v;
            }
        }
        if let Some(v) = s("PGHA_LOG_FORMAT") {
            self.log_format = LogFormat::parse(&v)
                .ok_or_else(|| invalid("log_format", format!("{v:?} is not text or json")))?;
        }
        if let Some(v) = s("PGHA_NOFAILOVER") {
            self.tags.nofailover = parse_bool("tags.nofailover", &v)?;
        }
        if let Some(v) = s("PGHA_FAILOVER_PRIORITY") {
            self.tags.failover_priority = v
                .parse()
                .map_err(|_| invalid("tags.failover_priority", format!("{v:?} is not a number")))?;
        }
        Ok(())
    }

    /// Rejects settings the agent cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name).map_err(|e| invalid("name", e.to_string()))?;
        validate_name(&self.cluster).map_err(|e| invalid("cluster", e.to_string()))?;
        self.bootstrap
            .validate()
            .map_err(|e| ConfigError::Invalid {
                key: format!("bootstrap.{}", e.key),
                reason: e.reason,
            })?;
        if self.etcd_endpoints.is_empty() || self.etcd_endpoints.iter().any(|e| e.is_empty()) {
            return Err(invalid(
                "etcd_endpoints",
                "needs at least one non-empty URL",
            ));
        }
        if !self.postgres.data_dir.is_absolute() {
            return Err(invalid("postgres.data_dir", "must be an absolute path"));
        }
        for (key, c) in [
            ("auth.superuser", &self.auth.superuser),
            ("auth.replication", &self.auth.replication),
            ("auth.rewind", &self.auth.rewind),
        ] {
            check_credentials(key, &c.username, &c.password)?;
        }
        let app = &self.auth.app;
        check_credentials("auth.app", &app.username, &app.password)?;
        check_identifier("auth.app.database", &app.database)?;
        if self.api.password.is_empty() {
            return Err(invalid(
                "api.password",
                "must be set (mutating REST calls need it)",
            ));
        }
        Ok(())
    }

    /// host:port that replicas and clients use to reach this postgres.
    pub fn pg_advertise(&self) -> (String, u16) {
        if let Some(a) = &self.postgres.advertise {
            if let Some((h, p)) = a.rsplit_once(':') {
                if let Ok(p) = p.parse() {
                    return (h.to_owned(), p);
                }
            }
        }
        let l = self.postgres.listen;
        (l.ip().to_string(), l.port())
    }

    /// Base URL of this agent's REST API.
    pub fn api_url(&self) -> String {
        self.api
            .advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.api.listen))
    }
}

fn parse_addr(key: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| invalid(key, format!("{v:?} is not an ip:port address")))
}

fn parse_bool(key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(key, format!("{v:?} is not a boolean"))),
    }
}

fn check_credentials(key: &str, user: &str, password: &str) -> Result<(), ConfigError> {
    check_identifier(&format!("{key}.username"), user)?;
    if password.is_empty() {
        return Err(invalid(&format!("{key}.password"), "must be set"));
    }
    if password.contains('\'') || password.contains('\\') {
        return Err(invalid(
            &format!("{key}.password"),
            "may not contain quotes or backslashes",
        ));
    }
    Ok(())
}

/// Role and database names go into SQL unquoted: keep them plain.
fn check_identifier(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() < 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{name:?} must be a lowercase SQL identifier (a-z, 0-9, _)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GOOD: &str = r#"
name = "node1"
etcd_endpoints = ["http://127.0.0.1:2379", "http://127.0.0.1:2381"]
[postgres]
data_dir = "/tmp/pgha/node1"
listen = "127.0.0.1:5433"
[api]
listen = "127.0.0.1:8009"
password = "apipw"
[auth]
superuser = { username = "postgres", password = "s" }
replication = { username = "replicator", password = "r" }
rewind = { username = "rewind_user", password = "w" }
app = { username = "app", password = "a" }
[tags]
nofailover = true
[bootstrap]
ttl = "20s"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("agent.toml"), text)
    }

    #[test]
    fn a_complete_file_parses_with_defaults_filled_in() {
        let c = parse(GOOD).unwrap();
        c.validate().unwrap();
        assert_eq!(c.cluster, "main");
        assert_eq!(c.bootstrap.ttl, Duration::from_secs(20));
        assert_eq!(c.bootstrap.loop_wait, Duration::from_secs(2));
        assert!(c.tags.nofailover);
        assert_eq!(c.pg_advertise(), ("127.0.0.1".into(), 5433));
        assert_eq!(c.api_url(), "http://127.0.0.1:8009");
        assert_eq!(c.auth.app.database, "app");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let e = parse("name = \"n\"\nnaem = \"x\"").unwrap_err().to_string();
        assert!(e.contains("naem"), "{e}");
        let e = parse("[postgres]\ndatadir = \"/x\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("datadir"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_reason() {
        let cases = [
            ("name = \"bad/name\"", "name"),
            ("[api]\npassword = \"\"", "api.password"),
            ("[postgres]\ndata_dir = \"relative\"", "postgres.data_dir"),
            ("[bootstrap]\nttl = \"5s\"", "bootstrap.ttl"),
        ];
        for (edit, key) in cases {
            let mut c = parse(GOOD).unwrap();
            let patch = parse(edit).unwrap();
            if edit.starts_with("name") {
                c.name = patch.name;
            } else if edit.contains("[api]") {
                c.api.password = patch.api.password;
            } else if edit.contains("[postgres]") {
                c.postgres.data_dir = patch.postgres.data_dir;
            } else {
                c.bootstrap = patch.bootstrap;
            }
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(&format!("`{key}`")), "{edit}: {e}");
        }
    }

    #[test]
    fn durations_must_be_human_readable() {
        let e = parse("[bootstrap]\nttl = 10").unwrap_err().to_string();
        assert!(e.contains("ttl"), "{e}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c = parse(GOOD).unwrap();
        c.apply_env(|k| match k {
            "PGHA_NAME" => Some("node9".into()),
            "PGHA_ETCD_ENDPOINTS" => Some("http://a:1, http://b:2".into()),
            "PGHA_PG_LISTEN" => Some("127.0.0.1:6000".into()),
            "PGHA_NOFAILOVER" => Some("false".into()),
            "PGHA_SUPERUSER_PASSWORD" => Some("fromenv".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.name, "node9");
        assert_eq!(c.etcd_endpoints, ["http://a:1", "http://b:2"]);
        assert_eq!(c.postgres.listen.port(), 6000);
        assert!(!c.tags.nofailover);
        assert_eq!(c.auth.superuser.password, "fromenv");
        let e = c
            .apply_env(|k| (k == "PGHA_PG_LISTEN").then(|| "nope".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`postgres.listen`"), "{e}");
    }

    #[test]
    fn missing_passwords_are_rejected() {
        let c = AgentConfig {
            name: "n1".into(),
            ..AgentConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`auth.superuser.password`"), "{e}");
    }
}
