//! `config`: the cluster-wide dynamic settings, changed with `pgha edit-config`.
//!
//! Every agent reads the same values, so timing rules that keep the cluster
//! safe (a leader must fence itself before its lease can expire elsewhere)
//! are checked here, once, by [`ClusterConfig::validate`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A setting breaks a rule; names the key and the reason.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("config key `{key}`: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

/// Dynamic cluster settings. Defaults are chosen for fast, safe failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Leader lease time to live. Default 10s: a lost leader is replaced
    /// within about `ttl` (Patroni's default is 30s).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Agent loop period; the agents also react to etcd watch events at once.
    /// Default 2s.
    #[serde(with = "humantime_serde")]
    pub loop_wait: Duration,
    /// How long etcd or postgres operations are retried before the leader
    /// gives up and fences itself. Default 3s.
    #[serde(with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// A replica further behind than this many bytes is never promoted.
    /// Default 1 MiB.
    pub maximum_lag_on_failover: u64,
    /// Keep a synchronous standby; only it may be promoted. Default false.
    pub synchronous_mode: bool,
    /// With no synchronous standby available, block writes rather than
    /// run without one. Default false.
    pub synchronous_mode_strict: bool,
    /// How long the agent tries to restart a crashed primary in place before
    /// releasing the leader key. Default 5s.
    #[serde(with = "humantime_serde")]
    pub primary_start_timeout: Duration,
    /// Maintenance mode: agents observe and report but take no action.
    pub pause: bool,
    /// How long a switchover waits for proxies to acknowledge the pause and
    /// for in-flight transactions to finish. Default 3s.
    #[serde(with = "humantime_serde")]
    pub switchover_timeout: Duration,
    /// Extra postgresql.conf parameters applied on every member.
    pub postgresql_parameters: BTreeMap<String, String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            ttl: Duration::from_secs(10),
            loop_wait: Duration::from_secs(2),
            retry_timeout: Duration::from_secs(3),
            maximum_lag_on_failover: 1 << 20,
            synchronous_mode: false,
            synchronous_mode_strict: false,
            primary_start_timeout: Duration::from_secs(5),
            pause: false,
            switchover_timeout: Duration::from_secs(3),
            postgresql_parameters: BTreeMap::new(),
        }
    }
}

impl ClusterConfig {
    /// How long a leader may go without renewing its lease before it must
    /// stop writes: renewals come every `loop_wait` and may fail for
    /// `retry_timeout` after that. Since `ttl >= loop_wait + 2 *
    /// retry_timeout`, at least `retry_timeout` is left to stop postgres
    /// before the lease can expire.
    pub fn fence_after(&self) -> Duration {
        self.loop_wait + self.retry_timeout
    }

    /// Checks the rules that keep failover safe.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key, reason: String| Err(ConfigError { key, reason });
        if self.ttl < Duration::from_secs(2) {
            return err("ttl", format!("{:?} is below the 2s minimum", self.ttl));
        }
        if self.loop_wait.is_zero() {
            return err("loop_wait", "must be greater than 0".into());
        }
        if self.retry_timeout.is_zero() {
            return err("retry_timeout", "must be greater than 0".into());
        }
        // A leader retries etcd for up to retry_timeout after its last loop
        // before it fences itself; both must fit inside the lease, or another
        // member could be promoted while the old one still accepts writes.
        if self.loop_wait + self.retry_timeout * 2 > self.ttl {
            return err(
                "ttl",
                format!(
                    "must be at least loop_wait + 2 x retry_timeout ({:?}), is {:?}",
                    self.loop_wait + self.retry_timeout * 2,
                    self.ttl
                ),
            );
        }
        if self.synchronous_mode_strict && !self.synchronous_mode {
            return err(
                "synchronous_mode_strict",
                "requires synchronous_mode = true".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_fast() {
        let c = ClusterConfig::default();
        c.validate().unwrap();
        assert!(c.ttl <= Duration::from_secs(10));
    }

    #[test]
    fn durations_are_human_readable() {
        let c: ClusterConfig =
            serde_json::from_str(r#"{"ttl":"20s","loop_wait":"500ms","retry_timeout":"5s"}"#)
                .unwrap();
        assert_eq!(c.ttl, Duration::from_secs(20));
        assert_eq!(c.loop_wait, Duration::from_millis(500));
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""ttl":"20s""#), "{json}");
    }

    #[test]
    fn unsafe_timing_is_rejected_naming_the_key() {
        let c = ClusterConfig {
            ttl: Duration::from_secs(5),
            loop_wait: Duration::from_secs(2),
            retry_timeout: Duration::from_secs(3),
            ..ClusterConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "ttl");
        assert!(
            e.to_string().contains("loop_wait + 2 x retry_timeout"),
            "{e}"
        );
    }

    #[test]
    fn strict_needs_synchronous_mode() {
        let c = ClusterConfig {
            synchronous_mode_strict: true,
            ..ClusterConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "synchronous_mode_strict");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = serde_json::from_str::<ClusterConfig>(r#"{"tll":"10s"}"#).unwrap_err();
        assert!(e.to_string().contains("tll"), "{e}");
    }
}
