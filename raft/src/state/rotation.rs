//! Apply rules for stage labels, rotations and the event log a Watch stream reads.
//!
//! - A rotation step applies only to the rotation it names, at the step it names: a step op from
//!   a deposed leader, or a retry of one that already applied, is refused with
//!   [`Rejection::RotationMoved`] and changes nothing, so a step is recorded done at most once.
//! - Labels move only here and in a put: a put makes its version `CURRENT` (the old one becomes
//!   `PREVIOUS`); a rotation's create step puts under `PENDING`; its finish moves both in one op.
//! - Events are numbered densely (`revision`) in apply order, the same on every node; the oldest
//!   are dropped past [`EVENTS_KEPT`].

use crate::command::{Outcome, PutSecret, Rejection, SecretMeta, VersionMeta};
use crate::error::StoreError;
use crate::rotation::{
    Event, EventKind, Rotation, RotationOp, RotationRecord, RotationState, Running, Stage, Stages, Step,
};
use crate::state::Txn;
use crate::store::{cf, version_key, EVENTS_NEXT_KEY};
use crate::{SecretPath, SecretVersion, UnixMillis};

/// How many events the state keeps; a Watch from an older revision is told to re-list.
pub(crate) const EVENTS_KEPT: u64 = 100_000;

/// Appends an event, dropping the one that falls out of the window.
pub(crate) fn emit(txn: &mut Txn<'_>, path: &SecretPath, at_ms: UnixMillis, kind: EventKind) -> Result<(), StoreError> {
    let revision = txn.get::<u64>(cf::CLUSTER, EVENTS_NEXT_KEY, "event counter")?.unwrap_or(1);
    txn.put(cf::EVENTS, revision.to_be_bytes().to_vec(), &Event { revision, at_ms, path: path.to_string(), kind });
    if let Some(old) = revision.checked_sub(EVENTS_KEPT) {
        txn.delete(cf::EVENTS, old.to_be_bytes().to_vec());
    }
    txn.put(cf::CLUSTER, EVENTS_NEXT_KEY.to_vec(), &revision.saturating_add(1));
    txn.last_event = Some(revision);
    Ok(())
}

/// A secret's labels; a secret written before labels existed has `CURRENT` at its newest version.
pub(crate) fn stages(txn: &Txn<'_>, path: &SecretPath, meta: Option<&SecretMeta>) -> Result<Stages, StoreError> {
    Ok(txn.get::<Stages>(cf::STAGES, path.as_str().as_bytes(), "stage labels")?.unwrap_or(Stages {
        current: meta.map_or(SecretVersion(0), |m| m.current_version),
        pending: None,
        previous: None,
        previous_until_ms: None,
    }))
}

fn rotation(txn: &Txn<'_>, path: &SecretPath) -> Result<Option<RotationRecord>, StoreError> {
    txn.get::<RotationRecord>(cf::ROTATIONS, path.as_str().as_bytes(), "rotation record")
}

/// Moves `CURRENT` to `version`; the old `CURRENT` becomes `PREVIOUS` for `grace_ms` (0: until
/// it moves again).
fn make_current(stages: &mut Stages, version: SecretVersion, at_ms: UnixMillis, grace_ms: u64) {
    if stages.current != version && stages.current != SecretVersion(0) {
        stages.previous = Some(stages.current);
        stages.previous_until_ms = (grace_ms > 0).then(|| UnixMillis(at_ms.0.saturating_add(grace_ms)));
    }
    stages.current = version;
    if stages.pending == Some(version) {
        stages.pending = None;
    }
}

