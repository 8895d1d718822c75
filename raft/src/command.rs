//! The one replicated command type, its response, and the records the state machine stores.
//!
//! Every byte string here is ciphertext, a wrapped key or an identifier; never plaintext.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::identity::{
    CreateToken, DeleteCertRole, DeletePolicy, ExpireTokens, InitClusterWithIdentity, PutCertRole, PutPolicy,
    RenewToken, RevokeToken,
};

use crate::rotation::Rotation;
use crate::types::{KeyName, KeyVersion, KeyringVersion, RequestId, SecretPath, SecretVersion, UnixMillis};

/// A log entry's payload: built and stamped (times, ids) by the proposing node, applied
/// deterministically by every node.
///
/// # Format
/// postcard encodes a variant as its index, so variants are only ever appended. Indexes 0 to 7 are
/// the format of the first release (commit 6808560) and are still applied, so a log or snapshot
/// written then replays unchanged (`raft/tests/fixtures`); nodes now propose only
/// [`Command::Writes`]. No variant contains a `Command`: a batch holds [`Op`]s, which hold no
/// batch, so decoding bytes from a peer or the disk recurses at most two levels whatever they say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// One [`InitCluster`] (format 1).
    InitCluster(InitCluster),
    /// One [`PutSecret`] (format 1; its own `request_id` applies).
    PutSecret(PutSecret),
    /// One [`CreateKey`] (format 1).
    CreateKey(CreateKey),
    /// One [`RotateKey`] (format 1).
    RotateKey(RotateKey),
    /// One [`UpdateKeyConfig`] (format 1).
    UpdateKeyConfig(UpdateKeyConfig),
    /// One [`DeleteKey`] (format 1).
    DeleteKey(DeleteKey),
    /// One [`SetVersionState`] (format 1).
    SetVersionState(SetVersionState),
    /// Several operations in one entry (format 1), applied like [`Command::Writes`] without
    /// request ids; answered by [`Response::Batch`].
    Batch(Vec<Op>),
    /// One or more writes in one entry, applied in order, each as if it were its own entry (a
    /// rejected one changes nothing and does not affect the others); answered by
    /// [`Response::Batch`], one [`Outcome`] per write. What nodes propose.
    Writes(Vec<Write>),
}

/// One write: an operation and the client's idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// The client's idempotency key. Once a write carrying it has applied, a write with the same
    /// id and the same [`Intent`] is answered with the first outcome and changes nothing; one
    /// with another intent is rejected ([`Rejection::RequestIdReused`]).
    pub request_id: Option<RequestId>,
    /// What to change.
    pub op: Op,
}

impl Write {
    /// A write without a request id.
    pub fn new(op: Op) -> Self {
        Write { request_id: None, op }
    }
}

/// One change to the replicated state. Holds no other operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// See [`InitCluster`].
    InitCluster(InitCluster),
    /// See [`PutSecret`].
    PutSecret(PutSecret),
    /// See [`CreateKey`].
    CreateKey(CreateKey),
    /// See [`RotateKey`].
    RotateKey(RotateKey),
    /// See [`UpdateKeyConfig`].
    UpdateKeyConfig(UpdateKeyConfig),
    /// See [`DeleteKey`].
    DeleteKey(DeleteKey),
    /// See [`SetVersionState`].
    SetVersionState(SetVersionState),
    /// See [`CreateJoinToken`].
    CreateJoinToken(CreateJoinToken),
    /// See [`UseJoinToken`].
    UseJoinToken(UseJoinToken),
    /// See [`InitClusterWithIdentity`].
    InitClusterWithIdentity(InitClusterWithIdentity),
    /// See [`CreateToken`].
    CreateToken(CreateToken),
    /// See [`RenewToken`].
    RenewToken(RenewToken),
    /// See [`RevokeToken`].
    RevokeToken(RevokeToken),
    /// See [`ExpireTokens`].
    ExpireTokens(ExpireTokens),
    /// See [`PutPolicy`].
    PutPolicy(PutPolicy),
    /// See [`DeletePolicy`].
    DeletePolicy(DeletePolicy),
    /// See [`PutCertRole`].
    PutCertRole(PutCertRole),
    /// See [`DeleteCertRole`].
    DeleteCertRole(DeleteCertRole),
    /// See [`PutStaged`]: what nodes now propose for a put.
    PutStaged(PutStaged),
    /// See [`Rotation`].
    Rotation(Rotation),
}

