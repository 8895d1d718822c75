//! A drill's report: verdict, violations, the faults and the nodes they hit, unavailability,
//! errors and latency; as JSON and markdown.
//!
//! # Correctness
//!
//! "fault → first write" (and "→ first decrypt") counts from the instant the first fault took
//! effect (see [`crate::fault`]) and only operations invoked at or after it: an operation already in
//! flight when the fault hit says nothing about how soon the cluster served again, even when it
//! completes after it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checker::SearchSummary;
use crate::fault::Fault;
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
    /// From the first fault taking effect to the completion of the first successful write invoked
    /// at or after it, milliseconds.
    pub fault_to_first_write_ms: Option<f64>,
    /// As `fault_to_first_write_ms`, for decrypts.
    pub fault_to_first_decrypt_ms: Option<f64>,
    /// Failed operations by gRPC status.
    pub errors_by_status: BTreeMap<String, usize>,
    /// Latency before the fault, while it lasted, and after it was healed.
    pub latency: BTreeMap<String, Latency>,
    /// How the Wing–Gong search over values and times went.
    pub search: SearchSummary,
    /// When the first fault took effect, microseconds on the history's clock.
    pub fault_at_us: u64,
    /// When the drill had healed every fault and found a leader again, on the same clock.
    pub healed_at_us: u64,
    /// Every fault, in order: what it did, when it took effect and the nodes it hit.
    pub faults: Vec<Fault>,
    /// What the scenario measured beside the history (the revocation drill's times).
    pub notes: Vec<String>,
    /// Every operation, written beside the report as JSON lines.
    #[serde(skip)]
    pub history: Vec<Op>,
}

/// From `fault_us` to the earliest completion of an operation `pick` accepts that was invoked at or
/// after `fault_us`, milliseconds.
fn first_after(history: &[Op], fault_us: u64, pick: impl Fn(&Op) -> bool) -> Option<f64> {
    history
        .iter()
        .filter(|o| o.invoke_us >= fault_us && pick(o))
        .map(|o| o.complete_us.saturating_sub(fault_us) as f64 / 1000.0)
        .min_by(f64::total_cmp)
}

impl Report {
    /// Builds the report of a history. The fault phase runs from the first of `faults` taking
    /// effect to `heal_us` (empty with no fault).
    pub fn new(
        scenario: &str,
        history: &[Op],
        faults: Vec<Fault>,
        heal_us: u64,
        violations: Vec<String>,
        search: SearchSummary,
    ) -> Report {
        let fault_us = faults.first().map_or(heal_us, |f| f.at_us);
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
            faults,
            notes: Vec::new(),
            history: history.to_vec(),
        }
    }

    /// Adds what the scenario found beside the history; a violation fails the drill.
    pub fn add_findings(&mut self, notes: Vec<String>, violations: Vec<String>) {
        self.notes.extend(notes);
        self.violations.extend(violations);
        if !self.violations.is_empty() {
            self.verdict = "FAIL".into();
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
             | faults | {} |\n| fault → first write | {} |\n| fault → first decrypt | {} |\n| errors | {} |\n\
             | linearizability search | {} |\n",
            self.scenario,
            self.verdict,
            self.operations,
            self.acknowledged_writes,
            self.faults_line(),
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
        if !self.notes.is_empty() {
            md.push('\n');
            for note in &self.notes {
                md.push_str(&format!("- {note}\n"));
            }
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

    /// The faults for the markdown table: the first few in full, then how many more.
    fn faults_line(&self) -> String {
        const SHOWN: usize = 5;
        if self.faults.is_empty() {
            return "none".to_owned();
        }
        let mut line = self.faults.iter().take(SHOWN).map(ToString::to_string).collect::<Vec<_>>().join("; ");
        if self.faults.len() > SHOWN {
            line.push_str(&format!("; … and {} more (see the JSON report)", self.faults.len() - SHOWN));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FaultKind, Hit, Role};

    fn write(invoke_us: u64, complete_us: u64, version: u64) -> Op {
        Op {
            client: 0,
            node: 0,
            call: Call::Write { key: "drill/k0".into(), value: format!("v{version}") },
            invoke_us,
            complete_us,
            outcome: Outcome::Written { version },
        }
    }

    fn kill_leader(at_us: u64) -> Fault {
        Fault { kind: FaultKind::Kill, at_us, nodes: vec![Hit { index: 1, id: 2, role: Some(Role::Leader) }] }
    }

    fn report(history: &[Op], faults: Vec<Fault>) -> Report {
        Report::new("kill-leader", history, faults, 5_000_000, Vec::new(), SearchSummary::default())
    }

    /// The `kill-leader` drill that reported 14 ms: a write the old leader took in its last
    /// milliseconds completes just after the kill, but it was invoked before the process was
    /// reaped, so it says nothing about failover. Only the write invoked after the fault counts.
    #[test]
    fn drill_kill_leader_a_write_in_flight_at_the_fault_does_not_count() -> anyhow::Result<()> {
        let fault_us = 2_000_000;
        let history = [
            write(1_990_000, 1_995_000, 1), // before the fault: not counted
            write(1_999_000, 2_014_000, 2), // in flight at the fault, completes 14 ms after it
            write(2_100_000, 2_530_000, 3), // invoked after the fault: the first that counts
            write(2_400_000, 2_600_000, 4), // later still
        ];
        let r = report(&history, vec![kill_leader(fault_us)]);
        assert_eq!(r.fault_at_us, fault_us);
        let ms = r.fault_to_first_write_ms.ok_or_else(|| anyhow::anyhow!("no write counted"))?;
        assert!((ms - 530.0).abs() < 1e-9, "fault → first write {ms} ms, want 530 ms");
        // An invoke exactly at the fault instant counts.
        let at = report(&[write(fault_us, fault_us + 7_000, 1)], vec![kill_leader(fault_us)]);
        assert_eq!(at.fault_to_first_write_ms, Some(7.0));
        Ok(())
    }

    /// The report names the node each fault hit, with its role, in the markdown and the JSON.
    #[test]
    fn the_report_names_the_node_each_fault_hit() -> anyhow::Result<()> {
        let r = report(&[write(2_100_000, 2_530_000, 1)], vec![kill_leader(2_000_000)]);
        let md = r.markdown();
        assert!(md.contains("| faults | kill -9 leader (node 2) at 2.00 s |"), "{md}");
        let json = serde_json::to_value(&r)?;
        assert_eq!(json["faults"][0]["kind"], "kill");
        assert_eq!(json["faults"][0]["nodes"][0]["id"], 2);
        assert_eq!(json["faults"][0]["nodes"][0]["role"], "leader");
        Ok(())
    }
}
