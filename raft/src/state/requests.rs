//! Apply rules for request ids: a write carrying one is applied once, and the id stays bound to
//! the [`Intent`] of the write it was first applied with.
//!
//! Format 1 stored the [`Response`] of a put under its bare id in `requests`; those records are
//! still honoured for format-1 puts. Writes now record `(intent, outcome)` in `request_ids`. Only
//! applied writes are recorded: a rejected write changed nothing, and its proposer may retry it
//! with the same id (a put resealed after losing its version to a concurrent write).

use serde::{Deserialize, Serialize};

use crate::command::{Intent, Outcome, PutSecret, Rejection, Response};
use crate::error::StoreError;
use crate::state::{secrets, Txn};
use crate::store::cf;
use crate::RequestId;

/// What `request_ids` holds for one id.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    intent: Intent,
    outcome: Outcome,
}

/// The outcome to answer with if `id` was applied before: the first outcome for the same intent,
/// a [`Rejection::RequestIdReused`] for another one; `None` if the id is new.
pub(crate) fn lookup(txn: &Txn<'_>, id: &RequestId, intent: &Intent) -> Result<Option<Outcome>, StoreError> {
    let Some(record) = txn.get::<Record>(cf::REQUEST_IDS, id.as_str().as_bytes(), "request id record")? else {
        // A put retried across the upgrade from format 1: its first attempt is in `requests`.
        if let Intent::PutSecret { .. } = intent {
            if let Some(Response::Put { version, created_at_ms }) =
                txn.get::<Response>(cf::REQUESTS, id.as_str().as_bytes(), "request record")?
            {
                return Ok(Some(Outcome::Put { version, created_at_ms }));
            }
        }
        return Ok(None);
    };
    if record.intent == *intent {
        return Ok(Some(record.outcome));
    }
    Ok(Some(Outcome::Rejected(Rejection::RequestIdReused {
        request_id: id.clone(),
        first: record.intent,
        now: intent.clone(),
    })))
}

/// The intent `id` is bound to, if a write carrying it has applied (format 2 records only).
pub(crate) fn intent(store: &crate::Store, id: &RequestId) -> Result<Option<Intent>, StoreError> {
    Ok(store.get::<Record>(cf::REQUEST_IDS, id.as_str().as_bytes(), "request id record")?.map(|r| r.intent))
}

/// Binds `id` to the write just applied.
pub(crate) fn record(txn: &mut Txn<'_>, id: &RequestId, intent: Intent, outcome: &Outcome) {
    txn.put(cf::REQUEST_IDS, id.as_str().as_bytes().to_vec(), &Record { intent, outcome: outcome.clone() });
}

