// Hot path: Keys crypto calls.
//! The `coffer.v1.Keys` service.

use std::sync::Arc;

use coffer_proto::v1::crypto_request::Call;
use coffer_proto::v1::crypto_result::Result as CryptoOutcome;
use coffer_proto::v1::keys_server::Keys;
use coffer_proto::v1::{
    BatchRequest, BatchResponse, CreateKeyRequest, CryptoRequest, CryptoResult, DecryptRequest, DecryptResponse,
    DeleteKeyRequest, DeleteKeyResponse, EncryptRequest, EncryptResponse, GenerateDataKeyRequest,
    GenerateDataKeyResponse, GetKeyRequest, HmacRequest, HmacResponse, ItemError, Key, KeyConfig, KeyType, KeyVersion,
    ListKeysRequest, ListKeysResponse, RewrapRequest, RewrapResponse, RotateKeyRequest, SignRequest, SignResponse,
    StreamRequest, StreamResponse, UpdateKeyConfigRequest, VerifyHmacRequest, VerifyRequest, VerifyResponse,
};
use coffer_raft::{NamedKeyRecord, NamedKeyType};
use tonic::{Request, Response, Status};

use crate::audit::layer::AuditSlot;
use crate::auth::{key_path, Capability, Principal};
use crate::error::Error;
use crate::keys::crypto::DataKeyPlaintext;
use crate::keys::{crypto as key_crypto, manage as manage_keys};
use crate::node::Node;
use crate::wire::{duration, timestamp};

/// The Keys service over a started node.
#[derive(Debug, Clone)]
pub struct KeysService {
    node: Arc<Node>,
}

impl KeysService {
    /// A service answering from `node`.
    pub fn new(node: Arc<Node>) -> Self {
        KeysService { node }
    }
}

fn key_type(wire: i32) -> Result<NamedKeyType, Error> {
    match KeyType::try_from(wire) {
        Ok(KeyType::Aes256Gcm) => Ok(NamedKeyType::Aes256Gcm),
        Ok(KeyType::Ed25519) => Ok(NamedKeyType::Ed25519),
        Ok(KeyType::EcdsaP256) => Ok(NamedKeyType::EcdsaP256),
        Ok(KeyType::HmacSha256) => Ok(NamedKeyType::HmacSha256),
        Ok(KeyType::Unspecified) | Err(_) => Err(Error::InvalidArgument {
            rule: "type must be one of AES256_GCM, ED25519, ECDSA_P256, HMAC_SHA256".into(),
        }),
    }
}

fn wire_key(name: String, record: &NamedKeyRecord) -> Key {
    let key_type = match record.key_type {
        NamedKeyType::Aes256Gcm => KeyType::Aes256Gcm,
        NamedKeyType::Ed25519 => KeyType::Ed25519,
        NamedKeyType::EcdsaP256 => KeyType::EcdsaP256,
        NamedKeyType::HmacSha256 => KeyType::HmacSha256,
    };
    let period = record.auto_rotate_period_ms;
    Key {
        name,
        r#type: key_type as i32,
        exportable: record.exportable,
        primary_version: record.primary().0,
        config: Some(KeyConfig {
            min_decryption_version: record.min_decryption_version.0,
            deletion_allowed: record.deletion_allowed,
            auto_rotate_period: (period > 0).then(|| prost_types::Duration {
                seconds: (period / 1000) as i64,
                nanos: ((period % 1000) * 1_000_000) as i32,
            }),
        }),
        versions: record
            .versions
            .iter()
            .map(|(v, r)| KeyVersion {
                version: v.0,
                created_at: Some(timestamp(r.created_at_ms.0)),
                public_key: r.public_key.clone(),
                encrypts: 0,
                decrypts: 0,
                last_used: None,
            })
            .collect(),
        created_at: Some(timestamp(record.created_at_ms.0)),
        usage_nodes_answered: 0,
        usage_nodes_total: 0,
    }
}

async fn encrypt(node: &Node, req: EncryptRequest) -> Result<EncryptResponse, Error> {
    let out = key_crypto::encrypt(node, &req.name, &req.plaintext, &req.associated_data).await?;
    Ok(EncryptResponse { ciphertext: out.value, key_version: out.key_version.0 })
}

