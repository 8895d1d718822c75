//! The state machine: applies committed [`Command`]s to the state column families, one RocksDB
//! `WriteBatch` per `apply` call, and builds and installs snapshots.
//!
//! # Correctness
//! - Deterministic: the outcome of a command depends only on the state and the command.
//! - Atomic: the state changes of a whole `apply` call and its `last_applied` land in one batch.
//!   The batch is not fsynced (the log is); after a crash openraft re-applies from `last_applied`.
//!   Before a snapshot is built, and so before the log behind it is purged, the WAL is fsynced.
//! - A rejected command writes nothing.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use rocksdb::{IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::command::{Command, NamedKeyRecord, Rejection, Response, SecretMeta, VersionMeta, VersionState};
use crate::error::StoreError;
use crate::store::{blocking, cf, decode, encode, keyring_key, version_key, Store, CLUSTER_KEY};
use crate::{ClusterRecord, NodeId, TypeConfig};

const LAST_APPLIED: &[u8] = b"last_applied";
const MEMBERSHIP: &[u8] = b"membership";
const CURRENT_SNAPSHOT: &str = "current.snap";

/// A snapshot as stored on disk: its metadata and its data.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The data of a snapshot: every key and value of the state column families.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    /// (index into `cf::STATE`, key, value)
    rows: Vec<(u8, Vec<u8>, Vec<u8>)>,
}

/// The replicated state machine. Cheap to clone: a handle on the shared [`Store`].
#[derive(Debug, Clone)]
pub struct StateMachine {
    store: Arc<Store>,
    snapshots_built: Arc<AtomicU64>,
}

impl StateMachine {
    /// A state machine over the shared RocksDB instance.
    pub fn new(store: Arc<Store>) -> Self {
        StateMachine { store, snapshots_built: Arc::new(AtomicU64::new(0)) }
    }
}

/// Pending writes of one `apply` call, with reads that see them.
struct Txn<'a> {
    store: &'a Store,
    batch: WriteBatch,
    overlay: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
}

impl<'a> Txn<'a> {
    fn new(store: &'a Store) -> Self {
        Txn { store, batch: WriteBatch::default(), overlay: HashMap::new() }
    }

