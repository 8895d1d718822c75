//! The rotation use cases behind the API: configure, rotate now, cancel, status.

use coffer_raft::{Outcome, RotationOp, RotationRecord, RotationState, SecretPath, UnixMillis};

use super::worker::propose;
use super::Spec;
use crate::error::Error;
use crate::node::Node;

/// Sets (or with `None` removes) a secret's rotation. Returns when the first scheduled rotation
/// is due.
///
/// # Errors
/// `InvalidArgument` for a bad config; `RotationState` when removing while a rotation runs.
pub async fn configure(
    node: &Node,
    path: &str,
    config: Option<&coffer_proto::v1::RotationConfig>,
) -> Result<Option<UnixMillis>, Error> {
    let path = SecretPath::parse(path)?;
    node.ready().await?;
    let (op, due) = match config {
        None => (RotationOp::Configure { spec: None, grace_ms: 0, next_due_ms: None }, None),
        Some(config) => {
            let (spec, grace_ms) = Spec::from_config(config)?;
            let due = spec.next_due(path.as_str(), UnixMillis::now().0).map(UnixMillis);
            (RotationOp::Configure { spec: Some(spec.to_text()), grace_ms, next_due_ms: due }, due)
        }
    };
    applied(propose(node, &path, op).await?)?;
    Ok(due)
}

/// Starts a rotation now; returns its number. The leader's worker runs it.
///
/// # Errors
/// `RotationState` when none is configured, one runs, or (two alternating users) `PREVIOUS` is
/// still within its grace.
pub async fn rotate(node: &Node, path: &str) -> Result<u64, Error> {
    let path = SecretPath::parse(path)?;
    node.read_barrier(None).await?;
    let record = node.reader().rotation(&path)?.ok_or_else(|| {
        Error::RotationState(format!(
            "secret {path} has no rotation config (set one with: coffer secret rotation configure {path} ...)"
        ))
    })?;
    let spec = Spec::parse(&record.spec).map_err(Error::RotationState)?;
    if spec.alternates() {
        if let Some(stages) = node.reader().stages(&path)? {
            if let (Some(previous), Some(until)) = (stages.previous, stages.previous_until_ms) {
                if until.0 > UnixMillis::now().0 {
                    return Err(Error::RotationState(format!(
                        "PREVIOUS (version {previous}) of {path} is within its grace period until {}; rotating now would \
                         change the password its holders use. Wait until then, or shorten the grace with \
                         coffer secret rotation configure",
                        crate::secrets::cli::format_ms(until.0)
                    )));
                }
            }
        }
    }
    let id = record.started.saturating_add(1);
    applied(propose(node, &path, RotationOp::Start { id, manual: true }).await?)?;
    Ok(id)
}

/// Ends a running or failed rotation and clears its `PENDING` label.
///
/// # Errors
/// `RotationState` when there is none.
pub async fn cancel(node: &Node, path: &str) -> Result<(), Error> {
    let path = SecretPath::parse(path)?;
    node.ready().await?;
    applied(propose(node, &path, RotationOp::Cancel).await?)
}

/// Every rotation record under `prefix` (linearizable).
///
/// # Errors
/// `Unavailable` when leadership cannot be confirmed.
pub async fn status(node: &Node, prefix: &str) -> Result<Vec<(String, RotationRecord)>, Error> {
    node.read_barrier(None).await?;
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = node.reader().rotations(prefix, after.as_deref(), 1000)?;
        let Some((last, _)) = page.last() else { return Ok(out) };
        after = Some(last.clone());
        out.extend(page);
    }
}

/// A rotation record's state, in one word, with its step and attempt.
pub fn state_words(record: &RotationRecord) -> (&'static str, String, u32, String) {
    match &record.state {
        RotationState::Idle => ("idle", String::new(), 0, String::new()),
        RotationState::Running(run) => {
            ("running", run.step.to_string(), run.attempt, run.last_error.clone().unwrap_or_default())
        }
        RotationState::Failed { step, reason, .. } => ("failed", step.to_string(), 0, reason.clone()),
    }
}

fn applied(outcome: Outcome) -> Result<(), Error> {
    match outcome {
        Outcome::Applied => Ok(()),
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other => Err(Error::Unexpected { what: "Rotation", outcome: Box::new(other) }),
    }
}
