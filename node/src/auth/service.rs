//! The `coffer.v1.Auth` service: a thin adapter over [`crate::auth::ops`].

use std::sync::Arc;

use coffer_proto::v1::auth_server::Auth;
use coffer_proto::v1::{
    AuditHashRequest, AuditHashResponse, CreateTokenRequest, CreateTokenResponse, DeletePolicyRequest,
    DeletePolicyResponse, DeleteRoleRequest, DeleteRoleResponse, ExplainRequest, ExplainResponse, ListAccessorsRequest,
    ListAccessorsResponse, ListPoliciesRequest, ListPoliciesResponse, ListRolesRequest, ListRolesResponse,
    LoginRequest, LookupTokenRequest, PolicyInfo, ReadPolicyRequest, ReadRoleRequest, RenewTokenRequest,
    RevokeTokenRequest, RevokeTokenResponse, RoleInfo, TokenInfo, WritePolicyRequest, WritePolicyResponse,
    WriteRoleRequest, WriteRoleResponse,
};
use coffer_raft::TokenRecord;
use tonic::{Request, Response, Status};

use crate::auth::ops::{self, NewToken};
use crate::auth::{Capability, Credential};
use crate::error::Error;
use crate::node::Node;
use crate::wire::{duration, timestamp};

/// The path whose `hmac` capability lets a caller compute audit value HMACs.
pub const AUDIT_HASH_PATH: &str = "sys/audit/hash";

/// The Auth service over a started node.
#[derive(Debug, Clone)]
pub struct AuthService {
    node: Arc<Node>,
}

impl AuthService {
    /// A service answering from `node`.
    pub fn new(node: Arc<Node>) -> Self {
        AuthService { node }
    }
}

/// A token's metadata for the wire.
pub(crate) fn token_info(record: &TokenRecord) -> TokenInfo {
    TokenInfo {
        accessor: record.accessor.clone(),
        policies: record.policies.clone(),
        display_name: record.display_name.clone(),
        created_at: Some(timestamp(record.created_at_ms.0)),
        expires_at: record.expires_at_ms.map(|at| timestamp(at.0)),
        max_expires_at: record.max_expires_at_ms.map(|at| timestamp(at.0)),
        renewable: record.renewable,
        has_parent: record.parent.is_some(),
    }
}

