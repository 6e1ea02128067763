//! The failover-time benchmark: kill the primary of a real cluster and time
//! how long until a write is accepted again, many times over.
//!
//! The clock runs from the SIGKILL to the first commit acknowledged by a new
//! primary, found the way an application would: a multi-host libpq
//! connection string with `target_session_attrs=read-write`. The same loop
//! drives pgha-agent and Patroni clusters through [`KillableCluster`], so
//! their figures are comparable.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// A cluster whose nodes can be killed and brought back.
pub trait KillableCluster {
    /// Postgres ports of every node, in node order.
    fn pg_ports(&self) -> Vec<u16>;
    /// The superuser `postgres`'s password.
    fn password(&self) -> String;
    /// SIGKILL node `i`'s postgres and its manager (agent / patroni).
    fn kill(&mut self, i: usize) -> Result<(), String>;
    /// Starts node `i`'s manager again; it rejoins on its own.
    fn restart(&mut self, i: usize) -> Result<(), String>;
}

/// libpq keyword string reaching whichever node accepts writes.
pub fn read_write_conn(ports: &[u16], password: &str) -> String {
    let hosts = vec!["127.0.0.1"; ports.len()].join(",");
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "host={hosts} port={ports} user=postgres password={password} dbname=postgres \
         target_session_attrs=read-write connect_timeout=1"
    )
}

async fn simple_query(
    port: u16,
    password: &str,
    sql: &str,
) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, String> {
    let conn = format!(
        "host=127.0.0.1 port={port} user=postgres password={password} dbname=postgres connect_timeout=1"
    );
    let (client, c) = tokio_postgres::connect(&conn, NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(c);
    client.simple_query(sql).await.map_err(|e| e.to_string())
}

async fn query_one(port: u16, password: &str, sql: &str) -> Result<String, String> {
    simple_query(port, password, sql)
        .await?
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| format!("no row from {sql:?}"))
}

/// The index of the one writable node whose replicas all stream from it,
/// or `None` while the cluster is not (yet) in that state.
pub async fn healthy_leader(ports: &[u16], password: &str) -> Option<usize> {
    let mut leader = None;
    for (i, p) in ports.iter().enumerate() {
        match query_one(*p, password, "select pg_is_in_recovery()")
            .await
            .ok()?
            .as_str()
        {
            "f" if leader.is_none() => leader = Some(i),
            "f" => return None,
            _ => {}
        }
    }
    let l = leader?;
    let streaming: usize = query_one(
        ports[l],
        password,
        "select count(*) from pg_stat_replication where state = 'streaming'",
    )
    .await
    .ok()?
    .parse()
    .ok()?;
    (streaming + 1 == ports.len()).then_some(l)
}

/// Waits up to `timeout` for [`healthy_leader`].
pub async fn wait_healthy(
    ports: &[u16],
    password: &str,
    timeout: Duration,
) -> Result<usize, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = healthy_leader(ports, password).await {
            return Ok(l);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no healthy leader with all replicas streaming after {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// From `since`, retries connect + insert until a write commits; returns the
/// elapsed time and the port of the node that took it.
pub async fn first_write_after(
    since: Instant,
    ports: &[u16],
    password: &str,
    table: &str,
    timeout: Duration,
) -> Result<(Duration, u16), String> {
    let conn = read_write_conn(ports, password);
    let sql = format!("insert into {table} default values returning inet_server_port()");
    let mut last = String::new();
    while since.elapsed() < timeout {
        match tokio_postgres::connect(&conn, NoTls).await {
            Ok((client, c)) => {
                tokio::spawn(c);
                match client.query_one(&sql, &[]).await {
                    Ok(row) => {
                        let port: i32 = row.get(0);
                        return Ok((since.elapsed(), port as u16));
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!("no write accepted within {timeout:?}: {last}"))
}

/// Kills the primary `kills` times; returns each kill-to-first-write time.
pub async fn measure(
    cluster: &mut dyn KillableCluster,
    kills: usize,
    heal_timeout: Duration,
) -> Result<Vec<Duration>, String> {
    let ports = cluster.pg_ports();
    let pw = cluster.password();
    let table = "pgha_failover_probe";
    let leader = wait_healthy(&ports, &pw, heal_timeout).await?;
    simple_query(
        ports[leader],
        &pw,
        &format!("create table if not exists {table} (id bigserial primary key, at timestamptz default now())"),
    )
    .await?;
    let mut times = Vec::with_capacity(kills);
    for n in 1..=kills {
        let leader = wait_healthy(&ports, &pw, heal_timeout).await?;
        let killed_at = Instant::now();
        cluster.kill(leader)?;
        let (took, new_port) =
            first_write_after(killed_at, &ports, &pw, table, heal_timeout).await?;
        if new_port == ports[leader] {
            return Err(format!("kill {n}: the killed node {leader} took a write"));
        }
        eprintln!(
            "kill {n}/{kills}: node {leader} killed, first write after {took:?} on port {new_port}"
        );
        times.push(took);
        cluster.restart(leader)?;
    }
    Ok(times)
}

/// Median and worst of a set of timings.
pub fn median_and_worst(times: &[Duration]) -> (Duration, Duration) {
    let mut v = times.to_vec();
    v.sort();
    (
        v.get(v.len() / 2).copied().unwrap_or_default(),
        v.last().copied().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_string_lists_every_node_and_asks_for_a_writer() {
        let c = read_write_conn(&[5001, 5002], "pw");
        assert!(c.contains("host=127.0.0.1,127.0.0.1 port=5001,5002"), "{c}");
        assert!(c.contains("target_session_attrs=read-write"), "{c}");
        let parsed: tokio_postgres::Config = c.parse().unwrap();
        assert_eq!(parsed.get_hosts().len(), 2);
        assert_eq!(parsed.get_ports(), &[5001, 5002]);
    }

    #[test]
    fn median_and_worst_of_timings() {
        let t = [3, 1, 2].map(Duration::from_secs);
        assert_eq!(
            median_and_worst(&t),
            (Duration::from_secs(2), Duration::from_secs(3))
        );
    }
}
