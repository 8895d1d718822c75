//! Apply rules for named keys (Keys service): create, rotate, config changes, delete.
//!
//! `generation` is bumped by every change so nodes know when their unwrapped copy is stale; it
//! wraps rather than overflows (only equality is ever compared).

use crate::command::{CreateKey, DeleteKey, KeyRule, NamedKeyRecord, Outcome, Rejection, RotateKey, UpdateKeyConfig};
use crate::error::StoreError;
use crate::state::Txn;
use crate::store::cf;
use crate::KeyName;

fn load(txn: &Txn<'_>, name: &KeyName) -> Result<Option<NamedKeyRecord>, StoreError> {
    txn.get::<NamedKeyRecord>(cf::KEYS, name.as_str().as_bytes(), "named key")
}

fn not_found(name: &KeyName) -> Outcome {
    Outcome::Rejected(Rejection::KeyNotFound { name: name.to_string() })
}

/// Creates a key, unless one of that name exists.
pub(crate) fn create(txn: &mut Txn<'_>, create: &CreateKey) -> Result<Outcome, StoreError> {
    if load(txn, &create.name)?.is_some() {
        return Ok(Outcome::Rejected(Rejection::KeyExists { name: create.name.to_string() }));
    }
    txn.put(cf::KEYS, create.name.as_str().as_bytes().to_vec(), &create.record);
    Ok(Outcome::Applied)
}

/// Adds the next version and makes it primary.
pub(crate) fn rotate(txn: &mut Txn<'_>, rotate: &RotateKey) -> Result<Outcome, StoreError> {
    let Some(mut record) = load(txn, &rotate.name)? else { return Ok(not_found(&rotate.name)) };
    let current = record.primary();
    let Some(next) = current.next() else {
        return Ok(Outcome::Rejected(Rejection::KeyVersionsExhausted { name: rotate.name.to_string() }));
    };
    if rotate.version != next {
        return Ok(Outcome::Rejected(Rejection::KeyVersionTaken {
            name: rotate.name.to_string(),
            version: rotate.version,
            current,
        }));
    }
    record.versions.insert(next, rotate.material.clone());
    record.generation = record.generation.wrapping_add(1);
    txn.put(cf::KEYS, rotate.name.as_str().as_bytes().to_vec(), &record);
    Ok(Outcome::Applied)
}

/// Changes the config. `min_decryption_version` only moves forward and never past the primary
/// version; format 1's `min_encryption_version` is ignored.
pub(crate) fn update_config(txn: &mut Txn<'_>, update: &UpdateKeyConfig) -> Result<Outcome, StoreError> {
    let name = &update.name;
    let Some(mut record) = load(txn, name)? else { return Ok(not_found(name)) };
    if let Some(min) = update.min_decryption_version {
        let primary = record.primary();
        if min > primary {
            return Ok(refused(KeyRule::MinAbovePrimary { name: name.to_string(), min, primary }));
        }
        if min < record.min_decryption_version {
            return Ok(refused(KeyRule::MinDecryptionBackwards {
                name: name.to_string(),
                current: record.min_decryption_version,
                asked: min,
            }));
        }
        record.min_decryption_version = min;
        record.min_encryption_version = record.min_encryption_version.max(min);
    }
    record.deletion_allowed = update.deletion_allowed.unwrap_or(record.deletion_allowed);
    record.auto_rotate_period_ms = update.auto_rotate_period_ms.unwrap_or(record.auto_rotate_period_ms);
    record.generation = record.generation.wrapping_add(1);
    txn.put(cf::KEYS, name.as_str().as_bytes().to_vec(), &record);
    Ok(Outcome::Applied)
}

