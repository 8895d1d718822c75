//! A Wing–Gong linearizability search for one register, with Lowe's memoisation (the algorithm
//! Porcupine uses).
//!
//! Unlike the version-based check in [`crate::checker`], this one trusts nothing Coffer says
//! about order: it looks only at values and at invoke and complete times, and searches for a
//! sequential order of the operations that respects real time and register semantics. Operations
//! are kept in a doubly linked list of call and return events ordered by time; the search
//! linearizes any operation whose call comes before the first pending return, backtracks when a
//! return is reached whose operation is not linearized yet, and remembers every (linearized set,
//! register value) pair it has explored so no configuration is searched twice.
//!
//! A write whose outcome is unknown (it failed with a retryable status, yet may have been
//! applied) returns at "infinity": it may take effect at any time after its call, or never, since
//! linearizing it last changes nothing.

use std::collections::HashSet;

/// One operation on the register. Values are small integers standing for the unique values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegOp {
    /// Wrote value `0`.
    Write(u32),
    /// Read a value (`None`: the register was empty).
    Read(Option<u32>),
}

/// An operation with its real-time interval; `complete == u64::MAX` for an unknown outcome.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    /// What was done.
    pub op: RegOp,
    /// When it was invoked.
    pub invoke: u64,
    /// When it completed.
    pub complete: u64,
}

/// What the search found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A linearization exists.
    Linearizable,
    /// None exists. The witness for the report: the operation whose return blocked the deepest
    /// partial linearization the search reached (index into the checked slice).
    NotLinearizable {
        /// Index into the checked slice.
        stuck_at: usize,
    },
    /// The search gave up after exploring `budget` configurations.
    Inconclusive,
}

const HEAD: usize = 0;

