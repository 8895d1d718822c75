// Hot path: every write (write) and every read (read_barrier, freshness).
//! [`Replica`]: the one front door of replication. The node writes operations and gets their
//! outcomes, waits for read barriers, asks who leads and how fresh it is, and changes membership;
//! it never sees openraft, the peer wire format or the leader's address book.
//!
//! Behind the door, each in one place:
//! - [`batch`]: concurrent writes share one log entry; a follower's batch is forwarded whole and
//!   the leader splices it into its own next entry;
//! - [`reads`]: linearizable barriers (read-index rounds shared by concurrent reads, on the
//!   leader and for each follower) and bounded-staleness freshness;
//! - [`membership`]: initialise, join and admit, remove, leadership hand-off;
//! - [`Replica::leader`]: who leads, read from openraft's metrics (nowhere else).
//!
//! # Cancellation
//! Every method may be dropped at an `.await`. A dropped [`Replica::write`] leaves its write
//! queued or proposed: it may still apply (the request id makes a retry safe). A dropped read
//! barrier or status call leaves nothing behind (a shared read round goes on for the others).

mod batch;
mod membership;
mod reads;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tonic::transport::Channel;

use crate::command::{Command, Outcome, Response, Write};
use crate::error::{Error, Peer};
use crate::handoff::Quiet;
use crate::network::{GrpcNetwork, LocalMetrics, PeerChannels};
use crate::service::PeerService;
use crate::{Coalescer, LogStore, NodeAddrs, NodeId, Raft, StateMachine, StateReader, Store};

pub(crate) use batch::{weight as batch_weight, MAX_BYTES as MAX_BATCH_BYTES, MAX_ITEMS as MAX_BATCH_ITEMS};
pub(crate) use reads::LeaderContact;

/// How a read must relate to the writes acknowledged before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// The read sees every write acknowledged before it started, on any node.
    Linearizable,
    /// The read sees a state at most this old (no round trip to the leader).
    BoundedStaleness(Duration),
}

/// What a replica is configured with.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// Where clients and other nodes reach this one.
    pub advertise: NodeAddrs,
    /// How often the leader sends heartbeats.
    pub heartbeat_interval: Duration,
    /// Election timeout, lower bound (also the leader lease).
    pub election_timeout_min: Duration,
    /// Election timeout, upper bound.
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries.
    pub snapshot_after_logs: u64,
    /// Peer address → address dialled instead (the drills' TCP proxies).
    pub dial_via: BTreeMap<String, String>,
    /// How long a write may wait to be committed before it is reported [`Error::OutcomeUnknown`].
    pub write_timeout: Duration,
    /// TLS for dialling peers (the cluster's CA, this node's certificate); `None`: plaintext.
    pub peer_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Whether every peer call must carry a [`crate::PeerIdentity`] (mutual TLS on the peer
    /// port), checked against the node each message claims to come from.
    pub authenticate_peers: bool,
}

/// This node's role in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// It leads.
    Leader,
    /// It follows a leader.
    Follower,
    /// It stands for election.
    Candidate,
    /// It receives the log but does not vote.
    Learner,
    /// It has stopped.
    Shutdown,
}

impl Role {
    /// The role's name, as `operator status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
}

/// One member of the cluster, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node id.
    pub id: NodeId,
    /// Where it is reached.
    pub addr: NodeAddrs,
    /// Whether it votes.
    pub voter: bool,
    /// How many entries it is behind the leader (known on the leader only).
    pub lag: Option<u64>,
}

/// A snapshot of this node's replication state, for `operator status`.
#[derive(Debug, Clone)]
pub struct ReplicaStatus {
    /// This node's id.
    pub node_id: NodeId,
    /// Its role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader, if known.
    pub leader: Option<NodeId>,
    /// The last log index.
    pub last_log_index: Option<u64>,
    /// The committed index.
    pub committed_index: Option<u64>,
    /// The applied index.
    pub applied_index: Option<u64>,
    /// The members.
    pub members: Vec<Member>,
}

/// Who leads, as this node's Raft metrics say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// This node leads.
    Me,
    /// Another node leads.
    Other(Peer),
    /// No leader is known (an election, no quorum), or its address is not.
    Unknown,
}

/// The handle on this node's replica. Cheap to clone.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ReplicaConfig,
    pub(crate) raft: Raft,
    pub(crate) reader: StateReader,
    pub(crate) channels: PeerChannels,
    pub(crate) contact: LeaderContact,
    pub(crate) quiet: Arc<Quiet>,
    /// Read-index rounds on the leader, shared by its linearizable reads and followers' requests.
    pub(crate) leader_reads: Coalescer<Result<u64, Error>>,
    /// `ReadIndex` calls to the leader, shared by this follower's linearizable reads.
    pub(crate) follower_reads: Coalescer<Result<u64, Error>>,
    pub(crate) batcher: batch::Batcher,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("node_id", &self.inner.config.node_id).finish_non_exhaustive()
    }
}