async fn decrypt(node: &Node, req: DecryptRequest) -> Result<DecryptResponse, Error> {
    let out = key_crypto::decrypt(node, &req.name, &req.ciphertext, &req.associated_data).await?;
    Ok(DecryptResponse { plaintext: out.value.to_vec(), key_version: out.key_version.0 })
}

async fn rewrap(node: &Node, req: RewrapRequest) -> Result<RewrapResponse, Error> {
    let out = key_crypto::rewrap(node, &req.name, &req.ciphertext, &req.associated_data).await?;
    Ok(RewrapResponse { ciphertext: out.value, key_version: out.key_version.0 })
}

async fn generate_data_key(node: &Node, req: GenerateDataKeyRequest) -> Result<GenerateDataKeyResponse, Error> {
    let plaintext = if req.with_plaintext { DataKeyPlaintext::Return } else { DataKeyPlaintext::Withhold };
    let key = key_crypto::generate_data_key(node, &req.name, req.bits, plaintext).await?;
    Ok(GenerateDataKeyResponse {
        ciphertext: key.ciphertext,
        plaintext: key.plaintext.map(|p| p.to_vec()).unwrap_or_default(),
        key_version: key.key_version.0,
    })
}

async fn sign(node: &Node, req: SignRequest) -> Result<SignResponse, Error> {
    let out = key_crypto::sign(node, &req.name, &req.message).await?;
    Ok(SignResponse { signature: out.value, key_version: out.key_version.0 })
}

async fn verify(node: &Node, req: VerifyRequest) -> Result<VerifyResponse, Error> {
    Ok(VerifyResponse { valid: key_crypto::verify(node, &req.name, &req.message, &req.signature).await? })
}

async fn hmac(node: &Node, req: HmacRequest) -> Result<HmacResponse, Error> {
    let out = key_crypto::hmac(node, &req.name, &req.message).await?;
    Ok(HmacResponse { hmac: out.value, key_version: out.key_version.0 })
}

async fn verify_hmac(node: &Node, req: VerifyHmacRequest) -> Result<VerifyResponse, Error> {
    Ok(VerifyResponse { valid: key_crypto::verify_hmac(node, &req.name, &req.message, &req.hmac).await? })
}

/// The key and capability a crypto call needs.
fn needs(call: &Call) -> (&str, Capability) {
    match call {
        Call::Encrypt(r) => (&r.name, Capability::Encrypt),
        Call::Decrypt(r) => (&r.name, Capability::Decrypt),
        Call::Rewrap(r) => (&r.name, Capability::Rewrap),
        Call::GenerateDataKey(r) => (&r.name, Capability::Datakey),
        Call::Sign(r) => (&r.name, Capability::Sign),
        Call::Verify(r) => (&r.name, Capability::Verify),
        Call::Hmac(r) => (&r.name, Capability::Hmac),
        Call::VerifyHmac(r) => (&r.name, Capability::Hmac),
    }
}

/// What an item of a batch or stream counts as in its call's audit record: the key's path and
/// the operation.
fn audit_label(request: Option<&CryptoRequest>) -> (String, &'static str) {
    let Some(call) = request.and_then(|r| r.call.as_ref()) else { return ("-".into(), "none") };
    let operation = match call {
        Call::Encrypt(_) => "encrypt",
        Call::Decrypt(_) => "decrypt",
        Call::Rewrap(_) => "rewrap",
        Call::GenerateDataKey(_) => "generate-data-key",
        Call::Sign(_) => "sign",
        Call::Verify(_) => "verify",
        Call::Hmac(_) => "hmac",
        Call::VerifyHmac(_) => "verify-hmac",
    };
    (format!("key/{}", needs(call).0), operation)
}

/// The key version a unary crypto call used, in its audit record.
fn note_key_version(slot: Option<&AuditSlot>, version: u32) {
    if let Some(slot) = slot {
        slot.update(|info| info.version = Some(u64::from(version)));
    }
}

