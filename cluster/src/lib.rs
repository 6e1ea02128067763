//! The etcd contract between pgha's components.
//!
//! Every key under `/pgha/<cluster>/` and every record stored there is defined
//! here, and nowhere else: the proxy, the agent and the backup service build
//! key strings only through [`Keys`] and (de)serialize values only through the
//! types in [`records`]. This crate does no I/O; it is plain data with
//! round-trip tests, so a change to the contract shows up as a compile error
//! or a failing test in one place.

pub mod config;
pub mod keys;
pub mod lsn;
pub mod records;

pub use config::{ClusterConfig, ConfigError};
pub use keys::{validate_name, Key, KeyError, Keys};
pub use lsn::{Lsn, LsnParseError};
pub use records::{
    decode, encode, HistoryEntry, Member, PgState, ProxyAck, RecordError, Role, Status, Switchover,
    SwitchoverPhase, SyncState, Tags,
};
