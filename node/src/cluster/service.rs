//! The `coffer.v1.Operator` service.

use std::sync::Arc;

use coffer_proto::v1::operator_server::Operator;
use coffer_proto::v1::{
    CreateJoinTokenRequest, CreateJoinTokenResponse, InitRequest, InitResponse, JoinRequest, JoinResponse,
    MemberStatus, RemoveRequest, RemoveResponse, StatusRequest, StatusResponse, TransferLeaderRequest,
    TransferLeaderResponse,
};
use coffer_raft::NodeId;
use tonic::{Request, Response, Status};

use crate::cluster::ops as operator;
use crate::error::Error;
use crate::node::Node;

/// The Operator service over a started node.
#[derive(Debug, Clone)]
pub struct OperatorService {
    node: Arc<Node>,
}

impl OperatorService {
    /// A service answering from `node`.
    pub fn new(node: Arc<Node>) -> Self {
        OperatorService { node }
    }

    /// Init and join need an operator certificate (`spiffe://coffer/operator/<name>`, verified
    /// by the node's TLS against the cluster's CA): they run on a node that has no tokens or
    /// policies yet. With `tls = "off"` nothing can be verified, and nothing is asked. Every
    /// other operator call is authorised like any call: `operator` on `sys/operator/<action>`,
    /// which an operator certificate always has.
    fn require_operator<T>(&self, request: &Request<T>, action: &'static str) -> Result<(), Error> {
        if matches!(self.node.config.tls, crate::config::Tls::Off) {
            return Ok(());
        }
        let identity = request.peer_certs().and_then(|certs| certs.first().and_then(coffer_tls::identity));
        let allowed = matches!(identity, Some(coffer_tls::Identity::Operator(_)));
        if let Some(slot) = request.extensions().get::<crate::audit::layer::AuditSlot>() {
            slot.update(|info| {
                info.peer = request.remote_addr().map(|a| a.to_string());
                info.path = Some(format!("sys/operator/{}", if action.starts_with("join") { "join" } else { "init" }));
                info.capability = Some(crate::auth::Capability::Operator.name());
                info.decision = Some(if allowed { "allowed" } else { "denied" });
                info.rule = Some("operator-certificate".into());
                if let Some(coffer_tls::Identity::Operator(name)) = &identity {
                    info.principal = Some(format!("operator certificate {name}"));
                    info.identity = Some(name.clone());
                }
            });
        }
        let presented = match identity {
            Some(coffer_tls::Identity::Operator(_)) => return Ok(()),
            None => "no client certificate".to_owned(),
            Some(coffer_tls::Identity::Client(name)) => format!("the client certificate of {name:?}"),
            Some(coffer_tls::Identity::Node(id)) => format!("node {id}'s certificate"),
        };
        tracing::warn!(action, presented = %presented, remote = ?request.remote_addr(), "refused an operator call");
        Err(Error::OperatorRequired { action, presented })
    }
}

#[tonic::async_trait]
impl Operator for OperatorService {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        self.require_operator(&request, "initialising a cluster")?;
        let (cluster, root) = self.node.init_cluster().await?;
        Ok(Response::new(InitResponse {
            cluster_id: cluster.cluster_id,
            kcv: cluster.root_kcv,
            root_token: root.to_string(),
        }))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.require_operator(&request, "joining a cluster")?;
        let req = request.into_inner();
        let cluster_id = operator::join(&self.node, &req.peer, &req.token).await?;
        Ok(Response::new(JoinResponse { cluster_id }))
    }

    async fn remove(&self, request: Request<RemoveRequest>) -> Result<Response<RemoveResponse>, Status> {
        self.node.authorize_operator(&request, "remove").await?;
        operator::remove(&self.node, NodeId(request.into_inner().node_id)).await?;
        Ok(Response::new(RemoveResponse {}))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.node.authorize_operator(&request, "transfer-leader").await?;
        let target = request.into_inner().node_id;
        if target != 0 && target != self.node.config.node_id.0 {
            return Err(Error::InvalidArgument {
                rule: format!("run transfer-leader against node {target} itself (COFFER_ADDR of that node)"),
            }
            .into());
        }
        let leader_id = operator::take_leadership(&self.node).await?;
        Ok(Response::new(TransferLeaderResponse { leader_id: leader_id.0 }))
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        self.node.authorize_operator(&request, "join-token").await?;
        let ttl = request.into_inner().ttl.map(|d| crate::wire::duration("ttl", d)).transpose()?;
        let (token, expires) = operator::create_join_token(&self.node, ttl).await?;
        Ok(Response::new(CreateJoinTokenResponse { token, expires_at: Some(crate::wire::timestamp(expires.0)) }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.node.authorize_operator(&request, "status").await?;
        let node = &self.node;
        let status = node.replica.status().await;
        let members = status
            .members
            .into_iter()
            .map(|m| MemberStatus { node_id: m.id.0, addr: m.addr.to_string(), voter: m.voter, lag: m.lag })
            .collect();
        let hsm = match node.hsm().probe().await {
            Ok(kcv) if kcv == *node.hsm().kcv() => "ok".to_owned(),
            Ok(kcv) => format!("root key changed: KCV now {kcv}"),
            Err(e) => format!("failing: {e}"),
        };
        let cluster_id = node.reader().cluster().map_err(Error::from)?.map(|c| c.cluster_id).unwrap_or_default();
        Ok(Response::new(StatusResponse {
            node_id: status.node_id.0,
            role: status.role.as_str().into(),
            term: status.term,
            leader_id: status.leader.map(|id| id.0),
            last_log_index: status.last_log_index,
            committed_index: status.committed_index,
            applied_index: status.applied_index,
            members,
            cluster_id,
            kcv: node.hsm().kcv().to_string(),
            transport: match node.config.tls {
                crate::config::Tls::On(_) => "tls".into(),
                crate::config::Tls::Off => "plaintext".into(),
            },
            hsm,
            audit: node.audit.as_ref().map_or_else(|| "off".to_owned(), |audit| audit.status()),
        }))
    }
}
