// Hot path: every write.
//! Write batching: the writes a node takes while its earlier writes are in flight share one
//! Raft entry.
//!
//! openraft 0.9 appends each client write as its own log entry from its single core task, and
//! the log store fsyncs every append before acknowledging it, so one entry per put costs a synced
//! RocksDB write on the leader and on each follower per put, one after another. A node instead
//! gathers the writes that arrive while up to [`IN_FLIGHT`] of its batches are being committed
//! into one [`Command::Writes`]. The state machine applies the items in order with the same
//! checks and outcomes as separate entries (a rejected item changes nothing and does not affect
//! the others), so a batch is only a cheaper way to carry the same writes. A write that arrives
//! when nothing is in flight goes at once: batching adds no wait at low load.
//!
//! A follower forwards a whole batch to the leader in one `ClientWrite` call, and the leader
//! splices it into its own next batch (the peer service queues it here like a local group of
//! writes), so one entry carries the writes of every node: fewer fsyncs, AppendEntries and applies
//! per write (3-node put benchmark, back to back: 2,713, 3,188 and 3,383 puts/s spliced against
//! 2,548 and 2,582 without, at 428-501 against 570 µs of server CPU per put).

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::command::{Command, Outcome, Response, Write};
use crate::error::Error;
use crate::replica::Inner;

/// Batches of one node being committed at once. One is best measured (3-node put benchmark,
/// 32 clients, back-to-back runs: 3,166 and 3,186 puts/s with one; 2,788 and 3,081 with two;
/// 2,323 with four): the leader still pipelines, since each node, and each follower's forwarded
/// batch, is a separate entry.
pub(crate) const IN_FLIGHT: usize = 1;
/// How long the next batch waits for one in flight before it goes anyway. Well above a commit's
/// time under load (about 10 ms at the median with 32 writers), far below the write timeout.
const SLOW_BATCH: Duration = Duration::from_millis(50);
/// Most writes in one batch.
pub(crate) const MAX_ITEMS: usize = 256;
/// Most bytes of sealed values and names in one batch, so an entry stays well under the Raft
/// transport's message limit.
pub(crate) const MAX_BYTES: usize = 1024 * 1024;

/// The size of a group of writes, as batches count it.
pub(crate) fn weight(writes: &[Write]) -> usize {
    writes.iter().map(|w| w.op.weight() + w.request_id.as_ref().map_or(0, |id| id.as_str().len())).sum()
}

type Waiter = oneshot::Sender<Result<Vec<Outcome>, Error>>;

/// A group of writes that must stay together: one local write, or a follower's whole batch.
struct Group {
    writes: Vec<Write>,
    waiter: Waiter,
}

impl Group {
    fn weight(&self) -> usize {
        weight(&self.writes)
    }
}

/// The sending side of a node's batcher.
#[derive(Debug)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Group>,
}

/// How many proposals (a node's own, and its followers' forwarded batches) may wait for the
/// batcher: past it a write is shed with `Overloaded` (`RESOURCE_EXHAUSTED`) instead of queueing
/// without bound. At the measured ~3,000 puts/s, 10,000 waiting is over 3 s of writes.
pub(crate) const QUEUE: usize = 10_000;

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("writes", &self.writes.len()).finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the batching task; it commits through `replica` and ends when the batcher is dropped.
    pub(crate) fn start(replica: Weak<Inner>) -> Batcher {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(replica, rx));
        Batcher { tx }
    }

    /// Proposes `writes` together in the next batch and waits for their outcomes, in order.
    pub(crate) async fn propose(&self, writes: Vec<Write>) -> Result<Vec<Outcome>, Error> {
        let (waiter, rx) = oneshot::channel();
        self.tx.try_send(Group { writes, waiter }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Error::Overloaded { queue: "write batcher".into(), capacity: QUEUE as u64 }
            }
            mpsc::error::TrySendError::Closed(_) => Error::ShuttingDown,
        })?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }
}