impl Replica {
    /// Starts replication over `store`: the log store, the state machine and the peer transport.
    ///
    /// # Errors
    /// [`Error::Raft`] when the config is invalid or openraft cannot start (a corrupt log).
    pub async fn start(config: ReplicaConfig, store: Arc<Store>) -> Result<Replica, Error> {
        let raft_config = openraft::Config {
            cluster_name: "coffer".into(),
            heartbeat_interval: millis(config.heartbeat_interval),
            election_timeout_min: millis(config.election_timeout_min),
            election_timeout_max: millis(config.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_after_logs),
            max_in_snapshot_log_to_keep: config.snapshot_after_logs.min(1000),
            ..Default::default()
        }
        .validate()
        .map_err(Error::raft)?;
        let channels = PeerChannels::new(config.dial_via.clone(), config.peer_tls.clone());
        let metrics: LocalMetrics = Arc::new(OnceLock::new());
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            GrpcNetwork::new(channels.clone(), metrics.clone()),
            LogStore::new(store.clone()),
            StateMachine::new(store.clone()),
        )
        .await
        .map_err(Error::raft)?;
        let _ = metrics.set(raft.metrics());
        let inner = Arc::new_cyclic(|weak| Inner {
            config,
            raft,
            reader: StateReader::new(store),
            channels,
            contact: LeaderContact::default(),
            quiet: Arc::default(),
            leader_reads: Coalescer::default(),
            follower_reads: Coalescer::default(),
            batcher: batch::Batcher::start(weak.clone()),
        });
        Ok(Replica { inner })
    }

    /// Proposes `write` and returns its outcome, once the leader has applied it.
    ///
    /// Concurrent writes share one log entry; a follower forwards its entry to the leader. The
    /// write is committed by a quorum (fsynced on each) before it is applied and answered. On a
    /// follower the outcome is the leader's: a read here right after needs a linearizable barrier.
    ///
    /// # Errors
    /// [`Error::OutcomeUnknown`] after `write_timeout`, [`Error::LeadershipMoved`]: the write may
    /// still apply (retry with the same request id). [`Error::NoLeader`], [`Error::LeaderCutOff`],
    /// [`Error::NotLeader`] (a forward met a node that no longer leads), [`Error::PeerUnreachable`],
    /// [`Error::ShuttingDown`]: retry. A refusal by the state (a CAS mismatch, say) is an
    /// `Ok(Outcome::Rejected)`, never an error.
    ///
    /// # Cancellation
    /// A dropped call leaves the write queued or proposed; it may still apply.
    pub async fn write(&self, write: Write) -> Result<Outcome, Error> {
        let timeout = self.inner.config.write_timeout;
        let mut outcomes = match tokio::time::timeout(timeout, self.inner.batcher.propose(vec![write])).await {
            Ok(result) => result?,
            Err(_) => return Err(Error::OutcomeUnknown { waited: timeout }),
        };
        outcomes.pop().ok_or(Error::ShuttingDown)
    }

    /// Waits until this node may serve a read of its local state with `consistency`.
    ///
    /// # Errors
    /// Linearizable: [`Error::NoLeader`], [`Error::NoQuorum`], [`Error::NotInitialized`],
    /// [`Error::PeerUnreachable`] (the leader did not answer), [`Error::OutcomeUnknown`] (the
    /// read index was not applied in time). Bounded: [`Error::Stale`],
    /// [`Error::NeverHeardFromLeader`]. All are retryable.
    pub async fn read_barrier(&self, consistency: Consistency) -> Result<(), Error> {
        match consistency {
            Consistency::Linearizable => self.inner.linearizable().await,
            Consistency::BoundedStaleness(bound) => self.inner.fresh_within(bound),
        }
    }

    /// The bounded-staleness barrier without an `.await`, for the crypto hot path: whether this
    /// node's applied state is at most `bound` old.
    ///
    /// # Errors
    /// [`Error::Stale`], [`Error::NeverHeardFromLeader`].
    pub fn fresh_within(&self, bound: Duration) -> Result<(), Error> {
        self.inner.fresh_within(bound)
    }

    /// How stale this node's applied state may be: as of the leader's last quorum acknowledgement
    /// that this node has applied (the leader: its own). `None` if it has none yet.
    pub fn freshness(&self) -> Option<Duration> {
        self.inner.staleness().map(|(s, _)| s)
    }

    /// Who leads, as this node knows it now.
    pub fn leader(&self) -> Leadership {
        self.inner.leadership()
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        role(self.inner.raft.metrics().borrow().state)
    }

    /// The members of the cluster, as this node's latest membership says.
    pub fn members(&self) -> Vec<Member> {
        self.status_now().members
    }

    /// This node's replication state, for operators.
    pub async fn status(&self) -> ReplicaStatus {
        let mut status = self.status_now();
        status.committed_index =
            self.inner.raft.with_raft_state(|st| st.committed.map(|l| l.index)).await.ok().flatten();
        status
    }

    fn status_now(&self) -> ReplicaStatus {
        let receiver = self.inner.raft.metrics();
        let m = receiver.borrow();
        let membership = m.membership_config.membership();
        let voters: Vec<NodeId> = membership.voter_ids().collect();
        let lag = |id: NodeId| {
            let matched = m.replication.as_ref()?.get(&id)?.as_ref().map_or(0, |l| l.index);
            Some(m.last_log_index.unwrap_or(0).saturating_sub(matched))
        };
        ReplicaStatus {
            node_id: m.id,
            role: role(m.state),
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index,
            committed_index: None,
            applied_index: m.last_applied.map(|l| l.index),
            members: membership
                .nodes()
                .map(|(id, n)| Member {
                    id: *id,
                    addr: NodeAddrs::from(n.addr.clone()),
                    voter: voters.contains(id),
                    lag: lag(*id),
                })
                .collect(),
        }
    }

    /// The state this replica has applied.
    pub fn reader(&self) -> &StateReader {
        &self.inner.reader
    }

    /// A channel to a peer, shared with replication's own calls (for node-to-node services the
    /// node adds, such as usage statistics).
    ///
    /// # Errors
    /// [`Error::BadPeerAddr`].
    pub fn peer_channel(&self, addr: &str) -> Result<Channel, Error> {
        self.inner.channels.channel(addr)
    }

    /// Dials peers with `tls` from now on: a renewed node certificate reaches the outgoing side
    /// without a restart. Connections already open are dropped once their calls finish.
    pub fn set_peer_tls(&self, tls: tonic::transport::ClientTlsConfig) {
        self.inner.channels.set_tls(tls);
    }

    /// The `coffer.raft.v1.Raft` service other nodes call, to mount on the peer listener.
    pub fn peer_service(&self) -> coffer_proto::raft::v1::raft_server::RaftServer<PeerService> {
        coffer_proto::raft::v1::raft_server::RaftServer::new(PeerService::new(self.inner.clone()))
            // Raft messages carry log entries and snapshot chunks: allow more than the 4 MiB default.
            .max_decoding_message_size(crate::network::MAX_MESSAGE_BYTES)
    }

    /// Whether this node has a membership (it was initialised or has joined).
    ///
    /// # Errors
    /// [`Error::Raft`] when openraft has stopped.
    pub async fn is_initialized(&self) -> Result<bool, Error> {
        self.inner.raft.is_initialized().await.map_err(Error::raft)
    }

    /// Makes this empty node the single voter of a new cluster and waits until it leads.
    ///
    /// # Errors
    /// [`Error::AlreadyInitialized`]; [`Error::Raft`].
    pub async fn initialize(&self) -> Result<(), Error> {
        self.inner.initialize().await
    }

    /// Asks the cluster `peer` belongs to to admit this node: the leader checks `kcv` against the
    /// cluster's, adds this node as a learner, waits for it to catch up and makes it a voter.
    /// Returns the cluster id.
    ///
    /// # Errors
    /// [`Error::AlreadyInitialized`] when this node is a voter already; [`Error::JoinRefused`];
    /// [`Error::PeerUnreachable`], [`Error::NoLeader`] and the like: retry (a join cut short is
    /// finished by the next one).
    pub async fn join(&self, peer: &str, kcv: &str, token: &str) -> Result<String, Error> {
        self.inner.join(peer, kcv, token).await
    }

    /// Removes `node` from the membership. Runs on the leader.
    ///
    /// # Errors
    /// [`Error::NotLeader`] (with the leader); [`Error::LastVoter`].
    pub async fn remove(&self, node: NodeId) -> Result<(), Error> {
        self.inner.remove(node).await
    }

    /// Makes this node the leader: the leader hands off (waits for this node to hold its log,
    /// then goes quiet) and this node stands for election until it wins. Returns this node's id.
    ///
    /// # Errors
    /// [`Error::NotVoter`]; [`Error::NoLeader`]; [`Error::HandoffBusy`], [`Error::Lagging`],
    /// [`Error::ElectionLost`]: retry.
    pub async fn take_leadership(&self) -> Result<NodeId, Error> {
        self.inner.take_leadership().await
    }

    /// Gives up leadership for good (until this node restarts): this node stops standing for
    /// election and, if it leads, hands off to the most caught-up other voter. Returns that
    /// voter; `None` when this node does not lead, or is the only voter (it then leads on).
    ///
    /// # Errors
    /// As a hand-off: [`Error::HandoffBusy`], [`Error::Lagging`]: retry.
    pub async fn step_down(&self) -> Result<Option<NodeId>, Error> {
        self.inner.step_down().await
    }

    /// Undoes [`Replica::step_down`]'s refusal to stand for election.
    pub fn allow_elections(&self) {
        self.inner.raft.runtime_config().elect(true);
    }

    /// Stops replication. Calls in flight fail with [`Error::ShuttingDown`].
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }
}

