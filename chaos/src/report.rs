//! A drill's report: verdict, violations, unavailability, errors and latency; as JSON and markdown.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checker::SearchSummary;
use crate::history::{Call, Op, Outcome};
use crate::scenario::{errors, latency};

/// Latency of successful operations in one phase.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Successful operations.
    pub count: usize,
    /// Median, milliseconds.
    pub p50_ms: f64,
    /// 99th percentile, milliseconds.
    pub p99_ms: f64,
}

/// The report of one drill.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub scenario: String,
    /// "pass" or "FAIL".
    pub verdict: String,
    /// Every broken invariant.
    pub violations: Vec<String>,
    /// Operations recorded.
    pub operations: usize,
    /// Writes acknowledged.
    pub acknowledged_writes: usize,
    /// From the fault to the first successful write invoked after it, milliseconds.
    pub fault_to_first_write_ms: Option<f64>,
    /// From the fault to the first successful decrypt invoked after it, milliseconds.
    pub fault_to_first_decrypt_ms: Option<f64>,
    /// Failed operations by gRPC status.
    pub errors_by_status: BTreeMap<String, usize>,
    /// Latency before the fault, while it lasted, and after it was healed.
    pub latency: BTreeMap<String, Latency>,
    /// How the Wing–Gong search over values and times went.
    pub search: SearchSummary,
    /// When the fault was injected and healed, microseconds on the history's clock.
    pub fault_at_us: u64,
    /// See `fault_at_us`.
    pub healed_at_us: u64,
    /// Every operation, written beside the report as JSON lines.
    #[serde(skip)]
    pub history: Vec<Op>,
}

fn first_after(history: &[Op], fault_us: u64, pick: impl Fn(&Op) -> bool) -> Option<f64> {
    history
        .iter()
        .filter(|o| o.invoke_us >= fault_us && pick(o))
        .map(|o| o.complete_us.saturating_sub(fault_us) as f64 / 1000.0)
        .min_by(f64::total_cmp)
}

impl Report {
    /// Builds the report of a history.
    pub fn new(
        scenario: &str,
        history: &[Op],
        (fault_us, heal_us): (u64, u64),
        violations: Vec<String>,
        search: SearchSummary,
    ) -> Report {
        let acknowledged_writes = history
            .iter()
            .filter(|o| matches!((&o.call, &o.outcome), (Call::Write { .. }, Outcome::Written { .. })))
            .count();
        let latency = BTreeMap::from([
            ("1-before".to_owned(), latency(history, 0, fault_us)),
            ("2-during".to_owned(), latency(history, fault_us, heal_us)),
            ("3-after".to_owned(), latency(history, heal_us, u64::MAX)),
        ]);
        Report {
            scenario: scenario.to_owned(),
            verdict: if violations.is_empty() { "pass".into() } else { "FAIL".into() },
            operations: history.len(),
            acknowledged_writes,
            fault_to_first_write_ms: first_after(history, fault_us, |o| matches!(o.outcome, Outcome::Written { .. })),
            fault_to_first_decrypt_ms: first_after(history, fault_us, |o| {
                matches!(o.outcome, Outcome::Decrypted { .. })
            }),
            errors_by_status: errors(history),
            latency,
            violations,
            search,
            fault_at_us: fault_us,
            healed_at_us: heal_us,
            history: history.to_vec(),
        }
    }

    /// Whether the drill found no violation.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    /// The report as a markdown section.
    pub fn markdown(&self) -> String {
        let ms = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.0} ms"));
        let mut md = format!(
            "## {} — {}\n\n| measure | value |\n|---|---|\n| operations | {} |\n| acknowledged writes | {} |\n\
             | fault → first write | {} |\n| fault → first decrypt | {} |\n| errors | {} |\n\
             | linearizability search | {} |\n",
            self.scenario,
            self.verdict,
            self.operations,
            self.acknowledged_writes,
            ms(self.fault_to_first_write_ms),
            ms(self.fault_to_first_decrypt_ms),
            if self.errors_by_status.is_empty() {
                "none".to_owned()
            } else {
                self.errors_by_status.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            },
            match self.search.inconclusive.len() {
                0 => format!("{} operations on {} secrets, all searched", self.search.operations, self.search.keys),
                n => format!(
                    "{} operations on {} secrets; {n} ran out of budget ({})",
                    self.search.operations,
                    self.search.keys,
                    self.search.inconclusive.join(", ")
                ),
            }
        );
        md.push_str("\n| phase | ops | p50 | p99 |\n|---|---|---|---|\n");
        for (phase, l) in &self.latency {
            md.push_str(&format!("| {} | {} | {:.1} ms | {:.1} ms |\n", &phase[2..], l.count, l.p50_ms, l.p99_ms));
        }
        if !self.violations.is_empty() {
            md.push_str("\nViolations:\n");
            for v in self.violations.iter().take(20) {
                md.push_str(&format!("- {v}\n"));
            }
            if self.violations.len() > 20 {
                md.push_str(&format!("- … and {} more (see the JSON report)\n", self.violations.len() - 20));
            }
        }
        md
    }
}
