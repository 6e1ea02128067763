//! Patroni (Debian's package) nodes: the peer orchestrator the failover
//! benchmark measures pgha-agent against, on the same machine and the same
//! harness etcd.
//!
//! Patroni starts postgres itself, so a node is two things to stop: the
//! patroni process group and the postmaster named in `postmaster.pid`. Both
//! are killed on drop.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::etcd::which;
use crate::{pg_bin_dir, reserve_port, Error, EtcdCluster, Port, Proc, RunAs, Sandbox, StopSignal};

/// Patroni's dynamic timing settings (seconds), written into bootstrap.dcs.
#[derive(Debug, Clone, Copy)]
pub struct PatroniTiming {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
}

impl PatroniTiming {
    /// Patroni's own defaults.
    pub const DEFAULTS: PatroniTiming = PatroniTiming {
        ttl: 30,
        loop_wait: 10,
        retry_timeout: 10,
    };
    /// Its smallest allowed ttl, with loop_wait + 2 x retry_timeout <= ttl.
    pub const FASTEST: PatroniTiming = PatroniTiming {
        ttl: 20,
        loop_wait: 5,
        retry_timeout: 5,
    };
}

/// One Patroni-managed PostgreSQL node.
#[derive(Debug)]
pub struct PatroniNode {
    name: String,
    _sandbox: Sandbox,
    dir: PathBuf,
    pg_port: Port,
    api_port: Port,
    proc: Option<Proc>,
    user: RunAs,
}

impl PatroniNode {
    /// Writes the node's config and starts patroni (which bootstraps or
    /// clones postgres on its own).
    pub fn start(
        sandbox: &Sandbox,
        name: &str,
        cluster: &str,
        etcd: &EtcdCluster,
        timing: PatroniTiming,
    ) -> Result<PatroniNode, Error> {
        let user = RunAs::for_postgres()?;
        let dir = sandbox.subdir(name)?;
        fs::create_dir_all(dir.join("sock")).map_err(Error::io("create socket dir"))?;
        let mut node = PatroniNode {
            name: name.to_owned(),
            _sandbox: sandbox.clone(),
            dir,
            pg_port: reserve_port()?,
            api_port: reserve_port()?,
            proc: None,
            user,
        };
        let hosts = etcd
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_owned())
            .collect::<Vec<_>>()
            .join(",");
        let conf = node.config(cluster, &hosts, timing)?;
        fs::write(node.dir.join("patroni.yml"), conf).map_err(Error::io("write patroni.yml"))?;
        node.user.own(&node.dir)?;
        node.spawn()?;
        Ok(node)
    }

    fn config(&self, cluster: &str, hosts: &str, t: PatroniTiming) -> Result<String, Error> {
        let bin = pg_bin_dir()?;
        let d = self.dir.display();
        Ok(format!(
            "scope: {cluster}
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: {hosts}
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry}
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_log_hints: 'on'
        fsync: 'off'
        shared_buffers: 32MB
  initdb:
  - encoding: UTF8
  - data-checksums
  - locale: C
  pg_hba:
  - host replication all 127.0.0.1/32 trust
  - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg}
  connect_address: 127.0.0.1:{pg}
  data_dir: {d}/data
  bin_dir: {bin}
  pgpass: {d}/pgpass
  authentication:
    superuser:
      username: postgres
      password: postgres
    replication:
      username: postgres
      password: postgres
    rewind:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: {d}/sock
log:
  level: INFO
",
            name = self.name,
            api = self.api_port.get(),
            pg = self.pg_port.get(),
            ttl = t.ttl,
            loop_wait = t.loop_wait,
            retry = t.retry_timeout,
            bin = bin.display(),
        ))
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let mut cmd = Command::new(which("patroni")?);
        cmd.arg(self.dir.join("patroni.yml"));
        self.proc = Some(Proc::spawn(
            &format!("patroni {}", self.name),
            cmd,
            &self.dir.join("patroni.log"),
            Some(&self.user),
            StopSignal::Term,
        )?);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pg_port(&self) -> u16 {
        self.pg_port.get()
    }

    pub fn api_port(&self) -> u16 {
        self.api_port.get()
    }

    /// The postmaster's pid from `postmaster.pid`, if postgres runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        crate::postgres::postmaster_pid(&self.dir.join("data"))
    }

    fn kill_postgres(&self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// SIGKILL patroni and its postgres, as a lost machine.
    pub fn kill(&mut self) -> Result<(), Error> {
        let pm = self.postmaster_pid();
        if let Some(mut p) = self.proc.take() {
            p.kill()?;
        }
        self.kill_postgres();
        if let Some(pid) = pm {
            crate::wait_until("killed postmaster gone", Duration::from_secs(10), || {
                Ok(nix::sys::signal::kill(Pid::from_raw(pid), None)
                    .is_err()
                    .then_some(()))
            })?;
        }
        Ok(())
    }

    /// Starts patroni again on the node's existing data (it rejoins).
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill()?;
        self.spawn()
    }
}

impl Drop for PatroniNode {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.stop(Duration::from_secs(10));
        }
        self.kill_postgres();
    }
}
