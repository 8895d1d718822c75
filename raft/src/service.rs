//! The server side of `coffer.raft.v1`: hands openraft messages to the local Raft, takes writes
//! forwarded by followers, answers read-index requests, and admits joining nodes.
//!
//! Statuses here are for other nodes, not clients: `UNAVAILABLE` means "not the leader, or no
//! quorum: retry", `FAILED_PRECONDITION` a refused join. The node maps what reaches a client.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffer_proto::raft::v1::raft_server::Raft as RaftRpc;
use coffer_proto::raft::v1::{
    Envelope, HandoffRequest, HandoffResponse, JoinRequest, JoinResponse, ReadIndexRequest, ReadIndexResponse,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::network::PeerChannels;
use crate::store::encode;
use crate::{Command, HandoffError, NodeId, Quiet, Raft, ReadRounds, StateReader};

/// How fresh this node's applied state is, as a follower: as of when a quorum last acknowledged
/// the leader that sent the latest AppendEntries whose `leader_commit` this node has since
/// applied. Hearing from the leader is not enough twice over: a restarted or lagging follower
/// hears heartbeats long before it has caught up, and a leader cut off in a minority keeps
/// sending heartbeats while a new leader, elsewhere, acknowledges writes.
#[derive(Debug)]
pub struct LeaderContact {
    base: Instant,
    /// Milliseconds after `base` the applied state is known fresh as of; 0: never.
    fresh_ms: AtomicU64,
    /// (as-of milliseconds after `base`, leader commit index) of accepted AppendEntries not yet
    /// applied, oldest first. A std `Mutex`: held for a few pushes and pops, never across an `.await`.
    pending: Mutex<VecDeque<(u64, u64)>>,
}

/// At most this many unapplied AppendEntries are remembered; older ones are dropped (the node is
/// then simply considered staler than it is).
const MAX_PENDING: usize = 256;

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact { base: Instant::now(), fresh_ms: AtomicU64::new(0), pending: Mutex::new(VecDeque::new()) }
    }
}

impl LeaderContact {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Records an accepted AppendEntries carrying `leader_commit`, sent by a leader a quorum last
    /// acknowledged `quorum_ack_age_ms` before (unknown: now), then settles against `applied`.
    fn heard(&self, leader_commit: Option<u64>, quorum_ack_age_ms: Option<u64>, applied: Option<u64>) {
        let as_of = self.now_ms().saturating_sub(quorum_ack_age_ms.unwrap_or(0)).max(1);
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.push_back((as_of, leader_commit.unwrap_or(0)));
        if pending.len() > MAX_PENDING {
            pending.pop_front();
        }
        self.settle(&mut pending, applied);
    }

    fn settle(&self, pending: &mut VecDeque<(u64, u64)>, applied: Option<u64>) {
        let applied = applied.unwrap_or(0);
        while let Some(&(at, commit)) = pending.front() {
            if commit > applied {
                break;
            }
            self.fresh_ms.fetch_max(at, Ordering::Relaxed);
            pending.pop_front();
        }
    }

    /// How stale this node's state may be, given what it has applied now: the age of the newest
    /// leader contact whose commit index is applied. `None` if there is none.
    pub fn since(&self, applied: Option<u64>) -> Option<Duration> {
        self.settle(&mut self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner), applied);
        match self.fresh_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base.elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }
}

/// How long this node has led without a quorum acknowledging it, if that is longer than
/// `threshold`: a leader cut off in a minority. openraft 0.9 keeps such a leader leading until it
/// hears a higher term, and a write to it would wait out its whole timeout; callers fail fast
/// instead, so clients move on to a node of the majority.
pub fn leading_without_quorum(raft: &Raft, threshold: Duration) -> Option<Duration> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    if m.state != openraft::ServerState::Leader || m.membership_config.membership().voter_ids().count() < 2 {
        return None;
    }
    let age = Duration::from_millis(m.millis_since_quorum_ack?);
    (age > threshold).then_some(age)
}

/// The threshold of [`leading_without_quorum`] for a Raft: two leases, at least a second, so a
/// slow disk or a busy machine in a healthy cluster does not trip it.
pub fn quorum_loss_threshold(raft: &Raft) -> Duration {
    Duration::from_millis(raft.config().election_timeout_max * 2).max(Duration::from_secs(1))
}

/// The node-to-node service of one node.
#[derive(Clone)]
pub struct RaftService {
    raft: Raft,
    reader: StateReader,
    channels: PeerChannels,
    contact: Arc<LeaderContact>,
    quiet: Arc<Quiet>,
    reads: Arc<ReadRounds>,
    writes: Option<Arc<dyn ForwardedWrites>>,
}

