//! The whole local stack as `pgha up` runs it, and as the end-to-end tests
//! start it: an etcd cluster, one `pgha-agent` per PostgreSQL node and one
//! `pgha-proxy`, all local processes on loopback.
//!
//! With a state directory the stack is resumable: the first run writes
//! `stack.toml` (ports, cluster name, the generated password) and later runs
//! read it back, so etcd finds its peers at the same addresses and the agents
//! resume their data. Without one (tests) everything lives in a temporary
//! sandbox on free ports.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::{AgentNode, AgentOptions};
use crate::proxy::{ProxyBackends, ProxyNode, ProxyOptions};
use crate::{claim_port, reserve_port, wait_until, Error, EtcdCluster, Sandbox};

const STATE_FILE: &str = "stack.toml";

/// How to bring the stack up.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Persistent state directory; `None` for a temporary one.
    pub dir: Option<PathBuf>,
    pub etcd_members: usize,
    pub nodes: usize,
    /// Keep one synchronous standby (no acknowledged commit lost on failover).
    pub synchronous: bool,
    /// `transaction` or `session`.
    pub pool_mode: String,
    /// On a first run, use the conventional ports (proxy 6432/6433/9930,
    /// agents 8008+i, etcd 2379...) where free, instead of random ones.
    pub conventional_ports: bool,
    pub agent_bin: PathBuf,
    pub proxy_bin: PathBuf,
}

/// What a resumed stack must keep: written on the first run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackState {
    pub cluster: String,
    /// Password of every role (postgres, replicator, rewind_user, app) and
    /// of the agents' REST API.
    pub password: String,
    pub synchronous: bool,
    pub pool_mode: String,
    /// (client, peer) per etcd member.
    pub etcd: Vec<(u16, u16)>,
    /// (postgres, REST API) per node.
    pub nodes: Vec<(u16, u16)>,
    /// (read-write, read-only, admin).
    pub proxy: (u16, u16, u16),
}

impl StackState {
    fn plan(opts: &StackOptions) -> Result<StackState, Error> {
        let pick = |conventional: u16| -> Result<u16, Error> {
            if opts.conventional_ports {
                if let Ok(p) = claim_port(conventional) {
                    return Ok(p.hand_over());
                }
            }
            Ok(reserve_port()?.hand_over())
        };
        let etcd = (0..opts.etcd_members as u16)
            .map(|i| Ok((pick(2379 + 2 * i)?, pick(2380 + 2 * i)?)))
            .collect::<Result<_, Error>>()?;
        let nodes = (0..opts.nodes as u16)
            .map(|i| Ok((pick(5433 + i)?, pick(8008 + i)?)))
            .collect::<Result<_, Error>>()?;
        Ok(StackState {
            cluster: "pgha".into(),
            password: random_password()?,
            synchronous: opts.synchronous,
            pool_mode: opts.pool_mode.clone(),
            etcd,
            nodes,
            proxy: (pick(6432)?, pick(6433)?, pick(9930)?),
        })
    }

    fn load(path: &Path) -> Result<Option<StackState>, Error> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map(Some).map_err(|e| Error::Command {
                what: format!("read {path:?}"),
                detail: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read {path:?}"))(e)),
        }
    }

