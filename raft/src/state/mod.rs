//! The replicated state's apply rules, one module per domain, over one [`Txn`] per `apply` call.
//!
//! | module | rules for |
//! |---|---|
//! | [`cluster`] | the cluster record and keyring keys |
//! | [`secrets`] | secret versions: put (CAS, version numbers, pruning), delete, undelete, destroy |
//! | [`keys`] | named keys: create, rotate, config, delete |
//! | [`identity`] | tokens (create, renew, revoke with descendants, expire), policies, login roles |
//! | [`requests`] | request ids: a write applied once, an id bound to its first write |
//! | [`rotation`] | stage labels, rotations (steps in order, once), the event log of Watch |
//! | [`snapshot`] | snapshot files: build, install, read back |
//!
//! # Correctness
//! - Deterministic: an outcome depends only on the state and the command; no clock, RNG, HSM or
//!   network here. Arithmetic on numbers that came from a proposer is checked: a crafted command
//!   is rejected, never a panic on every node.
//! - A rejected operation writes nothing; the operations after it in the same entry see the state
//!   as if it had never been proposed.

pub(crate) mod cluster;
pub(crate) mod identity;
pub(crate) mod keys;
pub(crate) mod requests;
pub(crate) mod rotation;
pub(crate) mod secrets;
pub(crate) mod snapshot;

use std::collections::HashMap;

use rocksdb::WriteBatch;
use serde::Serialize;

use crate::command::{Command, Op, Outcome, Response, Write};
use crate::error::StoreError;
use crate::store::{decode, encode, Store};

/// Pending writes of one `apply` call, with reads that see them.
pub(crate) struct Txn<'a> {
    pub(crate) store: &'a Store,
    pub(crate) batch: WriteBatch,
    overlay: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
    /// An identity rule wrote something: the store's identity generation moves once the batch
    /// is written.
    pub(crate) identity_changed: bool,
    /// The revision of the last event this batch appends: Watch streams wake once it is written.
    pub(crate) last_event: Option<u64>,
}

impl<'a> Txn<'a> {
    pub(crate) fn new(store: &'a Store) -> Self {
        Txn { store, batch: WriteBatch::default(), overlay: HashMap::new(), identity_changed: false, last_event: None }
    }

