//! Load and chaos tooling for pgha: a writer that records every acknowledged
//! write and the windows in which writes failed, the check that no
//! acknowledged write was lost, latency histograms, and the pooler benchmark
//! that runs pgbench against a direct connection, PgBouncer and pgha-proxy
//! side by side in one run.
//!
//! The library is used by integration tests (end-to-end failover checks) and
//! by the `pgha-loadtest` binary; servers are started through `pgha-local`.

pub mod bench;
pub mod cpu;
pub mod failover;
pub mod hist;
pub mod idle;
pub mod pgbench;
pub mod reader;
pub mod writer;

pub use hist::{LatencyHistogram, Summary};
pub use writer::{missing_ids, WriteOutcome, Writer};
