//! The idle list in states that only clients on several worker threads
//! reach, set up by hand on a real PostgreSQL.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pgha_local::{PgInstance, PgOptions, Sandbox};

use crate::config::{AuthMethod, BackendRole, Config, StaticBackend};
use crate::router::{Route, RoutingTable};
use crate::server::Login;

use super::Pool;

/// `pg` as a static primary backend.
pub(crate) fn backend(pg: &PgInstance) -> StaticBackend {
    StaticBackend {
        name: pg.name().into(),
        host: "127.0.0.1".into(),
        port: pg.port(),
        role: BackendRole::Primary,
        noloadbalance: false,
    }
}

/// The read-write pool of user and database postgres on `pg`, the only
/// backend, with `cfg`'s other settings and trust.
pub(crate) fn primary_pool(pg: &PgInstance, cfg: Config) -> (crate::Shared, Arc<Pool>) {
    let cfg = Config {
        auth_method: AuthMethod::Trust,
        backends: vec![backend(pg)],
        ..cfg
    };
    let table = RoutingTable::from_static(&cfg.backends);
    let shared = crate::Shared::new(Arc::new(cfg.clone()), None, table);
    shared.pools.set_config(Arc::new(cfg), None, false);
    let leader = shared.topology.load().leader.clone().unwrap();
    let login = Login {
        user: "postgres".into(),
        database: "postgres".into(),
        options: String::new(),
        secret: Default::default(),
    };
    let pool = shared.pools.get(&leader, &login, Route::ReadWrite);
    (shared, pool)
}

/// A connection given back while nobody waited kept its slot; one given
/// back on top of it while a client waited gave its slot to that client,
/// who has not taken it yet. A client without a slot then finds the top
/// one slotless and no slot free: it must take the older one, not wait
/// for a slot while a connection idles (until `checkout_timeout`, when
/// nobody else gives one back).
#[test]
fn a_client_without_a_slot_takes_an_older_idle_connection_that_kept_its_own() {
    let sb = Sandbox::new("px-pool-idle").unwrap();
    let pg = PgInstance::primary(&sb, "pg1", &PgOptions::default()).unwrap();
    let cfg = Config {
        pool_size: 2,
        ..Config::default()
    };
    let (_shared, pool) = primary_pool(&pg, cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let wait = Duration::from_secs(5);
    rt.block_on(async {
        let a = pool.checkout(wait, true).await.unwrap();
        let b = pool.checkout(wait, true).await.unwrap();
        let a_key = a.conn.key;
        let b_key = b.conn.key;
        a.checkin(true);
        pool.waiting.fetch_add(1, Ordering::Relaxed);
        b.checkin(true);
        pool.waiting.fetch_sub(1, Ordering::Relaxed);
        let owed = pool.slots.clone().try_acquire_owned().unwrap();
        assert_eq!(pool.slots.available_permits(), 0);
        let idle: Vec<bool> = pool
            .idle
            .lock()
            .unwrap()
            .iter()
            .map(|i| i.slot.is_some())
            .collect();
        assert_eq!(idle, [true, false], "a with its slot under b without");

        let c = pool
            .try_checkout_idle()
            .expect("the idle connection with its own slot");
        assert_eq!(c.conn.key, a_key);
        // The waiting client takes b with the slot it was given.
        let mut held = Some(owed);
        let (conn, slot) = pool
            .take_idle(&mut held)
            .expect("b, for the waiting client");
        assert!(held.is_none());
        assert_eq!(conn.key, b_key);
        let d = pool.hand_out(conn, slot);
        assert_eq!(pool.counts(), (0, 2));
        c.checkin(true);
        d.checkin(true);
    });
    // Two server connections all along: nobody opened a third.
    let proxy_servers =
        pg.psql("select count(*) from pg_stat_activity where application_name = 'pgha-proxy'");
    assert_eq!(proxy_servers.unwrap(), "2");
}