/// Writes a new version with a label: `CURRENT` for a client's put, `PENDING` for a rotation's
/// create step. Versions that hold a label are never pruned.
pub(crate) fn put_version(
    txn: &mut Txn<'_>,
    put: &PutSecret,
    stage: Stage,
    default_grace_ms: u64,
) -> Result<Outcome, StoreError> {
    let meta = txn.get::<SecretMeta>(cf::SECRETS, put.path.as_str().as_bytes(), "secret metadata")?;
    let current = meta.as_ref().map_or(SecretVersion(0), |m| m.current_version);
    if let Some(expected) = put.cas {
        if expected != current {
            return Ok(Outcome::Rejected(Rejection::CasMismatch { expected, current }));
        }
    }
    let Some(next) = current.next() else {
        return Ok(Outcome::Rejected(Rejection::SecretVersionsExhausted { path: put.path.to_string() }));
    };
    if put.version != next {
        return Ok(Outcome::Rejected(Rejection::VersionTaken { version: put.version, current }));
    }
    let mut stages = stages(txn, &put.path, meta.as_ref())?;
    let mut meta = meta.unwrap_or(SecretMeta {
        current_version: SecretVersion(0),
        max_versions: put.default_max_versions,
        created_at_ms: put.at_ms,
        updated_at_ms: put.at_ms,
        versions: Default::default(),
    });
    if let Some(max) = put.max_versions {
        meta.max_versions = max;
    }
    meta.current_version = next;
    meta.updated_at_ms = put.at_ms;
    meta.versions.insert(next, VersionMeta { created_at_ms: put.at_ms, deleted_at_ms: None, destroyed: false });
    match stage {
        Stage::Current | Stage::Previous => {
            let grace = rotation(txn, &put.path)?.map_or(default_grace_ms, |r| r.grace_ms);
            make_current(&mut stages, next, put.at_ms, grace);
        }
        Stage::Pending => stages.pending = Some(next),
    }
    let labelled =
        |v: &SecretVersion| *v == stages.current || Some(*v) == stages.pending || Some(*v) == stages.previous;
    let keep = meta.max_versions.max(1) as usize;
    while meta.versions.len() > keep {
        let Some(oldest) = meta.versions.keys().copied().find(|v| !labelled(v)) else { break };
        meta.versions.remove(&oldest);
        txn.delete(cf::VERSIONS, version_key(put.path.as_str(), oldest));
    }
    txn.put(cf::VERSIONS, version_key(put.path.as_str(), next), &put.sealed);
    txn.put(cf::SECRETS, put.path.as_str().as_bytes().to_vec(), &meta);
    txn.put(cf::STAGES, put.path.as_str().as_bytes().to_vec(), &stages);
    emit(txn, &put.path, put.at_ms, EventKind::Put { version: next, stage })?;
    Ok(Outcome::Put { version: next, created_at_ms: put.at_ms })
}

fn refused(rejection: Rejection) -> Result<Outcome, StoreError> {
    Ok(Outcome::Rejected(rejection))
}

