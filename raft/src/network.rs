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
use tonic::transport::{Channel, Endpoint};

use crate::store::encode;
use crate::{NodeId, TypeConfig};

/// How long a connection attempt to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// One shared channel per peer address. Cheap to clone. A std `Mutex`: held only to look up or
/// insert a map entry, never across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Peer address → the address dialled instead (drills put a TCP proxy on every link).
    dial_via: Arc<HashMap<String, String>>,
}

/// A peer address that is not a valid URI.
#[derive(Debug, thiserror::Error)]
#[error("peer address {0:?} is not a host:port")]
pub struct BadPeerAddr(pub String);

impl PeerChannels {
    /// Channels that dial `dial_via[addr]` instead of a peer address found in the map.
    pub fn with_dial_via(dial_via: impl IntoIterator<Item = (String, String)>) -> Self {
        PeerChannels { channels: Arc::default(), dial_via: Arc::new(dial_via.into_iter().collect()) }
    }

    /// The channel to `addr` (`host:port`), created on first use and reused afterwards.
    ///
    /// # Errors
    /// [`BadPeerAddr`] when the address cannot be a URI.
    pub fn channel(&self, addr: &str) -> Result<Channel, BadPeerAddr> {
        let mut map = self.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = map.get(addr) {
            return Ok(channel.clone());
        }
        let dial = self.dial_via.get(addr).map_or(addr, String::as_str);
        let endpoint = Endpoint::from_shared(format!("http://{dial}"))
            .map_err(|_| BadPeerAddr(addr.to_owned()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let channel = endpoint.connect_lazy();
        map.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// A `coffer.raft.v1` client for `addr`.
    ///
    /// # Errors
    /// [`BadPeerAddr`] when the address cannot be a URI.
    pub fn client(&self, addr: &str) -> Result<RaftClient<Channel>, BadPeerAddr> {
        Ok(RaftClient::new(self.channel(addr)?).max_decoding_message_size(64 * 1024 * 1024))
    }
}

/// The local Raft's metrics, once it exists: the network reads the leader's quorum-ack age from
/// them to stamp each AppendEntries (see `Envelope.quorum_ack_age_ms`).
pub type LocalMetrics = Arc<OnceLock<watch::Receiver<RaftMetrics<NodeId, BasicNode>>>>;

/// openraft's network factory over gRPC.
#[derive(Debug, Clone, Default)]
pub struct GrpcNetwork {
    channels: PeerChannels,
    metrics: LocalMetrics,
}

impl GrpcNetwork {
    /// A network sharing `channels` with the node's other node-to-node calls; `metrics` is set
    /// once the Raft is built.
    pub fn new(channels: PeerChannels, metrics: LocalMetrics) -> Self {
        GrpcNetwork { channels, metrics }
    }
}

/// The client for one peer.
#[derive(Debug)]
pub struct Peer {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    metrics: LocalMetrics,
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetwork {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        Peer { target, addr: node.addr.clone(), channels: self.channels.clone(), metrics: self.metrics.clone() }
    }
}

/// A reply payload that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("undecodable reply from peer: {0}")]
struct BadReply(postcard::Error);

impl Peer {
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

impl RaftNetwork<TypeConfig> for Peer {
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
