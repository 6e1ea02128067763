//! The pooler benchmark: the same pgbench scenarios against several targets
//! (a direct connection, PgBouncer, pgha-proxy) in one run, repeated, with
//! medians and ratios printed side by side.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::cpu::cpu_time;
use crate::pgbench;

/// Something pgbench can connect to.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub conn_str: String,
    /// The pooler's process, charged for CPU per transaction (None: direct).
    pub pid: Option<u32>,
}

/// A pgbench invocation, minus the connection string.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub args: Vec<String>,
}

impl Scenario {
    /// `pgbench -S` (select only) with `clients` clients for `secs` seconds.
    pub fn select_only(
        name: &str,
        mode: &str,
        clients: u32,
        secs: u64,
        connect_each: bool,
    ) -> Self {
        let mut args = vec![
            "-n".to_string(),
            "-S".into(),
            "-M".into(),
            mode.into(),
            "-c".into(),
            clients.to_string(),
            "-j".into(),
            "2".into(),
            "-T".into(),
            secs.to_string(),
        ];
        if connect_each {
            args.push("-C".into());
        }
        Scenario {
            name: name.to_owned(),
            args,
        }
    }
}

/// CPU per transaction of one run: (user + system, user).
type PerTx = (Duration, Duration);

/// Medians over the runs of one scenario on one target.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub target: String,
    pub tps: f64,
    pub latency_avg: Duration,
    pub latency_p99: Duration,
    /// Pooler CPU per transaction (None for direct connections).
    pub cpu_per_tx: Option<Duration>,
    /// The user-space part of it: the pooler's own code, without the
    /// kernel's share (system calls and the loopback network stack).
    pub user_per_tx: Option<Duration>,
    /// Set when the target could not run the scenario at all.
    pub error: Option<String>,
    /// Each round's TPS and CPU per transaction, in round order: the
    /// targets ran one after the other in every round, so the same index
    /// on two rows is a pair measured under the same machine load.
    pub rounds: Vec<(f64, Option<Duration>)>,
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

/// The order the targets run in round `round`: rotated by one each round,
/// so no target always runs right after the same other one (a run leaves
/// work behind, such as its pgbench log's writeback, that the next run
/// pays for) or always first.
fn round_order(targets: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..targets).map(move |k| (k + round) % targets)
}

/// Runs every scenario `runs` times on every target (interleaved, so drift
/// in machine load hits all targets alike) and returns the medians.
pub fn run_matrix(
    targets: &[Target],
    scenarios: &[Scenario],
    runs: usize,
    log_dir: &Path,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for sc in scenarios {
        let mut per_target: Vec<Vec<(pgbench::PgbenchResult, Option<PerTx>)>> =
            vec![Vec::new(); targets.len()];
        let mut errors: Vec<Option<String>> = vec![None; targets.len()];
        for round in 0..runs {
            for i in round_order(targets.len(), round) {
                let t = &targets[i];
                if errors[i].is_some() {
                    continue;
                }
                let cpu_before = t.pid.and_then(|p| cpu_time(p).ok());
                match pgbench::run(&t.conn_str, &sc.args, log_dir) {
                    Ok(r) => {
                        let cpu = t.pid.and_then(|p| cpu_time(p).ok());
                        let per_tx = match (cpu_before, cpu) {
                            (Some(b), Some(a)) if r.transactions > 0 => {
                                let n = r.transactions as u32;
                                Some(((a.total() - b.total()) / n, (a.user - b.user) / n))
                            }
                            _ => None,
                        };
                        per_target[i].push((r, per_tx));
                    }
                    Err(e) => errors[i] = Some(e),
                }
            }
        }
        for (i, t) in targets.iter().enumerate() {
            let results = &per_target[i];
            rows.push(Row {
                scenario: sc.name.clone(),
                target: t.name.clone(),
                tps: median(results.iter().map(|r| r.0.tps).collect()).unwrap_or(0.0),
                latency_avg: median(results.iter().map(|r| r.0.latency_avg).collect())
                    .unwrap_or_default(),
                latency_p99: median(results.iter().map(|r| r.0.latency_p99).collect())
                    .unwrap_or_default(),
                cpu_per_tx: median(results.iter().filter_map(|r| r.1.map(|c| c.0)).collect()),
                user_per_tx: median(results.iter().filter_map(|r| r.1.map(|c| c.1)).collect()),
                error: errors[i].clone(),
                rounds: results
                    .iter()
                    .map(|r| (r.0.tps, r.1.map(|c| c.0)))
                    .collect(),
            });
        }
    }
    rows
}

