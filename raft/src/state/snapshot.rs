//! Snapshot files: a full export of the state column families, written atomically, installed in
//! one synced batch.
//!
//! # Correctness
//! - Before a snapshot is built, and so before the log behind it can be purged, the WAL is
//!   fsynced: everything the snapshot covers is durable.
//! - The file is replaced atomically (a temporary file, fsynced, renamed, the directory fsynced).
//! - Installing replaces every state row and `last_applied` and membership in one synced batch.
//! - A snapshot from a peer is decoded into flat rows (no recursion); a row naming an unknown
//!   column family is refused.

use std::sync::atomic::Ordering;

use openraft::{BasicNode, LogId, SnapshotMeta, StoredMembership};
use rocksdb::{IteratorMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::state_machine::{StateMachine, LAST_APPLIED, MEMBERSHIP};
use crate::store::{blocking, cf, decode, encode};
use crate::NodeId;

const CURRENT_SNAPSHOT: &str = "current.snap";

/// A snapshot as stored on disk: its metadata and its data.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub(crate) meta: SnapshotMeta<NodeId, BasicNode>,
    pub(crate) data: Vec<u8>,
}

/// The data of a snapshot: every key and value of the state column families.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    /// (index into `cf::STATE`, key, value)
    rows: Vec<(u8, Vec<u8>, Vec<u8>)>,
}

impl StateMachine {
    pub(crate) fn read_snapshot_file(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        let path = self.store.snapshot_dir().join(CURRENT_SNAPSHOT);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(decode(&bytes, "snapshot")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::SnapshotIo { path: path.display().to_string(), source: source.into() }),
        }
    }

    /// Writes the snapshot file atomically: a temporary file, fsynced, renamed over the old one.
    fn write_snapshot_file(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let dir = self.store.snapshot_dir();
        let path = dir.join(CURRENT_SNAPSHOT);
        let io =
            |source: std::io::Error| StoreError::SnapshotIo { path: path.display().to_string(), source: source.into() };
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

    pub(crate) fn build(&self) -> Result<StoredSnapshot, StoreError> {
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

    pub(crate) fn install(&self, meta: &SnapshotMeta<NodeId, BasicNode>, data: Vec<u8>) -> Result<(), StoreError> {
        let parsed: SnapshotData = decode(&data, "snapshot data")?;
        let mut batch = WriteBatch::default();
        for name in cf::STATE {
            // Every key of the column family: state keys begin with a path, a request id or a fixed
            // ASCII tag (hashes come only after a tag), so every key's first byte is below 0xff.
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
        self.store.identity_changed();
        self.store.reload_events_tail()?;
        self.write_snapshot_file(&StoredSnapshot { meta: meta.clone(), data })
    }
}
