//! `postgres`: the local PostgreSQL server: process control, the agent-managed
//! configuration file, and probes.
//!
//! The agent starts `postgres` itself as a child (its own process group, so a
//! signal meant for the agent does not reach it) and so sees a crash the
//! moment it happens. Every setting the agent manages lives in one file,
//! `postgresql.pgha.conf`, included from `postgresql.conf` and rewritten
//! before each start; pg_basebackup and pg_rewind copy the leader's files, so
//! they are rewritten after those too. May run postgres binaries and connect
//! to the local server; knows nothing about etcd.

mod create;
mod sql;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgha_cluster::ClusterConfig;
use tokio::process::{Child, Command};

use crate::config::AgentConfig;
use crate::ha::{DataDir, StopMode};

pub use create::{ControlData, ReplicaMethod};
pub use sql::{connect, current_lsn, probe, Probe};

/// A postgres operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("sql {what}: {source}")]
    Sql {
        what: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

impl PgError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
        let what = what.into();
        move |source| PgError::Io { what, source }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            PgError::Io { .. } => "io",
            PgError::Command { .. } => "command",
            PgError::Sql { .. } => "sql",
            PgError::Timeout(..) => "timeout",
        }
    }
}

/// Where this node replicates from, as written into the managed config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub leader: String,
    pub host: String,
    pub port: u16,
}

/// How the node should run on the next start or reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunRole {
    Primary,
    /// Read-only; streams from `upstream` when there is one.
    Replica {
        upstream: Option<Upstream>,
    },
}

/// The local server and what the agent last configured on it.
pub struct Postgres {
    cfg: Arc<AgentConfig>,
    child: Option<Child>,
    role: RunRole,
    sync_names: Vec<String>,
    params: ClusterConfig,
}