fn wire_duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let req = request.into_inner();
        let ask = NewToken {
            policies: req.policies,
            ttl: req.ttl.map(|d| duration("ttl", d)).transpose()?,
            max_ttl: req.max_ttl.map(|d| duration("max_ttl", d)).transpose()?,
            renewable: req.renewable,
            orphan: req.orphan,
            display_name: req.display_name,
        };
        let made = ops::create_token(&self.node, &caller, ask).await?;
        Ok(Response::new(CreateTokenResponse { token: made.token.to_string(), info: Some(token_info(&made.record)) }))
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<CreateTokenResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let ttl = request.into_inner().ttl.map(|d| duration("ttl", d)).transpose()?;
        let made = ops::login(&self.node, &caller, ttl).await?;
        Ok(Response::new(CreateTokenResponse { token: made.token.to_string(), info: Some(token_info(&made.record)) }))
    }

    async fn lookup_token(&self, request: Request<LookupTokenRequest>) -> Result<Response<TokenInfo>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let (_, record) = ops::target(&self.node, &caller, &request.into_inner().accessor)?;
        Ok(Response::new(token_info(&record)))
    }

    async fn renew_token(&self, request: Request<RenewTokenRequest>) -> Result<Response<TokenInfo>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let req = request.into_inner();
        let increment = req.increment.map(|d| duration("increment", d)).transpose()?;
        let (hash, record) = ops::target(&self.node, &caller, &req.accessor)?;
        let renewed = ops::renew(&self.node, hash, &record, increment).await?;
        Ok(Response::new(token_info(&renewed)))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let (hash, record) = ops::target(&self.node, &caller, &request.into_inner().accessor)?;
        ops::revoke(&self.node, hash).await?;
        tracing::info!(accessor = %record.accessor, by = %caller.display(), "token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }

    async fn list_accessors(
        &self,
        request: Request<ListAccessorsRequest>,
    ) -> Result<Response<ListAccessorsResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        caller.require("sys/token/accessor", Capability::TokenAdmin)?;
        let req = request.into_inner();
        let size = if req.page_size == 0 { 100 } else { req.page_size.min(1000) } as usize;
        let after = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let mut accessors = self.node.reader().accessors(after, size + 1).map_err(Error::from)?;
        let next = if accessors.len() > size {
            accessors.truncate(size);
            accessors.last().cloned().unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListAccessorsResponse { accessors, next_page_token: next }))
    }

    async fn write_policy(
        &self,
        request: Request<WritePolicyRequest>,
    ) -> Result<Response<WritePolicyResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let req = request.into_inner();
        ops::write_policy(&self.node, &caller, &req.name, &req.document).await?;
        tracing::info!(policy = %req.name, by = %caller.display(), "policy written");
        Ok(Response::new(WritePolicyResponse {}))
    }

    async fn read_policy(&self, request: Request<ReadPolicyRequest>) -> Result<Response<PolicyInfo>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let name = request.into_inner().name;
        caller.require(&format!("sys/policy/{name}"), Capability::PolicyAdmin)?;
        let record = self.node.reader().policy(&name).map_err(Error::from)?.ok_or(Error::PolicyNotFound { name })?;
        Ok(Response::new(PolicyInfo {
            name: record.name,
            document: record.document,
            updated_at: Some(timestamp(record.updated_at_ms.0)),
        }))
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        caller.require("sys/policy", Capability::PolicyAdmin)?;
        let names = self.node.reader().policy_names().map_err(Error::from)?;
        Ok(Response::new(ListPoliciesResponse { names }))
    }

    async fn delete_policy(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let name = request.into_inner().name;
        ops::delete_policy(&self.node, &caller, &name).await?;
        tracing::info!(policy = %name, by = %caller.display(), "policy deleted");
        Ok(Response::new(DeletePolicyResponse {}))
    }

    async fn explain(&self, request: Request<ExplainRequest>) -> Result<Response<ExplainResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let req = request.into_inner();
        let capability = Capability::parse(&req.capability).map_err(|rule| Error::InvalidArgument { rule })?;
        let subject = if req.accessor.is_empty() {
            caller
        } else {
            let (hash, _) = ops::target(&self.node, &caller, &req.accessor)?;
            self.node.resolve(&Credential::Token(hash))?
        };
        let explanation = subject.policies.explain(&req.path, capability);
        let mut text = format!("{}\n", subject.display());
        text.push_str(&explanation.render(&req.path, capability));
        let allowed = subject.allows(&req.path, capability);
        if allowed && !explanation.allowed {
            text.push_str("  (allowed: an operator certificate may do operator things on sys/operator/…)\n");
        }
        Ok(Response::new(ExplainResponse { allowed, explanation: text }))
    }

    async fn audit_hash(&self, request: Request<AuditHashRequest>) -> Result<Response<AuditHashResponse>, Status> {
        self.node.authorize(&request, Ok(AUDIT_HASH_PATH.to_owned()), Capability::Hmac).await?;
        let value = zeroize::Zeroizing::new(request.into_inner().value);
        Ok(Response::new(AuditHashResponse { hmac: self.node.audit_hmac(&value).await? }))
    }

    async fn write_role(&self, request: Request<WriteRoleRequest>) -> Result<Response<WriteRoleResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let req = request.into_inner();
        let ttl = req.token_ttl.map(|d| duration("token_ttl", d)).transpose()?;
        ops::write_role(&self.node, &caller, &req.name, req.identities, req.policies, ttl).await?;
        tracing::info!(role = %req.name, by = %caller.display(), "login role written");
        Ok(Response::new(WriteRoleResponse {}))
    }

    async fn read_role(&self, request: Request<ReadRoleRequest>) -> Result<Response<RoleInfo>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let name = request.into_inner().name;
        caller.require(&format!("sys/role/{name}"), Capability::PolicyAdmin)?;
        let role = self.node.reader().cert_role(&name).map_err(Error::from)?.ok_or(Error::RoleNotFound { name })?;
        Ok(Response::new(RoleInfo {
            name: role.name,
            identities: role.identities,
            policies: role.policies,
            token_ttl: Some(wire_duration(std::time::Duration::from_millis(role.token_ttl_ms))),
        }))
    }

    async fn list_roles(&self, request: Request<ListRolesRequest>) -> Result<Response<ListRolesResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        caller.require("sys/role", Capability::PolicyAdmin)?;
        let names = self.node.reader().cert_roles().map_err(Error::from)?.into_iter().map(|r| r.name).collect();
        Ok(Response::new(ListRolesResponse { names }))
    }

    async fn delete_role(&self, request: Request<DeleteRoleRequest>) -> Result<Response<DeleteRoleResponse>, Status> {
        let caller = self.node.authenticate(&request).await?;
        let name = request.into_inner().name;
        ops::delete_role(&self.node, &caller, &name).await?;
        Ok(Response::new(DeleteRoleResponse {}))
    }
}
