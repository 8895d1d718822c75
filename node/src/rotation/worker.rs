//! The rotation worker: on the leader, starts due rotations and drives each running one through
//! its steps. Followers do nothing; a new leader finds running rotations in the state and goes on
//! from the step each is at.
//!
//! Each attempt at a step is committed before it runs (`BeginStep`) and its end after
//! (`CreatePending`, `StepDone`, `Finish`, or `StepFailed`), so the state always says which step
//! a rotation is at and how many attempts it took. A step op names its rotation and step: if the
//! state has moved on (another leader finished the step), the op is refused and the worker reads
//! the state again, so a step is recorded done once. The rotator's work itself may run twice (a
//! leader dies after the work, before its end is committed); every rotator step is idempotent.
//!
//! Bounded: at most [`MAX_RUNNING`] rotations run at once and at most [`STARTS_PER_TICK`] start
//! per tick; due times are spread over each secret's window (see `Spec::next_due`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use coffer_raft::{
    Op, Outcome, Rejection, Rotation, RotationOp, RotationRecord, RotationState, SecretPath, SecretVersion, Stage,
    Step, UnixMillis, Write,
};
use zeroize::Zeroizing;

use super::rotators::{self, Inputs, Login};
use super::{RotatorSpec, Spec};
use crate::error::Error;
use crate::node::Node;

/// How often the leader looks for due and running rotations.
pub const TICK: Duration = Duration::from_millis(500);
/// Rotations that run at once on the leader.
pub const MAX_RUNNING: usize = 64;
/// Scheduled rotations started per tick (so 10,000 due at once start over minutes, not at once).
pub const STARTS_PER_TICK: usize = 16;
/// The longest wait between attempts at a step.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs until the task is aborted (on shutdown).
pub async fn run(node: Arc<Node>) {
    let mut tasks: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if node.replica.role() != coffer_raft::Role::Leader {
            // A deposed leader stops its steps: the new leader resumes them from the state.
            for (_, task) in tasks.drain() {
                task.abort();
            }
            continue;
        }
        tasks.retain(|_, task| !task.is_finished());
        if let Err(e) = pass(&node, &mut tasks).await {
            tracing::warn!(error = %e, "rotation pass failed; retrying next tick");
        }
    }
}

/// One look at every rotation: drive the running ones, start the due ones.
async fn pass(node: &Arc<Node>, tasks: &mut HashMap<String, tokio::task::JoinHandle<()>>) -> Result<(), Error> {
    let now = UnixMillis::now().0;
    let mut started = 0;
    let mut after: Option<String> = None;
    loop {
        let page = node.reader().rotations("", after.as_deref(), 1000)?;
        let Some((last, _)) = page.last() else { return Ok(()) };
        after = Some(last.clone());
        for (path, record) in page {
            if tasks.len() >= MAX_RUNNING {
                return Ok(());
            }
            if tasks.contains_key(&path) {
                continue;
            }
            let due = match &record.state {
                RotationState::Running(_) => true,
                RotationState::Idle | RotationState::Failed { .. } => {
                    started < STARTS_PER_TICK && record.next_due_ms.is_some_and(|due| due.0 <= now)
                }
            };
            if !due {
                continue;
            }
            let Ok(parsed) = SecretPath::parse(&path) else { continue };
            if !matches!(record.state, RotationState::Running(_)) {
                match start_scheduled(node, &parsed, &record).await {
                    Ok(true) => started += 1,
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(path = %path, error = %e, "could not start a scheduled rotation");
                        continue;
                    }
                }
            }
            let node = node.clone();
            tasks.insert(path, tokio::spawn(async move { drive(&node, &parsed).await }));
        }
    }
}

/// Starts a due rotation, unless a rotator that alternates users would change the password of
/// `PREVIOUS` while it is within its grace: then it waits for the grace to end.
async fn start_scheduled(node: &Node, path: &SecretPath, record: &RotationRecord) -> Result<bool, Error> {
    let spec = Spec::parse(&record.spec).map_err(Error::RotationState)?;
    if spec.alternates() {
        if let Some(until) = node.reader().stages(path)?.and_then(|s| s.previous.and(s.previous_until_ms)) {
            if until.0 > UnixMillis::now().0 {
                return Ok(false);
            }
        }
    }
    let op = RotationOp::Start { id: record.started.saturating_add(1), manual: false };
    match propose(node, path, op).await? {
        Outcome::Applied => Ok(true),
        Outcome::Rejected(_) => Ok(false),
        other => Err(Error::Unexpected { what: "Rotation", outcome: Box::new(other) }),
    }
}

/// Proposes one rotation op on `path`.
pub(crate) async fn propose(node: &Node, path: &SecretPath, op: RotationOp) -> Result<Outcome, Error> {
    let rotation = Rotation { path: path.clone(), op, at_ms: UnixMillis::now() };
    node.propose(Write::new(Op::Rotation(rotation))).await
}