impl Postgres {
    pub fn new(cfg: Arc<AgentConfig>) -> Postgres {
        Postgres {
            cfg,
            child: None,
            role: RunRole::Replica { upstream: None },
            sync_names: Vec::new(),
            params: ClusterConfig::default(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.cfg.postgres.data_dir
    }

    fn bin(&self, prog: &str) -> PathBuf {
        self.cfg.postgres.bin_dir.join(prog)
    }

    fn log_path(&self) -> PathBuf {
        let mut p = self.data_dir().as_os_str().to_owned();
        p.push(".log");
        PathBuf::from(p)
    }

    /// The leader this node streams from, as configured.
    pub fn following(&self) -> Option<String> {
        match &self.role {
            RunRole::Replica {
                upstream: Some(u), ..
            } => Some(u.leader.clone()),
            _ => None,
        }
    }

    /// `synchronous_standby_names` as last set, as member names.
    pub fn sync_names(&self) -> &[String] {
        &self.sync_names
    }

    /// Whether our child postmaster is alive (reaps it if it died).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    tracing::warn!(%status, "postgres exited");
                    self.child = None;
                    false
                }
                Err(_) => false,
            },
            None => false,
        }
    }

    /// Resolves when our running postmaster exits; never if none is running.
    pub async fn exited(&mut self) {
        if !self.is_running() {
            return std::future::pending().await;
        }
        while self.is_running() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A postmaster left over from an earlier agent (pid from postmaster.pid).
    pub fn stray_postmaster(&self) -> Option<i32> {
        postmaster_pid(self.data_dir())
    }

    /// Stops a postmaster this agent did not start, so it can take control.
    pub async fn stop_stray(&mut self) -> Result<(), PgError> {
        if let Some(pid) = self.stray_postmaster() {
            tracing::warn!(pid, "stopping a postmaster left by an earlier agent");
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
            let gone = wait_pid_gone(pid, Duration::from_secs(30)).await;
            if !gone {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        Ok(())
    }

    /// Reads the data directory's state with pg_controldata (postgres down).
    pub async fn data_state(&self) -> DataDir {
        if !self.data_dir().join("PG_VERSION").exists() {
            return DataDir::Missing;
        }
        if self.data_dir().join("standby.signal").exists() {
            return DataDir::Standby;
        }
        match self.controldata().await {
            Ok(cd) if cd.state.contains("recovery") => DataDir::Standby,
            _ => DataDir::WasPrimary,
        }
    }

    /// Sets the cluster-wide parameters used on the next config write.
    pub fn set_params(&mut self, params: &ClusterConfig) {
        self.params = params.clone();
    }

    /// Writes the managed config for `role` and starts postgres, waiting up
    /// to `timeout` until it accepts connections.
    pub async fn start(&mut self, role: RunRole, timeout: Duration) -> Result<(), PgError> {
        if self.is_running() {
            self.stop(StopMode::Fast).await?;
        }
        self.role = role;
        self.write_conf()?;
        let standby = self.data_dir().join("standby.signal");
        match self.role {
            RunRole::Primary => {
                let _ = std::fs::remove_file(&standby);
            }
            RunRole::Replica { .. } => {
                std::fs::write(&standby, b"").map_err(PgError::io("write standby.signal"))?
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(PgError::io("open postgres log"))?;
        let err = log.try_clone().map_err(PgError::io("dup log fd"))?;
        let mut cmd = Command::new(self.bin("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .process_group(0);
        die_with_agent(&mut cmd);
        let child = cmd.spawn().map_err(PgError::io("spawn postgres"))?;
        tracing::info!(pid = child.id(), role = ?self.role, "postgres started");
        self.child = Some(child);
        self.wait_ready(timeout).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), PgError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return Err(PgError::Command {
                    what: "start postgres".into(),
                    detail: format!("exited during start; see {:?}", self.log_path()),
                });
            }
            if self.connect().await.is_ok() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(PgError::Timeout(timeout, "postgres to accept connections"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops postgres (`Fast`: clean, standbys get all WAL; `Immediate`: now).
    pub async fn stop(&mut self, mode: StopMode) -> Result<(), PgError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let Some(pid) = child.id() else {
            return Ok(());
        };
        let sig = match mode {
            StopMode::Fast => Signal::SIGINT,
            StopMode::Immediate => Signal::SIGQUIT,
        };
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(pid as i32), sig);
        let grace = match mode {
            StopMode::Fast => Duration::from_secs(60),
            StopMode::Immediate => Duration::from_secs(5),
        };
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = child.wait().await;
        }
        tracing::info!(?mode, "postgres stopped");
        Ok(())
    }

    /// Re-points a running replica at `upstream` with a reload (no restart).
    pub async fn follow(&mut self, upstream: Upstream) -> Result<(), PgError> {
        self.role = RunRole::Replica {
            upstream: Some(upstream),
        };
        self.write_conf()?;
        self.reload().await
    }

    /// Sets `synchronous_standby_names` (member names; `*` for any) and reloads.
    pub async fn set_sync_names(&mut self, names: Vec<String>) -> Result<(), PgError> {
        self.sync_names = names;
        self.write_conf()?;
        self.reload().await
    }

    /// Marks the node as primary in the managed config (after promotion).
    pub fn mark_primary(&mut self) -> Result<(), PgError> {
        self.role = RunRole::Primary;
        self.write_conf()
    }

    /// SIGHUP to the postmaster: re-read the configuration.
    pub async fn reload(&mut self) -> Result<(), PgError> {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            kill(Pid::from_raw(pid as i32), Signal::SIGHUP).map_err(|e| PgError::Command {
                what: "reload postgres".into(),
                detail: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Rewrites `postgresql.pgha.conf` from the agent config and current role.
    fn write_conf(&self) -> Result<(), PgError> {
        let text = managed_conf(&self.cfg, &self.role, &self.sync_names, &self.params);
        let path = self.data_dir().join("postgresql.pgha.conf");
        std::fs::write(&path, text).map_err(PgError::io(format!("write {path:?}")))?;
        let main = self.data_dir().join("postgresql.conf");
        let current =
            std::fs::read_to_string(&main).map_err(PgError::io("read postgresql.conf"))?;
        if !current.contains("include_if_exists = 'postgresql.pgha.conf'") {
            std::fs::write(
                &main,
                format!("{current}\n# settings managed by pgha-agent\ninclude_if_exists = 'postgresql.pgha.conf'\n"),
            )
            .map_err(PgError::io("write postgresql.conf"))?;
        }
        Ok(())
    }
}

/// The live postmaster of `data_dir`, from the first line of its
/// `postmaster.pid`.
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    kill(Pid::from_raw(pid), None).ok().map(|_| pid)
}

/// The slot a member streams through: lowercase, `[a-z0-9_]` only.
pub fn slot_name(member: &str) -> String {
    member
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

/// The text of `postgresql.pgha.conf`.
fn managed_conf(
    cfg: &AgentConfig,
    role: &RunRole,
    sync_names: &[String],
    params: &ClusterConfig,
) -> String {
    let listen = cfg.postgres.listen;
    let mut s = format!(
        "# written by pgha-agent before every start; do not edit\n\
         listen_addresses = '{}'\nport = {}\nunix_socket_directories = ''\n\
         cluster_name = '{}'\nwal_level = replica\nhot_standby = on\n\
         max_wal_senders = 10\nmax_replication_slots = 10\nwal_keep_size = '256MB'\n\
         wal_log_hints = on\npassword_encryption = 'scram-sha-256'\n\
         recovery_target_timeline = 'latest'\nwal_receiver_status_interval = '1s'\n\
         wal_retrieve_retry_interval = '1s'\n",
        listen.ip(),
        listen.port(),
        cfg.name
    );
    let ssn = match sync_names {
        [] => String::new(),
        [star] if star == "*" => "*".into(),
        names => format!(
            "FIRST {} ({})",
            names.len(),
            names
                .iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    s.push_str(&format!("synchronous_standby_names = '{ssn}'\n"));
    if let RunRole::Replica {
        upstream: Some(u), ..
    } = role
    {
        let r = &cfg.auth.replication;
        s.push_str(&format!(
            "primary_conninfo = 'host={} port={} user={} password={} application_name={} \
             connect_timeout=2 keepalives_idle=2 keepalives_interval=1 keepalives_count=3'\n\
             primary_slot_name = '{}'\n",
            u.host,
            u.port,
            r.username,
            r.password,
            cfg.name,
            slot_name(&cfg.name)
        ));
    }
    for (k, v) in &params.postgresql_parameters {
        s.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
    }
    s
}

/// The postmaster gets SIGQUIT (immediate shutdown, backends included) when
/// the agent dies: a primary whose agent is gone can no longer renew the
/// leader key, so it must not keep accepting writes (invariant 1). Tied to
/// the spawning thread, which is a runtime thread living as long as the agent.
#[allow(unsafe_code)]
fn die_with_agent(cmd: &mut Command) {
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGQUIT)?;
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

async fn wait_pid_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while kill(Pid::from_raw(pid), None).is_ok() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_valid_postgres_identifiers() {
        assert_eq!(slot_name("Node-1.a"), "node_1_a");
    }

    #[test]
    fn replica_conf_streams_through_its_slot_and_names_itself() {
        let cfg = AgentConfig {
            name: "n-2".into(),
            ..AgentConfig::default()
        };
        let up = Upstream {
            leader: "n-1".into(),
            host: "10.0.0.1".into(),
            port: 5433,
        };
        let text = managed_conf(
            &cfg,
            &RunRole::Replica { upstream: Some(up) },
            &["n-3".into()],
            &ClusterConfig::default(),
        );
        assert!(text.contains("host=10.0.0.1 port=5433"), "{text}");
        assert!(text.contains("application_name=n-2"), "{text}");
        assert!(text.contains("primary_slot_name = 'n_2'"), "{text}");
        assert!(
            text.contains(r#"synchronous_standby_names = 'FIRST 1 ("n-3")'"#),
            "{text}"
        );
        let primary = managed_conf(&cfg, &RunRole::Primary, &[], &ClusterConfig::default());
        assert!(!primary.contains("primary_conninfo"), "{primary}");
    }
}
