//! The identity domain's operations and records: tokens (kept only as a keyed hash), policies
//! (documents the node parses; the state keeps their text) and certificate login roles.
//!
//! The node computes every hash, accessor and time; this crate stores them and applies the
//! rules that must hold on every node: a child token needs a live parent, revoking a token
//! revokes its children, an expired or revoked token is gone from every index.

use serde::{Deserialize, Serialize};

use crate::{TokenHash, UnixMillis};

/// A token, as the replicated state keeps it: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The public id that lets an operator look up or revoke the token without knowing it.
    pub accessor: String,
    /// Attached policy names (`root` for the root token).
    pub policies: Vec<String>,
    /// The token that created it; `None` for the root token and orphans. Revoking the parent
    /// revokes this one.
    pub parent: Option<TokenHash>,
    /// Who it was made for: `root`, `token`, `cert:<identity>`, or a name the creator chose.
    pub display_name: String,
    /// When it was made (the proposer's clock).
    pub created_at_ms: UnixMillis,
    /// When it stops working; `None`: never (the root token).
    pub expires_at_ms: Option<UnixMillis>,
    /// How far renewals may push `expires_at_ms`; `None`: no limit.
    pub max_expires_at_ms: Option<UnixMillis>,
    /// The life a renewal gives, from the time of the renewal.
    pub ttl_ms: u64,
    /// Whether it may be renewed.
    pub renewable: bool,
}

/// Creates a token. Rejected when its hash is taken or its parent is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateToken {
    /// The keyed hash of the token.
    pub hash: TokenHash,
    /// What is kept of it.
    pub record: TokenRecord,
}

/// Moves a token's expiry, within its maximum, if it lives and is renewable at `at_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewToken {
    /// The keyed hash of the token.
    pub hash: TokenHash,
    /// The new expiry (the proposer caps it at the maximum; apply checks).
    pub expires_at_ms: UnixMillis,
    /// The proposer's clock.
    pub at_ms: UnixMillis,
}

/// Revokes a token and every token below it. Revoking a token that is gone applies (a retry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeToken {
    /// The keyed hash of the token.
    pub hash: TokenHash,
}

/// Revokes the listed tokens that have expired by `at_ms` (the leader's clock): the leader's
/// expiry sweep. A listed token that is gone or renewed past `at_ms` is left alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpireTokens {
    /// The leader's clock when it chose them.
    pub at_ms: UnixMillis,
    /// The tokens it found due.
    pub hashes: Vec<TokenHash>,
}

/// The key the node hashes tokens with, sealed by a keyring key, and the root token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapIdentity {
    /// The sealed hashing key.
    pub key: IdentityKeyRecord,
    /// The root token.
    pub root: CreateToken,
}

/// Records the cluster and its identity in one entry: a cluster never exists without its
/// token-hashing key and root token, so no later call can be the one that mints a root token.
/// Applied once; a second one is rejected and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitClusterWithIdentity {
    /// The cluster record and first keyring key.
    pub cluster: crate::InitCluster,
    /// The identity.
    pub identity: BootstrapIdentity,
}

/// The token-hashing key, sealed by a keyring key (AES-256-GCM, software).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityKeyRecord {
    /// The keyring key that sealed it.
    pub keyring_version: crate::KeyringVersion,
    /// Nonce ‖ ciphertext ‖ tag.
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

/// A policy as stored: its name and the document's text, as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    /// The name.
    pub name: String,
    /// The document (TOML or JSON), checked by the node before proposing.
    pub document: String,
    /// When it was last written.
    pub updated_at_ms: UnixMillis,
}

/// Writes (creates or replaces) a policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutPolicy {
    /// The policy.
    pub record: PolicyRecord,
}

/// Deletes a policy; tokens that name it keep the name and get nothing from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePolicy {
    /// The name.
    pub name: String,
}

/// A certificate login role: which client certificate identities it admits, and the policies
/// it gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRoleRecord {
    /// The name.
    pub name: String,
    /// Identities admitted: `spiffe://…` URIs, `dns:<name>`, or `cn:<name>`; a trailing `*`
    /// matches any rest.
    pub identities: Vec<String>,
    /// Policies given.
    pub policies: Vec<String>,
    /// The life of a token made by logging in.
    pub token_ttl_ms: u64,
    /// When it was last written.
    pub updated_at_ms: UnixMillis,
}

/// Writes (creates or replaces) a certificate login role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutCertRole {
    /// The role.
    pub record: CertRoleRecord,
}

/// Deletes a certificate login role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteCertRole {
    /// The name.
    pub name: String,
}
