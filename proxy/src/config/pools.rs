//! `[[pools]]`: the size bounds and mode of the pools of some databases
//! or users, in place of the top-level `pool_size`, `min_idle` and
//! `pool_mode`.

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, PoolMode};

/// The pool size, minimum and mode of the pools of one database, one
/// user, or one user in one database, in place of the top-level
/// `pool_size`, `min_idle` and `pool_mode` (PgBouncer's `pool_size`,
/// `min_pool_size` and `pool_mode` in `[databases]` and `[users]`). The
/// first entry that matches a pool, in file order, applies to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRule {
    /// The database it applies to; every database when absent.
    pub database: Option<String>,
    /// The user it applies to; every user when absent.
    pub user: Option<String>,
    /// Server connections per pool it matches; the top-level `pool_size`
    /// when absent.
    pub pool_size: Option<usize>,
    /// Server connections kept open per pool it matches; the top-level
    /// `min_idle` when absent.
    pub min_idle: Option<usize>,
    /// How long its clients keep a server connection; the top-level
    /// `pool_mode` when absent. A client keeps the mode it logged in with.
    pub pool_mode: Option<PoolMode>,
}

impl PoolRule {
    fn matches(&self, database: &str, user: &str) -> bool {
        self.database.as_deref().is_none_or(|d| d == database)
            && self.user.as_deref().is_none_or(|u| u == user)
    }
}

/// The bounds and mode of one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Server connections at most (idle plus in use).
    pub size: usize,
    /// Server connections kept open once the pool is used.
    pub min_idle: usize,
    /// How long its clients keep a server connection.
    pub mode: PoolMode,
}

impl Config {
    /// The bounds and mode of the pools of `user` in `database`: the first
    /// `[[pools]]` entry that matches, else (and for what it leaves out)
    /// the top-level keys.
    pub fn pool_settings(&self, database: &str, user: &str) -> PoolSettings {
        let rule = self.pools.iter().find(|r| r.matches(database, user));
        PoolSettings {
            size: rule.and_then(|r| r.pool_size).unwrap_or(self.pool_size),
            min_idle: rule.and_then(|r| r.min_idle).unwrap_or(self.min_idle),
            mode: rule.and_then(|r| r.pool_mode).unwrap_or(self.pool_mode),
        }
    }

    /// The `[[pools]]` entries: each names whom it applies to and what it
    /// sets, and is reachable (no earlier entry matches all its pools).
    pub(super) fn validate_pools(&self) -> Result<(), ConfigError> {
        for (i, rule) in self.pools.iter().enumerate() {
            let invalid = |key, reason: String| ConfigError::InvalidEntry {
                table: "pools",
                entry: i + 1,
                key,
                reason,
            };
            if rule.database.is_none() && rule.user.is_none() {
                return Err(invalid(
                    "database",
                    "name a database, a user or both (the top-level pool_size, min_idle and pool_mode apply to every pool)".into(),
                ));
            }
            if rule.pool_size.is_none() && rule.min_idle.is_none() && rule.pool_mode.is_none() {
                return Err(invalid(
                    "pool_size",
                    "the entry sets nothing: give pool_size, min_idle or pool_mode".into(),
                ));
            }
            if rule.pool_size == Some(0) {
                return Err(invalid("pool_size", "must be at least 1".into()));
            }
            let size = rule.pool_size.unwrap_or(self.pool_size);
            let min_idle = rule.min_idle.unwrap_or(self.min_idle);
            if min_idle > size {
                let whose = if rule.min_idle.is_some() {
                    "its"
                } else {
                    "the top-level"
                };
                return Err(invalid(
                    "min_idle",
                    format!("{whose} min_idle ({min_idle}) cannot exceed the pool_size that applies ({size})"),
                ));
            }
            // An earlier entry for the same pools or more (the same
            // database or any, the same user or any) takes all of them.
            let covers = |r: &PoolRule| {
                r.database
                    .as_ref()
                    .is_none_or(|d| Some(d) == rule.database.as_ref())
                    && r.user
                        .as_ref()
                        .is_none_or(|u| Some(u) == rule.user.as_ref())
            };
            if let Some(j) = self.pools[..i].iter().position(covers) {
                return Err(invalid(
                    "database",
                    format!("entry {} comes first and matches every pool this one does, so this one never applies", j + 1),
                ));
            }
        }
        Ok(())
    }
}
