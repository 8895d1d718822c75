//! The one replicated command type, its response, and the records the state machine stores.
//!
//! Every byte string here is ciphertext, a wrapped key or an identifier; never plaintext.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A client-chosen idempotency key: a retried write carrying the same id is applied once.
pub type RequestId = String;

/// A change to the replicated state. Built and stamped (times, ids) by the proposing node;
/// applied deterministically by every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Records the cluster's identity, its root key's check value and the first keyring key.
    /// Applied once; a second one is rejected.
    InitCluster {
        /// The cluster record.
        cluster: ClusterRecord,
        /// The first keyring key, wrapped by the HSM root key.
        keyring: KeyringRecord,
    },
    /// Writes a new version of a secret.
    PutSecret {
        /// Idempotency key, if the client gave one.
        request_id: Option<RequestId>,
        /// The secret path (validated by the proposer).
        path: String,
        /// The version this write creates. The proposer sealed the value for this number, so it
        /// applies only if the secret's current version is exactly `version - 1`.
        version: u64,
        /// The client's check-and-set: the current version must equal it (0: no secret yet).
        cas: Option<u64>,
        /// A new `max_versions` for the secret; `None` keeps the secret's setting.
        max_versions: Option<u32>,
        /// The default `max_versions` of a new secret, from the proposer's config.
        default_max_versions: u32,
        /// The sealed value.
        sealed: SealedValue,
        /// Proposer's wall-clock time, milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Creates a named key (Keys service) with its first version.
    CreateKey {
        /// The key name (validated by the proposer).
        name: String,
        /// The key's record, its version 1 wrapped by a keyring key.
        record: NamedKeyRecord,
    },
    /// Adds a version to a named key and makes it primary.
    RotateKey {
        /// The key name.
        name: String,
        /// The new version number; applies only if the key's newest version is `version - 1`.
        version: u32,
        /// The new version, wrapped by a keyring key.
        material: KeyVersionRecord,
    },
    /// Changes a named key's config; `None` fields stay as they are.
    UpdateKeyConfig {
        /// The key name.
        name: String,
        /// New minimum version that may decrypt or verify.
        min_decryption_version: Option<u32>,
        /// New minimum version that may encrypt or sign.
        min_encryption_version: Option<u32>,
        /// Whether DeleteKey is allowed.
        deletion_allowed: Option<bool>,
        /// Rotation period in milliseconds (0: none).
        auto_rotate_period_ms: Option<u64>,
    },
    /// Deletes a named key and all its versions (only if its config allows it).
    DeleteKey {
        /// The key name.
        name: String,
    },
    /// Changes the state of versions of a secret.
    SetVersionState {
        /// The secret path.
        path: String,
        /// The versions to change; empty means the current version.
        versions: Vec<u64>,
        /// The new state.
        state: VersionState,
        /// Proposer's wall-clock time, milliseconds since the Unix epoch.
        at_ms: u64,
    },
    /// Several commands in one log entry, applied in order, each as if it were its own entry (a
    /// rejected one changes nothing and does not affect the others); answered by
    /// [`Response::Batch`]. Proposers batch concurrent writes this way; a batch holds no batch.
    Batch(Vec<Command>),
}

/// The target state of a [`Command::SetVersionState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionState {
    /// Soft-deleted: unreadable until undeleted.
    Deleted,
    /// Readable again.
    Undeleted,
    /// Ciphertext and wrapped data key removed for good.
    Destroyed,
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The command changed the state (or was a no-op such as a membership entry).
    Applied,
    /// A secret version was written.
    Put {
        /// The new version.
        version: u64,
        /// Its creation time, milliseconds since the Unix epoch.
        created_at_ms: u64,
    },
    /// The command was refused and changed nothing.
    Rejected(Rejection),
    /// The responses to a [`Command::Batch`], in its order.
    Batch(Vec<Response>),
}

/// Why a command was refused. Deterministic: every node refuses the same command the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    /// The client's check-and-set did not match.
    #[error("check-and-set failed: expected version {expected}, current version is {current}")]
    CasMismatch {
        /// The version the client expected.
        expected: u64,
        /// The secret's current version (0: no secret).
        current: u64,
    },
    /// Another write took the version this one was sealed for; the proposer seals again.
    #[error("version {version} was taken by a concurrent write (current version is {current})")]
    VersionTaken {
        /// The version this write was sealed for.
        version: u64,
        /// The secret's current version.
        current: u64,
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
        version: u64,
    },
    /// A destroyed version cannot be restored.
    #[error("version {version} of secret {path} is destroyed and cannot be restored")]
    VersionDestroyed {
        /// The path.
        path: String,
        /// The version.
        version: u64,
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
    /// A named key's config change breaks a rule.
    #[error("{rule}")]
    KeyConfigRefused {
        /// The rule, in words.
        rule: String,
    },
    /// A [`Command::Batch`] inside a batch.
    #[error("a batch of writes may not contain another batch")]
    NestedBatch,
}

/// A secret value sealed by the node that received it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedValue {
    /// The keyring key version that wrapped the data key.
    pub keyring_version: u32,
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
    /// When the cluster was initialised, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// A keyring key, wrapped by the HSM root key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringRecord {
    /// The keyring key version.
    pub version: u32,
    /// The key, wrapped by the root key inside the HSM (RFC 5649).
    #[serde(with = "serde_bytes")]
    pub wrapped: Vec<u8>,
    /// When it was created, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// A secret's metadata: its versions and their states, without values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    /// The newest version number ever written (versions are never reused).
    pub current_version: u64,
    /// How many versions are kept.
    pub max_versions: u32,
    /// When the first version was written, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When the secret last changed, milliseconds since the Unix epoch.
    pub updated_at_ms: u64,
    /// The kept versions, oldest first.
    pub versions: BTreeMap<u64, VersionMeta>,
}

/// One version's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    /// When it was written, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When it was soft-deleted, if it is.
    pub deleted_at_ms: Option<u64>,
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
    /// When the key was created, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Versions below this may not decrypt or verify.
    pub min_decryption_version: u32,
    /// Versions below this may not encrypt or sign.
    pub min_encryption_version: u32,
    /// Whether DeleteKey is allowed.
    pub deletion_allowed: bool,
    /// Rotation period in milliseconds (0: none).
    pub auto_rotate_period_ms: u64,
    /// Every version, oldest first; the newest is primary.
    pub versions: BTreeMap<u32, KeyVersionRecord>,
    /// Bumped by every change: nodes compare it to know when their in-memory copy is stale.
    pub generation: u64,
}

/// One version of a named key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersionRecord {
    /// When it was created, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The keyring key version that wrapped it.
    pub keyring_version: u32,
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
    pub fn primary(&self) -> u32 {
        self.versions.keys().next_back().copied().unwrap_or(0)
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
        let sealed = SealedValue { keyring_version: 3, wrapped_data_key: vec![7; 60], ciphertext: (0..=255).collect() };
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
}