    fn get<T: serde::de::DeserializeOwned>(
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

    fn put<T: Serialize>(&mut self, cf_name: &'static str, key: Vec<u8>, value: &T) {
        let bytes = encode(value);
        self.batch.put_cf(self.store.cf(cf_name), &key, &bytes);
        self.overlay.insert((cf_name, key), Some(bytes));
    }

    fn delete(&mut self, cf_name: &'static str, key: Vec<u8>) {
        self.batch.delete_cf(self.store.cf(cf_name), &key);
        self.overlay.insert((cf_name, key), None);
    }

    /// Applies one command, or rejects it without touching the batch.
    fn apply(&mut self, command: &Command) -> Result<Response, StoreError> {
        match command {
            Command::InitCluster { cluster, keyring } => {
                if self.get::<ClusterRecord>(cf::CLUSTER, CLUSTER_KEY, "cluster record")?.is_some() {
                    return Ok(Response::Rejected(Rejection::AlreadyInitialized));
                }
                self.put(cf::CLUSTER, CLUSTER_KEY.to_vec(), cluster);
                self.put(cf::CLUSTER, keyring_key(keyring.version), keyring);
                Ok(Response::Applied)
            }
            Command::PutSecret {
                request_id,
                path,
                version,
                cas,
                max_versions,
                default_max_versions,
                sealed,
                at_ms,
            } => {
                if let Some(id) = request_id {
                    if let Some(done) = self.get::<Response>(cf::REQUESTS, id.as_bytes(), "request record")? {
                        return Ok(done);
                    }
                }
                let meta = self.get::<SecretMeta>(cf::SECRETS, path.as_bytes(), "secret metadata")?;
                let current = meta.as_ref().map_or(0, |m| m.current_version);
                if let Some(expected) = *cas {
                    if expected != current {
                        return Ok(Response::Rejected(Rejection::CasMismatch { expected, current }));
                    }
                }
                if *version != current + 1 {
                    return Ok(Response::Rejected(Rejection::VersionTaken { version: *version, current }));
                }
                let mut meta = meta.unwrap_or(SecretMeta {
                    current_version: 0,
                    max_versions: *default_max_versions,
                    created_at_ms: *at_ms,
                    updated_at_ms: *at_ms,
                    versions: Default::default(),
                });
                if let Some(max) = max_versions {
                    meta.max_versions = *max;
                }
                meta.current_version = *version;
                meta.updated_at_ms = *at_ms;
                meta.versions
                    .insert(*version, VersionMeta { created_at_ms: *at_ms, deleted_at_ms: None, destroyed: false });
                while meta.versions.len() > meta.max_versions.max(1) as usize {
                    if let Some((oldest, _)) = meta.versions.pop_first() {
                        self.delete(cf::VERSIONS, version_key(path, oldest));
                    }
                }
                self.put(cf::VERSIONS, version_key(path, *version), sealed);
                self.put(cf::SECRETS, path.as_bytes().to_vec(), &meta);
                let response = Response::Put { version: *version, created_at_ms: *at_ms };
                if let Some(id) = request_id {
                    self.put(cf::REQUESTS, id.as_bytes().to_vec(), &response);
                }
                Ok(response)
            }
            Command::CreateKey { name, record } => {
                if self.get::<NamedKeyRecord>(cf::KEYS, name.as_bytes(), "named key")?.is_some() {
                    return Ok(Response::Rejected(Rejection::KeyExists { name: name.clone() }));
                }
                self.put(cf::KEYS, name.as_bytes().to_vec(), record);
                Ok(Response::Applied)
            }
            Command::RotateKey { name, version, material } => {
                let Some(mut record) = self.get::<NamedKeyRecord>(cf::KEYS, name.as_bytes(), "named key")? else {
                    return Ok(Response::Rejected(Rejection::KeyNotFound { name: name.clone() }));
                };
                let current = record.primary();
                if *version != current + 1 {
                    return Ok(Response::Rejected(Rejection::VersionTaken {
                        version: u64::from(*version),
                        current: u64::from(current),
                    }));
                }
                record.versions.insert(*version, material.clone());
                record.generation += 1;
                self.put(cf::KEYS, name.as_bytes().to_vec(), &record);
                Ok(Response::Applied)
            }
            Command::UpdateKeyConfig {
                name,
                min_decryption_version,
                min_encryption_version,
                deletion_allowed,
                auto_rotate_period_ms,
            } => {
                let Some(mut record) = self.get::<NamedKeyRecord>(cf::KEYS, name.as_bytes(), "named key")? else {
                    return Ok(Response::Rejected(Rejection::KeyNotFound { name: name.clone() }));
                };
                let primary = record.primary();
                let min_dec = min_decryption_version.unwrap_or(record.min_decryption_version);
                let min_enc = min_encryption_version.unwrap_or(record.min_encryption_version);
                if min_dec > primary || min_enc > primary {
                    return Ok(Response::Rejected(Rejection::KeyConfigRefused {
                        rule: format!("minimum versions cannot exceed the primary version {primary}"),
                    }));
                }
                if min_enc < min_dec && min_encryption_version.is_some() {
                    return Ok(Response::Rejected(Rejection::KeyConfigRefused {
                        rule: "min_encryption_version cannot be below min_decryption_version".into(),
                    }));
                }
                record.min_decryption_version = min_dec;
                record.min_encryption_version = min_enc.max(min_dec);
                record.deletion_allowed = deletion_allowed.unwrap_or(record.deletion_allowed);
                record.auto_rotate_period_ms = auto_rotate_period_ms.unwrap_or(record.auto_rotate_period_ms);
                record.generation += 1;
                self.put(cf::KEYS, name.as_bytes().to_vec(), &record);
                Ok(Response::Applied)
            }
            Command::DeleteKey { name } => {
                let Some(record) = self.get::<NamedKeyRecord>(cf::KEYS, name.as_bytes(), "named key")? else {
                    return Ok(Response::Rejected(Rejection::KeyNotFound { name: name.clone() }));
                };
                if !record.deletion_allowed {
                    return Ok(Response::Rejected(Rejection::KeyConfigRefused {
                        rule: format!("key {name} does not allow deletion (set deletion_allowed first)"),
                    }));
                }
                self.delete(cf::KEYS, name.as_bytes().to_vec());
                Ok(Response::Applied)
            }
            Command::Batch(commands) => {
                let mut responses = Vec::with_capacity(commands.len());
                for command in commands {
                    responses.push(match command {
                        Command::Batch(_) => Response::Rejected(Rejection::NestedBatch),
                        one => self.apply(one)?,
                    });
                }
                Ok(Response::Batch(responses))
            }
            Command::SetVersionState { path, versions, state, at_ms } => {
                let Some(mut meta) = self.get::<SecretMeta>(cf::SECRETS, path.as_bytes(), "secret metadata")? else {
                    return Ok(Response::Rejected(Rejection::SecretNotFound { path: path.clone() }));
                };
                let targets = if versions.is_empty() { vec![meta.current_version] } else { versions.clone() };
                // Check every target before changing any: a rejected command changes nothing.
                for version in &targets {
                    match meta.versions.get(version) {
                        None => {
                            return Ok(Response::Rejected(Rejection::VersionNotFound {
                                path: path.clone(),
                                version: *version,
                            }))
                        }
                        Some(v) if v.destroyed && *state == VersionState::Undeleted => {
                            return Ok(Response::Rejected(Rejection::VersionDestroyed {
                                path: path.clone(),
                                version: *version,
                            }))
                        }
                        Some(_) => {}
                    }
                }
                for version in targets {
                    let Some(v) = meta.versions.get_mut(&version) else { continue };
                    match state {
                        VersionState::Deleted => {
                            if !v.destroyed && v.deleted_at_ms.is_none() {
                                v.deleted_at_ms = Some(*at_ms);
                            }
                        }
                        VersionState::Undeleted => v.deleted_at_ms = None,
                        VersionState::Destroyed => {
                            v.destroyed = true;
                            self.delete(cf::VERSIONS, version_key(path, version));
                        }
                    }
                }
                meta.updated_at_ms = *at_ms;
                self.put(cf::SECRETS, path.as_bytes().to_vec(), &meta);
                Ok(Response::Applied)
            }
        }
    }
}

impl StateMachine {
    fn read_snapshot_file(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        let path = self.store.snapshot_dir().join(CURRENT_SNAPSHOT);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(decode(&bytes, "snapshot")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::SnapshotIo { path: path.display().to_string(), source }),
        }
    }