/// Drives one rotation until it finishes, fails, is cancelled, or another leader takes it.
async fn drive(node: &Node, path: &SecretPath) {
    loop {
        match drive_once(node, path).await {
            Ok(Continue::Again) => {}
            Ok(Continue::After(wait)) => tokio::time::sleep(wait).await,
            Ok(Continue::Done) => return,
            Err(e) => {
                // The state could not be read or written (no quorum, say): try again shortly.
                tracing::warn!(path = %path, error = %e, "rotation worker could not proceed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if node.replica.role() != coffer_raft::Role::Leader {
                    return;
                }
            }
        }
    }
}

enum Continue {
    Again,
    After(Duration),
    Done,
}

/// One attempt at the step the rotation is at.
async fn drive_once(node: &Node, path: &SecretPath) -> Result<Continue, Error> {
    let Some(record) = node.reader().rotation(path)? else { return Ok(Continue::Done) };
    let RotationState::Running(run) = &record.state else { return Ok(Continue::Done) };
    let (id, step) = (run.id, run.step);
    let spec = match Spec::parse(&record.spec) {
        Ok(spec) => spec,
        Err(reason) => return fail(node, path, &record, id, step, run.attempt, reason, true).await,
    };
    if run.attempt >= spec.max_attempts {
        // The attempts ran out across leaders (each kill counts one).
        let reason = run.last_error.clone().unwrap_or_else(|| format!("{} attempts did not finish", run.attempt));
        return fail(node, path, &record, id, step, run.attempt, reason, true).await;
    }
    let attempt = run.attempt.saturating_add(1);
    let begin = RotationOp::BeginStep { id, step, attempt, node: node.config.node_id };
    if let Outcome::Rejected(_) = propose(node, path, begin).await? {
        return Ok(Continue::Again);
    }
    let deadline = Duration::from_millis(spec.step_deadline_ms);
    if !node.config.rotation_step_pause.is_zero() {
        tokio::time::sleep(node.config.rotation_step_pause).await;
    }
    let result = match tokio::time::timeout(deadline, run_step(node, path, &record, &spec, id, step)).await {
        Ok(result) => result,
        Err(_) => {
            Err(format!("step {step} did not finish within its deadline of {}", humantime::format_duration(deadline)))
        }
    };
    match result {
        Ok(()) => {
            audit(node, path, id, step, attempt, None).await;
            Ok(Continue::Again)
        }
        Err(reason) => {
            let last = attempt >= spec.max_attempts;
            let outcome = fail(node, path, &record, id, step, attempt, reason, last).await?;
            if last {
                return Ok(outcome);
            }
            let backoff = Duration::from_secs(1u64 << attempt.min(5)).min(MAX_BACKOFF);
            Ok(Continue::After(backoff))
        }
    }
}

/// Records a failed attempt (the rotation's failure when `last`), and audits it.
#[allow(clippy::too_many_arguments)]
async fn fail(
    node: &Node,
    path: &SecretPath,
    record: &RotationRecord,
    id: u64,
    step: Step,
    attempt: u32,
    reason: String,
    last: bool,
) -> Result<Continue, Error> {
    let next_due = Spec::parse(&record.spec).ok().and_then(|s| s.next_due(path.as_str(), UnixMillis::now().0));
    tracing::warn!(path = %path, rotation = id, step = %step, attempt, last, reason = %reason, "rotation step failed");
    let op = RotationOp::StepFailed { id, step, reason: reason.clone(), last, next_due_ms: next_due.map(UnixMillis) };
    propose(node, path, op).await?;
    audit(node, path, id, step, attempt, Some(&reason)).await;
    Ok(if last { Continue::Done } else { Continue::Again })
}

/// Writes the audit record of a step's end.
async fn audit(node: &Node, path: &SecretPath, id: u64, step: Step, attempt: u32, error: Option<&str>) {
    let Some(audit) = &node.audit else { return };
    let info = crate::audit::layer::AuditInfo {
        principal: Some("coffer-rotation".into()),
        path: Some(format!("secret/{path}")),
        decision: Some("allowed"),
        rule: Some("rotation".into()),
        error: error.map(str::to_owned),
        ..Default::default()
    };
    let request_id = format!("rotation:{path}#{id}/{step}/{attempt}");
    let status = if error.is_some() { "ABORTED" } else { "OK" };
    if let Err(e) = audit.record_work(&request_id, &format!("rotation/{step}"), info, status).await {
        tracing::warn!(path = %path, error = %e, "could not audit a rotation step");
    }
}

/// Reads a version's value on the leader (a linearizable read).
async fn read_version(node: &Node, path: &SecretPath, version: SecretVersion) -> Result<Zeroizing<Vec<u8>>, String> {
    crate::secrets::get::get_secret(node, path.as_str(), Some(version.0), None, None)
        .await
        .map(|s| s.value)
        .map_err(|e| format!("cannot read version {version} of {path}: {e}"))
}

