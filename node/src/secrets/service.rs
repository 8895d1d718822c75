// Hot path: every Secrets request.
//! The `coffer.v1.Secrets` service.

use std::sync::Arc;

use coffer_proto::v1::secrets_server::Secrets;
use coffer_proto::v1::{
    DeleteRequest, DeleteResponse, DescribeRequest, DescribeResponse, DestroyRequest, DestroyResponse, GetRequest,
    GetResponse, ListRequest, ListResponse, PutRequest, PutResponse, UndeleteRequest, UndeleteResponse, VersionInfo,
};
use coffer_raft::VersionState;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::auth::{secret_path, Capability};
use crate::node::Node;
use crate::secrets::{describe, get, list, put, set_state};
use crate::wire::{duration, timestamp};

/// The Secrets service over a started node.
#[derive(Debug, Clone)]
pub struct SecretsService {
    node: Arc<Node>,
}

impl SecretsService {
    /// A service answering from `node`.
    pub fn new(node: Arc<Node>) -> Self {
        SecretsService { node }
    }
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    #[tracing::instrument(level = "debug", skip_all)]
    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let principal = self.node.authenticate(&request).await?;
        let req = request.into_inner();
        // A first version needs `create`, a later one `update` (as this node's state has it).
        let exists = coffer_raft::SecretPath::parse(&req.path)
            .ok()
            .map(|p| self.node.reader().secret(&p))
            .transpose()
            .map_err(crate::error::Error::from)?
            .flatten()
            .is_some();
        principal.require(&secret_path(&req.path), if exists { Capability::Update } else { Capability::Create })?;
        let put = put::PutSecret {
            path: req.path,
            value: Zeroizing::new(req.value),
            cas: req.cas,
            max_versions: req.max_versions,
            request_id: req.request_id,
        };
        let written = put::put_secret(&self.node, put).await?;
        Ok(Response::new(PutResponse {
            version: written.version.0,
            created_at: Some(timestamp(written.created_at_ms.0)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.node.authorize(&request, &secret_path(&request.get_ref().path), Capability::Read).await?;
        let req = request.into_inner();
        let max_staleness = req.max_staleness.map(|d| duration("max_staleness", d)).transpose()?;
        let secret = get::get_secret(&self.node, &req.path, req.version, max_staleness).await?;
        // The reply owns a copy for encoding; tonic drops it after writing, unzeroized (a limit of
        // prost's `Vec<u8>` fields).
        Ok(Response::new(GetResponse {
            value: secret.value.to_vec(),
            version: secret.version.0,
            created_at: Some(timestamp(secret.created_at_ms.0)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn describe(&self, request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        self.node.authorize(&request, &secret_path(&request.get_ref().path), Capability::Read).await?;
        let req = request.into_inner();
        let meta = describe::describe_secret(&self.node, &req.path).await?;
        let versions = meta
            .versions
            .iter()
            .map(|(version, v)| VersionInfo {
                version: version.0,
                created_at: Some(timestamp(v.created_at_ms.0)),
                deleted_at: v.deleted_at_ms.map(|at| timestamp(at.0)),
                destroyed: v.destroyed,
            })
            .collect();
        Ok(Response::new(DescribeResponse {
            path: req.path,
            current_version: meta.current_version.0,
            max_versions: meta.max_versions,
            created_at: Some(timestamp(meta.created_at_ms.0)),
            updated_at: Some(timestamp(meta.updated_at_ms.0)),
            versions,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let principal = self.node.authenticate(&request).await?;
        let req = request.into_inner();
        let page = list::list_secrets(&self.node, &req.prefix, req.page_size, &req.page_token).await?;
        // Only the paths the caller may list: a page can come back shorter than asked, and the
        // page token still moves on.
        let paths = page.paths.into_iter().filter(|p| principal.allows(&secret_path(p), Capability::List)).collect();
        Ok(Response::new(ListResponse { paths, next_page_token: page.next_page_token.unwrap_or_default() }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        self.node.authorize(&request, &secret_path(&request.get_ref().path), Capability::Delete).await?;
        let req = request.into_inner();
        set_state::set_version_state(&self.node, &req.path, req.versions, VersionState::Deleted, &req.request_id)
            .await?;
        Ok(Response::new(DeleteResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn undelete(&self, request: Request<UndeleteRequest>) -> Result<Response<UndeleteResponse>, Status> {
        self.node.authorize(&request, &secret_path(&request.get_ref().path), Capability::Undelete).await?;
        let req = request.into_inner();
        set_state::set_version_state(&self.node, &req.path, req.versions, VersionState::Undeleted, &req.request_id)
            .await?;
        Ok(Response::new(UndeleteResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn destroy(&self, request: Request<DestroyRequest>) -> Result<Response<DestroyResponse>, Status> {
        self.node.authorize(&request, &secret_path(&request.get_ref().path), Capability::Destroy).await?;
        let req = request.into_inner();
        set_state::set_version_state(&self.node, &req.path, req.versions, VersionState::Destroyed, &req.request_id)
            .await?;
        Ok(Response::new(DestroyResponse {}))
    }
}
