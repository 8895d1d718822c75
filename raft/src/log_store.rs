//! The Raft log in RocksDB (`logs` and `raft_meta` column families).
//!
//! # Correctness
//! - `append` calls back only after the batch is written with `sync = true`: an entry openraft
//!   counts towards a quorum is on disk.
//! - The vote is written with `sync = true` before `save_vote` returns: a node never votes twice in
//!   a term across a crash.
//! - `purge` records `last_purged` in the same synced batch that deletes the entries, so the log
//!   state is never a gap.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{Entry, LogId, LogState, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions};

use crate::store::{blocking, cf, decode, encode, Store};
use crate::{NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
/// Sorts after every 8-byte index key: the exclusive end of "the rest of the log".
const PAST_LAST_INDEX: [u8; 9] = [0xff; 9];

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn synced() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    opts
}

/// openraft's view of the log. Cheap to clone: it is a handle on the shared [`Store`].
#[derive(Debug, Clone)]
pub struct LogStore {
    store: Arc<Store>,
}

impl LogStore {
    /// A log store over the shared RocksDB instance.
    pub fn new(store: Arc<Store>) -> Self {
        LogStore { store }
    }

    #[allow(clippy::result_large_err)] // openraft's StorageError is what every caller returns anyway
    fn meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StorageError<NodeId>> {
        self.store.get(cf::RAFT_META, key, what).map_err(|e| StorageIOError::read(&e).into())
    }

    /// Writes and fsyncs a batch.
    fn write(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        blocking(|| self.store.db.write_opt(batch, &synced()))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        let from = index_key(start);
        let iter = self.store.db.iterator_cf(self.store.cf(cf::LOGS), IteratorMode::From(&from, Direction::Forward));
        for item in iter {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let index =
                u64::from_be_bytes(key.as_ref().try_into().map_err(|_| StorageIOError::read_logs(&CorruptKey))?);
            if !range.contains(&index) {
                break;
            }
            entries.push(decode(&value, "log entry").map_err(|e| StorageIOError::read_log_at_index(index, &e))?);
        }
        Ok(entries)
    }
}

/// A `logs` key that is not 8 bytes long.
#[derive(Debug, thiserror::Error)]
#[error("a log key is not an 8-byte index")]
struct CorruptKey;

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged: Option<LogId<NodeId>> = self.meta(LAST_PURGED, "last purged log id")?;
        let mut iter = self.store.db.iterator_cf(self.store.cf(cf::LOGS), IteratorMode::End);
        let last = match iter.next() {
            Some(item) => {
                let (_, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
                let entry: Entry<TypeConfig> =
                    decode(&value, "log entry").map_err(|e| StorageIOError::read_logs(&e))?;
                Some(entry.log_id)
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(cf::RAFT_META), VOTE, encode(vote));
        self.write(batch).map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.meta(VOTE, "vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not synced: the committed index is a hint that lets a restarted node apply at once; losing
        // it only means waiting for the leader to tell it again.
        self.store
            .db
            .put_cf(self.store.cf(cf::RAFT_META), COMMITTED, encode(&committed))
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.meta::<Option<LogId<NodeId>>>(COMMITTED, "committed log id")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let logs = self.store.cf(cf::LOGS);
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(logs, index_key(entry.log_id.index), encode(&entry));
        }
        // The callback fires only after the fsync: openraft counts the entries towards a quorum then.
        let result = self.write(batch);
        let io = result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io);
        result.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.store.cf(cf::LOGS), index_key(log_id.index).as_slice(), PAST_LAST_INDEX.as_slice());
        self.write(batch).map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = WriteBatch::default();
        batch.put_cf(self.store.cf(cf::RAFT_META), LAST_PURGED, encode(&log_id));
        let end = match log_id.index.checked_add(1) {
            Some(next) => index_key(next).to_vec(),
            None => PAST_LAST_INDEX.to_vec(),
        };
        batch.delete_range_cf(self.store.cf(cf::LOGS), index_key(0).to_vec(), end);
        self.write(batch).map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