    fn save(&self, path: &Path) -> Result<(), Error> {
        let text = toml::to_string(self).map_err(|e| Error::Command {
            what: "encode stack state".into(),
            detail: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(Error::io(format!("write {path:?}")))
    }
}

fn random_password() -> Result<String, Error> {
    use std::io::Read;
    let mut bytes = [0u8; 18];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(Error::io("read /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A running local stack; everything stops when it is dropped.
#[derive(Debug)]
pub struct LocalStack {
    // Field order is drop order: the proxy goes first, etcd last.
    proxy: ProxyNode,
    agents: Vec<AgentNode>,
    etcd: EtcdCluster,
    state: StackState,
    sandbox: Sandbox,
    resumed: bool,
}

impl LocalStack {
    /// Starts (or resumes) the stack and waits until writes go through the proxy.
    pub fn up(opts: &StackOptions) -> Result<LocalStack, Error> {
        let sandbox = match &opts.dir {
            Some(d) => Sandbox::persistent(d)?,
            None => Sandbox::new("stack")?,
        };
        let state_path = sandbox.path().join(STATE_FILE);
        let (state, resumed) = match StackState::load(&state_path)? {
            Some(s) => (s, true),
            None => {
                let s = StackState::plan(opts)?;
                s.save(&state_path)?;
                (s, false)
            }
        };
        let etcd_ports = state
            .etcd
            .iter()
            .map(|(c, p)| Ok((claim_port(*c)?, claim_port(*p)?)))
            .collect::<Result<_, Error>>()?;
        let etcd = EtcdCluster::start_on(&sandbox, etcd_ports)?;
        let mut agents = Vec::new();
        for (i, (pg, api)) in state.nodes.iter().enumerate() {
            let agent_opts = AgentOptions {
                cluster: Some(state.cluster.clone()),
                ports: Some((*pg, *api)),
                password: Some(state.password.clone()),
                bootstrap: vec![format!("synchronous_mode = {}", state.synchronous)],
                ..AgentOptions::default()
            };
            let name = format!("node{}", i + 1);
            agents.push(AgentNode::start(
                &sandbox,
                &etcd,
                &name,
                &opts.agent_bin,
                &agent_opts,
            )?);
        }
        let users = ["app", "postgres"]
            .map(|u| (u.to_owned(), state.password.clone()))
            .to_vec();
        let proxy = ProxyNode::start(
            &sandbox,
            "proxy",
            &opts.proxy_bin,
            &ProxyOptions {
                id: "proxy1".into(),
                backends: ProxyBackends::Etcd {
                    endpoints: etcd.endpoints(),
                    cluster: state.cluster.clone(),
                },
                pool_mode: state.pool_mode.clone(),
                pool_size: 20,
                auth_method: "scram-sha-256".into(),
                users,
                ports: Some(state.proxy),
                // Clients wait through a failover (about one lease ttl)
                // instead of getting errors. The proxy leaves room under
                // the node's max_connections (100) for the agent,
                // replication and an operator's psql, however many pools.
                extra_config: vec![
                    "leader_wait_timeout = \"20s\"".into(),
                    "max_backend_connections = 80".into(),
                ],
            },
        )?;
        let stack = LocalStack {
            proxy,
            agents,
            etcd,
            state,
            sandbox,
            resumed,
        };
        stack.wait_ready(Duration::from_secs(120))?;
        Ok(stack)
    }

    /// Waits until a write commits through the read-write port, every other
    /// node streams from the leader and, in synchronous mode, one of them is
    /// recorded in the `sync` key (only then can a failover promote anyone).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), Error> {
        wait_until("the stack to accept writes", timeout, || {
            let rw = self
                .proxy_psql(self.proxy.rw_port(), "select not pg_is_in_recovery()")
                .map_err(|e| e.to_string())?;
            if rw != "t" {
                return Ok(None);
            }
            let leader = self.leader_index().ok_or("no single writable node")?;
            let streaming: usize = self.agents[leader]
                .psql("select count(*) from pg_stat_replication where state = 'streaming'")
                .map_err(|e| e.to_string())?
                .parse()
                .unwrap_or(0);
            if streaming + 1 < self.agents.len() {
                return Ok(None);
            }
            if self.state.synchronous && self.agents.len() > 1 {
                let listed = self
                    .agents
                    .iter()
                    .any(|a| a.api_get("/sync").is_ok_and(|(status, _)| status == 200));
                if !listed {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
    }

    fn proxy_psql(&self, port: u16, sql: &str) -> Result<String, Error> {
        crate::agent::psql_with(port, "app", "app", &self.state.password, sql)
    }

    /// Runs `sql` through the proxy's read-write port as the app user.
    pub fn psql_rw(&self, sql: &str) -> Result<String, Error> {
        self.proxy_psql(self.proxy.rw_port(), sql)
    }

    /// Runs `sql` through the proxy's read-only port as the app user.
    pub fn psql_ro(&self, sql: &str) -> Result<String, Error> {
        self.proxy_psql(self.proxy.ro_port(), sql)
    }

    /// The node whose postgres accepts writes, if exactly one does.
    pub fn leader_index(&self) -> Option<usize> {
        let writable: Vec<usize> = (0..self.agents.len())
            .filter(|i| {
                self.agents[*i]
                    .psql("select not pg_is_in_recovery()")
                    .is_ok_and(|v| v == "t")
            })
            .collect();
        (writable.len() == 1).then(|| writable[0])
    }

    fn url(&self, port: u16) -> String {
        format!(
            "postgresql://app:{}@127.0.0.1:{port}/app",
            self.state.password
        )
    }

    /// Connection URL of the read-write port.
    pub fn rw_url(&self) -> String {
        self.url(self.proxy.rw_port())
    }

    /// Connection URL of the read-only port.
    pub fn ro_url(&self) -> String {
        self.url(self.proxy.ro_port())
    }

    /// The proxy's admin base URL (`/metrics`, `/status`).
    pub fn proxy_admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.proxy.admin_port())
    }

    pub fn state(&self) -> &StackState {
        &self.state
    }

    /// Whether this run resumed an existing stack directory.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    pub fn dir(&self) -> &Path {
        self.sandbox.path()
    }

    pub fn etcd(&self) -> &EtcdCluster {
        &self.etcd
    }

    pub fn agents(&self) -> &[AgentNode] {
        &self.agents
    }

    pub fn agent_mut(&mut self, i: usize) -> &mut AgentNode {
        &mut self.agents[i]
    }

    pub fn proxy(&self) -> &ProxyNode {
        &self.proxy
    }

    pub fn proxy_mut(&mut self) -> &mut ProxyNode {
        &mut self.proxy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        assert_eq!(StackState::load(&path).unwrap(), None);
        let s = StackState {
            cluster: "pgha".into(),
            password: random_password().unwrap(),
            synchronous: true,
            pool_mode: "transaction".into(),
            etcd: vec![(2379, 2380)],
            nodes: vec![(5433, 8008), (5434, 8009)],
            proxy: (6432, 6433, 9930),
        };
        s.save(&path).unwrap();
        assert_eq!(StackState::load(&path).unwrap(), Some(s));
    }

    #[test]
    fn passwords_are_random_and_long() {
        let a = random_password().unwrap();
        assert_eq!(a.len(), 36);
        assert_ne!(a, random_password().unwrap());
    }
}
