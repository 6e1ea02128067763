//! One client connection: startup, authentication, then moving messages
//! between the client and whichever server connection serves it.
//!
//! In transaction mode a server is attached when a request arrives and given
//! back when its ReadyForQuery says idle with nothing outstanding; in
//! session mode it stays attached until the client leaves. A leader change
//! detaches servers that left their role. May call: `auth`, `pool`,
//! `topology`, `router`, `cancel`, `protocol`, `forward`, `relay`, `buffers`, `io`,
//! `vars`.

mod buffers;
mod event_loop;
mod forward;
mod io;
mod relay;
mod startup;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use crate::bell::Doorbell;
use crate::cancel::Registration;
use crate::config::PoolMode;
use crate::metrics::ErrorKind;
use crate::pool::{Checkout, Pool, PoolError};
use crate::protocol::messages as msg;
use crate::protocol::ProtocolError;
use crate::router::{Backend, Route};
use crate::server::{Login, Params, ServerError};
use crate::tracker::Pending;
use crate::vars::Vars;
use crate::Shared;
use forward::ClientStatements;

pub use io::{ClientIo, WriteNow};
pub use startup::{serve, serve_tcp, serve_unix, Link};

/// Largest message accepted from a server (the protocol's own limit).
const MAX_SERVER_MESSAGE: usize = i32::MAX as usize;

