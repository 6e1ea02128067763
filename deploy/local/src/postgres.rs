//! PostgreSQL 15 instances in the sandbox, on free loopback ports.
//!
//! `initdb` runs once per machine into a template (guarded by a file lock, so
//! parallel test processes share it) and each instance starts from a copy:
//! a fresh primary costs a `cp -a`, not an initdb. Replicas are cloned from
//! their primary with `pg_basebackup -R`, as the agent does. When the harness
//! runs as root, postgres runs as [`RunAs::for_postgres`].
//!
//! Instances use `trust` authentication on loopback and `fsync = off`: the
//! harness is for tests and benchmarks on one machine, where a SIGKILL loses
//! no page cache. The agent configures real authentication itself.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::process::run;
use crate::{reserve_port, wait_until, Error, Port, Proc, RunAs, Sandbox, StopSignal};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Settings written into every template's postgresql.conf.
const BASE_SETTINGS: &str = "
listen_addresses = '127.0.0.1'
fsync = off
shared_buffers = 32MB
max_connections = 200
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
wal_keep_size = '128MB'
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
";

/// Where the PostgreSQL 15 server binaries are: `$PGHA_PG_BIN`, or Debian's path.
pub fn pg_bin_dir() -> Result<PathBuf, Error> {
    let dir = std::env::var_os("PGHA_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
    if dir.join("postgres").is_file() {
        Ok(dir)
    } else {
        Err(Error::Missing(format!(
            "PostgreSQL 15 ({})",
            dir.join("postgres").display()
        )))
    }
}

/// Per-instance options.
#[derive(Debug, Clone, Default)]
pub struct PgOptions {
    /// Extra `postgresql.conf` settings, applied after the defaults.
    pub settings: Vec<(String, String)>,
    /// Replicas only: stream through this physical replication slot
    /// (created on the primary by pg_basebackup).
    pub slot: Option<String>,
}

impl PgOptions {
    pub fn set(mut self, key: &str, value: &str) -> Self {
        self.settings.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// A PostgreSQL server owned by the harness; stopped on drop.
#[derive(Debug)]
pub struct PgInstance {
    name: String,
    _sandbox: Sandbox,
    dir: PathBuf,
    port: Port,
    bin: PathBuf,
    user: RunAs,
    proc: Option<Proc>,
}

impl PgInstance {
    /// A new primary from the template, started and accepting connections.
    pub fn primary(sandbox: &Sandbox, name: &str, opts: &PgOptions) -> Result<Self, Error> {
        let mut pg = Self::prepare(sandbox, name)?;
        let template = template(&pg.bin, &pg.user)?;
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(&template).arg(pg.data_dir());
        run("copy the postgres template", cp, None)?;
        pg.append_settings(&opts.settings)?;
        pg.start()?;
        Ok(pg)
    }

    /// A streaming replica of `primary`, cloned with pg_basebackup.
    pub fn replica(
        sandbox: &Sandbox,
        name: &str,
        primary: &PgInstance,
        opts: &PgOptions,
    ) -> Result<Self, Error> {
        let mut pg = Self::prepare(sandbox, name)?;
        let mut cmd = Command::new(pg.bin.join("pg_basebackup"));
        cmd.arg("-D")
            .arg(pg.data_dir())
            .args(["-h", "127.0.0.1", "-p", &primary.port().to_string()])
            .args(["-U", "postgres", "-X", "stream", "-R", "-c", "fast"])
            .arg(format!("--label=pgha-harness-{name}"));
        if let Some(slot) = &opts.slot {
            cmd.args(["-C", "-S", slot]);
        }
        run(
            &format!("pg_basebackup {name} from {}", primary.name),
            cmd,
            Some(&pg.user),
        )?;
        let mut settings = opts.settings.clone();
        if let Some(slot) = &opts.slot {
            settings.push(("primary_slot_name".into(), format!("'{slot}'")));
        }
        pg.append_settings(&settings)?;
        pg.start()?;
        Ok(pg)
    }

    fn prepare(sandbox: &Sandbox, name: &str) -> Result<Self, Error> {
        let user = RunAs::for_postgres()?;
        let dir = sandbox.subdir(name)?;
        fs::create_dir_all(dir.join("sock")).map_err(Error::io("create socket dir"))?;
        user.own(&dir)?;
        Ok(PgInstance {
            name: name.to_owned(),
            _sandbox: sandbox.clone(),
            dir,
            port: reserve_port()?,
            bin: pg_bin_dir()?,
            user,
            proc: None,
        })
    }

    fn append_settings(&self, settings: &[(String, String)]) -> Result<(), Error> {
        self.append_settings_to("postgresql.conf", settings)
    }

    /// Appends `settings` to the data directory's config file `file`.
    fn append_settings_to(&self, file: &str, settings: &[(String, String)]) -> Result<(), Error> {
        let path = self.data_dir().join(file);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(Error::io(format!("open {path:?}")))?;
        let mut text = format!("\n# pgha harness: {}\n", self.name);
        for (k, v) in settings {
            text.push_str(&format!("{k} = {v}\n"));
        }
        f.write_all(text.as_bytes())
            .map_err(Error::io(format!("write {path:?}")))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port.get()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    pub fn run_as(&self) -> &RunAs {
        &self.user
    }

    /// libpq keyword/value connection string as superuser `postgres`.
    pub fn conn_str(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname}",
            self.port()
        )
    }

    /// `postgresql://` URL as superuser `postgres`.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{dbname}", self.port())
    }

    pub fn proc(&self) -> Option<&Proc> {
        self.proc.as_ref()
    }

    pub fn is_running(&mut self) -> bool {
        match self.proc.as_mut() {
            Some(p) => p.try_exit().is_none(),
            None => false,
        }
    }

    /// Starts the postmaster (on the existing data) and waits until it accepts queries.
    pub fn start(&mut self) -> Result<(), Error> {
        if self.proc.is_some() {
            self.kill()?;
        }
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-c")
            .arg(format!("port={}", self.port()))
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.join("sock").display()
            ));
        self.proc = Some(Proc::spawn(
            &format!("postgres {}", self.name),
            cmd,
            &self.log_path(),
            Some(&self.user),
            StopSignal::Int,
        )?);
        self.wait_ready(START_TIMEOUT)
    }

    /// Waits until the server answers a query (or fails if it exited).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let what = format!("postgres {} to accept connections", self.name);
        let port = self.port();
        let proc = self.proc.as_mut();
        let Some(proc) = proc else {
            return Err(Error::Command {
                what,
                detail: "not started".into(),
            });
        };
        wait_until(&what, timeout, || {
            if let Some(e) = proc.exited_error() {
                return Err(e.into());
            }
            Ok(psql_at(port, "postgres", "select 1").ok().map(|_| ()))
        })
    }

    /// Fast shutdown (SIGINT), waiting for the postmaster to exit.
    pub fn stop(&mut self) -> Result<(), Error> {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// SIGKILL the postmaster only, as a crash would; its backends notice and exit.
    /// Returns the postmaster's exit status (`None` if it was not running).
    pub fn kill(&mut self) -> Result<Option<ExitStatus>, Error> {
        let mut status = None;
        if let Some(p) = self.proc.as_mut() {
            let _ = p.signal(nix::sys::signal::Signal::SIGKILL);
            status = Some(p.wait_exit(Duration::from_secs(10))?);
        }
        // Dropping the handle kills whatever is left of the process group.
        self.proc = None;
        Ok(status)
    }

    /// Stops this (diverged) server, rewinds it with pg_rewind from `source`
    /// and starts it as a standby with no upstream: it replays only the WAL
    /// pg_rewind copied, so a test sees the state before any WAL receiver
    /// connects.
    pub fn rewind_from(&mut self, source: &PgInstance) -> Result<(), Error> {
        self.stop()?;
        let mut cmd = Command::new(self.bin.join("pg_rewind"));
        cmd.arg("--target-pgdata")
            .arg(self.data_dir())
            .arg(format!("--source-server={}", source.conn_str("postgres")));
        run(
            &format!("pg_rewind {} from {}", self.name, source.name),
            cmd,
            Some(&self.user),
        )?;
        // pg_rewind copied the source's postgresql.auto.conf, which may name
        // an upstream: settings there win over postgresql.conf.
        let no_upstream = [("primary_conninfo".to_owned(), "''".to_owned())];
        self.append_settings_to("postgresql.auto.conf", &no_upstream)?;
        let signal = self.data_dir().join("standby.signal");
        fs::write(&signal, "").map_err(Error::io(format!("write {signal:?}")))?;
        self.user.own(&signal)?;
        self.start()
    }

    /// Freezes the server (SIGSTOP to every postgres process).
    pub fn pause(&self) -> Result<(), Error> {
        self.running()?.pause()
    }

    /// Thaws a paused server.
    pub fn resume(&self) -> Result<(), Error> {
        self.running()?.resume()
    }

    fn running(&self) -> Result<&Proc, Error> {
        self.proc.as_ref().ok_or_else(|| Error::Command {
            what: format!("signal postgres {}", self.name),
            detail: "not running".into(),
        })
    }

    /// Runs `sql` with psql in database `postgres`; unaligned, tuples only.
    pub fn psql(&self, sql: &str) -> Result<String, Error> {
        psql_at(self.port(), "postgres", sql)
    }

    /// Whether the server is a standby (`pg_is_in_recovery()`).
    pub fn is_in_recovery(&self) -> Result<bool, Error> {
        Ok(self.psql("select pg_is_in_recovery()")? == "t")
    }
}

