use coffer_raft::{LogStore, NodeId, StateMachine, Store, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let store = Store::open(dir.path()).map_err(|e| openraft::StorageIOError::write(&e))?;
        Ok((dir, LogStore::new(store.clone()), StateMachine::new(store)))
    }
}

/// openraft's own storage conformance suite: the durability and ordering contract of every method.
#[test]
#[allow(clippy::result_large_err)] // the suite's own error type
fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(RocksBuilder)
}
