//! The acknowledged-write recorder: the ground truth of every failover test.
//!
//! A [`Writer`] inserts increasing ids, one transaction each, and records an
//! id only after the server acknowledged its commit. Errors, timeouts and
//! reconnects are recorded with the moment they happened, so a run reports
//! its write-unavailability windows: the gaps between two acknowledged writes
//! with failures in between. [`missing_ids`] then checks that every
//! acknowledged id is present where it must be.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::LatencyHistogram;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause after a failed attempt, so a dead server is not hammered.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Writes to `table (id bigint primary key, at timestamptz)`.
#[derive(Debug, Clone)]
pub struct Writer {
    pub conn_str: String,
    pub table: String,
    /// First id to write; ids increase by one per attempt.
    pub first_id: i64,
    /// How long one insert may take before the writer gives up on it (its
    /// outcome is then unknown and the connection is dropped). Default 5s;
    /// behind a proxy that holds transactions through a failover, more.
    pub statement_timeout: Duration,
}

/// What a writer saw.
#[derive(Debug, Default)]
pub struct WriteOutcome {
    /// Ids whose commit was acknowledged, in order.
    pub acked: Vec<i64>,
    /// Attempts that failed (error, timeout or lost connection).
    pub failures: u64,
    /// How many times the writer had to open a new connection after the first.
    pub reconnects: u64,
    /// Gaps between acknowledged writes that had failures in them.
    pub unavailable: Vec<Duration>,
    /// The longest gap between two consecutive acknowledged writes, failed
    /// attempts or not: a planned switchover's write pause shows here.
    pub max_gap: Duration,
    /// The last few error messages, for the report.
    pub last_errors: Vec<String>,
    pub latency: LatencyHistogram,
}

impl WriteOutcome {
    /// The longest write-unavailability window (zero if writes never failed).
    pub fn worst_window(&self) -> Duration {
        self.unavailable.iter().copied().max().unwrap_or_default()
    }
}

impl Writer {
    pub fn new(conn_str: impl Into<String>, table: impl Into<String>) -> Self {
        Writer {
            conn_str: conn_str.into(),
            table: table.into(),
            first_id: 1,
            statement_timeout: Duration::from_secs(5),
        }
    }

    /// Creates the table if missing (through the same connection string).
    pub async fn prepare(&self) -> Result<(), String> {
        let client = connect(&self.conn_str).await?;
        client
            .batch_execute(&format!(
                "create table if not exists {} (id bigint primary key, at timestamptz not null default now())",
                self.table
            ))
            .await
            .map_err(|e| e.to_string())
    }

    /// Writes until `stop` resolves, then returns what it saw.
    pub async fn run(&self, stop: impl std::future::Future<Output = ()>) -> WriteOutcome {
        tokio::pin!(stop);
        let mut out = WriteOutcome::default();
        let mut client: Option<Client> = None;
        let mut connected_once = false;
        let mut id = self.first_id;
        let mut last_ack = Instant::now();
        let mut failed_since_ack = false;
        let sql = format!("insert into {} (id) values ($1)", self.table);
        loop {
            let attempt = async {
                if client.as_ref().is_none_or(Client::is_closed) {
                    client = Some(connect(&self.conn_str).await?);
                    if connected_once {
                        out.reconnects += 1;
                    }
                    connected_once = true;
                }
                let c = client.as_ref().ok_or_else(|| "no connection".to_string())?;
                let start = Instant::now();
                match tokio::time::timeout(self.statement_timeout, c.execute(&sql, &[&id])).await {
                    Ok(Ok(_)) => Ok(start.elapsed()),
                    Ok(Err(e)) => Err(describe(&e)),
                    Err(_) => {
                        // The outcome is unknown: drop the connection, never count the id.
                        client = None;
                        Err(format!("no answer within {:?}", self.statement_timeout))
                    }
                }
            };
            let result = tokio::select! {
                biased;
                _ = &mut stop => break,
                r = attempt => r,
            };
            match result {
                Ok(latency) => {
                    let now = Instant::now();
                    if failed_since_ack {
                        out.unavailable.push(now - last_ack);
                        failed_since_ack = false;
                    }
                    if !out.acked.is_empty() {
                        out.max_gap = out.max_gap.max(now - last_ack);
                    }
                    last_ack = now;
                    out.latency.record(latency);
                    out.acked.push(id);
                }
                Err(e) => {
                    out.failures += 1;
                    failed_since_ack = true;
                    if out.last_errors.len() >= 5 {
                        out.last_errors.remove(0);
                    }
                    out.last_errors.push(e);
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(RETRY_PAUSE) => {}
                    }
                }
            }
            id += 1;
        }
        out
    }
}

/// An error with the server's SQLSTATE and message when there is one
/// (tokio-postgres's Display says only "db error").
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

async fn connect(conn_str: &str) -> Result<Client, String> {
    let connecting = tokio_postgres::connect(conn_str, NoTls);
    let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| format!("connect: no answer within {CONNECT_TIMEOUT:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// The acknowledged ids that `conn_str`'s `table` does not hold.
pub async fn missing_ids(conn_str: &str, table: &str, acked: &[i64]) -> Result<Vec<i64>, String> {
    let client = connect(conn_str).await?;
    let rows = client
        .query(
            &format!("select id from {table} where id = any($1)"),
            &[&acked],
        )
        .await
        .map_err(|e| e.to_string())?;
    let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    Ok(acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect())
}
