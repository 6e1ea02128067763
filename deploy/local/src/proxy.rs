//! `pgha-proxy` processes for end-to-end tests, benchmarks and `pgha up`.
//!
//! [`ProxyNode::start`] writes the proxy's TOML config and users file into
//! its directory and starts the binary; the proxy learns the leader from
//! etcd (or from static backends, for benchmarks against one server).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{claim_port, reserve_port, wait_until, Error, Port, Proc, Sandbox, StopSignal};

/// Where the proxy's routing table comes from.
#[derive(Debug, Clone)]
pub enum ProxyBackends {
    /// Watch the cluster's keys in etcd.
    Etcd {
        endpoints: Vec<String>,
        cluster: String,
    },
    /// One primary, no etcd.
    StaticPrimary { port: u16 },
}

/// Options for one proxy.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub id: String,
    pub backends: ProxyBackends,
    /// `transaction` or `session`.
    pub pool_mode: String,
    pub pool_size: u32,
    /// `scram-sha-256`, `md5` or `trust`.
    pub auth_method: String,
    /// (user, password) pairs for the users file.
    pub users: Vec<(String, String)>,
    /// (read-write, read-only, admin) ports to claim; `None`: free ones.
    pub ports: Option<(u16, u16, u16)>,
    /// More top-level config lines, e.g. `max_client_conn = 20000`.
    pub extra_config: Vec<String>,
}

/// A running `pgha-proxy`; stopped on drop.
#[derive(Debug)]
pub struct ProxyNode {
    _sandbox: Sandbox,
    dir: PathBuf,
    binary: PathBuf,
    rw: Port,
    ro: Port,
    admin: Port,
    proc: Option<Proc>,
}

impl ProxyNode {
    /// Writes the config and starts the proxy; waits until it listens.
    pub fn start(
        sandbox: &Sandbox,
        name: &str,
        binary: &Path,
        opts: &ProxyOptions,
    ) -> Result<ProxyNode, Error> {
        let dir = sandbox.subdir(name)?;
        let (rw, ro, admin) = match opts.ports {
            Some((rw, ro, admin)) => (claim_port(rw)?, claim_port(ro)?, claim_port(admin)?),
            None => (reserve_port()?, reserve_port()?, reserve_port()?),
        };
        let mut node = ProxyNode {
            _sandbox: sandbox.clone(),
            dir,
            binary: binary.to_owned(),
            rw,
            ro,
            admin,
            proc: None,
        };
        let users: String = opts
            .users
            .iter()
            .map(|(u, p)| format!("{u:?} {p:?}\n"))
            .collect();
        std::fs::write(node.dir.join("users.txt"), users).map_err(Error::io("write users"))?;
        std::fs::write(node.config_path(), node.config_text(opts))
            .map_err(Error::io("write proxy config"))?;
        node.start_again()?;
        Ok(node)
    }

    fn config_text(&self, opts: &ProxyOptions) -> String {
        let backends = match &opts.backends {
            ProxyBackends::Etcd { endpoints, cluster } => {
                format!("[etcd]\nendpoints = {endpoints:?}\ncluster = {cluster:?}\n")
            }
            ProxyBackends::StaticPrimary { port } => {
                format!("[[backends]]\nname = \"primary\"\nport = {port}\nrole = \"primary\"\n")
            }
        };
        format!(
            "id = {id:?}\nlisten_rw = \"127.0.0.1:{rw}\"\nlisten_ro = \"127.0.0.1:{ro}\"\n\
             listen_admin = \"127.0.0.1:{admin}\"\n\
             pool_mode = {mode:?}\npool_size = {size}\nauth_method = {auth:?}\n\
             {users}{extra}{backends}",
            id = opts.id,
            rw = self.rw.get(),
            ro = self.ro.get(),
            admin = self.admin.get(),
            mode = opts.pool_mode,
            size = opts.pool_size,
            auth = opts.auth_method,
            users = if opts.users.is_empty() {
                ""
            } else {
                "users_file = \"users.txt\"\n"
            },
            extra = opts
                .extra_config
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
    }

    /// Starts the proxy process (again) with its existing config.
    pub fn start_again(&mut self) -> Result<(), Error> {
        self.proc = None;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config").arg(self.config_path());
        let proc = Proc::spawn(
            "pgha-proxy",
            cmd,
            &self.dir.join("proxy.log"),
            None,
            StopSignal::Term,
        )?;
        let proc = self.proc.insert(proc);
        let rw = self.rw.get();
        wait_until("pgha-proxy to listen", Duration::from_secs(30), || {
            if let Some(e) = proc.exited_error() {
                return Err(e.into());
            }
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], rw));
            Ok(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| ()),
            )
        })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("proxy.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("proxy.log")
    }

    pub fn rw_port(&self) -> u16 {
        self.rw.get()
    }

    pub fn ro_port(&self) -> u16 {
        self.ro.get()
    }

    pub fn admin_port(&self) -> u16 {
        self.admin.get()
    }

    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    /// SIGKILL the proxy.
    pub fn kill(&mut self) -> Result<(), Error> {
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        Ok(())
    }
}
