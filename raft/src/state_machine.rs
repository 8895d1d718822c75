//! openraft's state machine: applies committed [`Command`](crate::Command)s (rules in [`crate::state`], one module
//! per domain), one RocksDB `WriteBatch` per `apply` call; snapshots in [`crate::state::snapshot`].
//!
//! # Correctness
//! - Deterministic: the outcome of a command depends only on the state and the command.
//! - Atomic: the state changes of a whole `apply` call and its `last_applied` land in one batch.
//!   The batch is not fsynced (the log is); after a crash openraft re-applies from `last_applied`.
//!   Before a snapshot is built, and so before the log behind it is purged, the WAL is fsynced.
//! - A rejected command writes nothing.

use std::io::Cursor;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};

use crate::command::Response;
use crate::error::StoreError;
use crate::state::Txn;
use crate::store::{blocking, cf, Store};
use crate::{NodeId, TypeConfig};

pub(crate) const LAST_APPLIED: &[u8] = b"last_applied";
pub(crate) const MEMBERSHIP: &[u8] = b"membership";

/// The replicated state machine. Cheap to clone: a handle on the shared [`Store`].
#[derive(Debug, Clone)]
pub struct StateMachine {
    pub(crate) store: Arc<Store>,
    pub(crate) snapshots_built: Arc<AtomicU64>,
}

impl StateMachine {
    /// A state machine over the shared RocksDB instance.
    pub fn new(store: Arc<Store>) -> Self {
        StateMachine { store, snapshots_built: Arc::new(AtomicU64::new(0)) }
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
        let Txn { store, batch, identity_changed, last_event, .. } = txn;
        store.db.write(batch).map_err(|e| StorageIOError::write_state_machine(&e))?;
        if identity_changed {
            store.identity_changed();
        }
        if let Some(revision) = last_event {
            store.events_written(revision);
        }
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