/// Format 1's config change, with format 1's rules exactly: a log written by the first release
/// must replay to the same state on every node. `min_decryption_version` could move back then,
/// and `min_encryption_version` was stored (without effect).
pub(crate) fn update_config_v1(txn: &mut Txn<'_>, update: &UpdateKeyConfig) -> Result<Outcome, StoreError> {
    let name = &update.name;
    let Some(mut record) = load(txn, name)? else { return Ok(not_found(name)) };
    let primary = record.primary();
    let min_dec = update.min_decryption_version.unwrap_or(record.min_decryption_version);
    let min_enc = update.min_encryption_version.unwrap_or(record.min_encryption_version);
    if min_dec > primary || min_enc > primary {
        return Ok(Outcome::Rejected(Rejection::KeyConfigRefused {
            rule: format!("minimum versions cannot exceed the primary version {primary}"),
        }));
    }
    if min_enc < min_dec && update.min_encryption_version.is_some() {
        return Ok(Outcome::Rejected(Rejection::KeyConfigRefused {
            rule: "min_encryption_version cannot be below min_decryption_version".into(),
        }));
    }
    record.min_decryption_version = min_dec;
    record.min_encryption_version = min_enc.max(min_dec);
    record.deletion_allowed = update.deletion_allowed.unwrap_or(record.deletion_allowed);
    record.auto_rotate_period_ms = update.auto_rotate_period_ms.unwrap_or(record.auto_rotate_period_ms);
    record.generation = record.generation.wrapping_add(1);
    txn.put(cf::KEYS, name.as_str().as_bytes().to_vec(), &record);
    Ok(Outcome::Applied)
}

/// Deletes a key whose config allows it.
pub(crate) fn delete(txn: &mut Txn<'_>, delete: &DeleteKey) -> Result<Outcome, StoreError> {
    let Some(record) = load(txn, &delete.name)? else { return Ok(not_found(&delete.name)) };
    if !record.deletion_allowed {
        return Ok(refused(KeyRule::DeletionNotAllowed { name: delete.name.to_string() }));
    }
    txn.delete(cf::KEYS, delete.name.as_str().as_bytes().to_vec());
    Ok(Outcome::Applied)
}

