// Hot path: every replicated write.
//! The Raft transport between nodes: openraft's network traits over the `coffer.raft.v1` gRPC
//! service.
//!
//! Messages are postcard-encoded openraft types in an `Envelope`. One lazily connected tonic
//! `Channel` per peer address is shared by every client to that peer (HTTP/2 multiplexes the
//! calls), and reconnects by itself after a peer restarts. Every call carries openraft's deadline.
//! Channels are built in exactly one place, [`PeerChannels::channel`], so switching on mTLS is a
//! change there and nowhere else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use coffer_proto::raft::v1::raft_client::RaftClient;
use coffer_proto::raft::v1::Envelope;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, RaftMetrics};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::command::{Command, Response};
use crate::error::{Error, Peer, Refusal};
use crate::store::encode;
use crate::{NodeId, TypeConfig};

/// The largest message between nodes: log entries and snapshot chunks exceed tonic's 4 MiB default.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// One shared channel per peer address. Cheap to clone. A std `Mutex`: held only to look up or
/// insert a map entry, never across an `.await`.
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerChannels {
    pool: Arc<Mutex<Pool>>,
    /// Peer address → the address dialled instead (drills put a TCP proxy on every link).
    dial_via: Arc<HashMap<String, String>>,
}

#[derive(Debug, Default)]
struct Pool {
    channels: HashMap<String, Channel>,
    /// TLS towards peers: the cluster CA and this node's certificate; `None`: plaintext.
    tls: Option<ClientTlsConfig>,
}

impl PeerChannels {
    /// Channels that dial `dial_via[addr]` instead of a peer address found in the map.
    pub(crate) fn new(dial_via: impl IntoIterator<Item = (String, String)>, tls: Option<ClientTlsConfig>) -> Self {
        PeerChannels {
            pool: Arc::new(Mutex::new(Pool { channels: HashMap::new(), tls })),
            dial_via: Arc::new(dial_via.into_iter().collect()),
        }
    }

    /// Dials with `tls` from now on (a renewed node certificate): channels already made are
    /// forgotten, so the next call to each peer connects anew; calls in flight finish on theirs.
    pub(crate) fn set_tls(&self, tls: ClientTlsConfig) {
        let mut pool = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pool.tls = Some(tls);
        pool.channels.clear();
    }