/// A table of the rows, with TPS and CPU ratios against `reference` (a target name).
pub fn render(rows: &[Row], reference: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:<16} {:>10} {:>10} {:>10} {:>12} {:>9} {:>9} {:>11} {:>9}",
        "scenario",
        "target",
        "tps",
        "avg ms",
        "p99 ms",
        "cpu us/tx",
        "tps/ref",
        "cpu/ref",
        "user us/tx",
        "user/ref"
    );
    for r in rows {
        let reference = rows
            .iter()
            .find(|x| x.scenario == r.scenario && x.target == reference && x.error.is_none());
        if let Some(e) = &r.error {
            let _ = writeln!(out, "{:<22} {:<16} error: {e}", r.scenario, r.target);
            continue;
        }
        let ratio = |a: f64, b: f64| {
            if b > 0.0 {
                format!("{:.2}", a / b)
            } else {
                "-".into()
            }
        };
        let tps_ratio = reference.map_or("-".into(), |x| ratio(r.tps, x.tps));
        let versus = |mine: Option<Duration>, theirs: Option<Duration>| match (mine, theirs) {
            (Some(a), Some(b)) => ratio(a.as_secs_f64(), b.as_secs_f64()),
            _ => "-".into(),
        };
        let micros =
            |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e6));
        let cpu_ratio = versus(r.cpu_per_tx, reference.and_then(|x| x.cpu_per_tx));
        let user_ratio = versus(r.user_per_tx, reference.and_then(|x| x.user_per_tx));
        let cpu = micros(r.cpu_per_tx);
        let _ = writeln!(
            out,
            "{:<22} {:<16} {:>10.0} {:>10.3} {:>10.3} {:>12} {:>9} {:>9} {:>11} {:>9}",
            r.scenario,
            r.target,
            r.tps,
            r.latency_avg.as_secs_f64() * 1e3,
            r.latency_p99.as_secs_f64() * 1e3,
            cpu,
            tps_ratio,
            cpu_ratio,
            micros(r.user_per_tx),
            user_ratio
        );
    }
    out
}

