//! The server side of `coffer.raft.v1`: hands openraft messages to the local Raft, takes writes
//! forwarded by followers into this node's batches, answers read-index requests, admits joining
//! nodes and hands leadership off.
//!
//! Errors go back as [`crate::network::refused`] statuses: typed for the calling node, worded
//! for people. Every payload is decoded into types that hold no type of their own kind (see
//! [`Command`]), so a forged message cannot make decoding recurse.

use std::sync::Arc;

use coffer_proto::raft::v1::raft_server::Raft as RaftRpc;
use coffer_proto::raft::v1::{
    Envelope, HandoffRequest, HandoffResponse, JoinRequest, JoinResponse, ReadIndexRequest, ReadIndexResponse,
};
use openraft::raft::AppendEntriesResponse;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::command::{Command, Op, Write};
use crate::error::Error;
use crate::network::refused;
use crate::replica::{Inner, Leadership};
use crate::store::encode;
use crate::NodeId;

/// The node a call's TLS client certificate names. The node's peer listener puts it into each
/// request's extensions after TLS verified the certificate against the cluster's CA; the service
/// checks every message against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIdentity(pub NodeId);

/// What a sender must be in this node's membership (see `PeerService::check_known`).
#[derive(Debug, Clone, Copy)]
struct Needs {
    role: Role,
    /// A node in no membership itself lets the sender through.
    unless_outside: bool,
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Voter,
    Member,
}

impl Needs {
    /// Asking for a vote.
    const CANDIDATE: Needs = Needs { role: Role::Voter, unless_outside: true };
    /// Sending log entries or a snapshot.
    const LEADER: Needs = Needs { role: Role::Member, unless_outside: true };
    /// Forwarding a write, asking for a read index, passing a join on.
    const MEMBER: Needs = Needs { role: Role::Member, unless_outside: false };
}

/// The node-to-node service of one node.
#[derive(Clone)]
pub struct PeerService {
    replica: Arc<Inner>,
}

impl std::fmt::Debug for PeerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerService").finish_non_exhaustive()
    }
}

impl PeerService {
    pub(crate) fn new(replica: Arc<Inner>) -> Self {
        PeerService { replica }
    }

    /// Who sent `request`, when peers are authenticated (`None` when they are not: tls = "off").
    fn sender<T>(&self, request: &Request<T>) -> Result<Option<NodeId>, Error> {
        if !self.replica.config.authenticate_peers {
            return Ok(None);
        }
        request.extensions().get::<PeerIdentity>().map(|p| Some(p.0)).ok_or(Error::PeerUnauthenticated)
    }

    /// A Raft message must come from the node it names (`claimed`): a certificate of node 2
    /// sending a vote as node 3 is refused.
    fn check_claim(sender: Option<NodeId>, claimed: Option<NodeId>) -> Result<(), Error> {
        match sender {
            Some(certified) if claimed != Some(certified) => {
                Err(Error::PeerMismatch { certified, claimed: claimed.unwrap_or_default() })
            }
            _ => Ok(()),
        }
    }

    /// `sender` must be known to this node's membership as `needs` says: a vote comes only from
    /// a voter, log entries and snapshots, forwarded writes, read-index requests and passed-on
    /// joins only from a member. A node certificate of the cluster's CA alone (a node never
    /// admitted, or one removed) cannot make this node follow it. With [`Needs::unless_outside`]
    /// a node in no membership itself (joining, or recovering from lost data) lets it through.
    fn check_known(&self, sender: Option<NodeId>, needs: Needs) -> Result<(), Error> {
        let Some(node) = sender else { return Ok(()) };
        let metrics = self.replica.raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let outside = membership.get_node(&self.replica.config.node_id).is_none();
        let known = match needs.role {
            Role::Voter => membership.voter_ids().any(|id| id == node),
            Role::Member => membership.get_node(&node).is_some(),
        };
        if known || (needs.unless_outside && outside) {
            Ok(())
        } else {
            Err(Error::PeerNotMember { node })
        }
    }