    /// The channel to `addr` (`host:port`), created on first use and reused afterwards.
    ///
    /// # Errors
    /// [`Error::BadPeerAddr`] when the address cannot be a URI.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let mut pool = self.pool.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = pool.channels.get(addr) {
            return Ok(channel.clone());
        }
        let dial = self.dial_via.get(addr).map_or(addr, String::as_str);
        let scheme = if pool.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{dial}"))
            .map_err(|_| Error::BadPeerAddr { addr: addr.to_owned() })?;
        if let Some(tls) = &pool.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|_| Error::BadPeerAddr { addr: addr.to_owned() })?;
        }
        let endpoint = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let channel = endpoint.connect_lazy();
        pool.channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// A `coffer.raft.v1` client for `addr`.
    ///
    /// # Errors
    /// [`Error::BadPeerAddr`] when the address cannot be a URI.
    pub(crate) fn client(&self, addr: &str) -> Result<RaftClient<Channel>, Error> {
        Ok(RaftClient::new(self.channel(addr)?).max_decoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// The local Raft's metrics, once it exists: the network reads the leader's quorum-ack age from
/// them to stamp each AppendEntries (see `Envelope.quorum_ack_age_ms`).
pub(crate) type LocalMetrics = Arc<OnceLock<watch::Receiver<RaftMetrics<NodeId, BasicNode>>>>;

/// openraft's network factory over gRPC.
#[derive(Debug, Clone, Default)]
pub(crate) struct GrpcNetwork {
    channels: PeerChannels,
    metrics: LocalMetrics,
}

impl GrpcNetwork {
    /// A network sharing `channels` with the node's other node-to-node calls; `metrics` is set
    /// once the Raft is built.
    pub(crate) fn new(channels: PeerChannels, metrics: LocalMetrics) -> Self {
        GrpcNetwork { channels, metrics }
    }
}

/// The client for one peer.
#[derive(Debug)]
pub(crate) struct PeerClient {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    metrics: LocalMetrics,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let addr = crate::NodeAddrs::from(node.addr.clone()).peer;
        PeerClient { target, addr, channels: self.channels.clone(), metrics: self.metrics.clone() }
    }
}

/// A reply payload that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable reply from peer: {0}")]
struct BadReply(postcard::Error);

impl PeerClient {
    async fn call<Req, Resp, E>(
        &self,
        req: &Req,
        option: &RPCOption,
        method: Method,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self.channels.client(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let quorum_ack_age_ms = match method {
            // Read at send time; openraft refreshes it on every turn of its loop (each tick at least).
            Method::AppendEntries => self.metrics.get().and_then(|m| m.borrow().millis_since_quorum_ack),
            Method::Vote | Method::InstallSnapshot => None,
        };
        let mut request = tonic::Request::new(Envelope { payload: encode(req), quorum_ack_age_ms });
        request.set_timeout(option.hard_ttl());
        let reply = match method {
            Method::AppendEntries => client.append_entries(request).await,
            Method::Vote => client.vote(request).await,
            Method::InstallSnapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            tonic::Code::Unavailable => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> = postcard::from_bytes(&reply.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&BadReply(e))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, Method::AppendEntries).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(&rpc, &option, Method::InstallSnapshot).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, Method::Vote).await
    }
}

// The node-to-node calls of the front door, client side. Refusals come back typed: the peer
// service puts a postcard `Refusal` in the status details ([`refused`]), and [`status_error`]
// turns it back into the same `Error` variant here.

/// The status a peer service answers an error with: a code for tools, the words for people, and
/// the typed refusal in the details for the calling node. A failure that is not a refusal (storage,
/// openraft) is logged here under an incident id and goes back opaque: its details stay on this
/// node, as they do for clients.
pub(crate) fn refused(e: &Error) -> tonic::Status {
    use tonic::Code;
    let code = match e {
        Error::JoinRefused(_)
        | Error::NotVoter { .. }
        | Error::UnknownMember { .. }
        | Error::LastVoter
        | Error::AlreadyInitialized => Code::FailedPrecondition,
        Error::BadMessage { .. } | Error::BadPeerAddr { .. } | Error::InvalidInput { .. } => Code::InvalidArgument,
        Error::PeerUnauthenticated => Code::Unauthenticated,
        Error::PeerMismatch { .. } | Error::PeerNotMember { .. } => Code::PermissionDenied,
        e if e.is_retryable() || matches!(e, Error::NotInitialized) => Code::Unavailable,
        _ => Code::Internal,
    };
    if let Some(refusal) = e.refusal() {
        return tonic::Status::with_details(code, e.to_string(), encode(&refusal).into());
    }
    if matches!(code, Code::PermissionDenied | Code::Unauthenticated) {
        tracing::warn!(error = %e, "refused a node-to-node call");
    }
    if code != Code::Internal {
        return tonic::Status::new(code, e.to_string());
    }
    let incident = incident_id();
    tracing::error!(incident = %incident, error = %e, "a peer's request failed");
    let message = format!("internal error (incident {incident}; details are in this node's log)");
    tonic::Status::with_details(code, message, encode(&Refusal::Internal { incident }).into())
}

/// An id to find a logged failure by: this process and a counter.
fn incident_id() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!("{:x}-{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// The error a peer's status stands for.
pub(crate) fn status_error(peer: &str, status: &tonic::Status) -> Error {
    match postcard::from_bytes::<Refusal>(status.details()) {
        Ok(refusal) if !status.details().is_empty() => refusal.into(),
        _ => Error::PeerUnreachable {
            peer: peer.to_owned(),
            detail: format!("{:?}: {}", status.code(), status.message()),
        },
    }
}

/// Forwards a command to the leader and returns what applying it produced.
pub(crate) async fn forward(
    channels: &PeerChannels,
    leader: &Peer,
    command: &Command,
    deadline: Duration,
) -> Result<Response, Error> {
    let mut client = channels.client(&leader.addr.peer)?;
    let mut request = tonic::Request::new(Envelope { payload: encode(command), quorum_ack_age_ms: None });
    request.set_timeout(deadline);
    let reply = client.client_write(request).await.map_err(|s| status_error(&leader.addr.peer, &s))?;
    postcard::from_bytes(&reply.into_inner().payload).map_err(|source| Error::BadMessage { source })
}

/// Asks the leader for a read index.
pub(crate) async fn read_index(channels: &PeerChannels, leader: &Peer, deadline: Duration) -> Result<u64, Error> {
    let mut client = channels.client(&leader.addr.peer)?;
    let mut request = tonic::Request::new(coffer_proto::raft::v1::ReadIndexRequest {});
    request.set_timeout(deadline);
    client.read_index(request).await.map(|r| r.into_inner().index).map_err(|s| status_error(&leader.addr.peer, &s))
}

/// Asks the cluster `peer` belongs to to admit this node; returns the cluster id.
pub(crate) async fn join(
    channels: &PeerChannels,
    peer: &str,
    node_id: NodeId,
    addr: &str,
    kcv: &str,
    token: &str,
) -> Result<String, Error> {
    let mut client = channels.client(peer)?;
    let request = coffer_proto::raft::v1::JoinRequest {
        node_id: node_id.0,
        addr: addr.to_owned(),
        kcv: kcv.to_owned(),
        token: token.to_owned(),
    };
    client.join(request).await.map(|r| r.into_inner().cluster_id).map_err(|s| match s.code() {
        // The client port answers, but without the node-to-node service: the wrong port.
        tonic::Code::Unimplemented => Error::PeerUnreachable {
            peer: peer.to_owned(),
            detail:
                "it has no node-to-node service there: give the peer address (its peer-listen), not the client port"
                    .into(),
        },
        _ => status_error(peer, &s),
    })
}

/// Asks the leader to hand leadership to `target`; returns how long it stays quiet.
pub(crate) async fn handoff(channels: &PeerChannels, leader: &Peer, target: NodeId) -> Result<Duration, Error> {
    let mut client = channels.client(&leader.addr.peer)?;
    let reply = client
        .handoff(coffer_proto::raft::v1::HandoffRequest { node_id: target.0 })
        .await
        .map_err(|s| status_error(&leader.addr.peer, &s))?;
    Ok(Duration::from_millis(reply.into_inner().quiet_ms))
}
