//! The read-only port's witness: which node answered each read, and whether
//! that node was a standby when it answered.
//!
//! A [`Reader`] runs one short query at a time through one client
//! connection and records, per answer, the serving node's port and
//! `pg_is_in_recovery()`. After a failover the checker asks whether any read
//! was served by a node that was writable without being the leader, which is
//! exactly a read from a demoted (split-brained) primary.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// One answered read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// When the query was sent: the answer tells the node's state at some
    /// moment after this one.
    pub asked: Instant,
    /// `inet_server_port()` of the node that answered.
    pub port: u16,
    pub in_recovery: bool,
}

/// What a reader saw.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub reads: Vec<Read>,
    pub failures: u64,
    pub last_errors: Vec<String>,
}

impl ReadOutcome {
    /// Reads asked at or after `since` and answered by a writable node on
    /// `port`: that node was writable after the moment. (A read asked
    /// before it may have been answered before it, whenever it arrived.)
    pub fn primary_reads_from(&self, port: u16, since: Instant) -> Vec<Read> {
        self.reads
            .iter()
            .copied()
            .filter(|r| r.port == port && !r.in_recovery && r.asked >= since)
            .collect()
    }
}

/// Reads through `conn_str` until stopped.
pub async fn read_until(
    conn_str: &str,
    stop: impl std::future::Future<Output = ()>,
) -> ReadOutcome {
    tokio::pin!(stop);
    let mut out = ReadOutcome::default();
    let mut client = None;
    loop {
        let attempt = async {
            let asked = Instant::now();
            if client
                .as_ref()
                .is_none_or(tokio_postgres::Client::is_closed)
            {
                let (c, conn) = tokio_postgres::connect(conn_str, NoTls)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                tokio::spawn(conn);
                client = Some(c);
            }
            let c = client.as_ref().ok_or("no connection")?;
            let row = tokio::time::timeout(
                Duration::from_secs(5),
                c.query_one("select inet_server_port(), pg_is_in_recovery()", &[]),
            )
            .await
            .map_err(|_| "no answer within 5s".to_string())?
            .map_err(|e| crate::writer::describe(&e))?;
            let port: i32 = row.get(0);
            Ok::<_, String>(Read {
                asked,
                port: port as u16,
                in_recovery: row.get(1),
            })
        };
        let result = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = attempt => r,
        };
        match result {
            Ok(r) => out.reads.push(r),
            Err(e) => {
                out.failures += 1;
                if out.last_errors.len() >= 5 {
                    out.last_errors.remove(0);
                }
                out.last_errors.push(e);
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_reads_are_those_from_a_writable_node_after_the_moment() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(1);
        let out = ReadOutcome {
            reads: vec![
                Read {
                    asked: t0,
                    port: 1,
                    in_recovery: false,
                },
                Read {
                    asked: later,
                    port: 1,
                    in_recovery: false,
                },
                Read {
                    asked: later,
                    port: 1,
                    in_recovery: true,
                },
                Read {
                    asked: later,
                    port: 2,
                    in_recovery: false,
                },
            ],
            ..ReadOutcome::default()
        };
        let bad = out.primary_reads_from(1, later);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].asked, later);
    }
}
