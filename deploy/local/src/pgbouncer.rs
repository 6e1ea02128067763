//! PgBouncer, Debian's package, as the peer pooler the benchmarks compare
//! pgha-proxy against. Runs as the postgres user (it refuses root) in front of
//! one harness [`PgInstance`], with trust auth like the instance itself.

use std::fs;
use std::process::Command;
use std::time::Duration;

use crate::etcd::which;
use crate::{reserve_port, wait_until, Error, PgInstance, Port, Proc, RunAs, Sandbox, StopSignal};

/// PgBouncer's pooling mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

/// A running PgBouncer; stopped on drop.
#[derive(Debug)]
pub struct PgBouncer {
    _sandbox: Sandbox,
    port: Port,
    proc: Proc,
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` with `pool_size` server connections per
    /// database/user pair, forwarding database `postgres` to `backend`.
    pub fn start(
        sandbox: &Sandbox,
        name: &str,
        backend: &PgInstance,
        mode: PoolMode,
        pool_size: u32,
    ) -> Result<PgBouncer, Error> {
        let bin = which("pgbouncer")?;
        let user = RunAs::for_postgres()?;
        let dir = sandbox.subdir(name)?;
        let port = reserve_port()?;
        let mode = match mode {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        };
        let ini = format!(
            "[databases]\n\
             postgres = host=127.0.0.1 port={backend} dbname=postgres\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 20000\n\
             max_db_connections = 0\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile =\n\
             pidfile =\n\
             log_connections = 0\n\
             log_disconnections = 0\n",
            backend = backend.port(),
            port = port.get(),
            dir = dir.display(),
        );
        let conf = dir.join("pgbouncer.ini");
        fs::write(&conf, ini).map_err(Error::io(format!("write {conf:?}")))?;
        fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n")
            .map_err(Error::io("write pgbouncer users"))?;
        user.own(&dir)?;
        let mut cmd = Command::new(bin);
        cmd.arg(&conf);
        let proc = Proc::spawn(
            name,
            cmd,
            &dir.join("pgbouncer.log"),
            Some(&user),
            StopSignal::Int,
        )?;
        let mut bouncer = PgBouncer {
            _sandbox: sandbox.clone(),
            port,
            proc,
        };
        let port = bouncer.port();
        let proc = &mut bouncer.proc;
        wait_until(
            "pgbouncer to accept connections",
            Duration::from_secs(20),
            || {
                if let Some(e) = proc.exited_error() {
                    return Err(e.into());
                }
                Ok(crate::postgres::psql_at(port, "postgres", "select 1")
                    .ok()
                    .map(|_| ()))
            },
        )?;
        Ok(bouncer)
    }

    pub fn port(&self) -> u16 {
        self.port.get()
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// libpq connection string to database `postgres` through PgBouncer.
    pub fn conn_str(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port()
        )
    }
}
