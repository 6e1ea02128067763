//! `pgha-agent` processes for tests, benchmarks and `pgha up`.
//!
//! [`AgentNode::start`] reserves ports for postgres and the REST API, writes
//! the agent's TOML config into the node's directory and starts the agent as
//! the unprivileged postgres user (the agent starts postgres itself). The
//! handle can kill, freeze and thaw the agent and, separately, its postgres
//! (found through `postmaster.pid`), and runs SQL with the test password.
//! Dropping it stops the agent and anything left of its postgres.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::etcd::EtcdCluster;
use crate::process::run;
use crate::{claim_port, reserve_port, Error, Port, Proc, RunAs, Sandbox, StopSignal};

/// The password every role gets in harness clusters.
pub const TEST_PASSWORD: &str = "pgha-test-secret";

/// Per-agent options.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Cluster name (default `test`).
    pub cluster: Option<String>,
    pub nofailover: bool,
    pub nosync: bool,
    /// Default 1.
    pub failover_priority: Option<u32>,
    /// Extra lines for the `[bootstrap]` table (dynamic settings).
    pub bootstrap: Vec<String>,
    /// Extra environment for the agent process.
    pub env: Vec<(String, String)>,
    /// (postgres, REST API) ports to claim; `None`: free ones.
    pub ports: Option<(u16, u16)>,
    /// Password of every role and of the REST API (default [`TEST_PASSWORD`]).
    pub password: Option<String>,
}

/// One running `pgha-agent` and the postgres it manages.
#[derive(Debug)]
pub struct AgentNode {
    name: String,
    _sandbox: Sandbox,
    dir: PathBuf,
    pg_port: Port,
    api_port: Port,
    binary: PathBuf,
    user: RunAs,
    env: Vec<(String, String)>,
    password: String,
    proc: Option<Proc>,
}

impl AgentNode {
    /// Writes the config and starts the agent (does not wait for postgres).
    pub fn start(
        sandbox: &Sandbox,
        etcd: &EtcdCluster,
        name: &str,
        binary: &Path,
        opts: &AgentOptions,
    ) -> Result<AgentNode, Error> {
        let user = RunAs::for_postgres()?;
        let dir = sandbox.subdir(name)?;
        let mut node = AgentNode {
            name: name.to_owned(),
            _sandbox: sandbox.clone(),
            dir,
            pg_port: match opts.ports {
                Some((pg, _)) => claim_port(pg)?,
                None => reserve_port()?,
            },
            api_port: match opts.ports {
                Some((_, api)) => claim_port(api)?,
                None => reserve_port()?,
            },
            binary: binary.to_owned(),
            user,
            env: opts.env.clone(),
            password: opts
                .password
                .clone()
                .unwrap_or_else(|| TEST_PASSWORD.to_owned()),
            proc: None,
        };
        let config = node.config_text(etcd, opts);
        std::fs::write(node.config_path(), config).map_err(Error::io("write agent config"))?;
        node.user.own(&node.dir)?;
        node.spawn()?;
        Ok(node)
    }

