//! An etcd cluster of one or more members on loopback.
//!
//! Members get their own client and peer ports and data directories, and one
//! `--initial-cluster` naming all of them, as a real deployment would. A
//! member can be killed, frozen (SIGSTOP), restarted on its old data, and the
//! cluster reports the endpoints that are meant to be up.

use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::{reserve_port, wait_until, Error, Port, Proc, Sandbox, StopSignal};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One etcd member.
#[derive(Debug)]
pub struct EtcdMember {
    name: String,
    client: Port,
    peer: Port,
    data_dir: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl EtcdMember {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client_port(&self) -> u16 {
        self.client.get()
    }

    pub fn peer_port(&self) -> u16 {
        self.peer.get()
    }

    /// `http://127.0.0.1:<port>`.
    pub fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client.get())
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer.get())
    }

    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// GET /health: true when this member is up and the cluster has a leader.
    pub fn healthy(&self) -> Result<bool, String> {
        let (_, body) = crate::agent::http_request(self.client.get(), "GET", "/health", None, "")
            .map_err(|e| e.to_string())?;
        Ok(body.contains(r#""health":"true""#))
    }
}

/// A running etcd cluster; every member is stopped on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    _sandbox: Sandbox,
    members: Vec<EtcdMember>,
    initial_cluster: String,
    token: String,
}

impl EtcdCluster {
    /// Starts `size` members on free ports and waits until the cluster is healthy.
    pub fn start(sandbox: &Sandbox, size: usize) -> Result<EtcdCluster, Error> {
        let ports = (0..size)
            .map(|_| Ok((reserve_port()?, reserve_port()?)))
            .collect::<Result<Vec<_>, Error>>()?;
        Self::start_on(sandbox, ports)
    }

    /// Starts one member per (client, peer) port pair, in the sandbox's
    /// `etcd<i>` directories: on existing data, the members resume their
    /// cluster (its peer URLs are in the data, so the ports must not change).
    pub fn start_on(sandbox: &Sandbox, ports: Vec<(Port, Port)>) -> Result<EtcdCluster, Error> {
        let bin = which("etcd")?;
        let size = ports.len();
        let mut members = Vec::with_capacity(size);
        for (i, (client, peer)) in ports.into_iter().enumerate() {
            let name = format!("etcd{}", i + 1);
            let dir = sandbox.subdir(&name)?;
            members.push(EtcdMember {
                log: dir.join("etcd.log"),
                data_dir: dir.join("data"),
                name,
                client,
                peer,
                proc: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        // Unique per sandbox, so members of different runs never join each other.
        let token = sandbox
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pgha".into());
        let mut cluster = EtcdCluster {
            _sandbox: sandbox.clone(),
            members,
            initial_cluster,
            token,
        };
        for i in 0..size {
            cluster.spawn(i, &bin)?;
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize, bin: &std::path::Path) -> Result<(), Error> {
        let m = &self.members[i];
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(m.client_url())
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            // Keep the default 100ms heartbeat / 1s election: realistic and
            // robust on a loaded 2-core machine.
            .env_remove("ETCDCTL_API");
        let proc = Proc::spawn(&m.name, cmd, &m.log, None, StopSignal::Term)?;
        self.members[i].proc = Some(proc);
        Ok(())
    }

    /// Waits until every running member answers /health with a leader.
    pub fn wait_healthy(&mut self) -> Result<(), Error> {
        let members = &mut self.members;
        wait_until("etcd cluster healthy", START_TIMEOUT, || {
            for m in members.iter_mut() {
                let Some(p) = m.proc.as_mut() else { continue };
                if let Some(e) = p.exited_error() {
                    return Err(e.into());
                }
                if !m.healthy()? {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
    }

    pub fn members(&self) -> &[EtcdMember] {
        &self.members
    }

    pub fn member(&self, i: usize) -> &EtcdMember {
        &self.members[i]
    }

    /// Client URLs of every member, running or not (as a client would be configured).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::client_url).collect()
    }

    /// Endpoints joined with commas, for `--etcd` style flags.
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// SIGKILL member `i`; its exit status, or `None` if it was not running.
    pub fn kill(&mut self, i: usize) -> Result<Option<ExitStatus>, Error> {
        match self.members[i].proc.take() {
            Some(mut p) => p.kill().map(Some),
            None => Ok(None),
        }
    }

    /// Freezes member `i` (SIGSTOP): it holds its sockets but answers nothing.
    pub fn pause(&self, i: usize) -> Result<(), Error> {
        self.proc(i)?.pause()
    }

    /// Thaws member `i`.
    pub fn resume(&self, i: usize) -> Result<(), Error> {
        self.proc(i)?.resume()
    }

    fn proc(&self, i: usize) -> Result<&Proc, Error> {
        self.members[i].proc.as_ref().ok_or_else(|| Error::Command {
            what: format!("signal {}", self.members[i].name),
            detail: "not running".into(),
        })
    }

    /// Stops every member and gives back their (client, peer) ports, still
    /// held, so the cluster can start again on them with [`Self::start_on`].
    pub fn stop(self) -> Vec<(Port, Port)> {
        self.members
            .into_iter()
            .map(|mut m| {
                drop(m.proc.take());
                (m.client, m.peer)
            })
            .collect()
    }

    /// Starts a killed member again on its existing data.
    pub fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.kill(i)?;
        self.spawn(i, &which("etcd")?)?;
        self.wait_healthy()
    }
}

/// Finds a program on PATH or in the usual system directories.
pub(crate) fn which(prog: &str) -> Result<PathBuf, Error> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Missing(prog.to_owned()))
}