async fn run(replica: Weak<Inner>, mut rx: mpsc::Receiver<Group>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // Wait for a slot before gathering: writes arriving meanwhile join this batch. A batch
        // that is slow to commit (an election, a leader cut off) does not hold the next one back
        // for longer than SLOW_BATCH.
        let slot = match tokio::time::timeout(SLOW_BATCH, slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Some(slot),
            Ok(Err(_)) => return,
            Err(_) => None,
        };
        let (mut bytes, mut count) = (first.weight(), first.writes.len());
        let mut batch = vec![first];
        while count < MAX_ITEMS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(next) if bytes + next.weight() > MAX_BYTES || count + next.writes.len() > MAX_ITEMS => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.weight();
                    count += next.writes.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let Some(replica) = replica.upgrade() else { return };
        tokio::spawn(async move {
            commit(&replica, batch).await;
            drop(slot);
        });
    }
}

/// Commits the groups as one entry and hands each waiter its outcomes.
async fn commit(replica: &Inner, batch: Vec<Group>) {
    let mut sizes = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    let mut writes = Vec::with_capacity(batch.len());
    for group in batch {
        sizes.push(group.writes.len());
        writes.extend(group.writes);
        waiters.push(group.waiter);
    }
    let timeout = replica.config.write_timeout;
    let outcome = match tokio::time::timeout(timeout, replica.commit(Command::Writes(writes))).await {
        Ok(outcome) => outcome,
        // Each caller has given up by now (the same bound); this frees the slot.
        Err(_) => Err(Error::OutcomeUnknown { waited: timeout }),
    };
    match outcome.and_then(|response| split(&sizes, response)) {
        Ok(answers) => {
            for (waiter, answer) in waiters.into_iter().zip(answers) {
                let _ = waiter.send(Ok(answer));
            }
        }
        Err(e) => {
            for waiter in waiters {
                let _ = waiter.send(Err(e.clone()));
            }
        }
    }
}

/// Each group's share of a batch's outcomes.
fn split(sizes: &[usize], response: Response) -> Result<Vec<Vec<Outcome>>, Error> {
    let expected: usize = sizes.iter().sum();
    let mut outcomes = match response {
        Response::Batch(outcomes) if outcomes.len() == expected => outcomes.into_iter(),
        other => return Err(Error::raft(WrongShape { expected, got: format!("{other:?}") })),
    };
    Ok(sizes.iter().map(|n| outcomes.by_ref().take(*n).collect()).collect())
}

/// A batch answered with another number of outcomes than it had writes: a broken invariant.
#[derive(Debug, thiserror::Error)]
#[error("a batch of {expected} writes was answered with {got}")]
struct WrongShape {
    expected: usize,
    got: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Rejection;
    use crate::{SecretVersion, UnixMillis};

    fn put(version: u64) -> Outcome {
        Outcome::Put { version: SecretVersion(version), created_at_ms: UnixMillis(1) }
    }

    #[test]
    fn a_spliced_batch_gets_its_own_outcomes_back_in_order() -> Result<(), Error> {
        let taken = Outcome::Rejected(Rejection::VersionTaken { version: SecretVersion(2), current: SecretVersion(2) });
        let response = Response::Batch(vec![put(1), put(2), taken.clone(), put(4), put(5)]);
        let answers = split(&[1, 3, 1], response)?;
        assert_eq!(answers, vec![vec![put(1)], vec![put(2), taken, put(4)], vec![put(5)]]);
        assert_eq!(split(&[0, 1], Response::Batch(vec![put(1)]))?, vec![vec![], vec![put(1)]]);
        Ok(())
    }

    #[test]
    fn a_batch_answered_with_the_wrong_shape_fails_every_waiter() {
        assert!(matches!(split(&[1, 1], Response::Batch(vec![put(1)])), Err(Error::Raft { .. })));
        assert!(matches!(split(&[1, 1], Response::Applied), Err(Error::Raft { .. })));
    }
}