    /// The leader's side of a forwarded write: into this node's next batch. A node that does not
    /// lead refuses rather than forwarding on: two nodes with stale views of the leader would
    /// otherwise pass a write back and forth until it timed out.
    async fn take_forwarded(&self, command: Command) -> Result<crate::Response, Error> {
        if !matches!(self.replica.leadership(), Leadership::Me) {
            return Err(Error::NotLeader { leader: self.replica.leader_peer() });
        }
        let (writes, lone) = into_writes(command);
        // A follower's batch is at most one batch: a larger group (only a forged one) would make an
        // entry too large to replicate.
        let bytes = crate::replica::batch_weight(&writes);
        if writes.len() > crate::replica::MAX_BATCH_ITEMS || bytes > crate::replica::MAX_BATCH_BYTES {
            return Err(Error::InvalidInput {
                rule: format!(
                    "a forwarded batch holds at most {} writes and {} bytes; this one has {} and {bytes}",
                    crate::replica::MAX_BATCH_ITEMS,
                    crate::replica::MAX_BATCH_BYTES,
                    writes.len()
                ),
            });
        }
        let mut outcomes = self.replica.batcher.propose(writes).await?;
        Ok(match (lone, outcomes.pop()) {
            (true, Some(outcome)) => outcome.into(),
            (_, last) => {
                outcomes.extend(last);
                crate::Response::Batch(outcomes)
            }
        })
    }
}

/// The writes a forwarded command carries, and whether it was a lone format-1 command (answered
/// with a single response, as format 1 expects).
fn into_writes(command: Command) -> (Vec<Write>, bool) {
    // A format-1 put keeps its own request id in the op, where apply honours it.
    match command {
        Command::Writes(writes) => (writes, false),
        Command::Batch(ops) => (ops.into_iter().map(Write::new).collect(), false),
        Command::InitCluster(c) => (vec![Write::new(Op::InitCluster(c))], true),
        Command::PutSecret(p) => (vec![Write::new(Op::PutSecret(p))], true),
        Command::CreateKey(c) => (vec![Write::new(Op::CreateKey(c))], true),
        Command::RotateKey(r) => (vec![Write::new(Op::RotateKey(r))], true),
        Command::UpdateKeyConfig(u) => (vec![Write::new(Op::UpdateKeyConfig(u))], true),
        Command::DeleteKey(d) => (vec![Write::new(Op::DeleteKey(d))], true),
        Command::SetVersionState(s) => (vec![Write::new(Op::SetVersionState(s))], true),
    }
}

