//! The real-cluster harness: starts etcd and PostgreSQL 15 as local processes
//! on free loopback ports, in directories it owns, and stops every one of them
//! by process id when its handle is dropped, also when a test panics.
//!
//! Every integration test, `pgha up`, the load tester and the benchmarks start
//! servers through this crate, so there is one place that knows how to run
//! them. It may spawn processes, bind probe sockets and touch the filesystem
//! under its sandbox and a shared template/port-lock area in the temp dir;
//! [`Blackhole`] adds iptables rules for one of its ports while it lives.
//!
//! ```no_run
//! use pgha_local::{Sandbox, EtcdCluster, PgInstance, PgOptions};
//! let sb = Sandbox::new("demo")?;
//! let etcd = EtcdCluster::start(&sb, 3)?;
//! let primary = PgInstance::primary(&sb, "pg1", &PgOptions::default())?;
//! let replica = PgInstance::replica(&sb, "pg2", &primary, &PgOptions::default())?;
//! # Ok::<(), pgha_local::Error>(())
//! ```

mod agent;
mod bins;
mod blackhole;
mod error;
mod etcd;
mod patroni;
mod pgbouncer;
mod ports;
mod postgres;
mod process;
mod proxy;
mod sandbox;
mod stack;
mod user;
mod wait;

pub use agent::{psql as psql_with_password, psql_with, AgentNode, AgentOptions, TEST_PASSWORD};
pub use bins::sibling_binary;
pub use blackhole::Blackhole;
pub use error::Error;
pub use etcd::{EtcdCluster, EtcdMember};
pub use patroni::{PatroniNode, PatroniTiming};
pub use pgbouncer::{PgBouncer, PoolMode};
pub use ports::{claim_port, reserve_port, Port};
pub use postgres::{pg_bin_dir, PgInstance, PgOptions};
pub use process::{processes_under, Proc, StopSignal};
pub use proxy::{ProxyBackends, ProxyNode, ProxyOptions};
pub use sandbox::Sandbox;
pub use stack::{LocalStack, StackOptions, StackState};
pub use user::RunAs;
pub use wait::{wait_until, Wait};
