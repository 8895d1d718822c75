//! Reads of the applied state, for the node's services. Callers decide consistency (a
//! linearizable read waits for the read index to be applied before it reads here).

use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, ReadOptions};

use crate::command::{ClusterRecord, KeyringRecord, NamedKeyRecord, SealedValue, SecretMeta};
use crate::error::StoreError;
use crate::identity::{CertRoleRecord, IdentityKeyRecord, PolicyRecord, TokenRecord};
use crate::rotation::{Event, RotationRecord, Stages};
use crate::state::identity as id;
use crate::store::{cf, decode, keyring_key, version_key, Store, CLUSTER_KEY, KEYRING_PREFIX};
use crate::{KeyName, KeyringVersion, SecretPath, SecretVersion, TokenHash};

/// One version of a secret as [`StateReader::secret_version`] read it, with the secret's metadata
/// from the same view.
#[derive(Debug)]
pub struct VersionRead {
    /// The secret's metadata.
    pub meta: SecretMeta,
    /// The version read (the current one if none was asked for).
    pub version: SecretVersion,
    /// Its sealed value; `None` when the version is not stored (never written, pruned or
    /// destroyed): the metadata says which.
    pub sealed: Option<SealedValue>,
}

/// A read handle on the state machine's data. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StateReader {
    store: Arc<Store>,
}

impl StateReader {
    /// A reader over the shared RocksDB instance.
    pub fn new(store: Arc<Store>) -> Self {
        StateReader { store }
    }