/// A put that keeps the stage labels: its version becomes `CURRENT` and the old `CURRENT`
/// becomes `PREVIOUS` in this one operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutStaged {
    /// The put.
    pub put: PutSecret,
    /// How long `PREVIOUS` stays readable when the secret has no rotation config (0: until
    /// `CURRENT` moves again).
    pub default_grace_ms: u64,
}

/// A join token's SHA-256, or a service token's keyed hash: 32 bytes, checked when decoded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "serde_bytes::ByteBuf", into = "serde_bytes::ByteBuf")]
pub struct TokenHash(pub [u8; 32]);

impl TryFrom<serde_bytes::ByteBuf> for TokenHash {
    type Error = String;
    fn try_from(bytes: serde_bytes::ByteBuf) -> Result<Self, String> {
        let array: [u8; 32] =
            bytes.as_slice().try_into().map_err(|_| format!("a token hash is 32 bytes, not {}", bytes.len()))?;
        Ok(TokenHash(array))
    }
}

impl From<TokenHash> for serde_bytes::ByteBuf {
    fn from(hash: TokenHash) -> Self {
        serde_bytes::ByteBuf::from(hash.0.to_vec())
    }
}

/// Records a join token: only its SHA-256, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateJoinToken {
    /// SHA-256 of the token.
    pub hash: TokenHash,
    /// When it was created (the proposer's clock).
    pub created_at_ms: UnixMillis,
    /// After this, the token admits no one.
    pub expires_at_ms: UnixMillis,
}

/// Spends a join token on a node: applies once per token, before its expiry. The leader proposes
/// it, stamped with its own clock, before it admits the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UseJoinToken {
    /// SHA-256 of the token presented.
    pub hash: TokenHash,
    /// The joining node.
    pub node: crate::NodeId,
    /// When the leader checked it.
    pub at_ms: UnixMillis,
}

/// A join token as the replicated state keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTokenRecord {
    /// When it was created.
    pub created_at_ms: UnixMillis,
    /// When it stops admitting.
    pub expires_at_ms: UnixMillis,
    /// The node it admitted, once spent.
    pub used_by: Option<crate::NodeId>,
}

impl Op {
    /// What a request id carried by this operation is bound to.
    pub fn intent(&self) -> Intent {
        match self {
            Op::InitCluster(_) => Intent::InitCluster,
            Op::PutSecret(p) => Intent::PutSecret { path: p.path.clone() },
            Op::CreateKey(c) => Intent::CreateKey { name: c.name.clone() },
            Op::RotateKey(r) => Intent::RotateKey { name: r.name.clone() },
            Op::UpdateKeyConfig(u) => Intent::UpdateKeyConfig { name: u.name.clone() },
            Op::DeleteKey(d) => Intent::DeleteKey { name: d.name.clone() },
            Op::SetVersionState(s) => {
                Intent::SetVersionState { path: s.path.clone(), state: s.state, versions: s.versions.clone() }
            }
            Op::CreateJoinToken(_) => Intent::CreateJoinToken,
            Op::UseJoinToken(u) => Intent::UseJoinToken { node: u.node },
            Op::InitClusterWithIdentity(_) => Intent::InitCluster,
            Op::CreateToken(c) => Intent::Identity { change: format!("creating token {}", c.record.accessor) },
            Op::RenewToken(_) => Intent::Identity { change: "renewing a token".into() },
            Op::RevokeToken(_) => Intent::Identity { change: "revoking a token".into() },
            Op::ExpireTokens(_) => Intent::Identity { change: "expiring tokens".into() },
            Op::PutPolicy(p) => Intent::Identity { change: format!("writing policy {}", p.record.name) },
            Op::DeletePolicy(d) => Intent::Identity { change: format!("deleting policy {}", d.name) },
            Op::PutCertRole(p) => Intent::Identity { change: format!("writing login role {}", p.record.name) },
            Op::DeleteCertRole(d) => Intent::Identity { change: format!("deleting login role {}", d.name) },
            Op::PutStaged(p) => Intent::PutSecret { path: p.put.path.clone() },
            Op::Rotation(r) => Intent::Rotation { path: r.path.clone() },
        }
    }

