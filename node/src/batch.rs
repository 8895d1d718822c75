// Hot path: every secret put.
//! Write batching: the secret puts a node takes while its earlier writes are in flight share one
//! Raft entry.
//!
//! openraft 0.9 appends each client write as its own log entry from its single core task, and
//! the log store fsyncs every append before acknowledging it, so one entry per put costs a synced
//! RocksDB write on the leader and on each follower per put, one after another. A node instead
//! gathers the puts that arrive while up to [`IN_FLIGHT`] of its batches are being committed into
//! one [`Command::Batch`]. The state machine applies the items in order with the same checks and
//! responses as separate entries (a rejected item changes nothing and does not affect the
//! others), so a batch is only a cheaper way to carry the same commands. A put that arrives when
//! nothing is in flight goes at once: batching adds no wait at low load.
//!
//! A follower forwards a whole batch to the leader in one `ClientWrite` call, and the leader
//! splices it into its own next batch ([`Forwarded`]), so one entry carries the writes of every
//! node: fewer fsyncs, AppendEntries and applies per write (3-node put benchmark, back to back:
//! 2,713, 3,188 and 3,383 puts/s spliced against 2,548 and 2,582 without, at 428-501 against
//! 570 µs of server CPU per put).

use std::sync::Weak;
use std::time::Duration;

use coffer_raft::{Command, Response};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::Error;
use crate::node::Node;

/// Batches of one node being committed at once. One is best measured (3-node put benchmark,
/// 32 clients, back-to-back runs: 3,166 and 3,186 puts/s with one; 2,788 and 3,081 with two;
/// 2,323 with four): the leader still pipelines, since each node, and each follower's forwarded
/// batch, is a separate entry.
pub(crate) const IN_FLIGHT: usize = 1;
/// How long the next batch waits for one in flight before it goes anyway. Well above a commit's
/// time under load (about 10 ms at the median with 32 writers), far below the write timeout.
const SLOW_BATCH: Duration = Duration::from_millis(50);
/// Most commands in one batch.
const MAX_ITEMS: usize = 256;
/// Most bytes of sealed values and paths in one batch, so an entry stays well under the Raft
/// transport's message limit.
const MAX_BYTES: usize = 1024 * 1024;

type Waiter = oneshot::Sender<Result<Response, Error>>;

/// The sending side of a node's batcher.
#[derive(Debug)]
pub(crate) struct Batcher {
    tx: mpsc::UnboundedSender<(Command, Waiter)>,
}

