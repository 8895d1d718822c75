//! The benchmark's report: every figure, the ratios to the baselines, and where each goal of the
//! benchmark issue stands; as JSON and markdown.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::load::Measured;

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// What was measured ("coffer", "etcd (3 nodes)", "ring, 1 core", ...).
    pub system: String,
    /// The scenario.
    pub scenario: String,
    /// The measurement.
    pub measured: Measured,
    /// Server CPU time per operation summed over every server process, microseconds.
    pub cpu_us_per_op: Option<f64>,
}

impl Figure {
    /// A row; `cpu` is the servers' CPU time over the measured phase, if known.
    pub(crate) fn new(system: &str, scenario: &str, measured: Measured, cpu: Option<Duration>) -> Figure {
        let cpu_us_per_op =
            cpu.filter(|_| measured.ops > 0).map(|c| c.as_secs_f64() * 1e6 / measured.items.max(1) as f64);
        Figure { system: system.into(), scenario: scenario.into(), measured, cpu_us_per_op }
    }
}

/// Resident memory before and after writing many secrets.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Memory {
    /// Secrets written.
    pub secrets: u64,
    /// Resident bytes of each node before.
    pub before: Vec<u64>,
    /// Resident bytes of each node after.
    pub after: Vec<u64>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// Clients (closed loop) or in-flight cap (open loop).
    pub clients: usize,
    /// Open-loop rate, if any.
    pub rate: Option<u64>,
    /// Measured seconds per scenario.
    pub seconds: f64,
    /// Coffer nodes loaded.
    pub nodes: usize,
    /// Every row.
    pub figures: Vec<Figure>,
    /// The memory figure, if measured.
    pub memory: Option<Memory>,
}

/// The scenarios measured with and without TLS.
pub(crate) const TLS_COST_SCENARIOS: [&str; 3] = ["empty-rpc", "get-linear", "encrypt64"];
/// The system name of the TLS side of the cost pass.
pub(crate) const TLS_PASS: &str = "tls cost: TLS";
/// The system name of the plaintext side of the cost pass.
pub(crate) const PLAIN_PASS: &str = "tls cost: plaintext";
/// The scenarios measured with and without authorisation checks.
pub(crate) const AUTH_COST_SCENARIOS: [&str; 2] = ["get-linear", "encrypt64"];
/// The side of the authorisation pass that checks a least-privilege token.
pub(crate) const CHECKED_PASS: &str = "auth cost: token + policy";
/// The side of the authorisation pass with `auth.checks = "off"`.
pub(crate) const UNCHECKED_PASS: &str = "auth cost: checks off";
/// The scenarios measured with and without audit.
pub(crate) const AUDIT_COST_SCENARIOS: [&str; 4] = ["put", "get-linear", "encrypt64", "encrypt64-batch"];
/// The side of the audit pass that records every call, each on disk before its answer.
pub(crate) const AUDITED_PASS: &str = "audit cost: sync always";
/// The side of the audit pass that records every call, synced within 10 ms.
pub(crate) const AUDITED_WITHIN_PASS: &str = "audit cost: sync 10ms";
/// The side of the audit pass with `[audit] enabled = false`.
pub(crate) const UNAUDITED_PASS: &str = "audit cost: audit off";

impl Report {
    /// An empty report of a run's settings.
    pub(crate) fn new(clients: usize, rate: Option<u64>, duration: Duration, nodes: usize) -> Report {
        Report { clients, rate, seconds: duration.as_secs_f64(), nodes, figures: Vec::new(), memory: None }
    }

    /// Adds a row.
    pub(crate) fn push(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    /// Records the memory figure.
    pub(crate) fn memory(&mut self, secrets: u64, before: &[u64], after: &[u64]) {
        self.memory = Some(Memory { secrets, before: before.to_vec(), after: after.to_vec() });
    }

    fn find(&self, system: &str, scenario: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.system.starts_with(system) && f.scenario == scenario)
    }