    /// Bytes the operation adds to an entry, roughly: what makes batches large.
    pub(crate) fn weight(&self) -> usize {
        match self {
            Op::PutSecret(p) | Op::PutStaged(PutStaged { put: p, .. }) => {
                p.path.as_str().len() + p.sealed.ciphertext.len() + p.sealed.wrapped_data_key.len() + 64
            }
            Op::Rotation(r) => match &r.op {
                crate::rotation::RotationOp::CreatePending { sealed, .. } => {
                    r.path.as_str().len() + sealed.ciphertext.len() + sealed.wrapped_data_key.len() + 64
                }
                _ => 256,
            },
            Op::CreateKey(c) => {
                c.name.as_str().len() + c.record.versions.values().map(|v| v.wrapped.len() + 64).sum::<usize>()
            }
            Op::RotateKey(r) => r.name.as_str().len() + r.material.wrapped.len() + 64,
            Op::SetVersionState(s) => s.path.as_str().len() + s.versions.len() * 8 + 32,
            Op::PutPolicy(p) => p.record.document.len() + 64,
            Op::ExpireTokens(e) => e.hashes.len() * 33 + 16,
            Op::InitCluster(_)
            | Op::UpdateKeyConfig(_)
            | Op::DeleteKey(_)
            | Op::CreateJoinToken(_)
            | Op::UseJoinToken(_)
            | Op::InitClusterWithIdentity(_)
            | Op::CreateToken(_)
            | Op::RenewToken(_)
            | Op::RevokeToken(_)
            | Op::DeletePolicy(_)
            | Op::PutCertRole(_)
            | Op::DeleteCertRole(_) => 256,
        }
    }
}

/// The kind and target of a write, which a request id is bound to. A retry reseals a put's value
/// and picks its version again, so neither is part of a put's intent; the versions a delete,
/// undelete or destroy names are (the node resolves a retried "current version" to the versions
/// its first attempt named, see `StateReader::request_intent`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Initialise the cluster.
    InitCluster,
    /// Put a version of the secret at `path`.
    PutSecret {
        /// The secret path.
        path: SecretPath,
    },
    /// Create the key `name`.
    CreateKey {
        /// The key name.
        name: KeyName,
    },
    /// Rotate the key `name`.
    RotateKey {
        /// The key name.
        name: KeyName,
    },
    /// Change the config of the key `name`.
    UpdateKeyConfig {
        /// The key name.
        name: KeyName,
    },
    /// Delete the key `name`.
    DeleteKey {
        /// The key name.
        name: KeyName,
    },
    /// Delete, undelete or destroy versions of the secret at `path`.
    SetVersionState {
        /// The secret path.
        path: SecretPath,
        /// The target state.
        state: VersionState,
        /// The versions.
        versions: Vec<SecretVersion>,
    },
    /// Create a join token.
    CreateJoinToken,
    /// Admit a node with a join token.
    UseJoinToken {
        /// The node.
        node: crate::NodeId,
    },
    /// Change tokens, policies or login roles.
    Identity {
        /// What, for a person.
        change: String,
    },
    /// Change the rotation of the secret at `path`.
    Rotation {
        /// The secret path.
        path: SecretPath,
    },
}

impl std::fmt::Display for Intent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Intent::InitCluster => write!(f, "initialising the cluster"),
            Intent::PutSecret { path } => write!(f, "a put to secret {path}"),
            Intent::CreateKey { name } => write!(f, "creating key {name}"),
            Intent::RotateKey { name } => write!(f, "rotating key {name}"),
            Intent::UpdateKeyConfig { name } => write!(f, "changing the config of key {name}"),
            Intent::DeleteKey { name } => write!(f, "deleting key {name}"),
            Intent::SetVersionState { path, state, versions } => {
                write!(f, "{state} versions {versions:?} of secret {path}")
            }
            Intent::CreateJoinToken => write!(f, "creating a join token"),
            Intent::UseJoinToken { node } => write!(f, "admitting node {node} with a join token"),
            Intent::Identity { change } => f.write_str(change),
            Intent::Rotation { path } => write!(f, "the rotation of secret {path}"),
        }
    }
}

/// Records the cluster's identity, its root key's check value and the first keyring key. Applied
/// once; a second one is rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitCluster {
    /// The cluster record.
    pub cluster: ClusterRecord,
    /// The first keyring key, wrapped by the HSM root key.
    pub keyring: KeyringRecord,
}