impl Batcher {
    /// Starts the batching task; it proposes through `node` and ends when the batcher is dropped.
    pub(crate) fn start(node: Weak<Node>) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(node, rx));
        Batcher { tx }
    }

    /// Proposes `command` in the next batch and waits for its own response.
    pub(crate) async fn propose(&self, command: Command) -> Result<Response, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((command, tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> Error {
    Error::Unavailable { reason: "this node is shutting down".into() }
}

/// Bytes a command adds to an entry, roughly: what makes batches large.
fn weight(command: &Command) -> usize {
    match command {
        Command::PutSecret { path, sealed, .. } => path.len() + sealed.ciphertext.len() + 64,
        Command::Batch(items) => items.iter().map(weight).sum(),
        _ => 256,
    }
}

/// Commands a queued command adds to a batch: a batch a follower forwarded is spliced in.
fn items(command: &Command) -> usize {
    match command {
        Command::Batch(items) => items.len(),
        _ => 1,
    }
}

async fn run(node: Weak<Node>, mut rx: mpsc::UnboundedReceiver<(Command, Waiter)>) {
    let slots = std::sync::Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match rx.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // Wait for a slot before gathering: puts arriving meanwhile join this batch. A batch that
        // is slow to commit (an election, a leader cut off) does not hold the next one back for
        // longer than SLOW_BATCH.
        let slot = match tokio::time::timeout(SLOW_BATCH, slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Some(slot),
            Ok(Err(_)) => return,
            Err(_) => None,
        };
        let (mut bytes, mut count) = (weight(&first.0), items(&first.0));
        let mut batch = vec![first];
        while count < MAX_ITEMS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(next) if bytes + weight(&next.0) > MAX_BYTES || count + items(&next.0) > MAX_ITEMS => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += weight(&next.0);
                    count += items(&next.0);
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let Some(node) = node.upgrade() else { return };
        tokio::spawn(async move {
            commit(&node, batch).await;
            drop(slot);
        });
    }
}

/// Proposes the batch (a lone command as itself; forwarded batches spliced in) and hands each
/// waiter its response.
async fn commit(node: &Node, batch: Vec<(Command, Waiter)>) {
    // For each waiter: None for one command, Some(n) for a spliced batch of n.
    let mut shapes = Vec::with_capacity(batch.len());
    let mut flat = Vec::with_capacity(batch.len());
    let mut waiters = Vec::with_capacity(batch.len());
    for (command, waiter) in batch {
        match command {
            Command::Batch(items) => {
                shapes.push(Some(items.len()));
                flat.extend(items);
            }
            one => {
                shapes.push(None);
                flat.push(one);
            }
        }
        waiters.push(waiter);
    }
    let lone = shapes == [None];
    let command = if lone { flat.remove(0) } else { Command::Batch(flat) };
    let timeout = node.config.write_timeout;
    let outcome = match tokio::time::timeout(timeout, node.propose_unbounded(command)).await {
        Ok(outcome) => outcome,
        // Each caller has given up by now (the same bound); this frees the slot.
        Err(_) => Err(Error::Unavailable { reason: "the write was not committed in time".into() }),
    };
    let answers = match outcome {
        Ok(response) if lone => Ok(vec![response]),
        Ok(response) => split(&shapes, response),
        Err(e) => Err(e),
    };
    match answers {
        Ok(answers) => {
            for (waiter, answer) in waiters.into_iter().zip(answers) {
                let _ = waiter.send(Ok(answer));
            }
        }
        Err(e) => {
            for waiter in waiters {
                let _ = waiter.send(Err(e.for_another_caller()));
            }
        }
    }
}

/// Each waiter's share of a batch's response: one response, or a batch of them for a spliced
/// batch.
fn split(shapes: &[Option<usize>], response: Response) -> Result<Vec<Response>, Error> {
    let expected: usize = shapes.iter().map(|s| s.unwrap_or(1)).sum();
    let responses = match response {
        Response::Batch(responses) if responses.len() == expected => responses,
        other => {
            return Err(Error::Internal(format!("a batch of {expected} writes was answered with {other:?}").into()))
        }
    };
    let mut responses = responses.into_iter();
    Ok(shapes
        .iter()
        .filter_map(|shape| match shape {
            None => responses.next(),
            Some(n) => Some(Response::Batch(responses.by_ref().take(*n).collect())),
        })
        .collect())
}

/// Writes forwarded by followers join this node's batches. A node that does not lead refuses
/// them as before, rather than forwarding them on: two nodes with stale views of the leader would
/// otherwise pass a write back and forth until it timed out.
pub(crate) struct Forwarded(pub(crate) Weak<Node>);

impl coffer_raft::ForwardedWrites for Forwarded {
    fn propose(&self, command: Command) -> coffer_raft::BoxFuture<'_, Result<Response, tonic::Status>> {
        Box::pin(async move {
            let node = self.0.upgrade().ok_or_else(|| tonic::Status::from(stopped()))?;
            let known = match node.leader_elsewhere() {
                Ok(None) => return Ok(node.propose(command).await?),
                Ok(Some((id, _))) => format!("node {id}"),
                Err(_) => "none known".to_owned(),
            };
            Err(tonic::Status::unavailable(format!("this node is not the leader (leader: {known}); retry")))
        })
    }
}

#[cfg(test)]
mod tests {
    use coffer_raft::Rejection;

    use super::*;

    fn put(version: u64) -> Response {
        Response::Put { version, created_at_ms: 1 }
    }

    #[test]
    fn a_spliced_batch_gets_its_own_items_back_in_order() -> Result<(), Error> {
        let taken = Response::Rejected(Rejection::VersionTaken { version: 2, current: 2 });
        let response = Response::Batch(vec![put(1), put(2), taken.clone(), put(4), put(5)]);
        let answers = split(&[None, Some(3), None], response)?;
        assert_eq!(answers, vec![put(1), Response::Batch(vec![put(2), taken, put(4)]), put(5)]);
        assert_eq!(split(&[Some(0), None], Response::Batch(vec![put(1)]))?, vec![Response::Batch(vec![]), put(1)]);
        Ok(())
    }

    #[test]
    fn a_batch_answered_with_the_wrong_shape_fails_every_waiter() {
        assert!(matches!(split(&[None, None], Response::Batch(vec![put(1)])), Err(Error::Internal(_))));
        assert!(matches!(split(&[None, None], put(1)), Err(Error::Internal(_))));
    }
}