/// A format-1 put: its own request id, checked against the format-1 records.
pub(crate) fn legacy_put(txn: &mut Txn<'_>, put: &PutSecret) -> Result<Outcome, StoreError> {
    if let Some(id) = &put.request_id {
        if let Some(done) = txn.get::<Response>(cf::REQUESTS, id.as_bytes(), "request record")? {
            return Ok(match done {
                Response::Put { version, created_at_ms } => Outcome::Put { version, created_at_ms },
                Response::Rejected(r) => Outcome::Rejected(r),
                Response::Applied | Response::Batch(_) => Outcome::Applied,
            });
        }
    }
    let outcome = secrets::put(txn, put)?;
    if let (Some(id), Outcome::Put { version, created_at_ms }) = (&put.request_id, &outcome) {
        txn.put(
            cf::REQUESTS,
            id.as_bytes().to_vec(),
            &Response::Put { version: *version, created_at_ms: *created_at_ms },
        );
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, DeleteKey, Op, VersionState, Write};
    use crate::state::testing::{must_name, must_path, sealed, Scratch};
    use crate::{SecretVersion, UnixMillis};

    fn put(path: &str, version: u64) -> Op {
        Op::PutSecret(PutSecret {
            request_id: None,
            path: must_path(path),
            version: SecretVersion(version),
            cas: None,
            max_versions: None,
            default_max_versions: 10,
            sealed: sealed(version as u8),
            at_ms: UnixMillis(1000 + version),
        })
    }

    fn with_id(id: &str, op: Op) -> Write {
        Write { request_id: RequestId::parse(id).expect("a test request id"), op }
    }

    fn writes(s: &Scratch, writes: Vec<Write>) -> Result<Vec<Outcome>, StoreError> {
        match s.apply(&Command::Writes(writes))? {
            Response::Batch(outcomes) => Ok(outcomes),
            other => panic!("answered {other:?}"),
        }
    }

    #[test]
    fn a_retried_write_applies_once_and_answers_as_the_first_time() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let first = writes(&s, vec![with_id("r1", put("a", 1))])?;
        // The retry was resealed for the next version, as a retry after a lost answer would be.
        let retry = writes(&s, vec![with_id("r1", put("a", 2))])?;
        assert_eq!(first, retry);
        assert_eq!(s.reader().secret(&must_path("a"))?.map(|m| m.current_version), Some(SecretVersion(1)));
        Ok(())
    }

    #[test]
    fn a_request_id_reused_on_another_path_or_command_is_refused_and_writes_nothing() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        writes(&s, vec![with_id("r1", put("a", 1))])?;
        let other_path = writes(&s, vec![with_id("r1", put("b", 1))])?;
        assert_eq!(
            other_path,
            vec![Outcome::Rejected(Rejection::RequestIdReused {
                request_id: RequestId::parse("r1").expect("an id").expect("not empty"),
                first: Intent::PutSecret { path: must_path("a") },
                now: Intent::PutSecret { path: must_path("b") },
            })]
        );
        assert!(s.reader().secret(&must_path("b"))?.is_none());
        let delete = Op::SetVersionState(crate::command::SetVersionState {
            path: must_path("a"),
            versions: vec![SecretVersion(1)],
            state: VersionState::Destroyed,
            at_ms: UnixMillis(5),
        });
        let other_command = writes(&s, vec![with_id("r1", delete)])?;
        assert!(matches!(&other_command[..], [Outcome::Rejected(Rejection::RequestIdReused { .. })]));
        let value = s.reader().secret_version(&must_path("a"), Some(SecretVersion(1)))?.expect("the secret").sealed;
        assert!(value.is_some(), "the version was not destroyed");
        Ok(())
    }

    #[test]
    fn a_rejected_write_does_not_bind_its_id() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let missing = writes(&s, vec![with_id("r2", Op::DeleteKey(DeleteKey { name: must_name("k") }))])?;
        assert!(matches!(&missing[..], [Outcome::Rejected(Rejection::KeyNotFound { .. })]));
        assert_eq!(
            writes(&s, vec![with_id("r2", put("a", 1))])?[0],
            Outcome::Put { version: SecretVersion(1), created_at_ms: UnixMillis(1001) }
        );
        Ok(())
    }

    /// Found in review: a put applied by format 1 whose answer was lost, retried with the same
    /// id after the upgrade, must not write a second version.
    #[test]
    fn a_put_retried_across_the_upgrade_applies_once() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let Op::PutSecret(mut p) = put("a", 1) else { unreachable!() };
        p.request_id = Some("old".into());
        let first = s.apply(&Command::PutSecret(p))?;
        let retry = writes(&s, vec![with_id("old", put("a", 2))])?;
        assert_eq!(
            Response::Batch(retry),
            Response::Batch(vec![Outcome::Put { version: SecretVersion(1), created_at_ms: UnixMillis(1001) }])
        );
        assert_eq!(first, Response::Put { version: SecretVersion(1), created_at_ms: UnixMillis(1001) });
        assert_eq!(s.reader().secret(&must_path("a"))?.map(|m| m.current_version), Some(SecretVersion(1)));
        Ok(())
    }

    #[test]
    fn format_1_puts_keep_their_own_request_ids() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let Op::PutSecret(mut p) = put("a", 1) else { unreachable!() };
        p.request_id = Some("old".into());
        let first = s.apply(&Command::PutSecret(p.clone()))?;
        p.version = SecretVersion(2);
        assert_eq!(s.apply(&Command::PutSecret(p))?, first);
        assert_eq!(s.reader().secret(&must_path("a"))?.map(|m| m.current_version), Some(SecretVersion(1)));
        Ok(())
    }
}
