//! SIGHUP: re-reads the config file and applies what can change while
//! clients stay connected, as PgBouncer's RELOAD does.
//!
//! Everything is checked before anything is applied: a file that does not
//! parse, a users file or certificate that cannot be read, and the proxy
//! keeps running on the old settings, saying which key is wrong. Keys in
//! [`RESTART_KEYS`] keep their old value (logged). Changing a key in
//! [`POOL_KEYS`] replaces the pools; static backends are swapped in as a
//! new routing table; the `tcp_*` keys apply to sockets accepted or opened
//! from now on; sessions pick up the rest at their next turn (their
//! doorbell rings). May call: `config`, `auth`, `tls`, `pool`, `sockopt`,
//! `watch`.

use std::path::Path;
use std::sync::Arc;

use crate::config::{ConfigError, POOL_KEYS, RESTART_KEYS};
use crate::router::RoutingTable;
use crate::{auth, tls, Config, Shared};

/// A reload that was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Users(#[from] auth::AuthError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys now in effect with their new value.
    pub applied: Vec<String>,
    /// Keys that changed in the file but wait for a restart.
    pub need_restart: Vec<String>,
}

/// Reads `path` and applies it to the running proxy.
pub fn reload(shared: &Shared, path: &Path) -> Result<Reloaded, ReloadError> {
    let mut new = Config::load(path)?;
    let old = shared.cfg();
    let changed = new.changed_keys(&old);
    let (need_restart, applied): (Vec<String>, Vec<String>) = changed
        .into_iter()
        .partition(|k| RESTART_KEYS.contains(&k.as_str()));
    new.keep_restart_keys(&old);
    // Read everything that can fail before changing anything.
    let users = new
        .users_file
        .as_deref()
        .map(auth::Users::load)
        .transpose()?;
    let tls = tls::client_tls(&new)?;
    let server_tls = tls::server_tls(&new)?;

    let new = Arc::new(new);
    shared.users.store(users.map(Arc::new));
    shared.tls.store(tls);
    shared.cfg.store(new.clone());
    shared.sockets.set(&new);
    let replace_pools = applied.iter().any(|k| POOL_KEYS.contains(&k.as_str()));
    shared
        .pools
        .set_config(new.clone(), server_tls, replace_pools);
    if new.etcd.is_none() && applied.iter().any(|k| k == "backends") {
        let current = shared.topology.load();
        let mut table = RoutingTable::from_static(&new.backends);
        table.paused = current.paused;
        crate::watch::install(shared, table);
    }
    // Sessions refresh their copy of the settings at the next turn.
    shared.bells.ring_all();
    Ok(Reloaded {
        applied,
        need_restart,
    })
}