/// Why a session ended or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client I/O: {0}")]
    ClientIo(std::io::Error),
    #[error("server I/O: {0}")]
    ServerIo(std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// An error a client sees for one request: SQLSTATE and text.
#[derive(Debug, Clone)]
struct ClientError {
    code: &'static str,
    message: String,
}

impl ClientError {
    /// The client cancelled a request that waited in the proxy.
    fn canceled() -> ClientError {
        ClientError {
            code: "57014",
            message: "canceling statement due to user request".into(),
        }
    }

    /// A request waited for the end of a pause past its bound.
    fn still_paused() -> ClientError {
        ClientError {
            code: "57P03",
            message: "the proxy is paused and did not resume in time".into(),
        }
    }
}

impl From<PoolError> for ClientError {
    fn from(e: PoolError) -> Self {
        tracing::warn!(error = %e, "server checkout failed");
        let (code, message) = match &e {
            PoolError::Timeout(d) => (
                "57P03",
                format!("no server connection available within {d:?} (pool exhausted)"),
            ),
            // The login itself was refused: the server's reason, which is
            // about this client's own request (bad startup options, an
            // unknown database).
            PoolError::Server(se @ ServerError::Rejected(f)) if !se.is_transient() => (
                "08004",
                format!("the database server refused the connection: {}", f.message),
            ),
            PoolError::Server(_) | PoolError::WrongRole(_) | PoolError::Retired => {
                ("57P03", "cannot connect to the database server".to_owned())
            }
        };
        ClientError { code, message }
    }
}

/// Whether the loop goes on.
enum Flow {
    Continue,
    Quit,
}

/// One authenticated client.
struct Session<C> {
    shared: Arc<Shared>,
    client: C,
    route: Route,
    login: Login,
    /// The configuration, refreshed when the bell rings after a reload.
    cfg: Arc<crate::Config>,
    /// The session settings this client wants (see `vars`): what it was
    /// told at startup, its own startup values, and what it SET since.
    vars: Vars,
    cancel: Registration,
    /// Rung on routing changes and drain.
    bell: Arc<Doorbell>,
    cbuf: BytesMut,
    /// Whether `cbuf` stays while the client is idle.
    keep: buffers::Keep,
    out_server: BytesMut,
    out_client: BytesMut,
    server: Option<Checkout>,
    stmts: ClientStatements,
    /// ParameterStatus values the client has been told.
    told: Params,
    /// Skipping extended-protocol messages up to Sync after a failed request.
    skipping: bool,
    /// An error owed to the client for a transaction the proxy aborted.
    owed: Option<ClientError>,
    /// The pool last used, so a transaction needs no pool-map lookup.
    pool_cache: Option<(Arc<Backend>, Arc<Pool>)>,
    /// Epoch of the routing table the attached server was last checked
    /// against (see `on_client_data`).
    seen_epoch: u64,
    /// Epoch of the table in which the cached pool's backend was the only
    /// choice for this route; 0: choose again (see `attach`).
    cache_epoch: u64,
    /// The client's last message was a Query or Sync, so the attached
    /// server owes a reply that needs nothing more from the client: the
    /// loop then waits for the server alone (see `next_event`).
    awaits_server: bool,
    /// A transaction-mode client that keeps its server from now on.
    pinned: bool,
    /// Its pool mode, chosen at login (`pool_mode`, or a `[[pools]]`
    /// entry's) and kept for its whole life.
    mode: PoolMode,
    /// What the statements in flight may leave on the server (see `sets`).
    sets: crate::sets::SetWatch,
}

impl<C: ClientIo> Session<C> {
    /// Transaction pooling applies: the pool mode says so and the client
    /// did not pin its server (see `relay::pins`).
    fn tx_mode(&self) -> bool {
        self.mode == PoolMode::Transaction && !self.pinned
    }

    /// Attaches a server: an idle pooled one at once when the routing table
    /// allows (the common case, no allocation), else the slow path, boxed
    /// so its large state does not grow every session.
    async fn attach(&mut self) -> Result<(), ClientError> {
        // The table has not changed since the cached pool's backend was
        // the only choice for this route: no table to load, no choice.
        if self.shared.topology.epoch() == self.cache_epoch {
            if let Some((b, p)) = self.pool_cache.take() {
                let co = (!p.is_retired()).then(|| p.try_checkout_idle()).flatten();
                let found = co.map(|co| self.attached(&b, co, self.cache_epoch, Duration::ZERO));
                self.pool_cache = Some((b, p));
                if found.is_some() {
                    return Ok(());
                }
            }
        }
        let table = self.shared.topology.load();
        let fallback = self.cfg.ro_fallback_to_leader;
        if !table.paused {
            let turn = self.shared.next_turn();
            if let Some(backend) = table.choose(self.route, turn, fallback) {
                // Another pool than the cached one (the read-only port's
                // next replica, say): an idle server there needs no wait
                // either, so no slow path.
                if let Some(co) = self.pool_for(&backend).try_checkout_idle() {
                    self.cache_epoch = self.sticky_epoch(&table);
                    self.attached(&backend, co, table.epoch, Duration::ZERO);
                    return Ok(());
                }
            }
        }
        Box::pin(self.attach_slow()).await
    }

    /// The pool of this client's login on `backend`: the cached one, or
    /// the pool map's (then cached, to be chosen again under a new epoch).
    fn pool_for(&mut self, backend: &Arc<Backend>) -> &Arc<Pool> {
        let cached = matches!(&self.pool_cache,
            Some((b, p)) if Arc::ptr_eq(b, backend) && !p.is_retired());
        if !cached {
            self.pool_cache = None;
            self.cache_epoch = 0;
        }
        let (pools, login, route) = (&self.shared.pools, &self.login, self.route);
        let (_, pool) = self
            .pool_cache
            .get_or_insert_with(|| (backend.clone(), pools.get(backend, login, route)));
        pool
    }

    /// The epoch under which the cached pool may be reused without a new
    /// choice: the table's when this route had a single candidate in it.
    fn sticky_epoch(&self, table: &crate::router::RoutingTable) -> u64 {
        let single = self.route == Route::ReadWrite || table.replicas.len() <= 1;
        if single && !table.paused {
            table.epoch
        } else {
            0
        }
    }

    /// `co`, from `backend` chosen under `epoch`, serves this client now.
    fn attached(&mut self, backend: &Arc<Backend>, co: Checkout, epoch: u64, waited: Duration) {
        self.shared.metrics.wait(self.route, waited);
        self.cancel.slot.attach(backend, co.conn.key);
        self.tell_params(&co.conn.params);
        self.server = Some(co);
        self.seen_epoch = epoch;
    }

    /// Finds the backend for this route (waiting up to the configured bound
    /// for a leader or the end of a pause) and checks out a connection.
    async fn attach_slow(&mut self) -> Result<(), ClientError> {
        let cfg = self.cfg.clone();
        let fallback = cfg.ro_fallback_to_leader;
        let route = self.route;
        let deadline = tokio::time::Instant::now() + cfg.leader_wait_timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let table = self
                .shared
                .topology
                .wait_for(left, |t| {
                    !t.paused && t.choose(route, 0, fallback).is_some()
                })
                .await
                .map_err(|t| {
                    self.shared.metrics.error(ErrorKind::NoServer);
                    if t.paused {
                        return ClientError::still_paused();
                    }
                    ClientError {
                        code: "57P03",
                        message: if route == Route::ReadWrite {
                            format!("no leader available within {:?}", cfg.leader_wait_timeout)
                        } else {
                            "no read-only server available".into()
                        },
                    }
                })?;
            let turn = self.shared.next_turn();
            let Some(backend) = table.choose(route, turn, fallback) else {
                continue;
            };
            let pool = self.pool_for(&backend).clone();
            let started = std::time::Instant::now();
            let co = match pool.try_checkout_idle() {
                Some(co) => Ok(co),
                None => tokio::select! {
                r = pool.checkout(cfg.checkout_timeout, route == Route::ReadWrite) => r,
                _ = self.cancel.slot.waiting.notified() => {
                    return Err(ClientError::canceled())
                }
                },
            };
            match co {
                Ok(co) => {
                    tracing::debug!(backend = %backend.name, waited = ?started.elapsed(), "checked out");
                    self.cache_epoch = self.sticky_epoch(&table);
                    self.attached(&backend, co, table.epoch, started.elapsed());
                    return Ok(());
                }
                // The pool was replaced while this client waited for a
                // slot (failover, reload, /reconnect): choose again, and
                // wait in the new pool's line, within the same bound.
                Err(PoolError::Retired) => continue,
                // The leader key moved before promotion finished: wait for
                // the table to change or the server to be promoted.
                Err(PoolError::WrongRole(e)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(backend = %backend.name, error = %e, "checkout: wrong role, waiting");
                    let _ = tokio::time::timeout(
                        Duration::from_millis(50),
                        self.shared.topology.changed(),
                    )
                    .await;
                }
                // The server is down (its node died and the leader key has
                // not expired yet, or postgres restarts in place): wait,
                // within the same bound, for the table to change or the
                // server to come back, so a failover costs the client time
                // but not an error.
                Err(PoolError::Server(e))
                    if e.is_transient() && tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(backend = %backend.name, error = %e, "checkout: server down, waiting");
                    self.shared.metrics.error(ErrorKind::NoServer);
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        self.shared.topology.changed(),
                    )
                    .await;
                }
                Err(e) => {
                    let kind = match e {
                        PoolError::Timeout(_) => ErrorKind::CheckoutTimeout,
                        _ => ErrorKind::NoServer,
                    };
                    self.shared.metrics.error(kind);
                    return Err(e.into());
                }
            }
        }
    }

    /// Sends ParameterStatus for values that differ from what the client
    /// was told, so it always sees the serving node's truth.
    fn tell_params(&mut self, params: &Params) {
        // Each server connection has its own copy; they are usually equal.
        if Arc::ptr_eq(&self.told, params) || self.told.wire == params.wire {
            return;
        }
        if self.told.list.is_empty() {
            self.out_client.extend_from_slice(&params.wire);
            // The client's own startup values win, and it is told so.
            let mut vars = params.vars.clone();
            for (k, v) in self.vars.iter() {
                msg::put_parameter_status(&mut self.out_client, k, v);
            }
            vars.update(&self.vars);
            self.vars = vars;
            self.told = params.clone();
            return;
        }
        for (k, v) in params.list.iter() {
            // The server is given the client's values of these instead.
            if Vars::is_tracked(k) {
                continue;
            }
            let known = self
                .told
                .list
                .iter()
                .find(|(tk, _)| tk == k)
                .map(|(_, tv)| tv);
            if known != Some(v) {
                msg::put_parameter_status(&mut self.out_client, k, v);
            }
        }
        self.told = params.clone();
    }

    /// Before the client's first message on a server, sets the session
    /// settings where the server differs from what the client wants.
    fn sync_vars(&mut self) {
        let Some(co) = self.server.as_mut() else {
            return;
        };
        if let Some(sql) = self.vars.set_sql(&co.conn.vars) {
            tracing::trace!(sql, "syncing session settings");
            self.shared.metrics.settings_synced.increment(1);
            msg::put_query(&mut self.out_server, &sql);
            let fakes = co.conn.tracker.push(Pending::HiddenQuery);
            forward::put_fake_replies(&mut self.out_client, fakes);
        }
    }

    /// Gives the server back (clean) or closes it.
    fn release(&mut self) {
        self.cancel.slot.detach();
        self.check_in();
    }

    /// Gives the server back (clean) or closes it; the cancel key was
    /// detached already.
    fn check_in(&mut self) {
        if let Some(co) = self.server.take() {
            let clean = co.conn.tracker.is_free() && !co.conn.discard;
            co.checkin(clean);
        }
    }

    /// Answers a request that cannot run with `err`, keeping the protocol
    /// in step: a ReadyForQuery now, or after the client's next Sync.
    fn refuse(&mut self, tag: u8, err: &ClientError) {
        if !self.skipping {
            msg::put_error(&mut self.out_client, "ERROR", err.code, &err.message);
        }
        match tag {
            b'Q' | b'F' | b'S' => {
                self.skipping = false;
                msg::put_ready(&mut self.out_client, b'I');
            }
            b'P' | b'B' | b'D' | b'E' | b'C' => self.skipping = true,
            _ => {}
        }
    }

    /// The server connection broke or left its role: drop it, and tell the
    /// client if it was waiting or inside a transaction there.
    fn lose_server(&mut self, err: ClientError) -> Flow {
        let Some(co) = self.server.take() else {
            return Flow::Continue;
        };
        self.cancel.slot.detach();
        let kind = if err.code == "57P01" {
            ErrorKind::LeaderChange
        } else {
            ErrorKind::ServerLost
        };
        self.shared.metrics.error(kind);
        let waiting = !co.conn.tracker.is_quiet();
        let in_tx = co.conn.tracker.status() != b'I';
        let (readies, unsynced) = co.conn.tracker.owed_ready();
        tracing::debug!(backend = %co.pool.backend.name, waiting, in_tx, error = %err.message, "lost the server connection");
        co.discard();
        if !self.tx_mode() {
            msg::put_error(&mut self.out_client, "FATAL", "57P01", &err.message);
            return Flow::Quit;
        }
        if waiting {
            // Every request group the client pipelined gets its error and
            // its ReadyForQuery; a group still missing its Sync is skipped
            // up to that Sync, as a server would after an error.
            for _ in 0..readies {
                msg::put_error(&mut self.out_client, "ERROR", err.code, &err.message);
                msg::put_ready(&mut self.out_client, b'I');
            }
            if unsynced {
                msg::put_error(&mut self.out_client, "ERROR", err.code, &err.message);
                self.skipping = true;
            }
        } else if in_tx {
            self.owed = Some(err);
        }
        Flow::Continue
    }

    /// After a routing change: a server that no longer serves this route is
    /// closed (no write ever reaches a demoted node).
    fn on_topology(&mut self) -> Flow {
        let table = self.shared.topology.load();
        self.seen_epoch = table.epoch;
        let fallback = self.cfg.ro_fallback_to_leader;
        let stale = self
            .server
            .as_ref()
            .is_some_and(|co| !table.still_serves(self.route, &co.pool.backend, fallback));
        if stale {
            tracing::info!(
                route = self.route.label(),
                "closing server connection after a leader change"
            );
            return self.lose_server(ClientError {
                code: "57P01",
                message: "terminating connection due to administrator command: the leader changed, the transaction was aborted".into(),
            });
        }
        if table.paused {
            self.park_if_free();
        } else if let Some(co) = self.server.as_mut() {
            // Resumed: counted as in flight again (and so in /status)
            // before the client's next request.
            co.unpark();
        }
        Flow::Continue
    }

    /// During a pause, a server this client keeps between transactions
    /// (session mode, or pinned) is parked: it runs nothing new until the
    /// pause ends, so a switchover's drain need not wait for the client
    /// to leave (see `hold_while_paused`).
    fn park_if_free(&mut self) {
        if self.tx_mode() {
            return;
        }
        if let Some(co) = self.server.as_mut().filter(|co| co.conn.tracker.is_free()) {
            co.park();
        }
    }

    fn is_parked(&self) -> bool {
        self.server.as_ref().is_some_and(|co| co.is_parked())
    }

    /// Before a request goes to a server kept across transactions: the
    /// routing change is applied (a server off its role is closed) and,
    /// while the proxy is paused, the request waits for the end of the
    /// pause (bounded by `leader_wait_timeout`, cancellable), as a
    /// transaction-mode client's would for a server.
    async fn hold_while_paused(&mut self) -> Result<Flow, ClientError> {
        loop {
            // Parks the server if the table is paused.
            if let Flow::Quit = self.on_topology() {
                return Ok(Flow::Quit);
            }
            let Some(co) = self.server.as_mut().filter(|co| co.is_parked()) else {
                return Ok(Flow::Continue);
            };
            let (backend, key) = (co.pool.backend.clone(), co.conn.key);
            // A cancel now reaches this wait, not the idle server.
            self.cancel.slot.detach();
            let bound = self.cfg.leader_wait_timeout;
            let resumed = tokio::select! {
                r = self.shared.topology.wait_for(bound, |t| !t.paused) => r.is_ok(),
                _ = self.cancel.slot.waiting.notified() => {
                    self.cancel.slot.attach(&backend, key);
                    return Err(ClientError::canceled());
                }
            };
            self.cancel.slot.attach(&backend, key);
            if !resumed {
                self.shared.metrics.error(ErrorKind::NoServer);
                return Err(ClientError::still_paused());
            }
            // Resumed: the next turn's `on_topology` unparks the server
            // (or parks it again, paused anew).
        }
    }

    /// The client left: keep its server only if it is clean, and cancel
    /// what still runs there in a transaction it can no longer commit.
    async fn finish(&mut self) {
        // The read buffer goes back to the shelf for the next client.
        if self.cbuf.capacity() > 0 {
            buffers::park_buffer(&mut self.cbuf);
        }
        let Some(mut co) = self.server.take() else {
            return;
        };
        self.cancel.slot.detach();
        let free = co.conn.tracker.is_free() && !co.conn.discard;
        if !co.conn.tracker.is_quiet() && co.conn.tracker.status() != b'I' {
            // Its query still runs inside a transaction no one can commit
            // now: stop it, or the backend would run it to the end (closing
            // the connection tells it nothing until it next writes). A
            // query outside a transaction block runs on and commits, as it
            // would had the client been connected directly.
            let (backend, key) = (co.pool.backend.clone(), co.conn.key);
            tokio::spawn(async move {
                if let Err(e) = crate::server::send_cancel(&backend, key).await {
                    tracing::debug!(error = %e, "cancel for a vanished client's query failed");
                }
            });
        }
        if free && !self.tx_mode() {
            let ok = Box::pin(co.conn.reset()).await.is_ok();
            co.checkin(ok);
        } else {
            co.checkin(free);
        }
    }
}
