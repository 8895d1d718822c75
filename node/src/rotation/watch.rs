//! `Secrets.Watch`: metadata events under a prefix, from a revision on, then as they apply.
//!
//! Events are part of the replicated state (numbered in apply order, the same on every node), so
//! any node serves a Watch and a client that loses its node resumes on another from the revision
//! after the last one it saw. A revision older than the oldest kept is `OUT_OF_RANGE` (the
//! message names the oldest kept: list again, then watch from there). A quiet stream gets a
//! bookmark every [`BOOKMARK_EVERY`] with the newest revision applied, so a client's resume
//! point moves even when nothing under its prefix changes.

use std::time::Duration;

use coffer_proto::v1::WatchEvent;
use coffer_raft::{Event, EventKind};

use crate::error::Error;
use crate::node::Node;
use crate::wire::timestamp;

/// A quiet stream gets a bookmark this often.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(5);
/// Events read from the state per batch.
const BATCH: usize = 256;

/// The wire form of an event.
pub fn to_wire(event: &Event) -> WatchEvent {
    let mut out = WatchEvent {
        revision: event.revision,
        at: Some(timestamp(event.at_ms.0)),
        path: event.path.clone(),
        ..Default::default()
    };
    out.kind = match &event.kind {
        EventKind::Put { version, stage } => {
            out.versions = vec![version.0];
            out.step = stage.to_string();
            "put"
        }
        EventKind::Deleted { versions } => {
            out.versions = versions.iter().map(|v| v.0).collect();
            "deleted"
        }
        EventKind::Undeleted { versions } => {
            out.versions = versions.iter().map(|v| v.0).collect();
            "undeleted"
        }
        EventKind::Destroyed { versions } => {
            out.versions = versions.iter().map(|v| v.0).collect();
            "destroyed"
        }
        EventKind::LabelsMoved { current, pending, previous } => {
            out.current = current.0;
            out.pending = pending.map_or(0, |v| v.0);
            out.previous = previous.map_or(0, |v| v.0);
            "labels-moved"
        }
        EventKind::RotationStarted { id, manual } => {
            out.rotation = *id;
            out.reason = if *manual { "asked for" } else { "scheduled" }.into();
            "rotation-started"
        }
        EventKind::RotationStep { id, step } => {
            out.rotation = *id;
            out.step = step.to_string();
            "rotation-step"
        }
        EventKind::RotationFinished { id, version } => {
            out.rotation = *id;
            out.versions = vec![version.0];
            "rotation-finished"
        }
        EventKind::RotationFailed { id, step, reason } => {
            out.rotation = *id;
            out.step = step.to_string();
            out.reason.clone_from(reason);
            "rotation-failed"
        }
        EventKind::RotationCancelled { id } => {
            out.rotation = *id;
            "rotation-cancelled"
        }
        EventKind::RotationConfigured { enabled } => {
            out.reason = if *enabled { "set" } else { "removed" }.into();
            "rotation-configured"
        }
    }
    .into();
    out
}

/// Streams the events under `prefix` from `from` (0: from the next one) into `tx` until the
/// receiver goes away. Each event is sent only if `visible(path)` (the caller's rights).
///
/// # Errors
/// `OutOfRange` for a revision no longer kept; storage failures.
pub async fn stream(
    node: &Node,
    prefix: String,
    from: u64,
    tx: tokio::sync::mpsc::Sender<Result<WatchEvent, tonic::Status>>,
    visible: impl Fn(&str) -> bool,
) -> Result<(), Error> {
    let mut tail = node.reader().subscribe_events();
    let (oldest, newest) = node.reader().events_window()?;
    let mut next = if from == 0 { newest.saturating_add(1) } else { from };
    if next < oldest {
        return Err(Error::OutOfRange(format!(
            "revision {from} is no longer kept (the oldest kept is {oldest}); list the secrets again, then watch from revision {oldest}"
        )));
    }
    loop {
        let newest = *tail.borrow_and_update();
        while next <= newest {
            let events = node.reader().events(next, BATCH)?;
            let Some(last) = events.last() else { break };
            next = last.revision.saturating_add(1);
            for event in &events {
                if event.path.starts_with(&prefix) && visible(&event.path) && tx.send(Ok(to_wire(event))).await.is_err()
                {
                    return Ok(());
                }
            }
        }
        tokio::select! {
            changed = tail.changed() => if changed.is_err() { return Ok(()) },
            () = tokio::time::sleep(BOOKMARK_EVERY) => {
                let bookmark = WatchEvent { revision: next.saturating_sub(1), kind: "bookmark".into(), ..Default::default() };
                if tx.send(Ok(bookmark)).await.is_err() {
                    return Ok(());
                }
            }
            () = tx.closed() => return Ok(()),
        }
    }
}