    /// The report as markdown: the figures, then the goals.
    pub(crate) fn markdown(&self) -> String {
        let mut md = String::new();
        let (heading, load) = match self.rate {
            Some(r) => (
                "Latency at a fixed rate (open loop)",
                format!(
                    "open loop at {r} ops/s, at most {} in flight; latency from each operation's scheduled start",
                    self.clients
                ),
            ),
            None => ("Figures", format!("closed loop, {} clients", self.clients)),
        };
        let _ =
            writeln!(md, "## {heading}\n\n{load}, {:.0} s per scenario, {} Coffer nodes.\n", self.seconds, self.nodes);
        md.push_str("| system | scenario | ops/s | items/s | p50 | p99 | p99.9 | max | server CPU/op | errors |\n");
        md.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n");
        for f in &self.figures {
            let m = &f.measured;
            let errors = if m.errors.is_empty() {
                "none".to_owned()
            } else {
                m.errors.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
                f.system,
                f.scenario,
                m.ops_per_sec,
                m.items_per_sec,
                us(m.p50_us),
                us(m.p99_us),
                us(m.p999_us),
                us(m.max_us),
                f.cpu_us_per_op.map_or("—".to_owned(), |c| format!("{c:.0} µs")),
                errors
            );
        }
        if self.rate.is_some() {
            // The baselines and goals are throughput figures, judged on the closed-loop run.
            return md;
        }
        let ratios = self.ratios();
        if !ratios.is_empty() {
            md.push_str("\n## Ratios to the baselines\n\nItems per second, Coffer over the baseline, same run.\n\n");
            md.push_str("| Coffer | baseline | ratio |\n|---|---|---:|\n");
            for (coffer, baseline, ratio) in ratios {
                // Ratios to the in-process crypto limit are small: keep two significant digits.
                let shown = if ratio < 0.1 { format!("{ratio:.4}") } else { format!("{ratio:.2}") };
                let _ = writeln!(md, "| {coffer} | {baseline} | {shown}× |");
            }
        }
        md.push_str("\n## Goals\n\n| goal | measured | status |\n|---|---|---|\n");
        for (goal, measured, met) in self.goals() {
            let status = match met {
                Some(true) => "met",
                Some(false) => "not met",
                None => "not measured",
            };
            let _ = writeln!(md, "| {goal} | {measured} | {status} |");
        }
        md
    }

    /// (Coffer figure, baseline figure, ratio) for each baseline beside the Coffer scenarios it
    /// bounds, where both were measured.
    fn ratios(&self) -> Vec<(String, String, f64)> {
        // (Coffer scenario, baseline system prefix, baseline scenario)
        const PAIRS: [(&str, &str, &str); 11] = [
            ("encrypt64", "coffer", "empty-rpc"),
            ("encrypt64", "ring", "aes-256-gcm seal 64 B"),
            ("encrypt64-batch", "ring", "aes-256-gcm seal 64 B"),
            ("encrypt1k-batch", "ring", "aes-256-gcm seal 1024 B"),
            ("encrypt64", "softhsm", "aes-256-gcm encrypt 64 B"),
            ("encrypt64-batch", "softhsm", "aes-256-gcm encrypt 64 B"),
            ("encrypt64-stream", "softhsm", "aes-256-gcm encrypt 64 B"),
            ("data-key", "softhsm", "wrap"),
            ("decrypt64", "softhsm", "unwrap"),
            ("put", "etcd", "put"),
            ("get-linear", "etcd", "get-linear"),
        ];
        PAIRS
            .iter()
            .filter_map(|(scenario, system, baseline)| {
                let c = self.find("coffer", scenario)?;
                let b = self.find(system, baseline)?;
                let (c_rate, b_rate) = (c.measured.items_per_sec, b.measured.items_per_sec);
                (b_rate > 0.0).then(|| {
                    (
                        format!("{scenario} ({c_rate:.0}/s)"),
                        format!("{} {baseline} ({b_rate:.0}/s)", b.system),
                        c_rate / b_rate,
                    )
                })
            })
            .collect()
    }