/// Searches for a linearization of `ops`, exploring at most `budget` configurations.
pub fn check(ops: &[Timed], budget: usize) -> Verdict {
    let n = ops.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events: (time, is_return, op). At equal times calls come first: touching intervals count as
    // concurrent, the lenient reading of a microsecond clock.
    let mut events: Vec<(u64, bool, usize)> =
        ops.iter().enumerate().flat_map(|(i, o)| [(o.invoke, false, i), (o.complete, true, i)]).collect();
    events.sort_unstable();
    // Node 0 is the head, node k (1..=2n) is events[k-1], node 2n+1 is the tail.
    let tail = 2 * n + 1;
    let mut next: Vec<usize> = (1..=tail + 1).collect();
    let mut prev: Vec<usize> = (0..=tail).map(|k| k.saturating_sub(1)).collect();
    let mut return_node = vec![0; n];
    for (k, &(_, is_return, op)) in events.iter().enumerate() {
        if is_return {
            return_node[op] = k + 1;
        }
    }
    let node_op = |node: usize| events[node - 1].2;
    let is_call = |node: usize| !events[node - 1].1;

    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, q) = (prev[node], next[node]);
        next[p] = q;
        prev[q] = p;
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, node: usize| {
        let (p, q) = (prev[node], next[node]);
        next[p] = node;
        prev[q] = node;
    };

    let mut state: Option<u32> = None;
    let mut linearized = vec![0u64; n.div_ceil(64)];
    let mut seen: HashSet<(Vec<u64>, Option<u32>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u32>)> = Vec::new();
    let mut entry = next[HEAD];
    let mut explored = 0usize;
    // (linearized count, op) of the deepest blocked return seen: the witness.
    let mut deepest = (0usize, 0usize);
    while next[HEAD] != tail {
        explored += 1;
        if explored > budget {
            return Verdict::Inconclusive;
        }
        if is_call(entry) {
            let op = node_op(entry);
            let after = match ops[op].op {
                RegOp::Write(v) => Some(Some(v)),
                RegOp::Read(v) => (v == state).then_some(state),
            };
            if let Some(after) = after {
                linearized[op / 64] |= 1 << (op % 64);
                if seen.insert((linearized.clone(), after)) {
                    stack.push((entry, state));
                    state = after;
                    lift(&mut next, &mut prev, entry);
                    lift(&mut next, &mut prev, return_node[op]);
                    entry = next[HEAD];
                    continue;
                }
                linearized[op / 64] &= !(1 << (op % 64));
            }
            entry = next[entry];
        } else {
            // The first pending return: its operation must be linearized before it. Undo the last choice.
            if stack.len() >= deepest.0 {
                deepest = (stack.len(), node_op(entry));
            }
            let Some((call, before)) = stack.pop() else {
                return Verdict::NotLinearizable { stuck_at: deepest.1 };
            };
            let op = node_op(call);
            state = before;
            linearized[op / 64] &= !(1 << (op % 64));
            unlift(&mut next, &mut prev, return_node[op]);
            unlift(&mut next, &mut prev, call);
            entry = next[call];
        }
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(v: u32, invoke: u64, complete: u64) -> Timed {
        Timed { op: RegOp::Write(v), invoke, complete }
    }
    fn r(v: Option<u32>, invoke: u64, complete: u64) -> Timed {
        Timed { op: RegOp::Read(v), invoke, complete }
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // Two overlapping writes; a read overlapping the second may see the first, then the second.
        let h = [w(1, 0, 10), w(2, 5, 15), r(Some(1), 12, 20), r(Some(2), 25, 30)];
        assert_eq!(check(&h, 10_000), Verdict::Linearizable);
        let h = [w(1, 0, 10), w(2, 5, 15), r(Some(2), 12, 20), r(Some(2), 25, 30)];
        assert_eq!(check(&h, 10_000), Verdict::Linearizable);
        // Once both writes are done, a read of 1 says 1 went last: a later read of 2 cannot be.
        let h = [w(1, 0, 10), w(2, 5, 15), r(Some(1), 16, 20), r(Some(2), 25, 30)];
        assert_eq!(check(&h, 10_000), Verdict::NotLinearizable { stuck_at: 3 });
    }

    #[test]
    fn a_hand_made_non_linearizable_history_is_caught() {
        // A classic: one reader sees the new value, a later reader sees the old one again.
        let h = [w(1, 0, 10), w(2, 20, 100), r(Some(2), 30, 40), r(Some(1), 50, 60)];
        assert!(matches!(check(&h, 10_000), Verdict::NotLinearizable { .. }));
        // A read of a value nobody wrote, and a read from before a write was invoked.
        assert!(matches!(check(&[w(1, 0, 10), r(Some(7), 20, 30)], 100), Verdict::NotLinearizable { .. }));
        assert!(matches!(check(&[r(Some(1), 0, 5), w(1, 10, 20)], 100), Verdict::NotLinearizable { .. }));
        // A lost acknowledged write: the register reads as empty after it.
        assert!(matches!(check(&[w(1, 0, 10), r(None, 20, 30)], 100), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn an_unknown_write_may_apply_late_or_never() {
        let late = [w(1, 0, 10), w(2, 20, u64::MAX), r(Some(1), 30, 40), r(Some(2), 50, 60)];
        assert_eq!(check(&late, 10_000), Verdict::Linearizable);
        let never = [w(1, 0, 10), w(2, 20, u64::MAX), r(Some(1), 30, 40)];
        assert_eq!(check(&never, 10_000), Verdict::Linearizable);
        let but_not_undone = [w(1, 0, 10), w(2, 20, u64::MAX), r(Some(2), 30, 40), r(Some(1), 50, 60)];
        assert!(matches!(check(&but_not_undone, 10_000), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_long_clean_history_is_checked_without_backtracking_blowup() {
        // 4 clients, 5,000 operations, each read overlapping the next write.
        let mut h = Vec::new();
        for i in 0..1250u32 {
            let t = u64::from(i) * 100;
            h.push(w(i + 1, t, t + 60));
            h.push(r(Some(i + 1), t + 70, t + 90));
            h.push(r(Some(i + 1), t + 50, t + 95)); // overlaps the write: may see it
            h.push(r(if i == 0 { None } else { Some(i) }, t + 10, t + 20)); // before the write ends
        }
        assert_eq!(check(&h, 1_000_000), Verdict::Linearizable);
    }

    #[test]
    fn the_budget_bounds_the_search() {
        let h: Vec<Timed> = (0..50).map(|i| w(i, 0, 1000)).chain([r(Some(999), 0, 1000)]).collect();
        assert_eq!(check(&h, 100), Verdict::Inconclusive);
    }
}
