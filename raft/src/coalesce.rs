// Hot path: every linearizable read.
//! Coalesces concurrent read-index rounds.
//!
//! A linearizable read needs a leadership check (a heartbeat round to a quorum) that *started
//! after the read arrived*; a round already under way when it arrives will not do, since a write
//! acknowledged just before the read may be missing from it. Many concurrent reads can share one
//! round, though: every read that arrives while round k runs waits for round k + 1, which one of
//! them starts when round k ends. Under load that turns one heartbeat round per read into one per
//! round trip, whatever the number of readers. etcd batches its read-index requests the same way.
//!
//! Cancellation: the caller running a round may be dropped mid-round (its client gave up). A
//! guard then ends the round and wakes the waiters, one of which starts the next; without it
//! every later read on the node would wait forever (found by the partition-leader drill in CI).

use std::future::Future;

use std::sync::Mutex;

use tokio::sync::watch;

/// Shares rounds of an async check among concurrent callers (see the module documentation).
#[derive(Debug)]
pub(crate) struct Coalescer<T: Clone> {
    state: Mutex<State>,
    done: watch::Sender<Option<(u64, T)>>,
}

#[derive(Debug, Default)]
struct State {
    /// Rounds started so far.
    started: u64,
    /// Whether a round is running.
    running: bool,
}

impl<T: Clone> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer { state: Mutex::new(State::default()), done: watch::Sender::new(None) }
    }
}

impl<T: Clone> Coalescer<T> {
    /// The result of a round of `round` that started after this call did: this caller's own, or
    /// one another caller started meanwhile.
    pub(crate) async fn run<F, Fut>(&self, round: F) -> T
    where
        F: Fn() -> Fut,
        Fut: Future<Output = T>,
    {
        let mut rx = self.done.subscribe();
        // A round already running started before this call: only the next one will do.
        let target = self.lock().started + 1;
        loop {
            if let Some((finished, result)) = rx.borrow_and_update().as_ref() {
                if *finished >= target {
                    return result.clone();
                }
            }
            let mine = {
                let mut state = self.lock();
                if state.running {
                    None
                } else {
                    state.running = true;
                    state.started += 1;
                    Some(state.started)
                }
            };
            if let Some(number) = mine {
                let guard = RoundGuard { coalescer: self };
                let result = round().await;
                std::mem::forget(guard);
                let mut state = self.lock();
                state.running = false;
                self.done.send_replace(Some((number, result.clone())));
                drop(state);
                return result;
            }
            // Someone else's round is running: wait for it (or a later one) to finish.
            if rx.changed().await.is_err() {
                // The sender lives in `self`; it cannot be gone while we borrow `self`.
                return round().await;
            }
        }
    }

    /// The state lock: held for a few field updates, never across an `.await`.
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Ends a round whose runner was dropped before it finished, and wakes the waiters.
struct RoundGuard<'a, T: Clone> {
    coalescer: &'a Coalescer<T>,
}

impl<T: Clone> Drop for RoundGuard<'_, T> {
    fn drop(&mut self) {
        self.coalescer.lock().running = false;
        // Wake every waiter without a result: one of them starts the next round.
        self.coalescer.done.send_modify(|_| {});
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Each round returns its number and the count of writes it saw; a caller must see every
    /// write that completed before it called.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_share_rounds_that_started_after_they_arrived() {
        let coalescer = Arc::new(Coalescer::<(u64, u64)>::default());
        let rounds = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (coalescer, rounds, writes) = (coalescer.clone(), rounds.clone(), writes.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    // A write completes, then a read must reflect it.
                    let seen_before = writes.fetch_add(1, Ordering::SeqCst) + 1;
                    let (_, seen) = coalescer
                        .run(|| {
                            let (rounds, writes) = (rounds.clone(), writes.clone());
                            async move {
                                let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                                // The round snapshots the writes when it starts, then takes a while.
                                let seen = writes.load(Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(2)).await;
                                (n, seen)
                            }
                        })
                        .await;
                    assert!(seen >= seen_before, "a round that started before the write was reused");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let rounds = rounds.load(Ordering::SeqCst);
        assert!(rounds < 64 * 20 / 4, "1280 reads shared {rounds} rounds");
    }

    /// Found by the partition-leader drill in CI: the caller running a round was cancelled (its
    /// client timed out while the leader could not reach a quorum), the round never ended, and
    /// every later read on the node waited forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drill_partition_leader_a_cancelled_round_does_not_block_later_reads() {
        let coalescer = Arc::new(Coalescer::<u64>::default());
        // A round that never ends, cancelled by a timeout, with a waiter queued behind it.
        let stuck = coalescer.clone();
        let runner = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_millis(50), stuck.run(std::future::pending::<u64>)).await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let queued = coalescer.clone();
        let waiter = tokio::spawn(async move { queued.run(|| async { 7 }).await });
        assert!(runner.await.expect("runner").is_err(), "the stuck round timed out");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(got.expect("the waiter was not left waiting").expect("task"), 7);
        let later = tokio::time::timeout(Duration::from_secs(5), coalescer.run(|| async { 8 })).await;
        assert_eq!(later.expect("a later read runs its own round"), 8);
    }
}