/// Applies one rotation operation.
pub(crate) fn apply(txn: &mut Txn<'_>, r: &Rotation) -> Result<Outcome, StoreError> {
    let path = &r.path;
    let key = path.as_str().as_bytes().to_vec();
    let existing = rotation(txn, path)?;
    if let RotationOp::Configure { spec, grace_ms, next_due_ms } = &r.op {
        let record = match (spec, existing) {
            (None, None) => return Ok(Outcome::Applied),
            (None, Some(rec)) => {
                if let RotationState::Running(run) = &rec.state {
                    return refused(in_progress(path, run));
                }
                txn.delete(cf::ROTATIONS, key);
                emit(txn, path, r.at_ms, EventKind::RotationConfigured { enabled: false })?;
                return Ok(Outcome::Applied);
            }
            (Some(spec), Some(mut rec)) => {
                rec.spec.clone_from(spec);
                rec.grace_ms = *grace_ms;
                rec.next_due_ms = *next_due_ms;
                rec
            }
            (Some(spec), None) => RotationRecord {
                spec: spec.clone(),
                grace_ms: *grace_ms,
                state: RotationState::Idle,
                started: 0,
                last_success_ms: None,
                next_due_ms: *next_due_ms,
                failures: 0,
                last_failure: None,
            },
        };
        txn.put(cf::ROTATIONS, key, &record);
        emit(txn, path, r.at_ms, EventKind::RotationConfigured { enabled: true })?;
        return Ok(Outcome::Applied);
    }
    let Some(mut rec) = existing else {
        return refused(Rejection::RotationNotConfigured { path: path.to_string() });
    };
    let meta = txn.get::<SecretMeta>(cf::SECRETS, &key, "secret metadata")?;
    let mut stages = stages(txn, path, meta.as_ref())?;
    let moved = |rec: &RotationRecord| Rejection::RotationMoved { path: path.to_string(), state: describe(&rec.state) };
    match &r.op {
        RotationOp::Configure { .. } => unreachable!("handled above"),
        RotationOp::Start { id, manual } => {
            if let RotationState::Running(run) = &rec.state {
                return refused(in_progress(path, run));
            }
            if *id != rec.started.saturating_add(1) {
                return refused(moved(&rec));
            }
            // A failed rotation's PENDING version loses its label: the new rotation makes its own.
            let cleared = stages.pending.take().is_some();
            rec.started = *id;
            rec.state = RotationState::Running(Running {
                id: *id,
                started_at_ms: r.at_ms,
                manual: *manual,
                step: Step::Create,
                attempt: 0,
                attempt_started: None,
                last_error: None,
            });
            emit(txn, path, r.at_ms, EventKind::RotationStarted { id: *id, manual: *manual })?;
            if cleared {
                txn.put(cf::STAGES, key.clone(), &stages);
                emit(txn, path, r.at_ms, labels(&stages))?;
            }
        }
        RotationOp::BeginStep { id, step, attempt, node } => {
            let RotationState::Running(run) = &mut rec.state else { return refused(moved(&rec)) };
            if run.id != *id || run.step != *step || *attempt != run.attempt.saturating_add(1) {
                return refused(moved(&rec));
            }
            run.attempt = *attempt;
            run.attempt_started = Some((r.at_ms, *node));
        }
        RotationOp::CreatePending { id, version, sealed, default_max_versions } => {
            let RotationState::Running(run) = &rec.state else { return refused(moved(&rec)) };
            if run.id != *id || run.step != Step::Create {
                return refused(moved(&rec));
            }
            let put = PutSecret {
                request_id: None,
                path: path.clone(),
                version: *version,
                cas: None,
                max_versions: None,
                default_max_versions: *default_max_versions,
                sealed: sealed.clone(),
                at_ms: r.at_ms,
            };
            let outcome = put_version(txn, &put, Stage::Pending, 0)?;
            if matches!(outcome, Outcome::Rejected(_)) {
                return Ok(outcome);
            }
            if let RotationState::Running(run) = &mut rec.state {
                advance(run, Step::Set);
            }
            emit(txn, path, r.at_ms, EventKind::RotationStep { id: *id, step: Step::Create })?;
            txn.put(cf::ROTATIONS, key, &rec);
            return Ok(outcome);
        }
        RotationOp::StepDone { id, step } => {
            let RotationState::Running(run) = &mut rec.state else { return refused(moved(&rec)) };
            let next = match step {
                Step::Set | Step::Test => step.next(),
                Step::Create | Step::Finish => None,
            };
            let Some(next) = next.filter(|_| run.id == *id && run.step == *step) else { return refused(moved(&rec)) };
            advance(run, next);
            emit(txn, path, r.at_ms, EventKind::RotationStep { id: *id, step: *step })?;
        }
        RotationOp::StepFailed { id, step, reason, last, next_due_ms } => {
            let RotationState::Running(run) = &mut rec.state else { return refused(moved(&rec)) };
            if run.id != *id || run.step != *step {
                return refused(moved(&rec));
            }
            run.last_error = Some(reason.clone());
            if *last {
                rec.state = RotationState::Failed { id: *id, step: *step, reason: reason.clone(), at_ms: r.at_ms };
                rec.failures = rec.failures.saturating_add(1);
                rec.last_failure = Some(format!("rotation {id} failed at step {step}: {reason}"));
                rec.next_due_ms = *next_due_ms;
                emit(txn, path, r.at_ms, EventKind::RotationFailed { id: *id, step: *step, reason: reason.clone() })?;
            }
        }
        RotationOp::Finish { id, next_due_ms } => {
            let RotationState::Running(run) = &rec.state else { return refused(moved(&rec)) };
            if run.id != *id || run.step != Step::Finish {
                return refused(moved(&rec));
            }
            let Some(pending) = stages.pending else { return refused(moved(&rec)) };
            make_current(&mut stages, pending, r.at_ms, rec.grace_ms);
            rec.state = RotationState::Idle;
            rec.last_success_ms = Some(r.at_ms);
            rec.next_due_ms = *next_due_ms;
            rec.failures = 0;
            txn.put(cf::STAGES, key.clone(), &stages);
            emit(txn, path, r.at_ms, labels(&stages))?;
            emit(txn, path, r.at_ms, EventKind::RotationFinished { id: *id, version: pending })?;
        }
        RotationOp::Cancel => {
            let id = match &rec.state {
                RotationState::Idle => return refused(Rejection::NoRotationToCancel { path: path.to_string() }),
                RotationState::Running(run) => run.id,
                RotationState::Failed { id, .. } => *id,
            };
            rec.state = RotationState::Idle;
            if stages.pending.take().is_some() {
                txn.put(cf::STAGES, key.clone(), &stages);
                emit(txn, path, r.at_ms, labels(&stages))?;
            }
            emit(txn, path, r.at_ms, EventKind::RotationCancelled { id })?;
        }
    }
    txn.put(cf::ROTATIONS, key, &rec);
    Ok(Outcome::Applied)
}

