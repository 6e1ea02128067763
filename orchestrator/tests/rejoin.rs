//! A former primary with unreplicated writes rejoins through pg_rewind.

#![allow(clippy::unwrap_used)] // a test fails loudly on any unexpected error

mod common;

use std::time::Duration;

use common::{Cluster, SETTLE};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
    assert!(log.contains("pg_rewind done"), "rewound, not re-cloned");
}