    pub(crate) fn get<T: serde::de::DeserializeOwned>(
        &self,
        cf_name: &'static str,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.overlay.get(&(cf_name, key.to_vec())) {
            Some(Some(bytes)) => Ok(Some(decode(bytes, what)?)),
            Some(None) => Ok(None),
            None => self.store.get(cf_name, key, what),
        }
    }

    pub(crate) fn put<T: Serialize>(&mut self, cf_name: &'static str, key: Vec<u8>, value: &T) {
        let bytes = encode(value);
        self.batch.put_cf(self.store.cf(cf_name), &key, &bytes);
        self.overlay.insert((cf_name, key), Some(bytes));
    }

    /// Every key that starts with `prefix`, as this batch would leave them, in order.
    pub(crate) fn keys_with_prefix(&self, cf_name: &'static str, prefix: &[u8]) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut keys = std::collections::BTreeSet::new();
        let iter = self.store.db.prefix_iterator_cf(self.store.cf(cf_name), prefix);
        for item in iter {
            let (key, _) = item.map_err(|e| self.store.rocks_err(e))?;
            if !key.starts_with(prefix) {
                break;
            }
            keys.insert(key.to_vec());
        }
        for ((name, key), value) in &self.overlay {
            if *name == cf_name && key.starts_with(prefix) {
                if value.is_some() {
                    keys.insert(key.clone());
                } else {
                    keys.remove(key);
                }
            }
        }
        Ok(keys.into_iter().collect())
    }

    pub(crate) fn delete(&mut self, cf_name: &'static str, key: Vec<u8>) {
        self.batch.delete_cf(self.store.cf(cf_name), &key);
        self.overlay.insert((cf_name, key), None);
    }

    /// Applies one entry's command. Format-1 commands (indexes 0 to 7) apply by format 1's rules
    /// where those differ (a key config change), so a log written by the first release replays to
    /// the same state on every node, upgraded or not.
    ///
    /// # Errors
    /// Only storage failures (a stored record that does not decode); refusals are outcomes.
    pub(crate) fn apply(&mut self, command: &Command) -> Result<Response, StoreError> {
        Ok(match command {
            Command::InitCluster(c) => cluster::init(self, c)?.into(),
            Command::PutSecret(p) => requests::legacy_put(self, p)?.into(),
            Command::CreateKey(c) => keys::create(self, c)?.into(),
            Command::RotateKey(r) => keys::rotate(self, r)?.into(),
            Command::UpdateKeyConfig(u) => keys::update_config_v1(self, u)?.into(),
            Command::DeleteKey(d) => keys::delete(self, d)?.into(),
            Command::SetVersionState(s) => secrets::set_version_state(self, s)?.into(),
            Command::Batch(ops) => {
                let mut outcomes = Vec::with_capacity(ops.len());
                for op in ops {
                    outcomes.push(match op {
                        Op::UpdateKeyConfig(u) => keys::update_config_v1(self, u)?,
                        other => self.apply_op(other)?,
                    });
                }
                Response::Batch(outcomes)
            }
            Command::Writes(writes) => {
                let mut outcomes = Vec::with_capacity(writes.len());
                for write in writes {
                    outcomes.push(self.apply_write(write)?);
                }
                Response::Batch(outcomes)
            }
        })
    }

    /// Applies one write: once per request id, and only with the intent the id was first used for.
    fn apply_write(&mut self, write: &Write) -> Result<Outcome, StoreError> {
        let Some(id) = &write.request_id else { return self.apply_op(&write.op) };
        if let Some(earlier) = requests::lookup(self, id, &write.op.intent())? {
            return Ok(earlier);
        }
        let outcome = self.apply_op(&write.op)?;
        if !matches!(outcome, Outcome::Rejected(_)) {
            requests::record(self, id, write.op.intent(), &outcome);
        }
        Ok(outcome)
    }

    fn apply_op(&mut self, op: &Op) -> Result<Outcome, StoreError> {
        match op {
            Op::InitCluster(c) => cluster::init(self, c),
            // A put's own (format-1) request id, if it has one, is honoured as it was.
            Op::PutSecret(p) => requests::legacy_put(self, p),
            Op::CreateKey(c) => keys::create(self, c),
            Op::RotateKey(r) => keys::rotate(self, r),
            Op::UpdateKeyConfig(u) => keys::update_config(self, u),
            Op::DeleteKey(d) => keys::delete(self, d),
            Op::SetVersionState(s) => secrets::set_version_state(self, s),
            Op::CreateJoinToken(c) => cluster::create_join_token(self, c),
            Op::UseJoinToken(u) => cluster::use_join_token(self, u),
            Op::InitClusterWithIdentity(i) => identity::init_with_identity(self, i),
            Op::CreateToken(c) => identity::create_token(self, c),
            Op::RenewToken(r) => identity::renew_token(self, r),
            Op::RevokeToken(r) => identity::revoke_token(self, r),
            Op::ExpireTokens(e) => identity::expire_tokens(self, e),
            Op::PutPolicy(p) => identity::put_policy(self, p),
            Op::DeletePolicy(d) => identity::delete_policy(self, d),
            Op::PutCertRole(p) => identity::put_role(self, p),
            Op::DeleteCertRole(d) => identity::delete_role(self, d),
            Op::PutStaged(p) => rotation::put_version(self, &p.put, crate::Stage::Current, p.default_grace_ms),
            Op::Rotation(r) => rotation::apply(self, r),
        }
    }
}

/// Test support for the domain modules: a store in a temporary directory and a way to apply
/// operations to it, each call one `apply` (one RocksDB batch).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::*;
    use crate::command::SealedValue;
    use crate::KeyringVersion;

    pub(crate) struct Scratch {
        _dir: tempfile::TempDir,
        pub(crate) store: Arc<Store>,
    }

    impl Scratch {
        pub(crate) fn must_new() -> Scratch {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let store = Store::open(dir.path()).expect("a store in a new directory");
            Scratch { _dir: dir, store }
        }

        /// Applies `command` as one entry and commits its batch.
        pub(crate) fn apply(&self, command: &Command) -> Result<Response, StoreError> {
            let mut txn = Txn::new(&self.store);
            let response = txn.apply(command)?;
            let Txn { batch, identity_changed, last_event, .. } = txn;
            self.store.db.write(batch).map_err(|e| self.store.rocks_err(e))?;
            if identity_changed {
                self.store.identity_changed();
            }
            if let Some(revision) = last_event {
                self.store.events_written(revision);
            }
            Ok(response)
        }

        /// Applies `ops` as one entry of writes without request ids.
        pub(crate) fn apply_ops(&self, ops: Vec<Op>) -> Result<Vec<Outcome>, StoreError> {
            match self.apply(&Command::Writes(ops.into_iter().map(Write::new).collect()))? {
                Response::Batch(outcomes) => Ok(outcomes),
                other => panic!("a Writes entry answered {other:?}"),
            }
        }

        pub(crate) fn reader(&self) -> crate::StateReader {
            crate::StateReader::new(self.store.clone())
        }
    }

    pub(crate) fn must_path(path: &str) -> crate::SecretPath {
        crate::SecretPath::parse(path).expect("a valid test path")
    }

    pub(crate) fn must_name(name: &str) -> crate::KeyName {
        crate::KeyName::parse(name).expect("a valid test key name")
    }

    pub(crate) fn sealed(tag: u8) -> SealedValue {
        SealedValue { keyring_version: KeyringVersion(1), wrapped_data_key: vec![tag; 60], ciphertext: vec![tag; 20] }
    }
}