    /// (goal, what was measured, met?) for each goal of the benchmark issue.
    fn goals(&self) -> Vec<(String, String, Option<bool>)> {
        let mut goals = Vec::new();
        let rate = |s: &str, sc: &str| self.find(s, sc).map(|f| f.measured.items_per_sec);
        // A cost pass runs each side in rounds (rows "<side> (round N)"): the mean of its rounds.
        let mean_rate = |side: &str, sc: &str| {
            let rates: Vec<f64> = self
                .figures
                .iter()
                .filter(|f| f.system.starts_with(side) && f.scenario == sc)
                .map(|f| f.measured.items_per_sec)
                .collect();
            (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64)
        };
        // The per-request HSM baseline is the fastest SoftHSM operation measured (AES-GCM in the
        // token, when measured, else wrap or unwrap).
        let hsm = self
            .figures
            .iter()
            .filter(|f| f.system.starts_with("softhsm"))
            .max_by(|a, b| a.measured.items_per_sec.total_cmp(&b.measured.items_per_sec))
            .map(|f| (f.scenario.as_str(), f.measured.items_per_sec));
        for sc in ["encrypt64-batch", "encrypt64-stream"] {
            let (measured, met) = match (rate("coffer", sc), hsm) {
                (Some(c), Some((op, h))) if h > 0.0 => {
                    (format!("{c:.0} items/s = {:.1}× SoftHSM {op} ({h:.0}/s)", c / h), Some(c >= 10.0 * h))
                }
                _ => ("—".to_owned(), None),
            };
            goals.push((format!("{sc}: ≥ 10× SoftHSM per request"), measured, met));
        }
        let (measured, met) = match (rate("coffer", "encrypt64"), rate("coffer", "empty-rpc")) {
            (Some(e), Some(r)) if r > 0.0 => {
                (format!("{e:.0}/s = {:.0} % of empty RPC ({r:.0}/s)", 100.0 * e / r), Some(e >= 0.8 * r))
            }
            _ => ("—".to_owned(), None),
        };
        goals.push(("encrypt64 unary: ≥ 80 % of an empty RPC".to_owned(), measured, met));
        let (measured, met) = match (self.find("coffer", "put"), self.find("etcd", "put")) {
            (Some(c), Some(e)) if e.measured.ops_per_sec > 0.0 => {
                let ratio = c.measured.ops_per_sec / e.measured.ops_per_sec;
                let cpu = match (c.cpu_us_per_op, e.cpu_us_per_op) {
                    (Some(a), Some(b)) => format!("; CPU/put {a:.0} vs {b:.0} µs"),
                    _ => String::new(),
                };
                (
                    format!(
                        "{:.0} vs {:.0} puts/s = {ratio:.2}×; p99 {} vs {}{cpu}",
                        c.measured.ops_per_sec,
                        e.measured.ops_per_sec,
                        us(c.measured.p99_us),
                        us(e.measured.p99_us)
                    ),
                    Some(ratio >= 1.0 && c.measured.p99_us <= e.measured.p99_us),
                )
            }
            _ => ("—".to_owned(), None),
        };
        goals.push(("put, 3 nodes: ≥ etcd's throughput at ≤ p99 (aim 2×)".to_owned(), measured, met));
        let (measured, met) = match (rate("coffer", "get-linear"), rate("etcd", "get-linear")) {
            (Some(c), Some(e)) if e > 0.0 => (format!("{c:.0} vs {e:.0} gets/s = {:.2}×", c / e), Some(c >= 2.0 * e)),
            _ => ("—".to_owned(), None),
        };
        goals.push(("linearizable get: ≥ 2× etcd".to_owned(), measured, met));
        let (measured, met) = match &self.memory {
            Some(m) if !m.after.is_empty() => {
                let max = m.after.iter().copied().max().unwrap_or(0);
                let growth: Vec<String> = m
                    .before
                    .iter()
                    .zip(&m.after)
                    .map(|(b, a)| format!("{:.0}", a.saturating_sub(*b) as f64 / m.secrets.max(1) as f64))
                    .collect();
                (
                    format!(
                        "{} secrets: largest node {:.0} MB; growth per secret {} B (per node)",
                        m.secrets,
                        max as f64 / 1e6,
                        growth.join(" / ")
                    ),
                    Some(max < 200_000_000 && m.secrets >= 100_000),
                )
            }
            _ => ("—".to_owned(), None),
        };
        goals.push(("memory: < 200 MB per node with 100,000 secrets".to_owned(), measured, met));
        // Each layer's cost: the same scenario with the layer and without, same run, means of
        // the alternating rounds.
        let cost = |with: &str, without: &str, sc: &str, words: (&str, &str), limit: f64| match (
            mean_rate(with, sc),
            mean_rate(without, sc),
        ) {
            (Some(t), Some(p)) if p > 0.0 => {
                let cost = 100.0 * (1.0 - t / p);
                let shown = if cost >= 0.0 { format!("{cost:.1} % slower") } else { format!("{:.1} % faster", -cost) };
                (format!("{t:.0}/s {}, {p:.0}/s {}: {shown}", words.0, words.1), Some(cost < limit))
            }
            _ => ("—".to_owned(), None),
        };
        for sc in TLS_COST_SCENARIOS {
            let (measured, met) = cost(TLS_PASS, PLAIN_PASS, sc, ("with TLS", "without"), 15.0);
            goals.push((format!("TLS costs < 15 % on {sc}"), measured, met));
        }
        for sc in AUTH_COST_SCENARIOS {
            let (measured, met) = cost(CHECKED_PASS, UNCHECKED_PASS, sc, ("checked", "unchecked"), 5.0);
            goals.push((format!("authorisation costs < 5 % on {sc}"), measured, met));
        }
        for (side, mode) in [(AUDITED_PASS, "sync always, the default"), (AUDITED_WITHIN_PASS, "sync 10ms")] {
            for sc in AUDIT_COST_SCENARIOS {
                let (measured, met) = cost(side, UNAUDITED_PASS, sc, ("audited", "unaudited"), 10.0);
                goals.push((format!("audit ({mode}) costs < 10 % on {sc}"), measured, met));
            }
        }
        goals
    }
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn measured(ops_per_sec: f64, items: u64, p99_us: u64) -> Measured {
        Measured {
            ops: 100,
            items,
            seconds: 1.0,
            ops_per_sec,
            items_per_sec: items as f64,
            p50_us: 10,
            p99_us,
            p999_us: p99_us,
            max_us: p99_us,
            errors: BTreeMap::new(),
            shed: 0,
        }
    }

