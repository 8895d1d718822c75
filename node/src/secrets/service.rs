// Hot path: every Secrets request.
//! The `coffer.v1.Secrets` service.

use std::sync::Arc;

use coffer_proto::v1::secrets_server::Secrets;
use coffer_proto::v1::{
    CancelRotationRequest, CancelRotationResponse, ConfigureRotationRequest, ConfigureRotationResponse, RotateRequest,
    RotateResponse, RotationInfo, RotationStatusRequest, RotationStatusResponse, WatchEvent, WatchRequest,
};
use coffer_proto::v1::{
    DeleteRequest, DeleteResponse, DescribeRequest, DescribeResponse, DestroyRequest, DestroyResponse, GetRequest,
    GetResponse, ListRequest, ListResponse, PutRequest, PutResponse, UndeleteRequest, UndeleteResponse, VersionInfo,
};
use coffer_raft::VersionState;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::auth::{secret_path, Capability, Principal};
use crate::node::Node;
use crate::rotation;
use crate::secrets::{describe, get, list, put, set_state};
use crate::wire::{duration, timestamp};

/// What a put may do under the caller's rights, as the `cas` to send: a first version needs
/// `create`, a later one `update`. A caller with `create` alone writes with `cas = 0`, so the
/// replicated state itself refuses a version over an existing secret (a stale follower's view
/// or a racing create cannot turn it into an update). A secret, once created, always exists
/// (versions are deleted, never the secret), so an `update`-only caller's local check is safe.
/// A caller with neither right gets the same refusal whether or not the secret exists.
fn write_rule(
    principal: &Principal,
    on: &str,
    exists: bool,
    cas: Option<u64>,
) -> Result<Option<u64>, crate::error::Error> {
    let (create, update) = (principal.allows(on, Capability::Create), principal.allows(on, Capability::Update));
    if !create && !update {
        return principal.require(on, Capability::Create).map(|()| cas);
    }
    match (create, update) {
        (true, true) => Ok(cas),
        (true, false) if exists || cas.is_some_and(|v| v > 0) => {
            principal.require(on, Capability::Update).map(|()| cas)
        }
        (true, false) => Ok(Some(0)),
        _ if !exists => principal.require(on, Capability::Create).map(|()| cas),
        _ => Ok(cas),
    }
}

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
        let slot = request.extensions().get::<crate::audit::layer::AuditSlot>().cloned();
        let req = request.into_inner();
        let on = secret_path(&req.path)?;
        let parsed = coffer_raft::SecretPath::parse(&req.path).map_err(crate::error::Error::from)?;
        let exists = self.node.reader().secret(&parsed).map_err(crate::error::Error::from)?.is_some();
        if let Some(slot) = &slot {
            // The capability a put of this path needs, as the audit record names it.
            let needs = if exists { Capability::Update } else { Capability::Create };
            slot.update(|info| {
                info.path = Some(on.clone());
                info.capability = Some(needs.name());
                info.rule = Some(principal.deciding_rule(&on, needs));
            });
        }
        let cas = write_rule(&principal, &on, exists, req.cas)?;
        let value_hmac = match &slot {
            Some(_) => self.node.audit_hmac(&req.value).await.ok(),
            None => None,
        };
        let put = put::PutSecret {
            path: req.path,
            value: Zeroizing::new(req.value),
            cas,
            max_versions: req.max_versions,
            request_id: req.request_id,
        };
        let written = put::put_secret(&self.node, put).await?;
        if let Some(slot) = slot {
            slot.update(|info| {
                info.version = Some(written.version.0);
                info.value_hmac = value_hmac;
            });
        }
        Ok(Response::new(PutResponse {
            version: written.version.0,
            created_at: Some(timestamp(written.created_at_ms.0)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Read).await?;
        let slot = request.extensions().get::<crate::audit::layer::AuditSlot>().cloned();
        let req = request.into_inner();
        let max_staleness = req.max_staleness.map(|d| duration("max_staleness", d)).transpose()?;
        let stage = match req.stage.as_str() {
            "" => None,
            label => {
                Some(coffer_raft::Stage::parse(label).map_err(|rule| crate::error::Error::InvalidArgument { rule })?)
            }
        };
        let secret = get::get_secret(&self.node, &req.path, req.version, stage, max_staleness).await?;
        if let Some(slot) = slot {
            let value_hmac = self.node.audit_hmac(&secret.value).await.ok();
            slot.update(|info| {
                info.version = Some(secret.version.0);
                info.value_hmac = value_hmac;
            });
        }
        // The reply owns a copy for encoding; tonic drops it after writing, unzeroized (a limit of
        // prost's `Vec<u8>` fields).
        Ok(Response::new(GetResponse {
            value: secret.value.to_vec(),
            version: secret.version.0,
            created_at: Some(timestamp(secret.created_at_ms.0)),
            stages: secret.stages.iter().map(ToString::to_string).collect(),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn describe(&self, request: Request<DescribeRequest>) -> Result<Response<DescribeResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Read).await?;
        let req = request.into_inner();
        let (meta, stages) = describe::describe_secret(&self.node, &req.path).await?;
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
            current: stages.current.0,
            pending: stages.pending.map_or(0, |v| v.0),
            previous: stages.previous.map_or(0, |v| v.0),
            previous_until: stages.previous_until_ms.map(|at| timestamp(at.0)),
        }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        // A list is of a folder: `list` on the folder itself (`secret` for all), and only names
        // under `<folder>/` (a prefix `app` does not reach `apple/…`). Names the caller is denied
        // `list` on are left out, and the page token is sealed with the keyring, so a page of
        // left-out names reveals none of them.
        let principal = self.node.authenticate(&request).await?;
        let folder = request.get_ref().prefix.trim_end_matches('/').to_owned();
        principal
            .require(&if folder.is_empty() { "secret".to_owned() } else { secret_path(&folder)? }, Capability::List)?;
        let req = request.into_inner();
        let prefix = if folder.is_empty() { String::new() } else { format!("{folder}/") };
        let ready = self.node.ready().await?;
        let after = list::open_cursor(&ready.keyring, &req.page_token)?;
        let page = list::list_secrets(&self.node, &prefix, req.page_size, after.as_deref().unwrap_or("")).await?;
        let paths =
            page.paths.into_iter().filter(|p| principal.allows(&format!("secret/{p}"), Capability::List)).collect();
        let next = page.next_page_token.map(|last| list::seal_cursor(&ready.keyring, &last)).transpose()?;
        Ok(Response::new(ListResponse { paths, next_page_token: next.unwrap_or_default() }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete(&self, request: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Delete).await?;
        let req = request.into_inner();
        set_state::set_version_state(&self.node, &req.path, req.versions, VersionState::Deleted, &req.request_id)
            .await?;
        Ok(Response::new(DeleteResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn undelete(&self, request: Request<UndeleteRequest>) -> Result<Response<UndeleteResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Undelete).await?;
        let req = request.into_inner();
        set_state::set_version_state(&self.node, &req.path, req.versions, VersionState::Undeleted, &req.request_id)
            .await?;
        Ok(Response::new(UndeleteResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn destroy(&self, request: Request<DestroyRequest>) -> Result<Response<DestroyResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Destroy).await?;
        let req = request.into_inner();
        set_state::set_version_state(&self.node, &req.path, req.versions, VersionState::Destroyed, &req.request_id)
            .await?;
        Ok(Response::new(DestroyResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn configure_rotation(
        &self,
        request: Request<ConfigureRotationRequest>,
    ) -> Result<Response<ConfigureRotationResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Rotate).await?;
        let req = request.into_inner();
        let due = rotation::ops::configure(&self.node, &req.path, req.config.as_ref()).await?;
        Ok(Response::new(ConfigureRotationResponse { next_due: due.map(|at| timestamp(at.0)) }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn rotate(&self, request: Request<RotateRequest>) -> Result<Response<RotateResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Rotate).await?;
        let rotation = rotation::ops::rotate(&self.node, &request.get_ref().path).await?;
        Ok(Response::new(RotateResponse { rotation }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn cancel_rotation(
        &self,
        request: Request<CancelRotationRequest>,
    ) -> Result<Response<CancelRotationResponse>, Status> {
        self.node.authorize(&request, secret_path(&request.get_ref().path), Capability::Rotate).await?;
        rotation::ops::cancel(&self.node, &request.get_ref().path).await?;
        Ok(Response::new(CancelRotationResponse {}))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn rotation_status(
        &self,
        request: Request<RotationStatusRequest>,
    ) -> Result<Response<RotationStatusResponse>, Status> {
        // Like List: only secrets the caller may `rotate` are shown.
        let principal = self.node.authenticate(&request).await?;
        let prefix = request.into_inner().prefix;
        let records = rotation::ops::status(&self.node, &prefix).await?;
        let rotations = records
            .into_iter()
            .filter(|(path, _)| principal.allows(&format!("secret/{path}"), Capability::Rotate))
            .map(|(path, record)| {
                let (state, step, attempt, last_error) = rotation::ops::state_words(&record);
                RotationInfo {
                    path,
                    state: state.into(),
                    rotation: record.started,
                    step,
                    attempt,
                    last_error: if last_error.is_empty() {
                        record.last_failure.clone().unwrap_or_default()
                    } else {
                        last_error
                    },
                    last_success: record.last_success_ms.map(|at| timestamp(at.0)),
                    next_due: record.next_due_ms.map(|at| timestamp(at.0)),
                    failures: record.failures,
                    rotator: rotation::Spec::parse(&record.spec).map(|s| s.describe()).unwrap_or_else(|e| e),
                }
            })
            .collect();
        Ok(Response::new(RotationStatusResponse { rotations }))
    }

    type WatchStream = tokio_stream::wrappers::ReceiverStream<Result<WatchEvent, Status>>;

    #[tracing::instrument(level = "debug", skip_all)]
    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        // A watch is of a folder, like a list: `watch` on the folder itself (`secret` for all),
        // and each event only if the caller may `watch` its path.
        let principal = self.node.authenticate(&request).await?;
        let folder = request.get_ref().prefix.trim_end_matches('/').to_owned();
        principal
            .require(&if folder.is_empty() { "secret".to_owned() } else { secret_path(&folder)? }, Capability::Watch)?;
        let req = request.into_inner();
        let prefix = if folder.is_empty() { String::new() } else { format!("{folder}/") };
        self.node.ready().await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let node = self.node.clone();
        // The first check runs before the answer, so OUT_OF_RANGE is the call's status.
        let (oldest, _) = node.reader().events_window().map_err(crate::error::Error::from)?;
        if req.from_revision != 0 && req.from_revision < oldest {
            return Err(crate::error::Error::OutOfRange(format!(
                "revision {} is no longer kept (the oldest kept is {oldest}); list the secrets again, then watch from revision {oldest}",
                req.from_revision
            ))
            .into());
        }
        tokio::spawn(async move {
            let visible = |path: &str| principal.allows(&format!("secret/{path}"), Capability::Watch);
            if let Err(e) = rotation::watch::stream(&node, prefix, req.from_revision, tx.clone(), visible).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}
