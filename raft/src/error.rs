//! The one error type of `coffer-raft`: storage failures, and every situation a caller of the
//! [`Replica`](crate::Replica) acts on, each its own variant.
//!
//! Not `#[non_exhaustive]`: these enums are the workspace's own, and the node maps each variant
//! to a gRPC status in one exhaustive match, so a new variant must fail to compile there until
//! someone decides its status.
//!
//! Errors are `Clone` (sources behind an `Arc`): the callers of one write batch each get the same
//! typed error. A refusal that crosses the node-to-node service travels typed too: as a
//! [`Refusal`] encoded in the status details, decoded back into the same variant on the caller.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{NodeAddrs, NodeId};

/// A node of the cluster: its id and the address peers reach it at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The node id.
    pub id: NodeId,
    /// Where it is reached.
    pub addr: NodeAddrs,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {} at {}", self.id, self.addr.client)
    }
}

/// Everything replication and storage can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// RocksDB failed (open, read or write).
    #[error("RocksDB at {path}: {source}")]
    Rocks {
        /// The database directory.
        path: String,
        /// What RocksDB said.
        #[source]
        source: rocksdb::Error,
    },
    /// A stored record could not be decoded: the data directory is corrupt or from a newer version.
    #[error("cannot decode a stored {what}")]
    Decode {
        /// Which record.
        what: &'static str,
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// A snapshot file could not be read or written.
    #[error("snapshot file {path}")]
    SnapshotIo {
        /// The file.
        path: String,
        /// The IO error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Input broke a rule of the domain (a secret path, a key name, a request id).
    #[error("{rule}")]
    InvalidInput {
        /// The rule, in words.
        rule: String,
    },
    /// The operation must run on the leader, and this node is not it.
    #[error("this node is not the leader{}", leader_hint(.leader))]
    NotLeader {
        /// The leader, if this node knows it.
        leader: Option<Peer>,
    },
    /// No leader is known: an election is under way, or the cluster has no quorum.
    #[error("no leader is known: an election is under way, or the cluster has no quorum; retry")]
    NoLeader,
    /// This node leads, but no quorum has acknowledged it for `since`: it is cut off from the
    /// majority, and a write to it would only wait.
    #[error("this node leads but no quorum has acknowledged it for {} ms: it is cut off from the majority; retry against another node", .since.as_millis())]
    LeaderCutOff {
        /// How long since a quorum last acknowledged it.
        since: Duration,
    },
    /// The leader could not confirm its leadership with a quorum for a linearizable read.
    #[error("no quorum: the leader cannot confirm its leadership; retry")]
    NoQuorum,
    /// This node has not applied its cluster's record: it is not in an initialised cluster yet.
    #[error(
        "this node is not part of an initialised cluster yet (run `coffer operator init` on the first node, \
         `coffer operator join --peer ADDR` on the others)"
    )]
    NotInitialized,
    /// The node is part of a cluster already.
    #[error("this node is already part of a cluster")]
    AlreadyInitialized,
    /// The node is shutting down.
    #[error("this node is shutting down")]
    ShuttingDown,
    /// A bounded-staleness read or crypto call: this node's state is older than the bound.
    #[error(
        "this node last heard from the {} {} ago, more than the {} max_staleness asked for",
        if *.leading { "quorum" } else { "leader" },
        humantime_ms(*.staleness),
        humantime_ms(*.bound)
    )]
    Stale {
        /// How stale this node's state may be.
        staleness: Duration,
        /// The bound asked for.
        bound: Duration,
        /// Whether this node leads (its freshness is its quorum's) or follows (its leader's).
        leading: bool,
    },
    /// A bounded-staleness read on a node that has not heard from a leader since it started.
    #[error("this node has not heard from a leader since it started")]
    NeverHeardFromLeader,
    /// The write was not known to be committed within `waited`; it may still apply. A retry with
    /// the same request id is applied at most once.
    #[error(
        "the write was not committed within {} (no quorum?); it may still be applied: retry with the same request_id",
        humantime_ms(*.waited)
    )]
    OutcomeUnknown {
        /// How long the write waited.
        waited: Duration,
    },
    /// Leadership moved while the write was proposed here; it may still apply under the new
    /// leader. A retry with the same request id is applied at most once.
    #[error(
        "leadership moved (leader now: {}) while the write was proposed; it may still be applied: retry with the same request_id",
        .leader.map_or_else(|| "unknown".to_owned(), |id| format!("node {id}"))
    )]
    LeadershipMoved {
        /// The new leader, if known.
        leader: Option<NodeId>,
    },
    /// A linearizable read's index was not applied here in time (a slow or stopping node).
    #[error("this node did not apply the read index within {}; retry", humantime_ms(*.waited))]
    ReadIndexNotApplied {
        /// How long the read waited.
        waited: Duration,
    },
    /// A peer failed internally while serving this node's request; its log has the details under
    /// `incident`.
    #[error("a peer failed internally (its incident {incident}; details are in that node's log)")]
    PeerInternal {
        /// The incident id the peer logged.
        incident: String,
    },
    /// A peer could not be reached, or did not answer in time.
    #[error("{peer} did not answer ({detail}); retry")]
    PeerUnreachable {
        /// The peer's address.
        peer: String,
        /// What the transport said.
        detail: String,
    },
    /// A peer's address is not a `host:port`.
    #[error("peer address {addr:?} is not a host:port")]
    BadPeerAddr {
        /// The address.
        addr: String,
    },
    /// The cluster refused to admit this node.
    #[error("the cluster refused this node: {0}")]
    JoinRefused(JoinRefusal),
    /// The node named is not a voter (a hand-off target, say).
    #[error("node {node} is not a voter")]
    NotVoter {
        /// The node.
        node: NodeId,
    },
    /// A leadership hand-off is already under way.
    #[error("a leadership hand-off is already under way; retry when it is over")]
    HandoffBusy,
    /// A bounded internal queue is full: the node sheds the request rather than grow without
    /// bound. Retry with backoff.
    #[error("the {queue} is full ({capacity} waiting); retry with backoff")]
    Overloaded {
        /// Which queue.
        queue: String,
        /// How many it holds.
        capacity: u64,
    },
    /// The hand-off target did not catch up with the leader's log in time.
    #[error("node {node} did not catch up with the leader's log within {}", humantime_ms(*.waited))]
    Lagging {
        /// The target.
        node: NodeId,
        /// How long the leader waited.
        waited: Duration,
    },
    /// This node did not win an election while the old leader was quiet.
    #[error(
        "this node did not win an election while the leader was quiet; the leader is now {}",
        .leader.map_or_else(|| "unknown".to_owned(), |id| format!("node {id}"))
    )]
    ElectionLost {
        /// The leader now, if known.
        leader: Option<NodeId>,
    },
    /// The node named is not a member (voter or learner) of the cluster.
    #[error("node {node} is not a member of the cluster")]
    UnknownMember {
        /// The node.
        node: NodeId,
    },
    /// Removing the node would leave the cluster without voters.
    #[error("cannot remove the last voter of a cluster")]
    LastVoter,
    /// A node-to-node call carried no node certificate (mutual TLS is on).
    #[error("node-to-node calls need a node certificate of this cluster")]
    PeerUnauthenticated,
    /// A message claims to come from another node than the certificate it came with names.
    #[error("refused: a message sent with node {certified}'s certificate claims to come from node {claimed}")]
    PeerMismatch {
        /// The node the TLS certificate names.
        certified: NodeId,
        /// The node the message says it is from.
        claimed: NodeId,
    },
    /// The certificate names a node that is not a member of this cluster.
    #[error("refused: node {node} is not a member of this cluster")]
    PeerNotMember {
        /// The node the certificate names.
        node: NodeId,
    },
    /// A peer answered with bytes that do not decode.
    #[error("undecodable message from a peer: {source}")]
    BadMessage {
        /// The decoder's error.
        #[source]
        source: postcard::Error,
    },
    /// openraft failed in a way no caller can act on (a fatal error, a broken invariant); the
    /// node's log has the details.
    #[error("raft: {source}")]
    Raft {
        /// openraft's error.
        #[source]
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

/// Why a cluster refused to admit a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JoinRefusal {
    /// The joining node's HSM root key is not the cluster's.
    #[error(
        "refusing node {node}: its HSM root key has KCV {theirs}, the cluster's root key has KCV {ours}; \
         give the node a token holding the cluster's root key"
    )]
    KcvMismatch {
        /// The joining node.
        node: NodeId,
        /// Its KCV.
        theirs: String,
        /// The cluster's KCV.
        ours: String,
    },
    /// The node asked has not been initialised.
    #[error("the node asked is not part of an initialised cluster")]
    NotInitialized,
    /// A join without a join token (the cluster runs TLS).
    #[error(
        "joining needs a join token: create one on a member with `coffer operator join-token create --ttl 10m` and pass it with --token"
    )]
    TokenRequired,
    /// The join token admits no one.
    #[error("{0}")]
    Token(crate::JoinTokenRefusal),
}