    #[test]
    fn goals_compare_the_right_rows() {
        let mut r = Report::new(32, None, Duration::from_secs(5), 3);
        r.push(Figure::new("coffer", "put", measured(9000.0, 100, 800), Some(Duration::from_millis(10))));
        r.push(Figure::new("etcd (3 nodes)", "put", measured(6000.0, 100, 900), Some(Duration::from_millis(14))));
        r.push(Figure::new("coffer", "encrypt64", measured(700.0, 700, 100), None));
        r.push(Figure::new("coffer", "empty-rpc", measured(1000.0, 1000, 100), None));
        let md = r.markdown();
        assert!(md.contains("9000 vs 6000 puts/s = 1.50×"), "{md}");
        assert!(md.contains("CPU/put 100 vs 140 µs"), "{md}");
        assert!(md.contains("700/s = 70 % of empty RPC"), "{md}");
        let goals = r.goals();
        assert_eq!(goals[2].2, Some(false), "70 % is under 80 %");
        assert_eq!(goals[3].2, Some(true), "1.5× at a lower p99");
        assert_eq!(goals[4].2, None, "no etcd get measured");
        assert_eq!(goals[0].2, None, "no SoftHSM figure");
        r.push(Figure::new(TLS_PASS, "encrypt64", measured(900.0, 900, 100), None));
        r.push(Figure::new(PLAIN_PASS, "encrypt64", measured(1000.0, 1000, 100), None));
        let goals = r.goals();
        let tls = goals.iter().find(|g| g.0 == "TLS costs < 15 % on encrypt64").expect("the TLS goal");
        assert_eq!((tls.1.as_str(), tls.2), ("900/s with TLS, 1000/s without: 10.0 % slower", Some(true)));
    }

    #[test]
    fn each_baseline_is_printed_beside_the_coffer_figures_it_bounds() {
        let mut r = Report::new(32, None, Duration::from_secs(5), 3);
        r.push(Figure::new("coffer", "encrypt64-batch", measured(3000.0, 300_000, 100), None));
        r.push(Figure::new("ring, 1 core", "aes-256-gcm seal 64 B", measured(6e6, 6_000_000, 1), None));
        r.push(Figure::new("softhsm (cryptoki)", "aes-256-gcm encrypt 64 B", measured(25_000.0, 25_000, 100), None));
        r.push(Figure::new("coffer", "put", measured(3000.0, 3000, 100), None));
        let md = r.markdown();
        assert!(
            md.contains("| encrypt64-batch (300000/s) | ring, 1 core aes-256-gcm seal 64 B (6000000/s) | 0.0500× |"),
            "{md}"
        );
        assert!(md.contains("| softhsm (cryptoki) aes-256-gcm encrypt 64 B (25000/s) | 12.00× |"), "{md}");
        assert!(!md.contains("| put ("), "no etcd figure, so no put ratio: {md}");
    }

    #[test]
    fn an_open_loop_report_has_its_own_heading_and_no_goals() {
        let mut r = Report::new(64, Some(2000), Duration::from_secs(5), 3);
        r.push(Figure::new("coffer", "put", measured(2000.0, 10_000, 900), None));
        let md = r.markdown();
        assert!(md.starts_with("## Latency at a fixed rate (open loop)\n\nopen loop at 2000 ops/s"), "{md}");
        assert!(md.contains("| coffer | put | 2000 |"), "{md}");
        assert!(!md.contains("## Goals") && !md.contains("## Ratios"), "{md}");
        assert!(Report::new(32, None, Duration::from_secs(5), 3).markdown().contains("## Goals"));
    }

    #[test]
    fn the_hsm_baseline_is_the_fastest_softhsm_operation() {
        let mut r = Report::new(32, None, Duration::from_secs(5), 3);
        r.push(Figure::new("softhsm (cryptoki)", "unwrap", measured(8000.0, 8000, 100), None));
        r.push(Figure::new("softhsm (cryptoki)", "aes-256-gcm encrypt 64 B", measured(50_000.0, 50_000, 100), None));
        r.push(Figure::new("coffer", "encrypt64-batch", measured(4000.0, 400_000, 100), None));
        r.push(Figure::new("coffer", "encrypt64-stream", measured(6000.0, 600_000, 100), None));
        let goals = r.goals();
        assert_eq!(goals[0].1, "400000 items/s = 8.0× SoftHSM aes-256-gcm encrypt 64 B (50000/s)");
        assert_eq!(goals[0].2, Some(false), "8× the GCM figure, though 50× unwrap");
        assert_eq!(goals[1].2, Some(true));
    }
}