/// An item's outcome, as counts name it.
fn outcome(result: &CryptoResult) -> &'static str {
    match &result.result {
        Some(CryptoOutcome::Error(e)) => crate::audit::layer::code_name(tonic::Code::from_i32(e.code)),
        _ => "OK",
    }
}

/// Runs one crypto call of a batch or stream; `Err` is what the unary RPC would have returned.
async fn execute(node: &Node, call: Call) -> Result<CryptoOutcome, Error> {
    Ok(match call {
        Call::Encrypt(req) => CryptoOutcome::Encrypt(encrypt(node, req).await?),
        Call::Decrypt(req) => CryptoOutcome::Decrypt(decrypt(node, req).await?),
        Call::Rewrap(req) => CryptoOutcome::Rewrap(rewrap(node, req).await?),
        Call::GenerateDataKey(req) => CryptoOutcome::GenerateDataKey(generate_data_key(node, req).await?),
        Call::Sign(req) => CryptoOutcome::Sign(sign(node, req).await?),
        Call::Verify(req) => CryptoOutcome::Verify(verify(node, req).await?),
        Call::Hmac(req) => CryptoOutcome::Hmac(hmac(node, req).await?),
        Call::VerifyHmac(req) => CryptoOutcome::VerifyHmac(verify_hmac(node, req).await?),
    })
}

/// One item of a batch or stream, checked against `principal`, as a per-item result.
async fn execute_item(
    node: &Node,
    principal: Result<&Principal, Error>,
    request: Option<CryptoRequest>,
) -> CryptoResult {
    let result = match (principal, request.and_then(|r| r.call)) {
        (_, None) => Err(Error::InvalidArgument { rule: "the item names no call".into() }),
        (Err(e), Some(_)) => Err(e),
        (Ok(principal), Some(call)) => {
            let (name, capability) = needs(&call);
            // Not `require`: an item refused is counted in the batch's record, and does not make
            // the whole call a refusal.
            let allowed = |path: String| match principal.allows(&path, capability) {
                true => Ok(()),
                false => Err(Error::PermissionDenied { capability, path }),
            };
            match key_path(name).and_then(allowed) {
                Ok(()) => execute(node, call).await,
                Err(e) => Err(e),
            }
        }
    };
    CryptoResult {
        result: Some(result.unwrap_or_else(|e| {
            // The item's error is what the unary call would have answered: the one mapping.
            let status = Status::from(e);
            CryptoOutcome::Error(ItemError { code: status.code() as i32, message: status.message().to_owned() })
        })),
    }
}

type ResultStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<StreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Keys for KeysService {
    type StreamStream = ResultStream;

    #[tracing::instrument(level = "debug", skip_all)]
    async fn batch(&self, request: Request<BatchRequest>) -> Result<Response<BatchResponse>, Status> {
        // Authenticated once, then resolved again for every item: each counts against the
        // token's rate, and a revoke lands mid-batch as it does mid-stream.
        self.node.authenticate(&request).await?;
        let credential = self.node.credential(&request).await?;
        let slot = request.extensions().get::<crate::audit::layer::AuditSlot>().cloned();
        let items = request.into_inner().items;
        let max = self.node.config.max_batch_items;
        if items.len() > max {
            return Err(Error::InvalidArgument {
                rule: format!("a batch carries at most {max} items (max-batch-items); this one has {}", items.len()),
            }
            .into());
        }
        let mut results = Vec::with_capacity(items.len());
        // Counted here, then written into the record once: a batch's items share a few keys.
        let mut tally: Vec<((String, &'static str, &'static str), u64)> = Vec::new();
        for item in items {
            let label = slot.as_ref().map(|_| audit_label(Some(&item)));
            let result = match self.node.resolve(&credential) {
                Ok(principal) => execute_item(&self.node, Ok(&principal), Some(item)).await,
                Err(e) => execute_item(&self.node, Err(e), Some(item)).await,
            };
            if let Some((key, operation)) = label {
                let outcome = outcome(&result);
                match tally.iter_mut().find(|((k, o, r), _)| *k == key && *o == operation && *r == outcome) {
                    Some((_, n)) => *n += 1,
                    None => tally.push(((key, operation, outcome), 1)),
                }
            }
            results.push(result);
        }
        if let Some(slot) = &slot {
            slot.update(|info| {
                for ((key, operation, outcome), n) in &tally {
                    info.count_n(key, operation, outcome, *n);
                }
            });
        }
        Ok(Response::new(BatchResponse { results }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn stream(
        &self,
        request: Request<tonic::Streaming<StreamRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        // Checked at the start, then again for every item: a token revoked (or a policy changed)
        // mid-stream stops the next items, on every node, within the staleness bound.
        let credential = self.node.credential(&request).await?;
        let principal = self.node.resolve(&credential)?;
        let slot = request.extensions().get::<crate::audit::layer::AuditSlot>().cloned();
        if let Some(slot) = &slot {
            slot.update(|info| {
                principal.describe(info);
                info.peer = request.remote_addr().map(|a| a.to_string());
            });
        }
        let mut inbound = request.into_inner();
        let node = self.node.clone();
        let (idle, max_items) = (node.config.limits.stream_idle, node.config.limits.stream_max_items);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        // Ends when the client closes its side or goes away, or when the client stops reading.
        tokio::spawn(async move {
            let mut items = 0u64;
            loop {
                let next = match tokio::time::timeout(idle, inbound.message()).await {
                    Ok(Ok(Some(next))) => next,
                    Ok(Ok(None)) => return,
                    Ok(Err(status)) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(_) => {
                        let limit = format!(
                            "the stream sent nothing for {} (limits.stream-idle): closed",
                            humantime::format_duration(idle)
                        );
                        let _ = tx.send(Err(Error::Overloaded { limit }.into())).await;
                        return;
                    }
                };
                items += 1;
                if items > max_items {
                    let limit =
                        format!("the stream reached {max_items} items (limits.stream-max-items): open a new one");
                    let _ = tx.send(Err(Error::Overloaded { limit }.into())).await;
                    return;
                }
                // Labelled only when audited: no allocation per item otherwise.
                let label = slot.as_ref().map(|_| audit_label(next.request.as_ref()));
                let result = match node.resolve(&credential) {
                    Ok(principal) => execute_item(&node, Ok(&principal), next.request).await,
                    Err(e) => execute_item(&node, Err(e), next.request).await,
                };
                if let (Some(slot), Some((key, operation))) = (&slot, label) {
                    slot.update(|info| info.count(&key, operation, outcome(&result)));
                }
                // A client that stops reading frees the stream after stream-idle, as one that stops
                // sending does.
                let reply = Ok(StreamResponse { id: next.id, result: Some(result) });
                match tokio::time::timeout(idle, tx.send(reply)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn create_key(&self, request: Request<CreateKeyRequest>) -> Result<Response<Key>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::KeyAdmin).await?;
        let req = request.into_inner();
        let record =
            manage_keys::create_key(&self.node, &req.name, key_type(req.r#type)?, req.exportable, &req.request_id)
                .await?;
        Ok(Response::new(wire_key(req.name, &record)))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_key(&self, request: Request<GetKeyRequest>) -> Result<Response<Key>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::KeyAdmin).await?;
        let name = request.into_inner().name;
        let record = manage_keys::get_key(&self.node, &name).await?;
        let usage = manage_keys::cluster_usage(&self.node, &name).await;
        let mut key = wire_key(name, &record);
        for v in &mut key.versions {
            if let Some(u) = usage.versions.get(&coffer_raft::KeyVersion(v.version)) {
                v.encrypts = u.encrypts;
                v.decrypts = u.decrypts;
                v.last_used = (u.last_used_ms > 0).then(|| timestamp(u.last_used_ms));
            }
        }
        key.usage_nodes_answered = usage.answered;
        key.usage_nodes_total = usage.total;
        Ok(Response::new(key))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn list_keys(&self, request: Request<ListKeysRequest>) -> Result<Response<ListKeysResponse>, Status> {
        // `key-admin` on `key` itself (`key/**` grants it): key names are listed whole or not at
        // all; filtering one by one would leak the others through the page token.
        self.node.authorize(&request, Ok("key".to_owned()), Capability::KeyAdmin).await?;
        let req = request.into_inner();
        let (names, next) = manage_keys::list_keys(&self.node, req.page_size, &req.page_token).await?;
        Ok(Response::new(ListKeysResponse { names, next_page_token: next.unwrap_or_default() }))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn rotate_key(&self, request: Request<RotateKeyRequest>) -> Result<Response<Key>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::KeyAdmin).await?;
        let req = request.into_inner();
        let record = manage_keys::rotate_key(&self.node, &req.name, &req.request_id).await?;
        Ok(Response::new(wire_key(req.name, &record)))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn update_key_config(&self, request: Request<UpdateKeyConfigRequest>) -> Result<Response<Key>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::KeyAdmin).await?;
        let req = request.into_inner();
        let change = manage_keys::ConfigChange {
            min_decryption_version: req.min_decryption_version.map(coffer_raft::KeyVersion),
            deletion_allowed: req.deletion_allowed,
            auto_rotate_period: req.auto_rotate_period.map(|d| duration("auto_rotate_period", d)).transpose()?,
        };
        let record = manage_keys::update_key_config(&self.node, &req.name, change, &req.request_id).await?;
        Ok(Response::new(wire_key(req.name, &record)))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn delete_key(&self, request: Request<DeleteKeyRequest>) -> Result<Response<DeleteKeyResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::KeyAdmin).await?;
        let req = request.into_inner();
        manage_keys::delete_key(&self.node, &req.name, &req.request_id).await?;
        Ok(Response::new(DeleteKeyResponse {}))
    }

    async fn encrypt(&self, request: Request<EncryptRequest>) -> Result<Response<EncryptResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Encrypt).await?;
        let slot = request.extensions().get::<AuditSlot>().cloned();
        let reply = encrypt(&self.node, request.into_inner()).await?;
        note_key_version(slot.as_ref(), reply.key_version);
        Ok(Response::new(reply))
    }

    async fn decrypt(&self, request: Request<DecryptRequest>) -> Result<Response<DecryptResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Decrypt).await?;
        let slot = request.extensions().get::<AuditSlot>().cloned();
        let reply = decrypt(&self.node, request.into_inner()).await?;
        note_key_version(slot.as_ref(), reply.key_version);
        Ok(Response::new(reply))
    }

    async fn rewrap(&self, request: Request<RewrapRequest>) -> Result<Response<RewrapResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Rewrap).await?;
        let slot = request.extensions().get::<AuditSlot>().cloned();
        let reply = rewrap(&self.node, request.into_inner()).await?;
        note_key_version(slot.as_ref(), reply.key_version);
        Ok(Response::new(reply))
    }

    async fn generate_data_key(
        &self,
        request: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Datakey).await?;
        let slot = request.extensions().get::<AuditSlot>().cloned();
        let reply = generate_data_key(&self.node, request.into_inner()).await?;
        note_key_version(slot.as_ref(), reply.key_version);
        Ok(Response::new(reply))
    }

    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Sign).await?;
        let slot = request.extensions().get::<AuditSlot>().cloned();
        let reply = sign(&self.node, request.into_inner()).await?;
        note_key_version(slot.as_ref(), reply.key_version);
        Ok(Response::new(reply))
    }

    async fn verify(&self, request: Request<VerifyRequest>) -> Result<Response<VerifyResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Verify).await?;
        Ok(Response::new(verify(&self.node, request.into_inner()).await?))
    }

    async fn hmac(&self, request: Request<HmacRequest>) -> Result<Response<HmacResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Hmac).await?;
        let slot = request.extensions().get::<AuditSlot>().cloned();
        let reply = hmac(&self.node, request.into_inner()).await?;
        note_key_version(slot.as_ref(), reply.key_version);
        Ok(Response::new(reply))
    }

    async fn verify_hmac(&self, request: Request<VerifyHmacRequest>) -> Result<Response<VerifyResponse>, Status> {
        self.node.authorize(&request, key_path(&request.get_ref().name), Capability::Hmac).await?;
        Ok(Response::new(verify_hmac(&self.node, request.into_inner()).await?))
    }
}
