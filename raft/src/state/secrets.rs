//! Apply rules for secrets: format 1's put (the rules are in `rotation::put_version`) and
//! the version states (delete, undelete, destroy).

use crate::command::{Outcome, PutSecret, Rejection, SecretMeta, SetVersionState, VersionState};
use crate::error::StoreError;
use crate::rotation::EventKind;
use crate::state::Txn;
use crate::store::{cf, version_key};

/// Writes a new version, if the check-and-set holds and the version is the next one; it becomes
/// `CURRENT` (format 1's put: `PREVIOUS` then stays readable until `CURRENT` moves again).
pub(crate) fn put(txn: &mut Txn<'_>, put: &PutSecret) -> Result<Outcome, StoreError> {
    super::rotation::put_version(txn, put, crate::Stage::Current, 0)
}

/// Changes the state of versions; every target is checked before any changes.
pub(crate) fn set_version_state(txn: &mut Txn<'_>, set: &SetVersionState) -> Result<Outcome, StoreError> {
    let path = set.path.as_str();
    let Some(mut meta) = txn.get::<SecretMeta>(cf::SECRETS, path.as_bytes(), "secret metadata")? else {
        return Ok(Outcome::Rejected(Rejection::SecretNotFound { path: path.to_owned() }));
    };
    // Format 1: an empty list meant the current version. Proposers now name it.
    let targets = if set.versions.is_empty() { vec![meta.current_version] } else { set.versions.clone() };
    for version in &targets {
        match meta.versions.get(version) {
            None => {
                return Ok(Outcome::Rejected(Rejection::VersionNotFound { path: path.to_owned(), version: *version }))
            }
            Some(v) if v.destroyed && set.state == VersionState::Undeleted => {
                return Ok(Outcome::Rejected(Rejection::VersionDestroyed { path: path.to_owned(), version: *version }))
            }
            Some(_) => {}
        }
    }
    let targets_for_event = targets.clone();
    for version in targets {
        let Some(v) = meta.versions.get_mut(&version) else { continue };
        match set.state {
            VersionState::Deleted => {
                if !v.destroyed && v.deleted_at_ms.is_none() {
                    v.deleted_at_ms = Some(set.at_ms);
                }
            }
            VersionState::Undeleted => v.deleted_at_ms = None,
            VersionState::Destroyed => {
                v.destroyed = true;
                txn.delete(cf::VERSIONS, version_key(path, version));
            }
        }
    }
    meta.updated_at_ms = set.at_ms;
    txn.put(cf::SECRETS, path.as_bytes().to_vec(), &meta);
    let kind = match set.state {
        VersionState::Deleted => EventKind::Deleted { versions: targets_for_event },
        VersionState::Undeleted => EventKind::Undeleted { versions: targets_for_event },
        VersionState::Destroyed => EventKind::Destroyed { versions: targets_for_event },
    };
    super::rotation::emit(txn, &set.path, set.at_ms, kind)?;
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Op;
    use crate::state::testing::{must_path, sealed, Scratch};
    use crate::{SecretVersion, UnixMillis};

    fn put_op(path: &str, version: u64, cas: Option<u64>) -> Op {
        Op::PutSecret(PutSecret {
            request_id: None,
            path: must_path(path),
            version: SecretVersion(version),
            cas: cas.map(SecretVersion),
            max_versions: None,
            default_max_versions: 3,
            sealed: sealed(version as u8),
            at_ms: UnixMillis(version.saturating_add(1000)),
        })
    }

    fn set(path: &str, versions: Vec<u64>, state: VersionState) -> Op {
        Op::SetVersionState(SetVersionState {
            path: must_path(path),
            versions: versions.into_iter().map(SecretVersion).collect(),
            state,
            at_ms: UnixMillis(5000),
        })
    }

    #[test]
    fn versions_cas_and_pruning() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let r = s.apply_ops(vec![put_op("a", 1, Some(0)), put_op("a", 2, None), put_op("a", 2, None)])?;
        assert_eq!(r[1], Outcome::Put { version: SecretVersion(2), created_at_ms: UnixMillis(1002) });
        assert_eq!(
            r[2],
            Outcome::Rejected(Rejection::VersionTaken { version: SecretVersion(2), current: SecretVersion(2) }),
            "sees earlier items"
        );
        let r = s.apply_ops(vec![put_op("a", 3, Some(1))])?;
        assert_eq!(
            r[0],
            Outcome::Rejected(Rejection::CasMismatch { expected: SecretVersion(1), current: SecretVersion(2) })
        );
        s.apply_ops(vec![put_op("a", 3, None), put_op("a", 4, None)])?;
        let meta = s.reader().secret(&must_path("a"))?.expect("the secret");
        assert_eq!(
            meta.versions.keys().copied().collect::<Vec<_>>(),
            vec![SecretVersion(2), SecretVersion(3), SecretVersion(4)],
            "max_versions 3 pruned 1"
        );
        assert!(
            s.reader().secret_version(&must_path("a"), Some(SecretVersion(1)))?.expect("meta").sealed.is_none(),
            "pruned ciphertext removed"
        );
        Ok(())
    }

    /// Issue #10: `cas = u64::MAX` overflowed `cas + 1` on the proposer, and a version at
    /// `u64::MAX` overflowed `current + 1` in apply, which panics on every node in a debug build.
    #[test]
    fn the_largest_version_is_refused_not_overflowed() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let r = s.apply_ops(vec![put_op("a", u64::MAX, Some(u64::MAX))])?;
        assert_eq!(
            r[0],
            Outcome::Rejected(Rejection::CasMismatch { expected: SecretVersion(u64::MAX), current: SecretVersion(0) })
        );
        // A crafted meta at the largest version (reachable only by a forged command before this
        // check existed): the next put is refused.
        let mut txn = Txn::new(&s.store);
        txn.put(
            cf::SECRETS,
            b"full".to_vec(),
            &SecretMeta {
                current_version: SecretVersion(u64::MAX),
                max_versions: 1,
                created_at_ms: UnixMillis(1),
                updated_at_ms: UnixMillis(1),
                versions: Default::default(),
            },
        );
        let Txn { batch, .. } = txn;
        s.store.db.write(batch).map_err(|e| s.store.rocks_err(e))?;
        let r = s.apply_ops(vec![put_op("full", u64::MAX, None), put_op("full", 0, Some(u64::MAX))])?;
        let exhausted = Outcome::Rejected(Rejection::SecretVersionsExhausted { path: "full".into() });
        assert_eq!(r, vec![exhausted.clone(), exhausted]);
        assert_eq!(s.reader().secret(&must_path("full"))?.map(|m| m.current_version), Some(SecretVersion(u64::MAX)));
        Ok(())
    }

    #[test]
    fn delete_undelete_destroy() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![put_op("s", 1, None), put_op("s", 2, None)])?;
        let r = s.apply_ops(vec![set("s", vec![1, 9], VersionState::Deleted)])?;
        assert_eq!(r[0], Outcome::Rejected(Rejection::VersionNotFound { path: "s".into(), version: SecretVersion(9) }));
        assert_eq!(
            s.reader().secret(&must_path("s"))?.expect("meta").versions[&SecretVersion(1)].deleted_at_ms,
            None,
            "nothing changed"
        );
        s.apply_ops(vec![set("s", vec![2], VersionState::Deleted)])?;
        assert_eq!(
            s.reader().secret(&must_path("s"))?.expect("meta").versions[&SecretVersion(2)].deleted_at_ms,
            Some(UnixMillis(5000))
        );
        s.apply_ops(vec![set("s", vec![2], VersionState::Undeleted)])?;
        assert_eq!(s.reader().secret(&must_path("s"))?.expect("meta").versions[&SecretVersion(2)].deleted_at_ms, None);
        s.apply_ops(vec![set("s", vec![1], VersionState::Destroyed)])?;
        let read = s.reader().secret_version(&must_path("s"), Some(SecretVersion(1)))?.expect("meta");
        let (meta, value) = (read.meta, read.sealed);
        assert!(meta.versions[&SecretVersion(1)].destroyed && value.is_none());
        let r =
            s.apply_ops(vec![set("s", vec![1], VersionState::Undeleted), set("nope", vec![1], VersionState::Deleted)])?;
        assert_eq!(
            r[0],
            Outcome::Rejected(Rejection::VersionDestroyed { path: "s".into(), version: SecretVersion(1) })
        );
        assert_eq!(r[1], Outcome::Rejected(Rejection::SecretNotFound { path: "nope".into() }));
        Ok(())
    }
}