fn advance(run: &mut Running, step: Step) {
    run.step = step;
    run.attempt = 0;
    run.attempt_started = None;
    run.last_error = None;
}

fn labels(stages: &Stages) -> EventKind {
    EventKind::LabelsMoved { current: stages.current, pending: stages.pending, previous: stages.previous }
}

fn in_progress(path: &SecretPath, run: &Running) -> Rejection {
    Rejection::RotationInProgress {
        path: path.to_string(),
        id: run.id,
        step: run.step.as_str().to_owned(),
        attempt: run.attempt,
    }
}

/// Where a rotation stands, in words (for a refusal).
pub(crate) fn describe(state: &RotationState) -> String {
    match state {
        RotationState::Idle => "no rotation is running".into(),
        RotationState::Running(run) => format!("rotation {} is at step {} (attempt {})", run.id, run.step, run.attempt),
        RotationState::Failed { id, step, .. } => format!("rotation {id} failed at step {step}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Op, SetVersionState, VersionState};
    use crate::state::testing::{must_path, sealed, Scratch};
    use crate::NodeId;

    fn rot(path: &str, op: RotationOp) -> Op {
        Op::Rotation(Rotation { path: must_path(path), op, at_ms: UnixMillis(10_000) })
    }

    fn put(path: &str, version: u64) -> Op {
        Op::PutStaged(crate::command::PutStaged {
            put: PutSecret {
                request_id: None,
                path: must_path(path),
                version: SecretVersion(version),
                cas: None,
                max_versions: None,
                default_max_versions: 2,
                sealed: sealed(version as u8),
                at_ms: UnixMillis(1000),
            },
            default_grace_ms: 500,
        })
    }

    fn configure(path: &str) -> Op {
        rot(path, RotationOp::Configure { spec: Some("{}".into()), grace_ms: 3000, next_due_ms: None })
    }

    fn stages_of(s: &Scratch, path: &str) -> Stages {
        s.reader().stages(&must_path(path)).expect("readable").expect("labels")
    }

    #[test]
    fn a_put_moves_current_and_previous_together() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![put("a", 1), put("a", 2)])?;
        let st = stages_of(&s, "a");
        assert_eq!((st.current, st.previous), (SecretVersion(2), Some(SecretVersion(1))));
        assert_eq!(st.previous_until_ms, Some(UnixMillis(1500)), "the default grace when no rotation is configured");
        Ok(())
    }

    #[test]
    fn a_rotation_runs_its_steps_in_order_and_once() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![put("db", 1), configure("db")])?;
        let create =
            RotationOp::CreatePending { id: 1, version: SecretVersion(2), sealed: sealed(2), default_max_versions: 2 };
        let r = s.apply_ops(vec![
            rot("db", create.clone()),
            rot("db", RotationOp::Start { id: 1, manual: true }),
            rot("db", RotationOp::Start { id: 2, manual: true }),
            rot("db", RotationOp::BeginStep { id: 1, step: Step::Create, attempt: 1, node: NodeId(1) }),
            rot("db", create.clone()),
            rot("db", create),
        ])?;
        assert!(matches!(r[0], Outcome::Rejected(Rejection::RotationMoved { .. })), "no rotation yet: {:?}", r[0]);
        assert_eq!(r[1], Outcome::Applied);
        assert!(matches!(r[2], Outcome::Rejected(Rejection::RotationInProgress { id: 1, .. })), "{:?}", r[2]);
        assert_eq!(r[3], Outcome::Applied);
        assert!(matches!(r[4], Outcome::Put { version: SecretVersion(2), .. }));
        assert!(matches!(r[5], Outcome::Rejected(Rejection::RotationMoved { .. })), "create applies once: {:?}", r[5]);
        let st = stages_of(&s, "db");
        assert_eq!((st.current, st.pending), (SecretVersion(1), Some(SecretVersion(2))));

        let r = s.apply_ops(vec![
            rot("db", RotationOp::Finish { id: 1, next_due_ms: None }),
            rot("db", RotationOp::StepDone { id: 1, step: Step::Set }),
            rot("db", RotationOp::StepDone { id: 1, step: Step::Set }),
            rot("db", RotationOp::StepDone { id: 1, step: Step::Test }),
            rot("db", RotationOp::Finish { id: 1, next_due_ms: Some(UnixMillis(99)) }),
        ])?;
        assert!(matches!(r[0], Outcome::Rejected(Rejection::RotationMoved { .. })), "finish only after test");
        assert!(matches!(r[2], Outcome::Rejected(Rejection::RotationMoved { .. })), "set is done once");
        assert_eq!(r[4], Outcome::Applied);
        let st = stages_of(&s, "db");
        assert_eq!((st.current, st.pending, st.previous), (SecretVersion(2), None, Some(SecretVersion(1))));
        assert_eq!(st.previous_until_ms, Some(UnixMillis(13_000)), "the rotation's grace");
        let rec = s.reader().rotation(&must_path("db"))?.expect("record");
        assert_eq!(
            (rec.state, rec.last_success_ms, rec.next_due_ms),
            (RotationState::Idle, Some(UnixMillis(10_000)), Some(UnixMillis(99)))
        );

        let kinds: Vec<EventKind> = s.reader().events(1, 100)?.into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds.first(), Some(&EventKind::Put { version: SecretVersion(1), stage: Stage::Current }));
        assert!(kinds.contains(&EventKind::RotationFinished { id: 1, version: SecretVersion(2) }));
        let revisions: Vec<u64> = s.reader().events(1, 100)?.into_iter().map(|e| e.revision).collect();
        assert_eq!(revisions, (1..=revisions.len() as u64).collect::<Vec<_>>(), "dense revisions");
        Ok(())
    }

    #[test]
    fn a_failed_rotation_keeps_pending_until_the_next_one_or_a_cancel() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![
            put("p", 1),
            configure("p"),
            rot("p", RotationOp::Start { id: 1, manual: false }),
            rot(
                "p",
                RotationOp::CreatePending {
                    id: 1,
                    version: SecretVersion(2),
                    sealed: sealed(2),
                    default_max_versions: 2,
                },
            ),
            rot(
                "p",
                RotationOp::StepFailed { id: 1, step: Step::Set, reason: "down".into(), last: true, next_due_ms: None },
            ),
        ])?;
        let rec = s.reader().rotation(&must_path("p"))?.expect("record");
        assert!(matches!(rec.state, RotationState::Failed { id: 1, step: Step::Set, .. }));
        assert_eq!(stages_of(&s, "p").pending, Some(SecretVersion(2)), "kept for inspection");
        // Puts never prune a labelled version, even past max_versions (2 here).
        s.apply_ops(vec![put("p", 3), put("p", 4)])?;
        let meta = s.reader().secret(&must_path("p"))?.expect("meta");
        assert!(meta.versions.contains_key(&SecretVersion(2)), "PENDING kept: {:?}", meta.versions.keys());
        let r = s.apply_ops(vec![rot("p", RotationOp::Cancel), rot("p", RotationOp::Cancel)])?;
        assert_eq!(r[0], Outcome::Applied);
        assert!(matches!(r[1], Outcome::Rejected(Rejection::NoRotationToCancel { .. })));
        assert_eq!(stages_of(&s, "p").pending, None);
        let r = s.apply_ops(vec![rot("p", RotationOp::Configure { spec: None, grace_ms: 0, next_due_ms: None })])?;
        assert_eq!(r[0], Outcome::Applied);
        let r = s.apply_ops(vec![rot("p", RotationOp::Start { id: 2, manual: true })])?;
        assert!(matches!(r[0], Outcome::Rejected(Rejection::RotationNotConfigured { .. })));
        let r = s.apply_ops(vec![Op::SetVersionState(SetVersionState {
            path: must_path("p"),
            versions: vec![SecretVersion(3)],
            state: VersionState::Deleted,
            at_ms: UnixMillis(7),
        })])?;
        assert_eq!(r[0], Outcome::Applied);
        let last = s.reader().events(1, 1000)?.pop().expect("events");
        assert_eq!(last.kind, EventKind::Deleted { versions: vec![SecretVersion(3)] });
        Ok(())
    }
}
