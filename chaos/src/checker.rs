//! Checks a drill's history.
//!
//! Linearizability of each secret as a register, using the versions Coffer assigns: writes are
//! totally ordered by version (the commit order), so a linearizable read that returned version `v`
//! is consistent iff (1) the write of `v` was invoked before the read completed, (2) no write with a
//! higher version completed before the read was invoked, (3) no read that completed before this
//! one was invoked saw a higher version, and (4) the value is the one written with `v`. A read of
//! "no secret" is consistent only if no write completed before it was invoked. Writes whose outcome
//! is unknown (they failed, but may have applied) can justify a read but never require one.
//! This is the Wing–Gong condition specialised to a register whose writes carry their order, which
//! makes the check linear instead of a search. Acknowledged writes must also get versions in
//! real-time order.
//!
//! [`search`] checks the same histories again without trusting the versions: a Wing–Gong search
//! over values and times alone ([`crate::wgl`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::history::{Call, Op, Outcome};
use crate::wgl::{self, RegOp, Timed, Verdict};

/// Configurations the search may explore per secret before it gives up on that secret.
const SEARCH_BUDGET: usize = 300_000;

/// A broken invariant, in words.
pub type Violation = String;

/// Each secret's writes and linearizable reads, in history order.
fn registers(history: &[Op]) -> BTreeMap<&str, Vec<&Op>> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        match &op.call {
            Call::Write { key, .. } | Call::Read { key, max_staleness_ms: None } => {
                by_key.entry(key).or_default().push(op)
            }
            _ => {}
        }
    }
    by_key
}

/// Checks every secret's linearizable reads against its writes.
pub fn linearizable(history: &[Op]) -> Vec<Violation> {
    let by_key = registers(history);
    let mut violations = Vec::new();
    for (key, ops) in by_key {
        violations.extend(check_register(key, &ops));
    }
    violations
}

/// How the Wing–Gong search went over a history.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SearchSummary {
    /// Secrets searched.
    pub keys: usize,
    /// Operations searched, over all secrets.
    pub operations: usize,
    /// Secrets whose search ran out of budget (neither proven nor refuted).
    pub inconclusive: Vec<String>,
}

/// Searches each secret's history of writes and linearizable reads for a linearization, with
/// values and times only. Acknowledged writes and successful reads take part; a failed write takes
/// part (with an unknown completion) only if some read saw its value, since one nobody saw may
/// as well never have applied.
pub fn search(history: &[Op]) -> (Vec<Violation>, SearchSummary) {
    let by_key = registers(history);
    let mut violations = Vec::new();
    let mut summary = SearchSummary::default();
    for (key, ops) in by_key {
        let seen: HashSet<&str> = ops
            .iter()
            .filter_map(|o| match &o.outcome {
                Outcome::Value { value, .. } => Some(value.as_str()),
                _ => None,
            })
            .collect();
        let mut ids: HashMap<&str, u32> = HashMap::new();
        let mut id = |v| -> u32 {
            let next = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            *ids.entry(v).or_insert(next)
        };
        let mut timed: Vec<(&Op, Timed)> = Vec::new();
        for op in &ops {
            let t = match (&op.call, &op.outcome) {
                (Call::Write { value, .. }, Outcome::Written { .. }) => {
                    Timed { op: RegOp::Write(id(value)), invoke: op.invoke_us, complete: op.complete_us }
                }
                (Call::Write { value, .. }, Outcome::Failed { .. }) if seen.contains(value.as_str()) => {
                    Timed { op: RegOp::Write(id(value)), invoke: op.invoke_us, complete: u64::MAX }
                }
                (Call::Read { .. }, Outcome::Value { value, .. }) => {
                    Timed { op: RegOp::Read(Some(id(value))), invoke: op.invoke_us, complete: op.complete_us }
                }
                (Call::Read { .. }, Outcome::Missing) => {
                    Timed { op: RegOp::Read(None), invoke: op.invoke_us, complete: op.complete_us }
                }
                _ => continue,
            };
            timed.push((op, t));
        }
        summary.keys += 1;
        summary.operations += timed.len();
        let plain: Vec<Timed> = timed.iter().map(|(_, t)| *t).collect();
        match wgl::check(&plain, SEARCH_BUDGET) {
            Verdict::Linearizable => {}
            Verdict::Inconclusive => summary.inconclusive.push(key.to_owned()),
            Verdict::NotLinearizable { stuck_at } => {
                let op = timed[stuck_at].0;
                violations.push(format!(
                    "{key}: no linearization of its {} writes and reads exists (values and times alone); \
                     the search could not place the {:?} → {:?} invoked at {}us on node {}",
                    plain.len(),
                    op.call,
                    op.outcome,
                    op.invoke_us,
                    op.node + 1
                ));
            }
        }
    }
    (violations, summary)
}