/// Ratios against `reference` taken round by round (each round's pair ran
/// back to back): median, lowest and highest, and in how many rounds the
/// target's CPU per transaction was at most the reference's. On a noisy
/// machine this says more than the ratio of two medians.
pub fn render_paired(rows: &[Row], reference: &str) -> String {
    let mut out = String::new();
    let spread = |mut v: Vec<f64>| -> String {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        match (median(v.clone()), v.first(), v.last()) {
            (Some(m), Some(lo), Some(hi)) => format!("{m:.2} ({lo:.2}-{hi:.2})"),
            _ => "-".into(),
        }
    };
    for r in rows
        .iter()
        .filter(|r| r.target != reference && r.error.is_none())
    {
        let Some(base) = rows
            .iter()
            .find(|x| x.scenario == r.scenario && x.target == reference && x.error.is_none())
        else {
            continue;
        };
        let pairs: Vec<_> = r.rounds.iter().zip(&base.rounds).collect();
        let tps: Vec<f64> = pairs
            .iter()
            .filter(|(_, b)| b.0 > 0.0)
            .map(|(a, b)| a.0 / b.0)
            .collect();
        let cpu: Vec<f64> = pairs
            .iter()
            .filter_map(|(a, b)| match (a.1, b.1) {
                (Some(x), Some(y)) if !y.is_zero() => Some(x.as_secs_f64() / y.as_secs_f64()),
                _ => None,
            })
            .collect();
        if tps.is_empty() {
            continue;
        }
        let cpu_line = if cpu.is_empty() {
            "-".to_string()
        } else {
            let at_most = cpu.iter().filter(|&&x| x <= 1.0).count();
            format!(
                "{}, at most 1 in {at_most} of {}",
                spread(cpu.clone()),
                cpu.len()
            )
        };
        let _ = writeln!(
            out,
            "{:<22} {:<16} tps/ref {:<20} cpu/ref {cpu_line}",
            r.scenario,
            r.target,
            spread(tps)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_runs_every_target_once_and_rotates() {
        let rounds: Vec<Vec<usize>> = (0..4).map(|r| round_order(3, r).collect()).collect();
        assert_eq!(rounds[0], [0, 1, 2]);
        assert_eq!(rounds[1], [1, 2, 0]);
        assert_eq!(rounds[2], [2, 0, 1]);
        assert_eq!(rounds[3], [0, 1, 2]);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4, 1, 3, 2]), Some(3));
        assert_eq!(median::<u32>(vec![]), None);
    }

    #[test]
    fn render_shows_ratios_against_the_reference_and_errors() {
        let row = |target: &str, tps: f64, cpu_us: Option<u64>, error: Option<&str>| Row {
            scenario: "select".into(),
            target: target.into(),
            tps,
            latency_avg: Duration::from_millis(1),
            latency_p99: Duration::from_millis(2),
            cpu_per_tx: cpu_us.map(Duration::from_micros),
            user_per_tx: cpu_us.map(|us| Duration::from_micros(us / 4)),
            error: error.map(str::to_owned),
            rounds: vec![],
        };
        let table = render(
            &[
                row("pgbouncer", 1000.0, Some(20), None),
                row("pgha-proxy", 1500.0, Some(10), None),
                row(
                    "other",
                    0.0,
                    None,
                    Some("prepared statement P_0 already exists"),
                ),
            ],
            "pgbouncer",
        );
        let proxy_line = table.lines().find(|l| l.contains("pgha-proxy")).unwrap();
        assert!(proxy_line.contains("1.50"), "{table}");
        assert!(proxy_line.contains("0.50"), "{table}");
        assert!(
            table.contains("error: prepared statement P_0 already exists"),
            "{table}"
        );
    }

    #[test]
    fn paired_ratios_are_taken_round_by_round() {
        let row = |target: &str, rounds: Vec<(f64, u64)>| Row {
            scenario: "select".into(),
            target: target.into(),
            tps: 0.0,
            latency_avg: Duration::ZERO,
            latency_p99: Duration::ZERO,
            cpu_per_tx: None,
            user_per_tx: None,
            error: None,
            rounds: rounds
                .into_iter()
                .map(|(t, c)| (t, Some(Duration::from_micros(c))))
                .collect(),
        };
        // Round 2 is slow for both: paired, the proxy wins it too.
        let rows = [
            row("pgbouncer", vec![(1000.0, 20), (500.0, 40), (1000.0, 20)]),
            row("pgha-proxy", vec![(1100.0, 18), (600.0, 36), (900.0, 24)]),
        ];
        let text = render_paired(&rows, "pgbouncer");
        let line = text.lines().find(|l| l.contains("pgha-proxy")).unwrap();
        assert!(line.contains("tps/ref 1.10 (0.90-1.20)"), "{text}");
        assert!(
            line.contains("cpu/ref 0.90 (0.90-1.20), at most 1 in 2 of 3"),
            "{text}"
        );
        assert!(
            !text.contains("pgbouncer "),
            "no line for the reference itself: {text}"
        );
    }
}
