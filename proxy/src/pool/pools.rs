//! Every pool, by (database, user, startup options, backend, route):
//! made on first use, retired when their backend leaves its role or a
//! reload changes their shape, and each backend's
//! `max_backend_connections` count. May call: the pools, `cap`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Pool;
use crate::cap::BackendCap;
use crate::config::Config;
use crate::lock;
use crate::router::{Backend, Route};
use crate::server::{ConnectOpts, Login};
use crate::sockopt::SocketSetup;
use crate::tls::ServerTls;

/// (database, user, startup options, backend, route): read-write pools
/// hold only connections that confirmed `pg_is_in_recovery() = false`.
type PoolKey = (String, String, String, Arc<Backend>, Route);

/// Every pool, by (database, user, startup options, backend, route).
#[derive(Debug)]
pub struct Pools {
    /// For pools made from now on; swapped by a reload.
    cfg: arc_swap::ArcSwap<Config>,
    server_tls: arc_swap::ArcSwapOption<ServerTls>,
    /// Read at each connect, so a reload's TCP options reach new
    /// connections of existing pools too.
    sockets: Arc<SocketSetup>,
    map: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// Retired pools whose connections are not all closed yet: their
    /// transactions still count (a switchover's drain waits for them) and
    /// still show in /status and /metrics.
    retired: Mutex<Vec<Arc<Pool>>>,
    /// The pool handed out last: most connects ask for the same one, and
    /// this spares them building and hashing a key.
    last: Mutex<Option<Arc<Pool>>>,
    /// Each backend's `max_backend_connections` slots, shared by all its
    /// pools and kept across reloads (the bound resized), with no bound
    /// too: every open connection to the backend holds one.
    caps: Mutex<HashMap<Arc<Backend>, Arc<BackendCap>>>,
}

impl Pools {
    pub fn new(cfg: Arc<Config>, sockets: Arc<SocketSetup>) -> Pools {
        Pools {
            cfg: arc_swap::ArcSwap::new(cfg),
            server_tls: arc_swap::ArcSwapOption::empty(),
            sockets,
            map: Mutex::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            last: Mutex::new(None),
            caps: Mutex::new(HashMap::new()),
        }
    }

    /// The pool for this login on `backend`, created on first use.
    pub fn get(&self, backend: &Arc<Backend>, login: &Login, route: Route) -> Arc<Pool> {
        if let Some(p) = lock(&self.last).as_ref() {
            let same = p.route == route
                && p.login.user == login.user
                && p.login.database == login.database
                && p.login.options == login.options
                && (Arc::ptr_eq(&p.backend, backend) || *p.backend == **backend);
            if same && !p.is_retired() {
                return p.clone();
            }
        }
        let p = self.lookup(backend, login, route);
        *lock(&self.last) = Some(p.clone());
        p
    }

    fn lookup(&self, backend: &Arc<Backend>, login: &Login, route: Route) -> Arc<Pool> {
        let key = (
            login.database.clone(),
            login.user.clone(),
            login.options.clone(),
            backend.clone(),
            route,
        );
        let mut map = lock(&self.map);
        if let Some(p) = map.get(&key) {
            if !p.is_retired() {
                return p.clone();
            }
        }
        // Read under the lock a reload resizes the bounds under.
        let mut caps = lock(&self.caps);
        let cfg = self.cfg.load_full();
        let connect = self.opts(&cfg, cfg.prepared_cache_size);
        let max = crate::cap::slots_for(cfg.max_backend_connections);
        if !caps.contains_key(backend) {
            // A backend new to the proxy (a member joined, or moved): the
            // counts of those no connection or pool uses any more go.
            caps.retain(|_, c| !c.unused());
        }
        let cap = caps.entry(backend.clone());
        let cap = cap.or_insert_with(|| BackendCap::new(max)).clone();
        let p = Arc::new(Pool::new(
            backend.clone(),
            route,
            login.clone(),
            cfg,
            connect,
            cap.clone(),
        ));
        cap.add_pool(&p);
        map.insert(key, p.clone());
        p
    }