/// Where the writes followers forward go, when not straight into Raft: a node batches them with
/// its own (see `coffer-node`'s `batch` module), so the leader commits one entry for all of them.
pub trait ForwardedWrites: Send + Sync + 'static {
    /// Proposes a forwarded command and returns what applying it produced.
    fn propose(&self, command: Command) -> BoxFuture<'_, Result<crate::Response, Status>>;
}

/// A boxed future, as [`ForwardedWrites`] returns.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl std::fmt::Debug for RaftService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftService").finish_non_exhaustive()
    }
}

impl RaftService {
    /// The service over the node's Raft and state.
    pub fn new(
        raft: Raft,
        reader: StateReader,
        channels: PeerChannels,
        contact: Arc<LeaderContact>,
        quiet: Arc<Quiet>,
        reads: Arc<ReadRounds>,
    ) -> Self {
        RaftService { raft, reader, channels, contact, quiet, reads, writes: None }
    }

    /// Sends forwarded writes through `writes` instead of straight into Raft.
    #[must_use]
    pub fn with_forwarded_writes(mut self, writes: Arc<dyn ForwardedWrites>) -> Self {
        self.writes = Some(writes);
        self
    }

    /// The leader's address, if this node knows it and is not the leader itself.
    async fn leader_addr(&self) -> Option<String> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        if leader == metrics.id {
            return None;
        }
        metrics.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
    }
}