/// What the rotator needs besides the pending value: `CURRENT` and the admin login.
async fn inputs(node: &Node, path: &SecretPath, spec: &Spec) -> Result<Inputs, String> {
    let stages = node.reader().stages(path).map_err(|e| e.to_string())?;
    let current = match stages.map(|s| s.current) {
        Some(SecretVersion(0)) => None,
        Some(v) => Some(read_version(node, path, v).await?),
        None => match node.reader().secret(path).map_err(|e| e.to_string())? {
            Some(meta) => Some(read_version(node, path, meta.current_version).await?),
            None => None,
        },
    };
    let admin = match &spec.rotator {
        RotatorSpec::Postgres { admin_secret, .. } => {
            let value = crate::secrets::get::get_secret(node, admin_secret, None, None, None)
                .await
                .map_err(|e| format!("cannot read the admin login at {admin_secret}: {e}"))?;
            Some(Login::parse(&value.value, &format!("the admin secret {admin_secret}"))?)
        }
        RotatorSpec::Generator { .. } => None,
    };
    Ok(Inputs { current, admin })
}

/// The pending version's value.
async fn pending(node: &Node, path: &SecretPath) -> Result<Zeroizing<Vec<u8>>, String> {
    let version = node
        .reader()
        .stages(path)
        .map_err(|e| e.to_string())?
        .and_then(|s| s.pending)
        .ok_or_else(|| format!("{path} has no PENDING version"))?;
    read_version(node, path, version).await
}

/// Runs one step's work and commits its end. A refusal because the state moved on is not a
/// failure: the step was recorded by someone else.
async fn run_step(
    node: &Node,
    path: &SecretPath,
    record: &RotationRecord,
    spec: &Spec,
    id: u64,
    step: Step,
) -> Result<(), String> {
    let inputs = inputs(node, path, spec).await?;
    let end = match step {
        Step::Create => {
            let value = rotators::create(&spec.rotator, &inputs)?;
            return create_pending(node, path, id, &value).await;
        }
        Step::Set => {
            rotators::set(&spec.rotator, &inputs, &pending(node, path).await?).await?;
            RotationOp::StepDone { id, step }
        }
        Step::Test => {
            rotators::test(&spec.rotator, &pending(node, path).await?).await?;
            RotationOp::StepDone { id, step }
        }
        Step::Finish => {
            let now = UnixMillis::now().0;
            let until = (record.grace_ms > 0).then(|| now.saturating_add(record.grace_ms));
            rotators::finish(&spec.rotator, &inputs, &pending(node, path).await?, until).await?;
            RotationOp::Finish { id, next_due_ms: spec.next_due(path.as_str(), now).map(UnixMillis) }
        }
    };
    match propose(node, path, end).await.map_err(|e| e.to_string())? {
        Outcome::Applied | Outcome::Rejected(Rejection::RotationMoved { .. }) => Ok(()),
        other => Err(format!("recording the end of step {step} failed: {other:?}")),
    }
}

/// Seals the new value for the next version and writes it under `PENDING`.
async fn create_pending(node: &Node, path: &SecretPath, id: u64, value: &[u8]) -> Result<(), String> {
    let ready = node.ready().await.map_err(|e| e.to_string())?;
    for _ in 0..8 {
        let current =
            node.reader().secret(path).map_err(|e| e.to_string())?.map_or(SecretVersion(0), |m| m.current_version);
        let version = current.next().ok_or_else(|| format!("{path} has reached the largest version number"))?;
        let sealed = ready.keyring.seal(path.as_str(), version, value).map_err(|e| e.to_string())?;
        let op =
            RotationOp::CreatePending { id, version, sealed, default_max_versions: node.config.default_max_versions };
        match propose(node, path, op).await.map_err(|e| e.to_string())? {
            Outcome::Put { .. } | Outcome::Rejected(Rejection::RotationMoved { .. }) => return Ok(()),
            Outcome::Rejected(Rejection::VersionTaken { .. }) => {}
            Outcome::Rejected(r) => return Err(r.to_string()),
            other => return Err(format!("writing the PENDING version: unexpected {other:?}")),
        }
    }
    Err(format!("concurrent puts to {path} kept taking the PENDING version's number"))
}

/// The label a version holds, for answers.
pub fn labels_of(stages: &coffer_raft::Stages, version: SecretVersion) -> Vec<Stage> {
    let mut out = Vec::new();
    if stages.current == version {
        out.push(Stage::Current);
    }
    if stages.pending == Some(version) {
        out.push(Stage::Pending);
    }
    if stages.previous == Some(version) {
        out.push(Stage::Previous);
    }
    out
}