    /// The cluster record, once the cluster is initialised.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn cluster(&self) -> Result<Option<ClusterRecord>, StoreError> {
        self.store.get(cf::CLUSTER, CLUSTER_KEY, "cluster record")
    }

    /// One keyring key version.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn keyring(&self, version: KeyringVersion) -> Result<Option<KeyringRecord>, StoreError> {
        self.store.get(cf::CLUSTER, &keyring_key(version), "keyring record")
    }

    /// Every keyring key version, oldest first.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn keyrings(&self) -> Result<Vec<KeyringRecord>, StoreError> {
        let iter = self
            .store
            .db
            .iterator_cf(self.store.cf(cf::CLUSTER), IteratorMode::From(KEYRING_PREFIX, Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(|e| self.store.rocks_err(e))?;
            if !key.starts_with(KEYRING_PREFIX) {
                break;
            }
            out.push(decode(&value, "keyring record")?);
        }
        Ok(out)
    }

    /// A secret's metadata.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn secret(&self, path: &SecretPath) -> Result<Option<SecretMeta>, StoreError> {
        self.store.get(cf::SECRETS, path.as_str().as_bytes(), "secret metadata")
    }

    /// A secret's metadata and the sealed value of one version (the current one when `version` is
    /// `None`), read from one consistent view. The value is `None` when the version is not stored
    /// (never written, pruned or destroyed); the metadata says which.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn secret_version(
        &self,
        path: &SecretPath,
        version: Option<SecretVersion>,
    ) -> Result<Option<VersionRead>, StoreError> {
        let view = self.store.db.snapshot();
        let Some(bytes) =
            view.get_cf(self.store.cf(cf::SECRETS), path.as_str().as_bytes()).map_err(|e| self.store.rocks_err(e))?
        else {
            return Ok(None);
        };
        let meta: SecretMeta = decode(&bytes, "secret metadata")?;
        let version = version.unwrap_or(meta.current_version);
        let sealed = match view
            .get_cf(self.store.cf(cf::VERSIONS), version_key(path.as_str(), version))
            .map_err(|e| self.store.rocks_err(e))?
        {
            Some(bytes) => Some(decode(&bytes, "sealed value")?),
            None => None,
        };
        Ok(Some(VersionRead { meta, version, sealed }))
    }

    /// A secret's stage labels; `None` for a secret written before labels existed (its `CURRENT`
    /// is its newest version) or no secret.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn stages(&self, path: &SecretPath) -> Result<Option<Stages>, StoreError> {
        self.store.get(cf::STAGES, path.as_str().as_bytes(), "stage labels")
    }

    /// A secret's rotation record.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn rotation(&self, path: &SecretPath) -> Result<Option<RotationRecord>, StoreError> {
        self.store.get(cf::ROTATIONS, path.as_str().as_bytes(), "rotation record")
    }

    /// Up to `limit` rotation records whose path starts with `prefix` and sorts after
    /// `start_after`, in path order.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn rotations(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, RotationRecord)>, StoreError> {
        let from = match start_after {
            Some(after) if after.as_bytes() >= prefix.as_bytes() => [after.as_bytes(), b"\0"].concat(),
            _ => prefix.as_bytes().to_vec(),
        };
        let iter =
            self.store.db.iterator_cf(self.store.cf(cf::ROTATIONS), IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(|e| self.store.rocks_err(e))?;
            if !key.starts_with(prefix.as_bytes()) || out.len() >= limit {
                break;
            }
            out.push((String::from_utf8_lossy(&key).into_owned(), decode(&value, "rotation record")?));
        }
        Ok(out)
    }

    /// Up to `limit` events from `revision` on, in order. The oldest kept is
    /// [`StateReader::events_window`]'s first.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn events(&self, revision: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let from = revision.to_be_bytes();
        let iter = self.store.db.iterator_cf(self.store.cf(cf::EVENTS), IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (_, value) = item.map_err(|e| self.store.rocks_err(e))?;
            out.push(decode(&value, "event")?);
        }
        Ok(out)
    }

    /// The oldest event revision kept and the newest written (0, 0 before the first).
    ///
    /// # Errors
    /// RocksDB failures.
    pub fn events_window(&self) -> Result<(u64, u64), StoreError> {
        let newest = *self.store.events_tail.borrow();
        let mut iter = self.store.db.iterator_cf(self.store.cf(cf::EVENTS), IteratorMode::Start);
        let oldest = match iter.next() {
            Some(item) => {
                let (key, _) = item.map_err(|e| self.store.rocks_err(e))?;
                key.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0)
            }
            None => newest.saturating_add(1),
        };
        Ok((oldest, newest))
    }

    /// A receiver that changes whenever events are written; its value is the newest revision.
    pub fn subscribe_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.store.events_tail.subscribe()
    }

    /// Up to `limit` secret paths that start with `prefix` and sort after `start_after`, in order.
    ///
    /// # Errors
    /// RocksDB failures.
    pub fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut from = prefix.as_bytes().to_vec();
        if let Some(after) = start_after {
            if after.as_bytes() >= from.as_slice() {
                from = after.as_bytes().to_vec();
                from.push(0);
            }
        }
        let mut opts = ReadOptions::default();
        opts.fill_cache(false);
        let iter = self.store.db.iterator_cf_opt(
            self.store.cf(cf::SECRETS),
            opts,
            IteratorMode::From(&from, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (key, _) = item.map_err(|e| self.store.rocks_err(e))?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            // Keys are paths the node validated as ASCII; anything else is skipped, not trusted.
            if let Ok(path) = std::str::from_utf8(&key) {
                out.push(path.to_owned());
            }
        }
        Ok(out)
    }

    /// A named key's record.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn named_key(&self, name: &KeyName) -> Result<Option<NamedKeyRecord>, StoreError> {
        self.store.get(cf::KEYS, name.as_str().as_bytes(), "named key")
    }

    /// Up to `limit` named key names that sort after `start_after`, in order.
    ///
    /// # Errors
    /// RocksDB failures.
    pub fn named_keys(&self, start_after: Option<&str>, limit: usize) -> Result<Vec<KeyName>, StoreError> {
        let mut from = Vec::new();
        if let Some(after) = start_after {
            from = after.as_bytes().to_vec();
            from.push(0);
        }
        let iter = self.store.db.iterator_cf(self.store.cf(cf::KEYS), IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (key, _) = item.map_err(|e| self.store.rocks_err(e))?;
            // Keys are names the node parsed; anything else is skipped, not trusted.
            if let Some(name) = std::str::from_utf8(&key).ok().and_then(|n| KeyName::parse(n).ok()) {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// What `id` is bound to, if a write carrying it has applied: a node resolving a retried
    /// "current version" names the versions the first attempt named.
    ///
    /// # Errors
    /// RocksDB failures; a record that does not decode.
    pub fn request_intent(&self, id: &crate::RequestId) -> Result<Option<crate::Intent>, StoreError> {
        crate::state::requests::intent(&self.store, id)
    }

    /// A number that moves whenever tokens, policies or roles change (after the change is
    /// readable): a cache of identity reads stays valid while it stays put.
    pub fn identity_generation(&self) -> u64 {
        self.store.identity_generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The sealed token-hashing key, once the identity is bootstrapped.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn identity_key(&self) -> Result<Option<IdentityKeyRecord>, StoreError> {
        self.store.get(cf::IDENTITY, id::KEY, "identity key")
    }

    /// A live (not revoked, not swept) token by its keyed hash. Expiry is the caller's to check:
    /// the sweep may not have run yet.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn token(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        self.store.get(cf::IDENTITY, &id::key(id::TOKEN, &hash.0), "token")
    }

    /// A token by its accessor, with its hash.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn token_by_accessor(&self, accessor: &str) -> Result<Option<(TokenHash, TokenRecord)>, StoreError> {
        let Some(hash) =
            self.store.get::<TokenHash>(cf::IDENTITY, &id::key(id::ACCESSOR, accessor.as_bytes()), "accessor")?
        else {
            return Ok(None);
        };
        Ok(self.token(&hash)?.map(|record| (hash, record)))
    }

    /// Up to `limit` token accessors that sort after `start_after`, in order.
    ///
    /// # Errors
    /// RocksDB failures.
    pub fn accessors(&self, start_after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        self.names_under(id::ACCESSOR, start_after, limit)
    }

    /// Up to `limit` tokens whose expiry is at or before `at`, soonest first: the sweep's work.
    ///
    /// # Errors
    /// RocksDB failures.
    pub fn tokens_due(&self, at: crate::UnixMillis, limit: usize) -> Result<Vec<TokenHash>, StoreError> {
        let iter =
            self.store.db.iterator_cf(self.store.cf(cf::IDENTITY), IteratorMode::From(id::EXPIRY, Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            let (key, _) = item.map_err(|e| self.store.rocks_err(e))?;
            let Some(rest) = key.strip_prefix(id::EXPIRY) else { break };
            if out.len() >= limit || rest.len() != 40 {
                break;
            }
            let (when, hash) = rest.split_at(8);
            let when = u64::from_be_bytes(when.try_into().unwrap_or([0xff; 8]));
            if when > at.0 {
                break;
            }
            if let Ok(hash) = <[u8; 32]>::try_from(hash) {
                out.push(TokenHash(hash));
            }
        }
        Ok(out)
    }

    /// A policy by name.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn policy(&self, name: &str) -> Result<Option<PolicyRecord>, StoreError> {
        self.store.get(cf::IDENTITY, &id::key(id::POLICY, name.as_bytes()), "policy")
    }

    /// Every policy name, in order.
    ///
    /// # Errors
    /// RocksDB failures.
    pub fn policy_names(&self) -> Result<Vec<String>, StoreError> {
        self.names_under(id::POLICY, None, usize::MAX)
    }

    /// A certificate login role by name.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn cert_role(&self, name: &str) -> Result<Option<CertRoleRecord>, StoreError> {
        self.store.get(cf::IDENTITY, &id::key(id::ROLE, name.as_bytes()), "login role")
    }

    /// Every certificate login role, in name order.
    ///
    /// # Errors
    /// RocksDB or decoding failures.
    pub fn cert_roles(&self) -> Result<Vec<CertRoleRecord>, StoreError> {
        let mut out = Vec::new();
        for name in self.names_under(id::ROLE, None, usize::MAX)? {
            if let Some(role) = self.cert_role(&name)? {
                out.push(role);
            }
        }
        Ok(out)
    }

    /// The UTF-8 names after `prefix` in the identity family.
    fn names_under(&self, prefix: &[u8], start_after: Option<&str>, limit: usize) -> Result<Vec<String>, StoreError> {
        let mut from = prefix.to_vec();
        if let Some(after) = start_after {
            from.extend_from_slice(after.as_bytes());
            from.push(0);
        }
        let iter =
            self.store.db.iterator_cf(self.store.cf(cf::IDENTITY), IteratorMode::From(&from, Direction::Forward));
        let mut out = Vec::new();
        for item in iter {
            let (key, _) = item.map_err(|e| self.store.rocks_err(e))?;
            let Some(rest) = key.strip_prefix(prefix) else { break };
            if out.len() >= limit {
                break;
            }
            if let Ok(name) = std::str::from_utf8(rest) {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }

    /// Forces everything written so far to disk and flushes the memtables to SST files, then
    /// compacts them: used by tests and operators to check what is at rest.
    ///
    /// # Errors
    /// RocksDB failures.
    pub fn flush_and_compact(&self) -> Result<(), StoreError> {
        for name in cf::ALL {
            self.store.db.flush_cf(self.store.cf(name)).map_err(|e| self.store.rocks_err(e))?;
            self.store.db.compact_range_cf(self.store.cf(name), None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }
}