fn decode<T: DeserializeOwned>(request: Request<Envelope>) -> Result<T, Status> {
    postcard::from_bytes(&request.into_inner().payload)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<Envelope>, Status> {
    Ok(Response::new(Envelope { payload: encode(value), quorum_ack_age_ms: None }))
}

/// Why a node cannot take a write or a read-index request: says where the leader is, if known.
fn not_leader(leader: Option<&BasicNode>) -> Status {
    match leader {
        Some(node) => Status::unavailable(format!("not the leader; the leader is at {}", node.addr)),
        None => Status::unavailable("no leader is known: an election is under way, or the cluster has no quorum"),
    }
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let quorum_ack_age_ms = request.get_ref().quorum_ack_age_ms;
        let req: openraft::raft::AppendEntriesRequest<crate::TypeConfig> = decode(request)?;
        let leader_commit = req.leader_commit.map(|l| l.index);
        let result = self.raft.append_entries(req).await;
        // The sender is the leader this node follows; the contact counts once its commit is applied.
        if matches!(
            result,
            Ok(AppendEntriesResponse::Success
                | AppendEntriesResponse::PartialSuccess(_)
                | AppendEntriesResponse::Conflict)
        ) {
            let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
            self.contact.heard(leader_commit, quorum_ack_age_ms, applied);
        }
        reply(&result)
    }

    async fn vote(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let result = self.raft.vote(decode(request)?).await;
        reply(&result)
    }

    async fn install_snapshot(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let result = self.raft.install_snapshot(decode(request)?).await;
        reply(&result)
    }

    async fn client_write(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let command: Command = decode(request)?;
        if let Some(writes) = &self.writes {
            return reply(&writes.propose(command).await?);
        }
        self.quiet.wait().await;
        if let Some(age) = leading_without_quorum(&self.raft, quorum_loss_threshold(&self.raft)) {
            return Err(Status::unavailable(format!(
                "the leader has had no quorum for {} ms: it is cut off from the majority",
                age.as_millis()
            )));
        }
        match self.raft.client_write(command).await {
            Ok(written) => reply(&written.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(not_leader(f.leader_node.as_ref())),
            Err(RaftError::APIError(e @ ClientWriteError::ChangeMembershipError(_))) => {
                Err(Status::internal(e.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(Status::unavailable(format!("raft has stopped: {f}"))),
        }
    }

    async fn read_index(&self, _request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        self.quiet.wait().await;
        match self.reads.run(|| self.raft.get_read_log_id()).await {
            Ok((read, applied)) => {
                let index = read.map_or(0, |l| l.index).max(applied.map_or(0, |l| l.index));
                Ok(Response::new(ReadIndexResponse { index }))
            }
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(not_leader(f.leader_node.as_ref()))
            }
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(Status::unavailable(format!("no quorum confirms the leader: {q}")))
            }
            Err(RaftError::Fatal(f)) => Err(Status::unavailable(format!("raft has stopped: {f}"))),
        }
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = request.into_inner();
        if let Some(addr) = self.leader_addr().await {
            let mut client = self.channels.client(&addr).map_err(|e| Status::unavailable(e.to_string()))?;
            return client.join(req).await;
        }
        let cluster = self
            .reader
            .cluster()
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::failed_precondition("this node's cluster is not initialised yet"))?;
        if req.kcv != cluster.root_kcv {
            return Err(Status::failed_precondition(format!(
                "refusing node {}: its HSM root key has KCV {}, the cluster's root key has KCV {}; \
                 give the node a token holding the cluster's root key",
                req.node_id, req.kcv, cluster.root_kcv
            )));
        }
        let node = BasicNode { addr: req.addr.clone() };
        let write_err = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => not_leader(f.leader_node.as_ref()),
            other => Status::unavailable(other.to_string()),
        };
        // Blocks until the learner has caught up, so the promotion below does not stall writes.
        self.raft.add_learner(req.node_id, node, true).await.map_err(write_err)?;
        let mut voters: BTreeSet<NodeId> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(req.node_id);
        self.raft.change_membership(voters, false).await.map_err(write_err)?;
        tracing::info!(node_id = req.node_id, addr = %req.addr, "node joined as a voter");
        Ok(Response::new(JoinResponse { cluster_id: cluster.cluster_id }))
    }

    async fn handoff(&self, request: Request<HandoffRequest>) -> Result<Response<HandoffResponse>, Status> {
        let target = request.into_inner().node_id;
        let config = self.raft.config();
        // One lease for the voters' leases to lapse, then the target's election tries; writes held
        // meanwhile still finish inside the default write-timeout (5 s).
        let quiet_for = Duration::from_millis(config.election_timeout_max * 8);
        let catch_up = Duration::from_secs(2);
        match self.quiet.hand_off(&self.raft, target, catch_up, quiet_for).await {
            Ok(()) => Ok(Response::new(HandoffResponse {
                quiet_ms: u64::try_from(quiet_for.as_millis()).unwrap_or(u64::MAX),
            })),
            Err(HandoffError::NotLeader) => {
                let metrics = self.raft.metrics().borrow().clone();
                let leader =
                    metrics.current_leader.and_then(|l| metrics.membership_config.membership().get_node(&l).cloned());
                Err(not_leader(leader.as_ref()))
            }
            Err(e @ HandoffError::NotVoter(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ (HandoffError::Busy | HandoffError::Lagging(..))) => Err(Status::unavailable(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the kill-leader drill: a restarted node heard heartbeats before it had caught up,
    /// and served bounded-staleness reads from old state. Contact now counts only once the
    /// leader's commit index it carried has been applied.
    #[test]
    fn drill_kill_leader_contact_counts_only_once_caught_up() {
        let contact = LeaderContact::default();
        assert_eq!(contact.since(Some(0)), None, "never heard from a leader");
        contact.heard(Some(10), None, Some(3));
        assert_eq!(contact.since(Some(3)), None, "heard, but commit 10 is not applied yet");
        assert_eq!(contact.since(Some(9)), None);
        let fresh = contact.since(Some(10)).expect("caught up to the contact's commit");
        assert!(fresh < Duration::from_secs(1));
        // A newer contact with a higher commit does not count until applied; the older one still does.
        std::thread::sleep(Duration::from_millis(30));
        contact.heard(Some(20), None, Some(10));
        let older = contact.since(Some(10)).expect("still the first contact");
        assert!(older >= Duration::from_millis(25), "{older:?}"); // millisecond clock
        let newer = contact.since(Some(20)).expect("the second contact");
        assert!(newer < older);
    }

    /// Found by the partition-minority drill: a follower cut off with the old leader kept
    /// applying its heartbeats and served 500 ms bounded-staleness reads for a minute while the
    /// majority, under a new leader, acknowledged newer writes. Freshness now dates from the
    /// leader's last quorum acknowledgement, which stops in a minority.
    #[test]
    fn drill_partition_minority_freshness_dates_from_the_leaders_quorum_ack() {
        let contact = LeaderContact::default();
        std::thread::sleep(Duration::from_millis(50));
        contact.heard(Some(5), Some(0), Some(5));
        let fresh = contact.since(Some(5)).expect("applied");
        assert!(fresh < Duration::from_millis(40), "a leader acknowledged just now: {fresh:?}");
        // The deposed leader's heartbeat: commit unchanged, applied, but its quorum is 40 ms old.
        contact.heard(Some(5), Some(40), Some(5));
        let stale = contact.since(Some(5)).expect("applied");
        assert!(stale < Duration::from_millis(40), "an older proof does not make the node staler: {stale:?}");
        let later = LeaderContact::default();
        std::thread::sleep(Duration::from_millis(50));
        later.heard(Some(5), Some(45), Some(5));
        let age = later.since(Some(5)).expect("applied");
        assert!(age >= Duration::from_millis(40), "fresh only as of the quorum ack, 45 ms ago: {age:?}");
    }
}