/// Writes a new version of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutSecret {
    /// Format 1's idempotency key (bound to nothing, and any string of up to 128 bytes then);
    /// proposers now leave it `None` and set [`Write::request_id`].
    pub request_id: Option<String>,
    /// The secret path.
    pub path: SecretPath,
    /// The version this write creates. The proposer sealed the value for this number, so it
    /// applies only if the secret's current version is exactly `version - 1`.
    pub version: SecretVersion,
    /// The client's check-and-set: the current version must equal it (0: no secret yet).
    pub cas: Option<SecretVersion>,
    /// A new `max_versions` for the secret; `None` keeps the secret's setting.
    pub max_versions: Option<u32>,
    /// The default `max_versions` of a new secret, from the proposer's config.
    pub default_max_versions: u32,
    /// The sealed value.
    pub sealed: SealedValue,
    /// Proposer's wall-clock time.
    pub at_ms: UnixMillis,
}

/// Creates a named key (Keys service) with its first version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKey {
    /// The key name.
    pub name: KeyName,
    /// The key's record, its version 1 wrapped by a keyring key.
    pub record: NamedKeyRecord,
}

/// Adds a version to a named key and makes it primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotateKey {
    /// The key name.
    pub name: KeyName,
    /// The new version number; applies only if the key's newest version is `version - 1`.
    pub version: KeyVersion,
    /// The new version, wrapped by a keyring key.
    pub material: KeyVersionRecord,
}

/// Changes a named key's config; `None` fields stay as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateKeyConfig {
    /// The key name.
    pub name: KeyName,
    /// New minimum version that may decrypt or verify; only ever moves forward.
    pub min_decryption_version: Option<KeyVersion>,
    /// Format 1 only, and ignored: encryption and signing always use the primary version, so a
    /// minimum for them never had an effect. Proposers leave it `None`.
    pub min_encryption_version: Option<KeyVersion>,
    /// Whether DeleteKey is allowed.
    pub deletion_allowed: Option<bool>,
    /// Rotation period in milliseconds (0: none).
    pub auto_rotate_period_ms: Option<u64>,
}

/// Deletes a named key and all its versions (only if its config allows it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteKey {
    /// The key name.
    pub name: KeyName,
}

/// Changes the state of versions of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetVersionState {
    /// The secret path.
    pub path: SecretPath,
    /// The versions to change. Proposers resolve "the current version" to its number before
    /// proposing, so a retried delete never reaches a version written after it; format 1 used an
    /// empty list for the current version, which still applies that way.
    pub versions: Vec<SecretVersion>,
    /// The new state.
    pub state: VersionState,
    /// Proposer's wall-clock time.
    pub at_ms: UnixMillis,
}

/// The target state of a [`SetVersionState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionState {
    /// Soft-deleted: unreadable until undeleted.
    Deleted,
    /// Readable again.
    Undeleted,
    /// Ciphertext and wrapped data key removed for good.
    Destroyed,
}

impl std::fmt::Display for VersionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VersionState::Deleted => "deleting",
            VersionState::Undeleted => "undeleting",
            VersionState::Destroyed => "destroying",
        })
    }
}

/// What applying an entry produced.
///
/// # Format
/// Indexes 0 to 3 are format 1; [`Outcome`] repeats 0 to 2, so a batch's answer decodes either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The command changed the state (or was a no-op such as a membership entry).
    Applied,
    /// A secret version was written.
    Put {
        /// The new version.
        version: SecretVersion,
        /// Its creation time.
        created_at_ms: UnixMillis,
    },
    /// The command was refused and changed nothing.
    Rejected(Rejection),
    /// One outcome per operation of a [`Command::Batch`] or [`Command::Writes`], in order.
    Batch(Vec<Outcome>),
}

/// What applying one operation produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The operation changed the state.
    Applied,
    /// A secret version was written.
    Put {
        /// The new version.
        version: SecretVersion,
        /// Its creation time.
        created_at_ms: UnixMillis,
    },
    /// The operation was refused and changed nothing.
    Rejected(Rejection),
}

impl From<Outcome> for Response {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Applied => Response::Applied,
            Outcome::Put { version, created_at_ms } => Response::Put { version, created_at_ms },
            Outcome::Rejected(r) => Response::Rejected(r),
        }
    }
}

