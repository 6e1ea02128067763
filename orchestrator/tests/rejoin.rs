//! A former primary with unreplicated writes rejoins through pg_rewind.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::time::Duration;

use common::{Cluster, SETTLE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgha_local::{wait_until, PgInstance, PgOptions, Sandbox};

#[test]
fn old_primary_with_unreplicated_rows_rejoins_through_pg_rewind_with_the_new_leaders_data() {
    let mut c = Cluster::start_n("rejoin", 3);
    let p = c.wait_healthy(SETTLE);
    c.nodes[p]
        .psql("create table probe(id serial primary key, origin text); insert into probe(origin) values ('before')")
        .unwrap();
    for i in (0..3).filter(|&i| i != p) {
        c.wait_value(
            i,
            "select count(*) from probe",
            "1",
            Duration::from_secs(30),
        );
    }
    // Freeze the WAL senders: what the primary writes now never replicates.
    let senders: Vec<i32> = c.nodes[p]
        .psql("select pid from pg_stat_replication")
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(senders.len(), 2);
    for &pid in &senders {
        kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    }
    c.nodes[p]
        .psql("insert into probe(origin) select 'lost' from generate_series(1, 100)")
        .unwrap();
    // Postgres first: it dies with its agent (parent-death signal).
    c.nodes[p].kill_postgres().unwrap();
    c.nodes[p].kill_agent().unwrap();
    for &pid in &senders {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let (new, _) = c.wait_writable(&[p], Duration::from_secs(60));
    c.nodes[new]
        .psql("insert into probe(origin) values ('new-leader')")
        .unwrap();

    // The old primary comes back: it must rewind and follow, never write.
    c.nodes[p].restart_agent().unwrap();
    c.wait_value(
        p,
        "select count(*) from probe where origin = 'new-leader'",
        "1",
        Duration::from_secs(120),
    );
    assert_eq!(
        c.nodes[p]
            .psql("select count(*) from probe where origin = 'lost'")
            .unwrap(),
        "0"
    );
    assert!(!c.nodes[p].is_writable().unwrap(), "rejoined as a replica");
    assert_eq!(c.writable_now(), vec![new]);
    let log = std::fs::read_to_string(c.nodes[p].agent_log()).unwrap();
    assert_eq!(
        log.matches("pg_rewind done").count(),
        1,
        "rewound once, not re-cloned nor rewound again"
    );
}

/// Right after pg_rewind, before its WAL receiver connects, a standby's last
/// checkpoint is still on the old timeline while it already replays the new
/// one past the switch point. The probe must report the new timeline (from
/// the minimum recovery point pg_rewind wrote), or the agent takes the
/// freshly rewound replica for one that went past the new leader's branch
/// point and stops it to rewind it again.
#[test]
fn a_rewound_standby_reports_the_new_timeline_before_it_streams() {
    let sandbox = Sandbox::new("rewound-timeline").unwrap();
    let opts = PgOptions::default();
    let mut old = PgInstance::primary(&sandbox, "old", &opts).unwrap();
    old.psql("create table t(x int); insert into t values (0)")
        .unwrap();
    let new = PgInstance::replica(&sandbox, "new", &old, &opts).unwrap();
    wait_until(
        "the replica to have the row",
        Duration::from_secs(30),
        || Ok(new.psql("select count(*) from t").ok().filter(|n| n == "1")),
    )
    .unwrap();
    assert_eq!(new.psql("select pg_promote(true, 60)").unwrap(), "t");
    new.psql("insert into t select generate_series(1, 1000)")
        .unwrap();
    old.psql("insert into t values (-1)").unwrap();

    old.rewind_from(&new).unwrap();
    assert_eq!(
        old.psql("select timeline_id from pg_control_checkpoint()")
            .unwrap(),
        "1",
        "the case under test: checkpoint still on the old timeline"
    );
    assert_eq!(old.psql("select count(*) from t").unwrap(), "1001");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let probe = rt.block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&old.conn_str("postgres"), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(conn);
        pgha_orchestrator::postgres::probe(&client).await.unwrap()
    });
    assert!(probe.in_recovery && !probe.receiving, "{probe:?}");
    assert_eq!(probe.timeline, Some(2), "{probe:?}");
}