/// The live postmaster's pid from `<data_dir>/postmaster.pid`, if any:
/// how the harness finds a postgres that an agent or Patroni started.
pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .is_ok()
        .then_some(pid)
}

/// psql -XAtq against 127.0.0.1:`port`, failing on the first SQL error.
pub(crate) fn psql_at(port: u16, db: &str, sql: &str) -> Result<String, Error> {
    let mut cmd = Command::new("psql");
    cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", db, "-c", sql])
        .env("PGCONNECT_TIMEOUT", "3");
    Ok(run(&format!("psql -c {sql:?}"), cmd, None)?
        .trim()
        .to_owned())
}

/// The initdb'd template data directory, created once per machine and user.
fn template(bin: &Path, user: &RunAs) -> Result<PathBuf, Error> {
    let version = run(
        "postgres --version",
        {
            let mut c = Command::new(bin.join("postgres"));
            c.arg("--version");
            c
        },
        None,
    )?;
    let root = std::env::temp_dir().join(format!("pgha-pg-template-{}", user.uid));
    fs::create_dir_all(&root).map_err(Error::io(format!("create {root:?}")))?;
    let lock_path = root.join("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::io(format!("open {lock_path:?}")))?;
    // Held until this function returns: one process builds, the others wait.
    lock.lock()
        .map_err(Error::io(format!("lock {lock_path:?}")))?;
    let data = root.join("data");
    let marker = root.join("ready");
    if fs::read_to_string(&marker).ok().as_deref() == Some(version.as_str()) {
        return Ok(data);
    }
    let _ = fs::remove_dir_all(&data);
    let _ = fs::remove_file(&marker);
    user.own(&root)?;
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--data-checksums"])
        .args(["-E", "UTF8", "--locale=C", "--no-sync"]);
    run("initdb (template)", initdb, Some(user))?;
    let conf = data.join("postgresql.conf");
    let mut f = OpenOptions::new()
        .append(true)
        .open(&conf)
        .map_err(Error::io(format!("open {conf:?}")))?;
    f.write_all(BASE_SETTINGS.as_bytes())
        .map_err(Error::io(format!("write {conf:?}")))?;
    fs::write(&marker, &version).map_err(Error::io(format!("write {marker:?}")))?;
    Ok(data)
}
