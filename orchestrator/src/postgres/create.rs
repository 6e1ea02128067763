//! Creating and repairing a data directory: initdb, replica creation
//! (pg_basebackup; the [`ReplicaMethod`] seam admits others, e.g. a restore
//! from the backup repository), pg_rewind, pg_controldata.

use std::path::Path;
use std::process::Stdio;

use pgha_cluster::Lsn;
use tokio::process::Command;

use super::{PgError, Postgres, RunRole, Upstream};

/// How a replica's data directory is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReplicaMethod {
    /// Stream a copy from the leader with pg_basebackup.
    #[default]
    Basebackup,
}

/// What pg_controldata says about a stopped data directory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ControlData {
    /// "Database cluster state", e.g. `shut down in recovery`.
    pub state: String,
    pub timeline: Option<u32>,
    pub checkpoint: Option<Lsn>,
}

/// Runs a command to completion, failing with its output.
async fn run(what: &str, cmd: &mut Command) -> Result<String, PgError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(PgError::io(format!("run {what}")))?;
    if !out.status.success() {
        return Err(PgError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ),
        });
    }
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

impl Postgres {
    pub async fn controldata(&self) -> Result<ControlData, PgError> {
        let out = run(
            "pg_controldata",
            Command::new(self.bin("pg_controldata")).arg(self.data_dir()),
        )
        .await?;
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_owned())
        };
        Ok(ControlData {
            state: field("Database cluster state").unwrap_or_default(),
            timeline: field("Latest checkpoint's TimeLineID").and_then(|t| t.parse().ok()),
            checkpoint: field("Latest checkpoint location").and_then(|l| l.parse().ok()),
        })
    }

    /// initdb with data checksums and SCRAM, our pg_hba, then start as
    /// primary and create the roles. The caller holds `initialize`.
    pub async fn bootstrap(&mut self, timeout: std::time::Duration) -> Result<(), PgError> {
        let dir = self.data_dir().to_owned();
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(PgError::io("remove stale data dir"))?;
        }
        let pwfile = dir.with_extension("pw");
        std::fs::write(&pwfile, &self.cfg.auth.superuser.password)
            .map_err(PgError::io("write password file"))?;
        let res = run(
            "initdb",
            Command::new(self.bin("initdb"))
                .arg("-D")
                .arg(&dir)
                .args(["--data-checksums", "--auth-host=scram-sha-256"])
                .args(["--auth-local=peer", "-E", "UTF8", "--locale=C"])
                .arg(format!("--username={}", self.cfg.auth.superuser.username))
                .arg(format!("--pwfile={}", pwfile.display())),
        )
        .await;
        let _ = std::fs::remove_file(&pwfile);
        res?;
        self.write_hba()?;
        self.start(RunRole::Primary, timeout).await?;
        self.create_roles().await
    }

    fn write_hba(&self) -> Result<(), PgError> {
        let repl = &self.cfg.auth.replication.username;
        let text = format!(
            "# written by pgha-agent\n\
             local all all peer\n\
             host replication {repl} 0.0.0.0/0 scram-sha-256\n\
             host replication {repl} ::/0 scram-sha-256\n\
             host all all 0.0.0.0/0 scram-sha-256\n\
             host all all ::/0 scram-sha-256\n"
        );
        let path = self.data_dir().join("pg_hba.conf");
        std::fs::write(&path, text).map_err(PgError::io(format!("write {path:?}")))
    }

    /// Creates this replica's data directory from `upstream`.
    pub async fn create_replica(
        &mut self,
        method: ReplicaMethod,
        upstream: &Upstream,
    ) -> Result<(), PgError> {
        match method {
            ReplicaMethod::Basebackup => self.basebackup(upstream).await,
        }
    }

    async fn basebackup(&mut self, up: &Upstream) -> Result<(), PgError> {
        let dir = self.data_dir().to_owned();
        remove_data(&dir)?;
        let r = &self.cfg.auth.replication;
        let res = run(
            "pg_basebackup",
            Command::new(self.bin("pg_basebackup"))
                .arg("-D")
                .arg(&dir)
                .args([
                    "-h",
                    &up.host,
                    "-p",
                    &up.port.to_string(),
                    "-U",
                    &r.username,
                ])
                .args(["-X", "stream", "-c", "fast", "--no-password"])
                .arg(format!("--label=pgha-{}", self.cfg.name))
                .env("PGPASSWORD", &r.password)
                .env("PGCONNECT_TIMEOUT", "5"),
        )
        .await;
        if res.is_err() {
            let _ = remove_data(&dir);
        }
        res.map(|_| ())
    }

    /// pg_rewind from `upstream` (as the rewind role). Postgres must be down;
    /// pg_rewind runs crash recovery first if the node died uncleanly.
    pub async fn rewind(&mut self, up: &Upstream) -> Result<(), PgError> {
        let w = &self.cfg.auth.rewind;
        let source = format!(
            "host={} port={} user={} password={} dbname=postgres connect_timeout=5",
            up.host, up.port, w.username, w.password
        );
        let out = run(
            "pg_rewind",
            Command::new(self.bin("pg_rewind"))
                .arg("-D")
                .arg(self.data_dir())
                .arg(format!("--source-server={source}"))
                .arg("--progress"),
        )
        .await?;
        tracing::info!(output = %out.trim(), "pg_rewind done");
        // The source's config files were copied over ours.
        std::fs::write(self.data_dir().join("standby.signal"), b"")
            .map_err(PgError::io("write standby.signal"))
    }

    /// Removes the data directory (reinitialize).
    pub fn remove_data(&mut self) -> Result<(), PgError> {
        remove_data(self.data_dir())
    }
}

fn remove_data(dir: &Path) -> Result<(), PgError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(PgError::io(format!("remove {dir:?}")))?;
    }
    Ok(())
}
