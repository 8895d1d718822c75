//! The RocksDB instance that holds a node's Raft log and its state machine, in column families.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `logs` | log index, u64 big-endian | postcard `Entry` |
//! | `raft_meta` | `vote`, `committed`, `last_purged` | postcard |
//! | `sm_meta` | `last_applied`, `membership` | postcard |
//! | `secrets` | path | postcard [`SecretMeta`](crate::SecretMeta) |
//! | `versions` | path, 0x00, version u64 big-endian | postcard [`SealedValue`](crate::SealedValue) |
//! | `cluster` | `cluster`, `keyring/` + version u32 big-endian | postcard records |
//! | `requests` | request id | format 1: postcard [`Response`](crate::Response) of an applied put |
//! | `request_ids` | request id | postcard (intent, outcome) of the write it was first applied with |
//! | `keys` | named key name | postcard [`NamedKeyRecord`](crate::NamedKeyRecord) (versions wrapped) |
//! | `identity` | tag + hash or name | tokens, policies, login roles |
//! | `stages` | path | postcard [`Stages`](crate::Stages): `CURRENT`, `PENDING`, `PREVIOUS` |
//! | `rotations` | path | postcard [`RotationRecord`](crate::RotationRecord) |
//! | `events` | revision u64 big-endian | postcard [`Event`](crate::Event); the next revision is `cluster`/`events/next` |
//!
//! Paths never contain 0x00 (the node validates them), so `path 0x00` prefixes one secret's versions.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::StoreError;
use crate::{KeyringVersion, SecretVersion};

/// Column family names.
pub(crate) mod cf {
    pub(crate) const LOGS: &str = "logs";
    pub(crate) const RAFT_META: &str = "raft_meta";
    pub(crate) const SM_META: &str = "sm_meta";
    pub(crate) const SECRETS: &str = "secrets";
    pub(crate) const VERSIONS: &str = "versions";
    pub(crate) const CLUSTER: &str = "cluster";
    pub(crate) const REQUESTS: &str = "requests";
    pub(crate) const KEYS: &str = "keys";
    pub(crate) const REQUEST_IDS: &str = "request_ids";
    pub(crate) const IDENTITY: &str = "identity";
    pub(crate) const STAGES: &str = "stages";
    pub(crate) const ROTATIONS: &str = "rotations";
    pub(crate) const EVENTS: &str = "events";
    /// The column families that make up the state machine's data, in snapshot order (a snapshot
    /// row names its family by index here: only ever append).
    pub(crate) const STATE: [&str; 10] =
        [SECRETS, VERSIONS, CLUSTER, REQUESTS, KEYS, REQUEST_IDS, IDENTITY, STAGES, ROTATIONS, EVENTS];
    pub(crate) const ALL: [&str; 13] = [
        LOGS,
        RAFT_META,
        SM_META,
        SECRETS,
        VERSIONS,
        CLUSTER,
        REQUESTS,
        KEYS,
        REQUEST_IDS,
        IDENTITY,
        STAGES,
        ROTATIONS,
        EVENTS,
    ];
}

/// One RocksDB database shared by a node's log store, state machine and readers.
pub struct Store {
    pub(crate) db: DB,
    /// Moves after every batch that changed tokens, policies or roles, once it is written (and
    /// after a snapshot install): the node's identity cache is valid while it stays put.
    pub(crate) identity_generation: std::sync::atomic::AtomicU64,
    /// The revision of the newest event written: Watch streams wait on it.
    pub(crate) events_tail: tokio::sync::watch::Sender<u64>,
    path: PathBuf,
    snapshot_dir: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the store under `dir`: RocksDB in `dir/db`, snapshots in
    /// `dir/snapshots`.
    ///
    /// # Errors
    /// When RocksDB cannot open the directory (locked by another process, corrupt, unwritable).
    pub fn open(dir: &Path) -> Result<Arc<Store>, StoreError> {
        let path = dir.join("db");
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir).map_err(|source| StoreError::SnapshotIo {
            path: snapshot_dir.display().to_string(),
            source: source.into(),
        })?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // A failed fsync must stop the node rather than let it carry on with unknown durability.
        opts.set_paranoid_checks(true);
        let cfs = cf::ALL.iter().map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = DB::open_cf_descriptors(&opts, &path, cfs).map_err(|e| StoreError::rocks(&path, e))?;
        let store = Store {
            db,
            path,
            snapshot_dir,
            identity_generation: std::sync::atomic::AtomicU64::new(1),
            events_tail: tokio::sync::watch::Sender::new(0),
        };
        store.reload_events_tail()?;
        Ok(Arc::new(store))
    }

    pub(crate) fn cf(&self, name: &str) -> &ColumnFamily {
        self.db.cf_handle(name).expect("every column family in cf::ALL is created at open")
    }

    pub(crate) fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    /// Marks the identity state changed (after the batch that changed it is written).
    pub(crate) fn identity_changed(&self) {
        self.identity_generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Wakes Watch streams: events up to `revision` are written.
    pub(crate) fn events_written(&self, revision: u64) {
        self.events_tail.send_replace(revision);
    }

    /// Reads the newest event's revision from the state (at open and after a snapshot install).
    pub(crate) fn reload_events_tail(&self) -> Result<(), StoreError> {
        let next = self.get::<u64>(cf::CLUSTER, EVENTS_NEXT_KEY, "event counter")?.unwrap_or(1);
        self.events_tail.send_replace(next.saturating_sub(1));
        Ok(())
    }

    pub(crate) fn rocks_err(&self, source: rocksdb::Error) -> StoreError {
        StoreError::rocks(&self.path, source)
    }

    pub(crate) fn get<T: DeserializeOwned>(
        &self,
        cf_name: &str,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.db.get_pinned_cf(self.cf(cf_name), key).map_err(|e| self.rocks_err(e))? {
            Some(bytes) => Ok(Some(decode(&bytes, what)?)),
            None => Ok(None),
        }
    }

    /// Forces RocksDB's write-ahead log to disk: state written without fsync becomes durable.
    pub(crate) fn sync_wal(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true).map_err(|e| self.rocks_err(e))
    }
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &'static str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value)
        .expect("postcard encodes every record type of this crate (no maps with non-string keys, no unsized data)")
}

/// The `versions` key of one secret version.
pub(crate) fn version_key(path: &str, version: SecretVersion) -> Vec<u8> {
    let mut key = Vec::with_capacity(path.len() + 9);
    key.extend_from_slice(path.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.0.to_be_bytes());
    key
}

/// The `cluster` key of one keyring key version.
pub(crate) fn keyring_key(version: KeyringVersion) -> Vec<u8> {
    let mut key = b"keyring/".to_vec();
    key.extend_from_slice(&version.0.to_be_bytes());
    key
}

pub(crate) const KEYRING_PREFIX: &[u8] = b"keyring/";
pub(crate) const CLUSTER_KEY: &[u8] = b"cluster";
/// The `cluster` key of the next event revision.
pub(crate) const EVENTS_NEXT_KEY: &[u8] = b"events/next";

/// Runs blocking storage work (an fsync) without stalling the other tasks of a multi-threaded Tokio
/// runtime: the worker hands its queue to another thread for the duration. On a current-thread
/// runtime (some tests) it simply runs `f`.
///
/// `block_in_place` rather than `spawn_blocking`: the caller must not return before the write is
/// durable and visible, because openraft reads back what it appended and orders truncate and purge
/// after append.
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}