/// Why an operation was refused. Deterministic: every node refuses the same operation the same
/// way. Variants are only ever appended (postcard encodes the index).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// The client's check-and-set did not match.
    #[error("check-and-set failed: expected version {expected}, current version is {current}")]
    CasMismatch {
        /// The version the client expected.
        expected: SecretVersion,
        /// The secret's current version (0: no secret).
        current: SecretVersion,
    },
    /// Another write took the version this secret put was sealed for; the proposer seals again.
    #[error("version {version} was taken by a concurrent write (current version is {current})")]
    VersionTaken {
        /// The version this write was sealed for.
        version: SecretVersion,
        /// The secret's current version.
        current: SecretVersion,
    },
    /// No secret at the path.
    #[error("no secret at {path}")]
    SecretNotFound {
        /// The path.
        path: String,
    },
    /// The version does not exist (never written, or pruned by max_versions).
    #[error("secret {path} has no version {version}")]
    VersionNotFound {
        /// The path.
        path: String,
        /// The version.
        version: SecretVersion,
    },
    /// A destroyed version cannot be restored.
    #[error("version {version} of secret {path} is destroyed and cannot be restored")]
    VersionDestroyed {
        /// The path.
        path: String,
        /// The version.
        version: SecretVersion,
    },
    /// The cluster was initialised already.
    #[error("the cluster is already initialised")]
    AlreadyInitialized,
    /// A named key with this name exists.
    #[error("a key named {name} exists already")]
    KeyExists {
        /// The name.
        name: String,
    },
    /// No named key with this name.
    #[error("no key named {name}")]
    KeyNotFound {
        /// The name.
        name: String,
    },
    /// Format 1's refusal of a key config change, in words; no longer produced (see
    /// [`Rejection::KeyRule`]).
    #[error("{rule}")]
    KeyConfigRefused {
        /// The rule, in words.
        rule: String,
    },
    /// Format 1: a batch inside a batch. A batch can no longer hold one, so this is no longer produced.
    #[error("a batch of writes may not contain another batch")]
    NestedBatch,
    /// A named key's config change or deletion breaks a rule.
    #[error("{0}")]
    KeyRule(KeyRule),
    /// The secret has reached the largest version number.
    #[error("secret {path} has reached the largest version number")]
    SecretVersionsExhausted {
        /// The path.
        path: String,
    },
    /// The named key has reached the largest version number.
    #[error("key {name} has reached the largest version number")]
    KeyVersionsExhausted {
        /// The name.
        name: String,
    },
    /// The request id was first applied with another write.
    #[error("request_id {request_id:?} was already used for {first}; use a new request_id for {now}")]
    RequestIdReused {
        /// The request id.
        request_id: RequestId,
        /// What it was first used for.
        first: Intent,
        /// What it was used for now.
        now: Intent,
    },
    /// Another rotation took the version this one was made for; the proposer rotates again.
    /// (Format 1 answered this with [`Rejection::VersionTaken`].)
    #[error("version {version} of key {name} was taken by a concurrent rotation (primary version is {current})")]
    KeyVersionTaken {
        /// The key.
        name: String,
        /// The version this rotation made.
        version: KeyVersion,
        /// The key's primary version.
        current: KeyVersion,
    },
    /// A join token that admits no one.
    #[error("{0}")]
    JoinToken(JoinTokenRefusal),
    /// A token with this hash or accessor exists (a random collision: the proposer makes another).
    #[error("a token with this hash or accessor exists")]
    TokenExists,
    /// The token (or the parent a new token was made under) is revoked, expired or unknown.
    #[error("the token is revoked, expired or unknown")]
    TokenNotFound,
    /// The token is not renewable, or the renewal would pass its maximum life.
    #[error("the token is not renewable, or not that far: its maximum life is fixed when it is made")]
    TokenNotRenewable,
    /// No policy has this name.
    #[error("no policy is named {name:?}")]
    PolicyNotFound {
        /// The name.
        name: String,
    },
    /// No login role has this name.
    #[error("no login role is named {name:?}")]
    RoleNotFound {
        /// The name.
        name: String,
    },
    /// The secret has no rotation config.
    #[error("secret {path} has no rotation config (set one with: coffer secret rotation configure {path} ...)")]
    RotationNotConfigured {
        /// The path.
        path: String,
    },
    /// A rotation of the secret is running.
    #[error(
        "a rotation of secret {path} is in progress (rotation {id}, step {step}, attempt {attempt}); wait for it to finish, or clear it with: coffer secret rotation cancel {path}"
    )]
    RotationInProgress {
        /// The path.
        path: String,
        /// The running rotation.
        id: u64,
        /// Its step.
        step: String,
        /// Its attempt at the step.
        attempt: u32,
    },
    /// A rotation step named a rotation or step the secret is no longer at (a retry that applied
    /// already, or a deposed leader's step).
    #[error("the rotation of secret {path} has moved on: {state}")]
    RotationMoved {
        /// The path.
        path: String,
        /// Where it stands, in words.
        state: String,
    },
    /// Cancel with no rotation running or failed.
    #[error("secret {path} has no running or failed rotation to cancel")]
    NoRotationToCancel {
        /// The path.
        path: String,
    },
}

