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
//! makes the check linear instead of a search.

use std::collections::{BTreeMap, HashMap};

use crate::history::{Call, Op, Outcome};

/// A broken invariant, in words.
pub type Violation = String;

/// Checks every secret's linearizable reads against its writes.
pub fn linearizable(history: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history {
        match &op.call {
            Call::Write { key, .. } | Call::Read { key, max_staleness_ms: None } => {
                by_key.entry(key).or_default().push(op)
            }
            _ => {}
        }
    }
    let mut violations = Vec::new();
    for (key, ops) in by_key {
        violations.extend(check_register(key, &ops));
    }
    violations
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

    #[test]
    fn a_stale_read_after_an_acknowledged_write_is_caught() {
        let h = vec![w("a", 0, 10, Some(1)), w("b", 20, 30, Some(2)), r(40, 50, Some((1, "a")))];
        let v = linearizable(&h);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("version 2 was already acknowledged"), "{v:?}");
    }

    #[test]
    fn reads_going_back_in_time_are_caught() {
        // b is concurrent with both reads, but once one read saw b, a later read may not see a.
        let h = vec![
            w("a", 0, 10, Some(1)),
            w("b", 20, 100, Some(2)),
            r(30, 40, Some((2, "b"))),
            r(50, 60, Some((1, "a"))),
        ];
        assert_eq!(linearizable(&h).len(), 1);
    }

    #[test]
    fn reads_from_the_future_and_phantoms_are_caught() {
        let h = vec![r(0, 5, Some((1, "a"))), w("a", 10, 20, Some(1))];
        assert_eq!(linearizable(&h).len(), 1);
        let h = vec![w("a", 0, 10, Some(1)), r(20, 30, Some((1, "x")))];
        assert_eq!(linearizable(&h).len(), 1);
        let h = vec![w("a", 0, 10, Some(1)), r(20, 30, None)];
        assert_eq!(linearizable(&h).len(), 1, "a lost write reads as missing");
        let h = vec![w("a", 0, 10, Some(1)), w("b", 5, 15, Some(1))];
        assert_eq!(linearizable(&h).len(), 1, "duplicate versions");
    }
}
