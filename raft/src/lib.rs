//! Coffer's replicated state: the openraft type configuration, the RocksDB log store and state
//! machine, snapshots, and the read API the node serves from.
//!
//! # Correctness
//! - Everything here is ciphertext or metadata: the node seals values and wraps keys before it
//!   proposes a [`Command`]. This crate never sees plaintext and knows no crypto.
//! - `apply` is deterministic: no clock, RNG, HSM or network inside it. The proposer stamps times
//!   and ids into the command; a command that cannot apply (a CAS mismatch, a vanished version)
//!   is answered with a [`Rejection`] and changes nothing.
//! - A log append is acknowledged to openraft only after its RocksDB write is fsynced.

mod coalesce;
mod command;
mod error;
mod handoff;
mod log_store;
mod network;
mod reader;
mod service;
mod state_machine;
mod store;

use std::io::Cursor;

pub use coalesce::Coalescer;
pub use command::{
    ClusterRecord, Command, KeyVersionRecord, KeyringRecord, NamedKeyRecord, NamedKeyType, Rejection, RequestId,
    Response, SealedValue, SecretMeta, VersionMeta, VersionState,
};
pub use error::StoreError;
pub use handoff::{HandoffError, Quiet};
pub use log_store::LogStore;
pub use network::{BadPeerAddr, GrpcNetwork, LocalMetrics, PeerChannels};
pub use reader::StateReader;
pub use service::{
    leading_without_quorum, quorum_loss_threshold, BoxFuture, ForwardedWrites, LeaderContact, RaftService,
};
pub use state_machine::StateMachine;
pub use store::Store;

/// A Raft node id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of Coffer.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The Raft handle of a Coffer node.
pub type Raft = openraft::Raft<TypeConfig>;

/// What a leader's read-index round gives: (read log id, applied log id), or why it failed.
pub type ReadIndexResult = Result<
    (Option<openraft::LogId<NodeId>>, Option<openraft::LogId<NodeId>>),
    openraft::error::RaftError<NodeId, openraft::error::CheckIsLeaderError<NodeId, openraft::BasicNode>>,
>;

/// The leader's shared read-index rounds: every linearizable read on the leader and every
/// follower's `ReadIndex` request go through one [`Coalescer`].
pub type ReadRounds = Coalescer<ReadIndexResult>;