    fn config_text(&self, etcd: &EtcdCluster, opts: &AgentOptions) -> String {
        let eps = etcd
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let bin = crate::pg_bin_dir().unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
        let pw = &self.password;
        format!(
            "name = {name:?}\ncluster = {cluster:?}\netcd_endpoints = [{eps}]\n\
             [postgres]\ndata_dir = {data:?}\nbin_dir = {bin:?}\nlisten = \"127.0.0.1:{pg}\"\n\
             [api]\nlisten = \"127.0.0.1:{api}\"\npassword = {pw:?}\n\
             [auth]\nsuperuser = {{ username = \"postgres\", password = {pw:?} }}\n\
             replication = {{ username = \"replicator\", password = {pw:?} }}\n\
             rewind = {{ username = \"rewind_user\", password = {pw:?} }}\n\
             app = {{ username = \"app\", password = {pw:?} }}\n\
             [tags]\nnofailover = {nf}\nnosync = {ns}\nfailover_priority = {prio}\n\
             [bootstrap]\n{boot}\n\
             [bootstrap.postgresql_parameters]\nfsync = \"off\"\nshared_buffers = \"32MB\"\n",
            name = self.name,
            cluster = opts.cluster.as_deref().unwrap_or("test"),
            data = self.data_dir(),
            pg = self.pg_port.get(),
            api = self.api_port.get(),
            nf = opts.nofailover,
            ns = opts.nosync,
            prio = opts.failover_priority.unwrap_or(1),
            boot = opts.bootstrap.join("\n"),
        )
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config").arg(self.config_path());
        cmd.env("RUST_LOG", "info,pgha_orchestrator=debug");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let log = self.dir.join("agent.log");
        self.proc = Some(Proc::spawn(
            &format!("pgha-agent {}", self.name),
            cmd,
            &log,
            Some(&self.user),
            StopSignal::Term,
        )?);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn pg_port(&self) -> u16 {
        self.pg_port.get()
    }

    /// `http://127.0.0.1:<port>` of the REST API.
    pub fn api_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port.get())
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    /// Whether the agent process is alive.
    pub fn agent_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(|p| p.try_exit().is_none())
    }

    /// SIGKILL the agent only (its postgres keeps running).
    pub fn kill_agent(&mut self) -> Result<(), Error> {
        if let Some(mut p) = self.proc.take() {
            p.signal(Signal::SIGKILL)?;
            p.wait_exit(Duration::from_secs(10))?;
        }
        Ok(())
    }

    /// SIGTERM the agent and wait for its graceful exit.
    pub fn stop_agent(&mut self) -> Result<(), Error> {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(60))?;
        }
        Ok(())
    }

    /// Starts the agent again on the same config and data.
    pub fn restart_agent(&mut self) -> Result<(), Error> {
        self.kill_agent()?;
        self.spawn()
    }

    pub fn pause_agent(&self) -> Result<(), Error> {
        self.agent()?.signal(Signal::SIGSTOP)
    }

    pub fn resume_agent(&self) -> Result<(), Error> {
        self.agent()?.signal(Signal::SIGCONT)
    }

    fn agent(&self) -> Result<&Proc, Error> {
        self.proc.as_ref().ok_or_else(|| Error::Command {
            what: format!("signal agent {}", self.name),
            detail: "not running".into(),
        })
    }

    /// The running postmaster's pid, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Option<i32> {
        crate::postgres::postmaster_pid(&self.data_dir())
    }

    /// Sends `sig` to the postmaster; error if postgres is not running.
    pub fn signal_postgres(&self, sig: Signal) -> Result<i32, Error> {
        let pid = self.postmaster_pid().ok_or_else(|| Error::Command {
            what: format!("signal postgres of {}", self.name),
            detail: "not running".into(),
        })?;
        kill(Pid::from_raw(pid), sig).map_err(|e| Error::Command {
            what: format!("send {sig} to postmaster {pid}"),
            detail: e.to_string(),
        })?;
        Ok(pid)
    }

    /// SIGKILL the postmaster, as a crash would; returns its pid.
    pub fn kill_postgres(&self) -> Result<i32, Error> {
        self.signal_postgres(Signal::SIGKILL)
    }

    /// Runs `sql` in database `postgres` as superuser; unaligned, tuples only.
    pub fn psql(&self, sql: &str) -> Result<String, Error> {
        psql_with(self.pg_port(), "postgres", "postgres", &self.password, sql)
    }

    /// `Ok(true)` when postgres answers and is not in recovery.
    pub fn is_writable(&self) -> Result<bool, Error> {
        Ok(self.psql("select not pg_is_in_recovery()")? == "t")
    }

    /// GET `path` on the REST API: (status, body).
    pub fn api_get(&self, path: &str) -> Result<(u16, String), Error> {
        http_request(self.api_port.get(), "GET", path, None, "")
    }

    /// POST/PATCH `path` with `body`, with or without the test credentials.
    pub fn api_send(
        &self,
        method: &str,
        path: &str,
        body: &str,
        authenticated: bool,
    ) -> Result<(u16, String), Error> {
        let auth = authenticated.then(|| format!("pgha:{}", self.password));
        http_request(self.api_port.get(), method, path, auth.as_deref(), body)
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        let _ = self.stop_agent();
        if let Some(pid) = self.postmaster_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
            let _ = crate::wait_until("postmaster exit", Duration::from_secs(10), || {
                Ok(kill(Pid::from_raw(pid), None).is_err().then_some(()))
            });
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// psql as superuser with the test password against 127.0.0.1:`port`.
pub fn psql(port: u16, sql: &str) -> Result<String, Error> {
    psql_with(port, "postgres", "postgres", TEST_PASSWORD, sql)
}

/// psql as `user` with `password` into `db` on 127.0.0.1:`port`;
/// unaligned, tuples only, failing on the first SQL error.
pub fn psql_with(
    port: u16,
    user: &str,
    db: &str,
    password: &str,
    sql: &str,
) -> Result<String, Error> {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user])
        .args(["-d", db, "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "3");
    Ok(run(&format!("psql -c {sql:?}"), cmd, None)?
        .trim()
        .to_owned())
}

/// A minimal HTTP/1.0 request on loopback: (status, body).
pub(crate) fn http_request(
    port: u16,
    method: &str,
    path: &str,
    basic_auth: Option<&str>,
    body: &str,
) -> Result<(u16, String), Error> {
    use std::io::{Read, Write};
    let err = |detail: String| Error::Command {
        what: format!("{method} {path} on 127.0.0.1:{port}"),
        detail,
    };
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| err(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| err(e.to_string()))?;
    let auth = basic_auth
        .map(|a| {
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(a);
            format!("Authorization: Basic {token}\r\n")
        })
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| err(e.to_string()))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| err(e.to_string()))?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| err(format!("no status line in {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
