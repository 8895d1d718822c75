//! Coffer's replicated state behind one front door, [`Replica`]: write an operation and get its
//! outcome, wait for a read barrier, ask who leads and how fresh this node is, change membership.
//! Behind it: openraft, the RocksDB log store and state machine (apply rules by domain in
//! `state/`), snapshots, batching, forwarding and read-index rounds, and the peer transport.
//! Nodes read the applied state through [`StateReader`]; they never see openraft.
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
mod identity;
mod log_store;
mod network;
mod reader;
mod replica;
mod rotation;
mod service;
mod state;
mod state_machine;
mod store;
mod types;

use std::io::Cursor;

pub(crate) use coalesce::Coalescer;
pub use command::{
    ClusterRecord, Command, CreateJoinToken, CreateKey, DeleteKey, InitCluster, Intent, JoinTokenRecord,
    JoinTokenRefusal, KeyRule, KeyVersionRecord, KeyringRecord, NamedKeyRecord, NamedKeyType, Op, Outcome, PutSecret,
    PutStaged, Rejection, Response, RotateKey, SealedValue, SecretMeta, SetVersionState, TokenHash, UpdateKeyConfig,
    UseJoinToken, VersionMeta, VersionState, Write,
};
pub use error::{Error, JoinRefusal, Peer};
pub use identity::{
    BootstrapIdentity, CertRoleRecord, CreateToken, DeleteCertRole, DeletePolicy, ExpireTokens, IdentityKeyRecord,
    InitClusterWithIdentity, PolicyRecord, PutCertRole, PutPolicy, RenewToken, RevokeToken, TokenRecord,
};
pub use log_store::LogStore;
pub use reader::{StateReader, VersionRead};
pub use replica::{Consistency, Leadership, Member, Replica, ReplicaConfig, ReplicaStatus, Role};
pub use rotation::{
    Event, EventKind, Rotation, RotationOp, RotationRecord, RotationState, Running, Stage, Stages, Step,
};
pub use service::{PeerIdentity, PeerService};
pub use state_machine::StateMachine;
pub use store::Store;
pub use types::{
    KeyName, KeyVersion, KeyringVersion, NodeAddrs, NodeId, RequestId, SecretPath, SecretVersion, UnixMillis,
    MAX_KEY_NAME_BYTES, MAX_PATH_BYTES, MAX_REQUEST_ID_BYTES,
};

/// The SHA-256 of a join token: what the replicated state keeps of it, and what a join is
/// checked against. The token itself is never stored.
pub fn join_token_hash(token: &str) -> TokenHash {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    TokenHash(hash)
}

openraft::declare_raft_types!(
    /// The openraft type configuration of Coffer (for this crate's storage tests; nodes use
    /// [`Replica`]).
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle of a node.
pub(crate) type Raft = openraft::Raft<TypeConfig>;