fn check_register(key: &str, ops: &[&Op]) -> Vec<Violation> {
    let mut out = Vec::new();
    // version -> (value, invoke) of acknowledged writes
    let mut acked: HashMap<u64, (&str, u64)> = HashMap::new();
    for op in ops {
        if let (Call::Write { value, .. }, Outcome::Written { version }) = (&op.call, &op.outcome) {
            if let Some((other, _)) = acked.insert(*version, (value, op.invoke_us)) {
                out.push(format!("{key}: two acknowledged writes got version {version} ({other:?} and {value:?})"));
            }
        }
    }
    // value -> invoke of every write, acknowledged or not
    let invoked: HashMap<&str, u64> = ops
        .iter()
        .filter_map(|op| match &op.call {
            Call::Write { value, .. } => Some((value.as_str(), op.invoke_us)),
            _ => None,
        })
        .collect();
    // (complete, version) of acknowledged writes and of successful reads, to bound each read below.
    let mut floors: Vec<(u64, u64)> = Vec::new();
    for op in ops {
        match (&op.call, &op.outcome) {
            (Call::Write { .. }, Outcome::Written { version }) => floors.push((op.complete_us, *version)),
            (Call::Read { .. }, Outcome::Value { version, .. }) => floors.push((op.complete_us, *version)),
            _ => {}
        }
    }
    floors.sort_unstable();
    // Running maximum of versions by completion time.
    let mut prefix_max = Vec::with_capacity(floors.len());
    let mut max = 0;
    for (t, v) in &floors {
        max = max.max(*v);
        prefix_max.push((*t, max));
    }
    let floor_before = |t: u64| -> u64 {
        let idx = prefix_max.partition_point(|(c, _)| *c < t);
        if idx == 0 {
            0
        } else {
            prefix_max[idx - 1].1
        }
    };
    for op in ops {
        if let (Call::Write { .. }, Outcome::Written { version }) = (&op.call, &op.outcome) {
            let floor = floor_before(op.invoke_us);
            if *version <= floor {
                out.push(format!(
                    "{key}: a write invoked at {}us got version {version}, but version {floor} was acknowledged or read before it began",
                    op.invoke_us
                ));
            }
        }
    }
    for op in ops {
        let Call::Read { .. } = op.call else { continue };
        match &op.outcome {
            Outcome::Value { version, value } => {
                let floor = floor_before(op.invoke_us);
                if *version < floor {
                    out.push(format!(
                        "{key}: read at {}us returned version {version}, but version {floor} was already acknowledged or read before it began",
                        op.invoke_us
                    ));
                }
                match acked.get(version) {
                    Some((written, _)) if written != value => out.push(format!(
                        "{key}: read returned {value:?} as version {version}, which was written as {written:?}"
                    )),
                    Some((_, w_invoke)) if *w_invoke > op.complete_us => {
                        out.push(format!("{key}: read returned version {version} before its write was invoked"))
                    }
                    Some(_) => {}
                    None => match invoked.get(value.as_str()) {
                        Some(w_invoke) if *w_invoke <= op.complete_us => {}
                        _ => out
                            .push(format!("{key}: read returned {value:?} (version {version}), which no write wrote")),
                    },
                }
            }
            Outcome::Missing => {
                let floor = floor_before(op.invoke_us);
                if floor > 0 {
                    out.push(format!(
                        "{key}: read at {}us found no secret after version {floor} existed",
                        op.invoke_us
                    ));
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: Call, invoke_us: u64, complete_us: u64, outcome: Outcome) -> Op {
        Op { client: 0, node: 0, call, invoke_us, complete_us, outcome }
    }
    fn w(v: &str, t0: u64, t1: u64, version: Option<u64>) -> Op {
        let outcome = match version {
            Some(version) => Outcome::Written { version },
            None => Outcome::Failed { code: "Unavailable".into() },
        };
        op(Call::Write { key: "k".into(), value: v.into() }, t0, t1, outcome)
    }
    fn r(t0: u64, t1: u64, seen: Option<(u64, &str)>) -> Op {
        let outcome = match seen {
            Some((version, value)) => Outcome::Value { version, value: value.into() },
            None => Outcome::Missing,
        };
        op(Call::Read { key: "k".into(), max_staleness_ms: None }, t0, t1, outcome)
    }

    #[test]
    fn a_linearizable_history_passes() {
        let h = vec![
            r(0, 5, None),
            w("a", 10, 20, Some(1)),
            r(15, 25, Some((1, "a"))), // overlaps the write: may see it
            w("b", 30, 40, Some(2)),
            r(32, 38, Some((1, "a"))), // concurrent with b: may still see a
            w("c", 50, 60, None),      // unknown outcome
            r(55, 70, Some((3, "c"))), // may see the unknown write
            r(80, 90, Some((3, "c"))),
        ];
        assert_eq!(linearizable(&h), Vec::<String>::new());
    }

    /// b is concurrent with both reads, but once one read saw b, a later read may not see a. The
    /// versions b and the second read claim are given.
    fn back_in_time(b_version: u64, second_read_version: u64) -> Vec<Op> {
        vec![
            w("a", 0, 10, Some(1)),
            w("b", 20, 100, Some(b_version)),
            r(30, 40, Some((b_version, "b"))),
            r(50, 60, Some((second_read_version, "a"))),
        ]
    }

    fn must_find_one(violations: &[Violation], containing: &str) {
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains(containing), "{violations:?}");
    }

    #[test]
    fn versions_against_real_time_are_caught() {
        must_find_one(&linearizable(&[w("a", 0, 10, Some(2)), w("b", 20, 30, Some(1))]), "got version 1");
    }

    /// The search also catches a non-linearizable history whose versions were made up to look
    /// consistent.
    #[test]
    fn the_search_catches_what_the_versions_would_hide() {
        // Versions that lie (the later read claims a newer version for the old value): the
        // version check lets it through; the search, which ignores versions, does not.
        let lying = back_in_time(3, 4);
        assert_eq!(linearizable(&lying), Vec::<String>::new());
        let (violations, summary) = search(&lying);
        must_find_one(&violations, "no linearization");
        assert_eq!((summary.keys, summary.operations, summary.inconclusive.len()), (1, 4, 0));
        // A linearizable history with an unknown write that a read saw passes.
        let fine = vec![w("a", 0, 10, Some(1)), w("c", 50, 60, None), r(55, 70, Some((2, "c")))];
        assert_eq!(search(&fine).0, Vec::<String>::new());
    }

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_caught() {
        let h = vec![w("a", 0, 10, Some(1)), w("b", 20, 30, Some(2)), r(40, 50, Some((1, "a")))];
        must_find_one(&linearizable(&h), "version 2 was already acknowledged");
    }

    /// The hand-made non-linearizable history the issue asks for, caught by both checkers.
    #[test]
    fn reads_going_back_in_time_are_caught() {
        let h = back_in_time(2, 1);
        assert_eq!(linearizable(&h).len(), 1);
        assert_eq!(search(&h).0.len(), 1);
    }

    #[test]
    fn reads_from_the_future_and_phantoms_are_caught() {
        let h = vec![r(0, 5, Some((1, "a"))), w("a", 10, 20, Some(1))];
        assert_eq!(linearizable(&h).len(), 2, "the read, and a write whose version was seen before it began");
        let h = vec![w("a", 0, 10, Some(1)), r(20, 30, Some((1, "x")))];
        assert_eq!(linearizable(&h).len(), 1);
        let h = vec![w("a", 0, 10, Some(1)), r(20, 30, None)];
        assert_eq!(linearizable(&h).len(), 1, "a lost write reads as missing");
        let h = vec![w("a", 0, 10, Some(1)), w("b", 5, 15, Some(1))];
        assert_eq!(linearizable(&h).len(), 1, "duplicate versions");
    }
}