/// The typed part of a refusal between nodes, carried in a status's details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Refusal {
    NotLeader { leader: Option<Peer> },
    NoLeader,
    LeaderCutOff { since_ms: u64 },
    NoQuorum,
    NotInitialized,
    ShuttingDown,
    OutcomeUnknown { waited_ms: u64 },
    LeadershipMoved { leader: Option<NodeId> },
    JoinRefused(JoinRefusal),
    NotVoter { node: NodeId },
    HandoffBusy,
    Lagging { node: NodeId, waited_ms: u64 },
    ReadIndexNotApplied { waited_ms: u64 },
    Internal { incident: String },
    Overloaded { queue: String, capacity: u64 },
}

impl Error {
    pub(crate) fn rocks(path: &std::path::Path, source: rocksdb::Error) -> Self {
        Error::Rocks { path: path.display().to_string(), source }
    }

    pub(crate) fn raft(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Error::Raft { source: Arc::new(source) }
    }

    /// Whether the caller may retry the same request (with the same request id, for a write) and
    /// expect it to succeed once the cluster settles.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::NotLeader { .. }
                | Error::NoLeader
                | Error::LeaderCutOff { .. }
                | Error::NoQuorum
                | Error::ShuttingDown
                | Error::Stale { .. }
                | Error::NeverHeardFromLeader
                | Error::OutcomeUnknown { .. }
                | Error::LeadershipMoved { .. }
                | Error::ReadIndexNotApplied { .. }
                | Error::PeerUnreachable { .. }
                | Error::HandoffBusy
                | Error::Overloaded { .. }
                | Error::Lagging { .. }
                | Error::ElectionLost { .. }
        )
    }

    /// The refusal to send a peer, for the errors that have one.
    pub(crate) fn refusal(&self) -> Option<Refusal> {
        let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Some(match self {
            Error::NotLeader { leader } => Refusal::NotLeader { leader: leader.clone() },
            Error::NoLeader => Refusal::NoLeader,
            Error::LeaderCutOff { since } => Refusal::LeaderCutOff { since_ms: ms(since) },
            Error::NoQuorum => Refusal::NoQuorum,
            Error::NotInitialized => Refusal::NotInitialized,
            Error::ShuttingDown => Refusal::ShuttingDown,
            Error::OutcomeUnknown { waited } => Refusal::OutcomeUnknown { waited_ms: ms(waited) },
            Error::LeadershipMoved { leader } => Refusal::LeadershipMoved { leader: *leader },
            Error::JoinRefused(r) => Refusal::JoinRefused(r.clone()),
            Error::NotVoter { node } => Refusal::NotVoter { node: *node },
            Error::HandoffBusy => Refusal::HandoffBusy,
            Error::Lagging { node, waited } => Refusal::Lagging { node: *node, waited_ms: ms(waited) },
            Error::ReadIndexNotApplied { waited } => Refusal::ReadIndexNotApplied { waited_ms: ms(waited) },
            Error::Overloaded { queue, capacity } => Refusal::Overloaded { queue: queue.clone(), capacity: *capacity },
            _ => return None,
        })
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::NotLeader { leader } => Error::NotLeader { leader },
            Refusal::NoLeader => Error::NoLeader,
            Refusal::LeaderCutOff { since_ms } => Error::LeaderCutOff { since: Duration::from_millis(since_ms) },
            Refusal::NoQuorum => Error::NoQuorum,
            Refusal::NotInitialized => Error::NotInitialized,
            Refusal::ShuttingDown => Error::ShuttingDown,
            Refusal::OutcomeUnknown { waited_ms } => Error::OutcomeUnknown { waited: Duration::from_millis(waited_ms) },
            Refusal::LeadershipMoved { leader } => Error::LeadershipMoved { leader },
            Refusal::JoinRefused(r) => Error::JoinRefused(r),
            Refusal::NotVoter { node } => Error::NotVoter { node },
            Refusal::HandoffBusy => Error::HandoffBusy,
            Refusal::Lagging { node, waited_ms } => Error::Lagging { node, waited: Duration::from_millis(waited_ms) },
            Refusal::ReadIndexNotApplied { waited_ms } => {
                Error::ReadIndexNotApplied { waited: Duration::from_millis(waited_ms) }
            }
            Refusal::Internal { incident } => Error::PeerInternal { incident },
            Refusal::Overloaded { queue, capacity } => Error::Overloaded { queue, capacity },
        }
    }
}

fn leader_hint(leader: &Option<Peer>) -> String {
    match leader {
        Some(peer) => format!("; the leader is {peer}"),
        None => String::new(),
    }
}

fn humantime_ms(d: Duration) -> String {
    // Whole milliseconds: "1s 20ms", not nanoseconds.
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

/// The storage layer's name for the crate error (the storage modules return only its storage
/// variants).
pub(crate) type StoreError = Error;
