//! pgha-orchestrator: the node agent and the operator CLI.
//!
//! `config` reads the agent's settings; `ha` decides (pure); `dcs` talks to
//! etcd; `postgres` controls and probes the local server; `agent` runs the
//! observe -> decide -> act loop; `api` serves the REST API; `http` is the
//! small client peers and the CLI use; `metrics` names every metric; `up`
//! runs a whole local cluster for `pgha up`.

pub mod agent;
pub mod api;
pub mod cli;
pub mod config;
pub mod dcs;
pub mod ha;
pub mod http;
pub mod metrics;
pub mod postgres;
pub mod up;