fn refused(rule: KeyRule) -> Outcome {
    Outcome::Rejected(Rejection::KeyRule(rule))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{KeyVersionRecord, NamedKeyType, Op};
    use crate::state::testing::{must_name, Scratch};
    use crate::{KeyVersion, KeyringVersion, UnixMillis};

    fn version(tag: u8) -> KeyVersionRecord {
        KeyVersionRecord {
            created_at_ms: UnixMillis(u64::from(tag)),
            keyring_version: KeyringVersion(1),
            wrapped: vec![tag; 60],
            public_key: vec![],
        }
    }

    fn record(primary: u32) -> NamedKeyRecord {
        NamedKeyRecord {
            key_type: NamedKeyType::Aes256Gcm,
            exportable: false,
            created_at_ms: UnixMillis(1),
            min_decryption_version: KeyVersion(1),
            min_encryption_version: KeyVersion(1),
            deletion_allowed: false,
            auto_rotate_period_ms: 0,
            versions: [(KeyVersion(primary), version(1))].into(),
            generation: 0,
        }
    }

    fn create(name: &str, primary: u32) -> Op {
        Op::CreateKey(CreateKey { name: must_name(name), record: record(primary) })
    }

    fn rotate(name: &str, v: u32) -> Op {
        Op::RotateKey(RotateKey { name: must_name(name), version: KeyVersion(v), material: version(v as u8) })
    }

    fn config(name: &str, min: Option<u32>, deletion: Option<bool>) -> Op {
        Op::UpdateKeyConfig(UpdateKeyConfig {
            name: must_name(name),
            min_decryption_version: min.map(KeyVersion),
            min_encryption_version: None,
            deletion_allowed: deletion,
            auto_rotate_period_ms: None,
        })
    }

    fn rule(rule: KeyRule) -> Outcome {
        Outcome::Rejected(Rejection::KeyRule(rule))
    }

    #[test]
    fn create_once_and_rotate_in_order() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let r = s.apply_ops(vec![create("k", 1), create("k", 1), rotate("k", 2), rotate("k", 2), rotate("nope", 1)])?;
        assert_eq!(r[0], Outcome::Applied);
        assert_eq!(r[1], Outcome::Rejected(Rejection::KeyExists { name: "k".into() }));
        assert_eq!(r[2], Outcome::Applied);
        assert_eq!(
            r[3],
            Outcome::Rejected(Rejection::KeyVersionTaken {
                name: "k".into(),
                version: KeyVersion(2),
                current: KeyVersion(2)
            })
        );
        assert_eq!(r[4], Outcome::Rejected(Rejection::KeyNotFound { name: "nope".into() }));
        let key = s.reader().named_key(&must_name("k"))?.expect("the key");
        assert_eq!((key.primary(), key.generation), (KeyVersion(2), 1));
        Ok(())
    }

    /// Issue #10: a key version at `u32::MAX` followed by a rotation overflowed in apply.
    #[test]
    fn a_rotation_past_the_largest_version_is_refused() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let r = s.apply_ops(vec![create("max", u32::MAX), rotate("max", 0), rotate("max", u32::MAX)])?;
        let exhausted = Outcome::Rejected(Rejection::KeyVersionsExhausted { name: "max".into() });
        assert_eq!(r, vec![Outcome::Applied, exhausted.clone(), exhausted]);
        assert_eq!(s.reader().named_key(&must_name("max"))?.expect("the key").versions.len(), 1);
        Ok(())
    }

    #[test]
    fn min_decryption_version_only_moves_forward_and_not_past_the_primary() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![create("k", 1), rotate("k", 2), rotate("k", 3)])?;
        let r =
            s.apply_ops(vec![config("k", Some(2), None), config("k", Some(1), None), config("k", Some(4), None)])?;
        assert_eq!(r[0], Outcome::Applied);
        assert_eq!(
            r[1],
            rule(KeyRule::MinDecryptionBackwards { name: "k".into(), current: KeyVersion(2), asked: KeyVersion(1) })
        );
        assert_eq!(
            r[2],
            rule(KeyRule::MinAbovePrimary { name: "k".into(), min: KeyVersion(4), primary: KeyVersion(3) })
        );
        let key = s.reader().named_key(&must_name("k"))?.expect("the key");
        assert_eq!(key.min_decryption_version, KeyVersion(2), "the refused changes wrote nothing");
        assert_eq!(s.apply_ops(vec![config("k", Some(2), Some(true))])?, vec![Outcome::Applied], "same value: fine");
        Ok(())
    }

    /// Found in review: a format-1 entry replayed by an upgraded node must reach the state the
    /// first release reached, or nodes diverge (a backward min_decryption_version applied then; a
    /// min_encryption_version above the primary refused the whole change, deletion_allowed too).
    #[test]
    fn format_1_config_changes_replay_under_format_1_rules() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        s.apply_ops(vec![create("k", 1), rotate("k", 2), config("k", Some(2), None)])?;
        let v1 = |min_dec: Option<u32>, min_enc: Option<u32>, deletion: Option<bool>| {
            crate::command::Command::UpdateKeyConfig(UpdateKeyConfig {
                name: must_name("k"),
                min_decryption_version: min_dec.map(KeyVersion),
                min_encryption_version: min_enc.map(KeyVersion),
                deletion_allowed: deletion,
                auto_rotate_period_ms: None,
            })
        };
        let refused = s.apply(&v1(None, Some(3), Some(true)))?;
        assert!(matches!(refused, crate::Response::Rejected(Rejection::KeyConfigRefused { .. })), "{refused:?}");
        assert!(!s.reader().named_key(&must_name("k"))?.expect("the key").deletion_allowed, "refused whole");
        assert_eq!(s.apply(&v1(Some(1), None, None))?, crate::Response::Applied, "format 1 could move it back");
        let key = s.reader().named_key(&must_name("k"))?.expect("the key");
        assert_eq!((key.min_decryption_version, key.min_encryption_version), (KeyVersion(1), KeyVersion(2)));
        Ok(())
    }

    #[test]
    fn a_key_is_deleted_only_when_its_config_allows_it() -> Result<(), StoreError> {
        let s = Scratch::must_new();
        let delete = || Op::DeleteKey(DeleteKey { name: must_name("k") });
        let r = s.apply_ops(vec![create("k", 1), delete(), config("k", None, Some(true)), delete(), delete()])?;
        assert_eq!(r[1], rule(KeyRule::DeletionNotAllowed { name: "k".into() }));
        assert_eq!(r[3], Outcome::Applied);
        assert_eq!(r[4], Outcome::Rejected(Rejection::KeyNotFound { name: "k".into() }));
        assert!(s.reader().named_key(&must_name("k"))?.is_none());
        Ok(())
    }
}