    /// New pools use `cfg`; with `replace`, the existing ones are retired
    /// (idle connections close now, busy ones when given back).
    pub fn set_config(&self, cfg: Arc<Config>, server_tls: Option<Arc<ServerTls>>, replace: bool) {
        self.cfg.store(cfg);
        self.server_tls.store(server_tls);
        {
            // The retired pools' connections keep their slots until they
            // close, so the bound holds across a reload: one set of slots
            // per backend, resized, kept without a bound too (setting one
            // later must count the connections open then).
            let caps = lock(&self.caps);
            let max = crate::cap::slots_for(self.cfg.load().max_backend_connections);
            for cap in caps.values() {
                cap.resize(max);
            }
        }
        if replace {
            self.retire_unless(|_, _| false);
        }
    }

    /// How the proxy's own connections (auth_query) are made.
    pub fn connect_opts(&self) -> ConnectOpts {
        self.opts(&self.cfg.load(), 1)
    }

    /// How connections are made under `cfg`, keeping `cache_size`
    /// prepared statements.
    fn opts(&self, cfg: &Config, cache_size: usize) -> ConnectOpts {
        ConnectOpts {
            timeout: cfg.server_connect_timeout,
            cache_size,
            tls: self.server_tls.load_full(),
            sockets: self.sockets.clone(),
        }
    }

    /// Retires every pool for which `stays(backend, route)` is false.
    pub fn retire_unless(&self, stays: impl Fn(&Backend, Route) -> bool) {
        self.retire_where(|(_, _, _, b, r), _| !stays(b, *r));
    }

    /// Retires the pools of `database`, or every pool (PgBouncer's
    /// RECONNECT): their idle connections close now, busy ones when they
    /// are released, and the next transaction opens new ones, which get
    /// what changed on the server since (`ALTER ROLE ... SET`, a new
    /// certificate). How many pools were retired.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        self.retire_where(|(db, ..), _| database.is_none_or(|d| d == db))
    }

    /// Retires the pools whose key `retire` picks and forgets them (the
    /// next lookup makes new ones); how many.
    fn retire_where(&self, retire: impl Fn(&PoolKey, &Pool) -> bool) -> usize {
        let mut map = lock(&self.map);
        // Moved under the map's lock (taken before the list's, as in
        // `every`): a count never sees a pool in neither place.
        let mut retired = lock(&self.retired);
        let before = retired.len();
        map.retain(|key, p| {
            let hit = retire(key, p);
            if hit {
                p.retire();
                retired.push(p.clone());
            }
            !hit
        });
        let n = retired.len() - before;
        retired.retain(|p| p.in_use());
        n
    }

    /// Runs `f` on every pool that holds connections or may be given
    /// some: the live ones, then retired ones whose connections are not
    /// all closed yet (those that are go now).
    fn every<T>(&self, f: impl FnMut(&Arc<Pool>) -> T) -> Vec<T> {
        let map = lock(&self.map);
        let mut retired = lock(&self.retired);
        retired.retain(|p| p.in_use());
        map.values().chain(retired.iter()).map(f).collect()
    }

    /// Read-write connections that may run a transaction now, in live and
    /// retired pools: transactions in flight on the leader.
    pub fn rw_in_flight(&self) -> usize {
        let n = self.every(|p| (p.route == Route::ReadWrite).then(|| p.in_flight()));
        n.into_iter().flatten().sum()
    }

    /// Runs [`Pool::maintain`] on every live pool, then forgets the
    /// pools made for a client's own startup settings once they hold no
    /// connection and no one waits on them: every distinct set of
    /// settings makes a pool, and they must not pile up (a new login
    /// makes the pool again).
    pub async fn maintain(&self) {
        for p in self.snapshot() {
            if !p.is_retired() {
                p.maintain().await;
            }
        }
        self.retire_where(|(_, _, options, ..), p| {
            !options.is_empty() && !p.in_use() && p.waiting() == 0
        });
    }

    /// Every pool for `/status` and `/metrics` (see `every`).
    pub fn snapshot(&self) -> Vec<Arc<Pool>> {
        self.every(Arc::clone)
    }
}