impl Inner {
    /// Who leads: the one place that reads it from the metrics.
    pub(crate) fn leadership(&self) -> Leadership {
        let receiver = self.raft.metrics();
        let m = receiver.borrow();
        match m.current_leader {
            Some(id) if id == m.id => Leadership::Me,
            Some(id) => match m.membership_config.membership().get_node(&id) {
                Some(node) => Leadership::Other(Peer { id, addr: NodeAddrs::from(node.addr.clone()) }),
                None => Leadership::Unknown,
            },
            None => Leadership::Unknown,
        }
    }

    /// The leader as a peer, for a [`Error::NotLeader`].
    pub(crate) fn leader_peer(&self) -> Option<Peer> {
        match self.leadership() {
            Leadership::Other(peer) => Some(peer),
            Leadership::Me => Some(Peer { id: self.config.node_id, addr: self.config.advertise.clone() }),
            Leadership::Unknown => None,
        }
    }

    /// How long this node has led without a quorum acknowledging it, if longer than two leases
    /// (at least a second, so a slow disk in a healthy cluster does not trip it): a leader cut off
    /// in a minority. openraft 0.9 keeps such a leader leading until it hears a higher term, and a
    /// write to it would wait out its whole timeout; callers fail fast instead.
    pub(crate) fn cut_off(&self) -> Option<Duration> {
        let threshold = (self.config.election_timeout_max * 2).max(Duration::from_secs(1));
        let receiver = self.raft.metrics();
        let m = receiver.borrow();
        if m.state != ServerState::Leader || m.membership_config.membership().voter_ids().count() < 2 {
            return None;
        }
        let age = Duration::from_millis(m.millis_since_quorum_ack?);
        (age > threshold).then_some(age)
    }

