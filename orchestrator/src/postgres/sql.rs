//! SQL against the local server as superuser: probes, promotion, roles, slots.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgha_cluster::Lsn;
use tokio_postgres::{Client, NoTls};

use super::{slot_name, PgError, Postgres};
use crate::config::AgentConfig;
use crate::ha::Streaming;

/// What a running server reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Probe {
    pub in_recovery: bool,
    /// Primary: its timeline. Replica: the newest it has reached (WAL
    /// receiver, minimum recovery point (set by pg_rewind) or checkpoint).
    pub timeline: Option<u32>,
    /// Primary: write position; replica: furthest of received and replayed.
    pub lsn: Option<Lsn>,
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub streaming: Vec<Streaming>,
    /// Replica: the WAL receiver is streaming.
    pub receiving: bool,
}

fn sql(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |source| PgError::Sql { what, source }
}

fn lsn(s: Option<String>) -> Option<Lsn> {
    s.and_then(|s| s.parse().ok())
}

/// A superuser session on the local server described by `cfg` (2s timeout).
pub async fn connect(cfg: &AgentConfig) -> Result<Client, PgError> {
    let su = &cfg.auth.superuser;
    let listen = cfg.postgres.listen;
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen.ip().to_string()
    };
    let mut c = tokio_postgres::Config::new();
    c.host(&host)
        .port(listen.port())
        .user(&su.username)
        .password(&su.password)
        .dbname("postgres")
        .application_name("pgha-agent")
        .connect_timeout(Duration::from_secs(2));
    let (client, conn) = c.connect(NoTls).await.map_err(sql("connect"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The session that probes and `/status` share: opening one costs a SCRAM
/// exchange (noticeable on a busy machine, and paid by every peer's
/// `/status` during a failover), so it is kept while it works. Only quick
/// read-only queries use it; slow commands (checkpoint, promote) get their
/// own session so they never hold these up.
static PROBE_SESSION: Mutex<Option<(SocketAddr, Arc<Client>)>> = Mutex::new(None);

async fn probe_session(cfg: &AgentConfig) -> Result<Arc<Client>, PgError> {
    let addr = cfg.postgres.listen;
    let cached = PROBE_SESSION
        .lock()
        .ok()
        .and_then(|g| g.clone())
        .filter(|(a, c)| *a == addr && !c.is_closed())
        .map(|(_, c)| c);
    if let Some(c) = cached {
        return Ok(c);
    }
    let c = Arc::new(connect(cfg).await?);
    if let Ok(mut g) = PROBE_SESSION.lock() {
        *g = Some((addr, c.clone()));
    }
    Ok(c)
}

/// The furthest WAL position of the running local server, read now: peers
/// compare these during failover, so a cached value would not do.
pub async fn current_lsn(cfg: &AgentConfig) -> Result<Option<Lsn>, PgError> {
    let c = probe_session(cfg).await?;
    let row = c
        .query_one(
            "select case when pg_is_in_recovery()
                    then greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::text
                    else pg_current_wal_lsn()::text end",
            &[],
        )
        .await
        .map_err(sql("current lsn"))?;
    Ok(lsn(row.get(0)))
}

/// The switch point in a timeline history file: the second field of its
/// last entry (`<parent tli>\t<switch lsn>\t<reason>`).
fn switch_point(history_file: &str) -> Option<Lsn> {
    history_file
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

impl Postgres {
    /// Where the previous timeline ended, from the history file of
    /// timeline `tl` (which this server created by its promotion).
    pub async fn switch_point(&self, tl: u32) -> Result<Option<Lsn>, PgError> {
        let c = self.connect().await?;
        let file = format!("pg_wal/{tl:08X}.history");
        let row = c
            .query_one("select pg_read_file($1)", &[&file])
            .await
            .map_err(sql("read timeline history"))?;
        Ok(switch_point(row.get(0)))
    }

    /// A superuser session on the local server (2s connect timeout).
    pub async fn connect(&self) -> Result<Client, PgError> {
        connect(&self.cfg).await
    }

    /// Role, timeline, WAL positions and connected standbys.
    pub async fn probe(&self) -> Result<Probe, PgError> {
        probe(&*probe_session(&self.cfg).await?).await
    }

    /// Promotes the standby and waits until it accepts writes.
    pub async fn promote(&mut self) -> Result<(), PgError> {
        let c = self.connect().await?;
        let done: bool = c
            .query_one("select pg_promote(true, 60)", &[])
            .await
            .map_err(sql("pg_promote"))?
            .get(0);
        if !done {
            return Err(PgError::Command {
                what: "promote".into(),
                detail: "pg_promote returned false".into(),
            });
        }
        self.mark_primary()?;
        // pg_rewind reads the source's timeline from pg_control, which changes
        // only at the next checkpoint: without it, a former primary rewinding
        // from us would see "no rewind required" and then fail to follow.
        if let Err(e) = c.batch_execute("checkpoint").await {
            tracing::warn!(error = %e, "checkpoint after promotion failed");
        }
        Ok(())
    }

    pub async fn checkpoint(&self) -> Result<(), PgError> {
        let c = self.connect().await?;
        c.batch_execute("checkpoint")
            .await
            .map_err(sql("checkpoint"))
    }

    /// Creates the replication, rewind and application roles and database.
    pub async fn create_roles(&self) -> Result<(), PgError> {
        let a = &self.cfg.auth;
        let c = self.connect().await?;
        // Names and passwords were validated as plain identifiers / unquoted text.
        let script = format!(
            "create role {repl} login replication password '{repl_pw}';
             create role {rw} login password '{rw_pw}';
             grant execute on function pg_catalog.pg_ls_dir(text, boolean, boolean) to {rw};
             grant execute on function pg_catalog.pg_stat_file(text, boolean) to {rw};
             grant execute on function pg_catalog.pg_read_binary_file(text) to {rw};
             grant execute on function pg_catalog.pg_read_binary_file(text, bigint, bigint, boolean) to {rw};
             create role {app} login password '{app_pw}';",
            repl = a.replication.username,
            repl_pw = a.replication.password,
            rw = a.rewind.username,
            rw_pw = a.rewind.password,
            app = a.app.username,
            app_pw = a.app.password,
        );
        c.batch_execute(&script)
            .await
            .map_err(sql("create roles"))?;
        c.batch_execute(&format!(
            "create database {} owner {}",
            a.app.database, a.app.username
        ))
        .await
        .map_err(sql("create database"))
    }

    /// Leader: one physical slot per other member; drops inactive slots of
    /// members that are gone.
    pub async fn ensure_slots(&self, members: &[String]) -> Result<(), PgError> {
        let c = self.connect().await?;
        let want: Vec<String> = members.iter().map(|m| slot_name(m)).collect();
        let have = c
            .query(
                "select slot_name::text, active from pg_replication_slots where slot_type = 'physical'",
                &[],
            )
            .await
            .map_err(sql("list slots"))?;
        for s in &want {
            if !have.iter().any(|r| r.get::<_, String>(0) == *s) {
                c.execute("select pg_create_physical_replication_slot($1, true)", &[s])
                    .await
                    .map_err(sql("create slot"))?;
                tracing::info!(slot = %s, "created replication slot");
            }
        }
        for r in &have {
            let name: String = r.get(0);
            let active: bool = r.get(1);
            if !active && !want.contains(&name) {
                c.execute("select pg_drop_replication_slot($1)", &[&name])
                    .await
                    .map_err(sql("drop slot"))?;
                tracing::info!(slot = %name, "dropped replication slot");
            }
        }
        Ok(())
    }
}

/// Role, timeline, WAL positions and connected standbys of the server
/// behind `c`.
pub async fn probe(c: &Client) -> Result<Probe, PgError> {
    let row = c
        .query_one(
            "select pg_is_in_recovery(),
               case when pg_is_in_recovery() then null else pg_current_wal_lsn()::text end,
               pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text,
               case when pg_is_in_recovery()
                    then greatest((select received_tli from pg_stat_wal_receiver),
                                  (select nullif(min_recovery_end_timeline, 0) from pg_control_recovery()),
                                  (select timeline_id from pg_control_checkpoint()))
                    else ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
               end,
               exists (select 1 from pg_stat_wal_receiver where status = 'streaming')",
            &[],
        )
        .await
        .map_err(sql("probe"))?;
    let in_recovery: bool = row.get(0);
    let current = lsn(row.get(1));
    let receive_lsn = lsn(row.get(2));
    let replay_lsn = lsn(row.get(3));
    let timeline: Option<i32> = row.get(4);
    let receiving: bool = row.get(5);
    let streaming = if in_recovery {
        Vec::new()
    } else {
        c.query(
            "select application_name, sync_state from pg_stat_replication where state = 'streaming'",
            &[],
        )
        .await
        .map_err(sql("pg_stat_replication"))?
        .iter()
        .map(|r| Streaming {
            member: r.get(0),
            sync: r.get::<_, String>(1) == "sync",
        })
        .collect()
    };
    Ok(Probe {
        receiving,
        in_recovery,
        timeline: timeline.and_then(|t| u32::try_from(t).ok()),
        lsn: current.or(receive_lsn.max(replay_lsn)),
        receive_lsn,
        replay_lsn,
        streaming,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switch_point_is_read_from_the_last_history_entry() {
        let file = "1\t0/3000158\tno recovery target specified\n\n\
                    2\t0/5030800\tno recovery target specified\n";
        assert_eq!(switch_point(file), "0/5030800".parse().ok());
        assert_eq!(switch_point("# comment only\n"), None);
    }
}
