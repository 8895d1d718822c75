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
//! A follower forwards a whole batch to the leader in one `ClientWrite` call.

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
        _ => 256,
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
        let mut bytes = weight(&first.0);
        let mut batch = vec![first];
        while batch.len() < MAX_ITEMS && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(next) if bytes + weight(&next.0) > MAX_BYTES => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += weight(&next.0);
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

/// Proposes the batch (a lone command as itself) and hands each waiter its response.
async fn commit(node: &Node, batch: Vec<(Command, Waiter)>) {
    let (commands, waiters): (Vec<Command>, Vec<Waiter>) = batch.into_iter().unzip();
    let command = match <[Command; 1]>::try_from(commands) {
        Ok([one]) => one,
        Err(many) => Command::Batch(many),
    };
    let batched = matches!(command, Command::Batch(_));
    let timeout = node.config.write_timeout;
    let outcome = match tokio::time::timeout(timeout, node.propose_unbounded(command)).await {
        Ok(outcome) => outcome,
        // Each caller has given up by now (the same bound); this frees the slot.
        Err(_) => Err(Error::Unavailable { reason: "the write was not committed in time".into() }),
    };
    match outcome {
        Ok(Response::Batch(responses)) if batched && responses.len() == waiters.len() => {
            for (waiter, response) in waiters.into_iter().zip(responses) {
                let _ = waiter.send(Ok(response));
            }
        }
        Ok(response) if !batched => {
            for waiter in waiters {
                let _ = waiter.send(Ok(response.clone()));
            }
        }
        Ok(other) => {
            let reason = format!("a batch of {} writes was answered with {other:?}", waiters.len());
            for waiter in waiters {
                let _ = waiter.send(Err(Error::Internal(reason.clone().into())));
            }
        }
        Err(e) => {
            for waiter in waiters {
                let _ = waiter.send(Err(e.for_another_caller()));
            }
        }
    }
}