/// Why a join token admits no one. None of these says whether some other token exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JoinTokenRefusal {
    /// No token with this hash was created.
    #[error("the join token is not one this cluster issued (create one with: coffer operator join-token create)")]
    Unknown,
    /// The token's time is up.
    #[error("the join token expired at {expired_at_ms} ms since the epoch; create a new one")]
    Expired {
        /// When it expired.
        expired_at_ms: UnixMillis,
    },
    /// The token admitted a node already; tokens are single-use.
    #[error("the join token was already used (by node {by}); tokens are single-use, create a new one")]
    Used {
        /// The node it admitted.
        by: crate::NodeId,
    },
}

/// A rule of a named key's config that a change would break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KeyRule {
    /// A minimum version above the primary version would retire every version.
    #[error("min_decryption_version {min} of key {name} cannot exceed its primary version {primary}")]
    MinAbovePrimary {
        /// The key.
        name: String,
        /// The minimum asked for.
        min: KeyVersion,
        /// The primary version.
        primary: KeyVersion,
    },
    /// `min_decryption_version` only moves forward: versions below it may have been erased.
    #[error(
        "min_decryption_version of key {name} is {current} and only moves forward; {asked} would bring back retired versions"
    )]
    MinDecryptionBackwards {
        /// The key.
        name: String,
        /// Its minimum now.
        current: KeyVersion,
        /// The minimum asked for.
        asked: KeyVersion,
    },
    /// The key's config does not allow deletion.
    #[error("key {name} does not allow deletion (set deletion_allowed first)")]
    DeletionNotAllowed {
        /// The key.
        name: String,
    },
}

/// A secret value sealed by the node that received it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedValue {
    /// The keyring key version that wrapped the data key.
    pub keyring_version: KeyringVersion,
    /// The data key, sealed by the keyring key (nonce, ciphertext, tag).
    #[serde(with = "serde_bytes")]
    pub wrapped_data_key: Vec<u8>,
    /// The value, sealed by the data key (ciphertext, tag).
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for SealedValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedValue")
            .field("keyring_version", &self.keyring_version)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// The cluster's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// A random id chosen at init.
    pub cluster_id: String,
    /// The key check value of the HSM root key every node must hold.
    pub root_kcv: String,
    /// When the cluster was initialised.
    pub created_at_ms: UnixMillis,
}

/// A keyring key, wrapped by the HSM root key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringRecord {
    /// The keyring key version.
    pub version: KeyringVersion,
    /// The key, wrapped by the root key inside the HSM (RFC 5649).
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
    /// When it was created.
    pub created_at_ms: UnixMillis,
}

/// A secret's metadata: its versions and their states, without values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    /// The newest version number ever written (versions are never reused).
    pub current_version: SecretVersion,
    /// How many versions are kept.
    pub max_versions: u32,
    /// When the first version was written.
    pub created_at_ms: UnixMillis,
    /// When the secret last changed.
    pub updated_at_ms: UnixMillis,
    /// The kept versions, oldest first.
    pub versions: BTreeMap<SecretVersion, VersionMeta>,
}

/// One version's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// When it was written.
    pub created_at_ms: UnixMillis,
    /// When it was soft-deleted, if it is.
    pub deleted_at_ms: Option<UnixMillis>,
    /// Whether its ciphertext was destroyed.
    pub destroyed: bool,
}