    /// Writes the snapshot file atomically: a temporary file, fsynced, renamed over the old one.
    fn write_snapshot_file(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let dir = self.store.snapshot_dir();
        let path = dir.join(CURRENT_SNAPSHOT);
        let io = |source| StoreError::SnapshotIo { path: path.display().to_string(), source };
        let tmp = dir.join(format!("{CURRENT_SNAPSHOT}.tmp"));
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp).map_err(io)?;
            file.write_all(&encode(snapshot)).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }

    fn build(&self) -> Result<StoredSnapshot, StoreError> {
        // Everything applied so far becomes durable before the log behind it can be purged.
        self.store.sync_wal()?;
        let view = self.store.db.snapshot();
        let read_meta = |key: &[u8]| view.get_cf(self.store.cf(cf::SM_META), key).map_err(|e| self.store.rocks_err(e));
        let last_applied: Option<LogId<NodeId>> = match read_meta(LAST_APPLIED)? {
            Some(bytes) => decode(&bytes, "last applied log id")?,
            None => None,
        };
        let membership: StoredMembership<NodeId, BasicNode> = match read_meta(MEMBERSHIP)? {
            Some(bytes) => decode(&bytes, "membership")?,
            None => StoredMembership::default(),
        };
        let mut rows = Vec::new();
        for (i, name) in cf::STATE.iter().enumerate() {
            for item in view.iterator_cf(self.store.cf(name), IteratorMode::Start) {
                let (key, value) = item.map_err(|e| self.store.rocks_err(e))?;
                rows.push((i as u8, key.to_vec(), value.to_vec()));
            }
        }
        let n = self.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{n}", id.leader_id.term, id.index),
            None => format!("0-0-{n}"),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        let stored = StoredSnapshot { meta, data: encode(&SnapshotData { rows }) };
        self.write_snapshot_file(&stored)?;
        Ok(stored)
    }

    fn install(&self, meta: &SnapshotMeta<NodeId, BasicNode>, data: Vec<u8>) -> Result<(), StoreError> {
        let parsed: SnapshotData = decode(&data, "snapshot data")?;
        let mut batch = WriteBatch::default();
        for name in cf::STATE {
            // Every key of the column family: state keys begin with a path, a request id or a fixed
            // ASCII tag, all UTF-8, and no UTF-8 string contains the byte 0xff.
            batch.delete_range_cf(self.store.cf(name), b"".as_slice(), b"\xff".as_slice());
        }
        for (i, key, value) in &parsed.rows {
            let name = cf::STATE.get(usize::from(*i)).ok_or(StoreError::Decode {
                what: "snapshot column family",
                source: postcard::Error::DeserializeBadEnum,
            })?;
            batch.put_cf(self.store.cf(name), key, value);
        }
        batch.put_cf(self.store.cf(cf::SM_META), LAST_APPLIED, encode(&meta.last_log_id));
        batch.put_cf(self.store.cf(cf::SM_META), MEMBERSHIP, encode(&meta.last_membership));
        let mut opts = rocksdb::WriteOptions::default();
        opts.set_sync(true);
        blocking(|| self.store.db.write_opt(batch, &opts)).map_err(|e| self.store.rocks_err(e))?;
        self.write_snapshot_file(&StoredSnapshot { meta: meta.clone(), data })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let stored = blocking(|| self.build()).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Snapshot { meta: stored.meta, snapshot: Box::new(Cursor::new(stored.data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>> {
        let read = |e: StoreError| StorageIOError::read_state_machine(&e);
        let last_applied =
            self.store.get::<Option<LogId<NodeId>>>(cf::SM_META, LAST_APPLIED, "last applied").map_err(read)?;
        let membership = self
            .store
            .get::<StoredMembership<NodeId, BasicNode>>(cf::SM_META, MEMBERSHIP, "membership")
            .map_err(read)?;
        Ok((last_applied.flatten(), membership.unwrap_or_default()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut txn = Txn::new(&self.store);
        let mut responses = Vec::new();
        let mut last = None;
        for entry in entries {
            let response = match &entry.payload {
                EntryPayload::Blank => Response::Applied,
                EntryPayload::Normal(command) => {
                    txn.apply(command).map_err(|e| StorageIOError::apply(entry.log_id, &e))?
                }
                EntryPayload::Membership(membership) => {
                    let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                    txn.put(cf::SM_META, MEMBERSHIP.to_vec(), &stored);
                    Response::Applied
                }
            };
            responses.push(response);
            last = Some(entry.log_id);
        }
        if let Some(last) = last {
            txn.put(cf::SM_META, LAST_APPLIED.to_vec(), &Some(last));
        }
        let Txn { store, batch, .. } = txn;
        store.db.write(batch).map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        blocking(|| self.install(meta, snapshot.into_inner()))
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let stored = self.read_snapshot_file().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