/// Decodes a whole payload: trailing bytes make it undecodable too (a message means one thing).
fn decode<T: DeserializeOwned>(request: Request<Envelope>) -> Result<T, Status> {
    let payload = request.into_inner().payload;
    match postcard::take_from_bytes(&payload) {
        Ok((value, [])) => Ok(value),
        Ok(_) => Err(refused(&Error::BadMessage { source: postcard::Error::DeserializeBadEncoding })),
        Err(source) => Err(refused(&Error::BadMessage { source })),
    }
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<Envelope>, Status> {
    Ok(Response::new(Envelope { payload: encode(value), quorum_ack_age_ms: None }))
}

#[tonic::async_trait]
impl RaftRpc for PeerService {
    async fn append_entries(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let sender = self.sender(&request).map_err(|e| refused(&e))?;
        let quorum_ack_age_ms = request.get_ref().quorum_ack_age_ms;
        let req: openraft::raft::AppendEntriesRequest<crate::TypeConfig> = decode(request)?;
        Self::check_claim(sender, req.vote.leader_id().voted_for()).map_err(|e| refused(&e))?;
        self.check_known(sender, Needs::LEADER).map_err(|e| refused(&e))?;
        let leader_commit = req.leader_commit.map(|l| l.index);
        let raft = &self.replica.raft;
        let result = raft.append_entries(req).await;
        // The sender is the leader this node follows; the contact counts once its commit is applied.
        if matches!(
            result,
            Ok(AppendEntriesResponse::Success
                | AppendEntriesResponse::PartialSuccess(_)
                | AppendEntriesResponse::Conflict)
        ) {
            let applied = raft.metrics().borrow().last_applied.map(|l| l.index);
            self.replica.contact.heard(leader_commit, quorum_ack_age_ms, applied);
        }
        reply(&result)
    }

    async fn vote(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let sender = self.sender(&request).map_err(|e| refused(&e))?;
        let req: openraft::raft::VoteRequest<NodeId> = decode(request)?;
        Self::check_claim(sender, req.vote.leader_id().voted_for()).map_err(|e| refused(&e))?;
        self.check_known(sender, Needs::CANDIDATE).map_err(|e| refused(&e))?;
        let result = self.replica.raft.vote(req).await;
        reply(&result)
    }

    async fn install_snapshot(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let sender = self.sender(&request).map_err(|e| refused(&e))?;
        let req: openraft::raft::InstallSnapshotRequest<crate::TypeConfig> = decode(request)?;
        Self::check_claim(sender, req.vote.leader_id().voted_for()).map_err(|e| refused(&e))?;
        self.check_known(sender, Needs::LEADER).map_err(|e| refused(&e))?;
        let result = self.replica.raft.install_snapshot(req).await;
        reply(&result)
    }

    async fn client_write(&self, request: Request<Envelope>) -> Result<Response<Envelope>, Status> {
        let sender = self.sender(&request).map_err(|e| refused(&e))?;
        self.check_known(sender, Needs::MEMBER).map_err(|e| refused(&e))?;
        let command: Command = decode(request)?;
        let timeout = self.replica.config.write_timeout;
        match tokio::time::timeout(timeout, self.take_forwarded(command)).await {
            Ok(Ok(response)) => reply(&response),
            Ok(Err(e)) => Err(refused(&e)),
            Err(_) => Err(refused(&Error::OutcomeUnknown { waited: timeout })),
        }
    }

    async fn read_index(&self, request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        let sender = self.sender(&request).map_err(|e| refused(&e))?;
        self.check_known(sender, Needs::MEMBER).map_err(|e| refused(&e))?;
        self.replica.quiet.wait().await;
        if !matches!(self.replica.leadership(), Leadership::Me) {
            return Err(refused(&Error::NotLeader { leader: self.replica.leader_peer() }));
        }
        match self.replica.leader_read_index().await {
            Ok(index) => Ok(Response::new(ReadIndexResponse { index })),
            Err(e) => Err(refused(&e)),
        }
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        // A node joins as itself; a member may pass a join on to the leader.
        let sender = self.sender(&request).map_err(|e| refused(&e))?;
        let req = request.into_inner();
        if sender.is_some_and(|s| s != NodeId(req.node_id)) {
            self.check_known(sender, Needs::MEMBER).map_err(|e| refused(&e))?;
        }
        if let Leadership::Other(leader) = self.replica.leadership() {
            let mut client = self.replica.channels.client(&leader.addr.peer).map_err(|e| refused(&e))?;
            return client.join(req).await;
        }
        match self.replica.admit(NodeId(req.node_id), &req.addr, &req.kcv, &req.token).await {
            Ok(cluster_id) => Ok(Response::new(JoinResponse { cluster_id })),
            Err(e) => Err(refused(&e)),
        }
    }

    async fn handoff(&self, request: Request<HandoffRequest>) -> Result<Response<HandoffResponse>, Status> {
        // Only the target asks for leadership: a node cannot make another one stand.
        let sender = self.sender(&request).map_err(|e| refused(&e))?;
        let target = NodeId(request.into_inner().node_id);
        Self::check_claim(sender, Some(target)).map_err(|e| refused(&e))?;
        match self.replica.hand_off(target).await {
            Ok(quiet) => {
                Ok(Response::new(HandoffResponse { quiet_ms: u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX) }))
            }
            Err(e) => Err(refused(&e)),
        }
    }
}