/// The kinds of named keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamedKeyType {
    /// AES-256-GCM encryption.
    Aes256Gcm,
    /// Ed25519 signatures.
    Ed25519,
    /// ECDSA P-256 with SHA-256 signatures.
    EcdsaP256,
    /// HMAC-SHA-256.
    HmacSha256,
}

/// A named key of the Keys service: its config and every version, wrapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedKeyRecord {
    /// The kind of key.
    pub key_type: NamedKeyType,
    /// Whether the key material may ever be exported; fixed at creation.
    pub exportable: bool,
    /// When the key was created.
    pub created_at_ms: UnixMillis,
    /// Versions below this may not decrypt or verify.
    pub min_decryption_version: KeyVersion,
    /// Format 1 only, and without effect: encryption and signing always use the primary version.
    pub min_encryption_version: KeyVersion,
    /// Whether DeleteKey is allowed.
    pub deletion_allowed: bool,
    /// Rotation period in milliseconds (0: none).
    pub auto_rotate_period_ms: u64,
    /// Every version, oldest first; the newest is primary.
    pub versions: BTreeMap<KeyVersion, KeyVersionRecord>,
    /// Bumped by every change: nodes compare it to know when their in-memory copy is stale.
    pub generation: u64,
}

/// One version of a named key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersionRecord {
    /// When it was created.
    pub created_at_ms: UnixMillis,
    /// The keyring key version that wrapped it.
    pub keyring_version: KeyringVersion,
    /// The key material, sealed by the keyring key (nonce, ciphertext, tag).
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
    /// The public key of a signing key; empty otherwise.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
}

impl std::fmt::Debug for KeyVersionRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyVersionRecord").field("keyring_version", &self.keyring_version).finish_non_exhaustive()
    }
}

impl NamedKeyRecord {
    /// The primary (newest) version number.
    pub fn primary(&self) -> KeyVersion {
        self.versions.keys().next_back().copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SealedValue` as it was before its byte fields were marked `serde_bytes`.
    #[derive(Serialize)]
    struct PlainSealedValue {
        keyring_version: u32,
        wrapped_data_key: Vec<u8>,
        ciphertext: Vec<u8>,
    }

    #[test]
    fn byte_fields_keep_their_postcard_encoding() -> Result<(), postcard::Error> {
        // serde_bytes encodes a whole slice at once instead of byte by byte; postcard writes both
        // as a varint length and the raw bytes, so stored logs and state read back unchanged.
        let sealed = SealedValue {
            keyring_version: KeyringVersion(3),
            wrapped_data_key: vec![7; 60],
            ciphertext: (0..=255).collect(),
        };
        let plain = PlainSealedValue {
            keyring_version: 3,
            wrapped_data_key: sealed.wrapped_data_key.clone(),
            ciphertext: sealed.ciphertext.clone(),
        };
        let bytes = postcard::to_allocvec(&sealed)?;
        assert_eq!(bytes, postcard::to_allocvec(&plain)?);
        assert_eq!(postcard::from_bytes::<SealedValue>(&bytes)?, sealed);
        Ok(())
    }

    /// Issue #10: a `ClientWrite` of the bytes `7, 1` repeated (a batch holding a batch holding a
    /// batch…) overflowed the stack while decoding. Nothing decodes deeper than two levels now,
    /// whether it arrives as a forwarded command, inside a log entry, or as a reply.
    #[test]
    fn a_nested_batch_does_not_decode_and_does_not_recurse() {
        let nested = [7u8, 1].repeat(200_000);
        assert!(postcard::from_bytes::<Command>(&nested).is_err());
        // A log entry: log id (term, node, index), payload Normal (1), then the command.
        let mut entry = vec![1u8, 1, 1, 1];
        entry.extend_from_slice(&nested);
        assert!(postcard::from_bytes::<openraft::Entry<crate::TypeConfig>>(&entry).is_err());
        // A reply: Response::Batch (3) of one Outcome whose index 3 does not exist.
        assert!(postcard::from_bytes::<Response>(&[3u8, 1].repeat(200_000)).is_err());
        // Writes (8) of one write without a request id (0) whose op is a batch (7): refused too.
        assert!(postcard::from_bytes::<Command>(&[8u8, 1, 0, 7, 1, 7, 1, 7, 1]).is_err());
    }
}