    /// Commits one command through the local Raft (leader) or the leader (follower), unbatched.
    pub(crate) async fn commit(&self, command: Command) -> Result<Response, Error> {
        self.quiet.wait().await;
        if let Some(since) = self.cut_off() {
            return Err(Error::LeaderCutOff { since });
        }
        // Leader or not, from the metrics: no copy of the command is kept to retry with, and a
        // follower does not queue it through its own Raft core only to be told where to send it.
        match self.leadership() {
            Leadership::Me => self.raft.client_write(command).await.map(|w| w.data).map_err(write_error),
            Leadership::Other(leader) => {
                crate::network::forward(&self.channels, &leader, &command, self.config.write_timeout).await
            }
            Leadership::Unknown => Err(Error::NoLeader),
        }
    }
}

/// A failed local `client_write`.
pub(crate) fn write_error(
    e: openraft::error::RaftError<NodeId, openraft::error::ClientWriteError<NodeId, BasicNode>>,
) -> Error {
    use openraft::error::{ClientWriteError, Fatal, RaftError};
    match e {
        // Leadership moved between the metrics and the write. Not forwarded: the entry may have
        // been appended here and may still commit under the new leader.
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Error::LeadershipMoved { leader: f.leader_id },
        RaftError::APIError(e @ ClientWriteError::ChangeMembershipError(_)) => Error::raft(e),
        RaftError::Fatal(Fatal::Stopped) => Error::ShuttingDown,
        RaftError::Fatal(f) => Error::raft(f),
    }
}

fn role(state: ServerState) -> Role {
    match state {
        ServerState::Leader => Role::Leader,
        ServerState::Follower => Role::Follower,
        ServerState::Candidate => Role::Candidate,
        ServerState::Learner => Role::Learner,
        ServerState::Shutdown => Role::Shutdown,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
