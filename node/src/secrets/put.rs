// Hot path: secret put.
//! Put: validate, seal for the next version, propose, and reseal when a concurrent write took
//! that version.

use coffer_raft::{Op, Outcome, Rejection, RequestId, SecretPath, SecretVersion, UnixMillis, Write};
use zeroize::Zeroizing;

use crate::error::Error;
use crate::node::Node;
use crate::validate;

/// How many times a put without CAS reseals after losing its version to a concurrent write.
const MAX_ATTEMPTS: usize = 32;

/// A put request, validated by [`put_secret`]. Its `Debug` never shows the value.
pub struct PutSecret {
    /// The secret path.
    pub path: String,
    /// The value; zeroized when dropped.
    pub value: Zeroizing<Vec<u8>>,
    /// Check-and-set: the current version must equal it (0: must not exist).
    pub cas: Option<u64>,
    /// A new `max_versions` for the secret.
    pub max_versions: Option<u32>,
    /// The client's idempotency key; empty: none.
    pub request_id: String,
}

impl std::fmt::Debug for PutSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PutSecret")
            .field("path", &self.path)
            .field("value", &"[redacted]")
            .field("cas", &self.cas)
            .field("max_versions", &self.max_versions)
            .field("request_id", &self.request_id)
            .finish()
    }
}

/// What a successful put returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The new version.
    pub version: SecretVersion,
    /// Its creation time, milliseconds since the Unix epoch.
    pub created_at_ms: UnixMillis,
}

/// Writes a new version.
///
/// # Errors
/// `InvalidArgument` (path, size, max_versions, cas, request id), `CasMismatch`,
/// `VersionsExhausted`, `Contended`, `RequestIdReused`, or a retryable replica error when no leader
/// can take the write.
pub async fn put_secret(node: &Node, req: PutSecret) -> Result<Written, Error> {
    let path = SecretPath::parse(&req.path)?;
    validate::value(&req.value, node.config.max_value_bytes)?;
    validate::max_versions(req.max_versions)?;
    let request_id = RequestId::parse(&req.request_id)?;
    if req.cas == Some(u64::MAX) {
        return Err(Error::InvalidArgument {
            rule: format!("cas {} is the largest version number; no version can follow it", u64::MAX),
        });
    }
    let ready = node.ready().await?;
    // Without CAS, the next version is a guess: the local current version, then whatever the state
    // machine reported as current when a concurrent write took the guessed one.
    let mut current = match req.cas {
        Some(cas) => SecretVersion(cas),
        None => node.reader().secret(&path)?.map_or(SecretVersion(0), |m| m.current_version),
    };
    for _ in 0..MAX_ATTEMPTS {
        let version = current.next().ok_or_else(|| Error::VersionsExhausted { what: format!("secret {path}") })?;
        let sealed = ready.keyring.seal(path.as_str(), version, &req.value)?;
        let put = coffer_raft::PutSecret {
            request_id: None,
            path: path.clone(),
            version,
            cas: req.cas.map(SecretVersion),
            max_versions: req.max_versions,
            default_max_versions: node.config.default_max_versions,
            sealed,
            at_ms: UnixMillis::now(),
        };
        let default_grace_ms = u64::try_from(crate::rotation::DEFAULT_GRACE.as_millis()).unwrap_or(u64::MAX);
        let op = Op::PutStaged(coffer_raft::PutStaged { put, default_grace_ms });
        match node.propose(Write { request_id: request_id.clone(), op }).await? {
            Outcome::Put { version, created_at_ms } => return Ok(Written { version, created_at_ms }),
            // A concurrent write took the version: reseal for the one after the current.
            Outcome::Rejected(Rejection::VersionTaken { current: now, .. }) => current = now,
            Outcome::Rejected(r) => return Err(Error::rejected(r)),
            other => return Err(Error::Unexpected { what: "PutSecret", outcome: Box::new(other) }),
        }
    }
    Err(Error::Contended { target: path.to_string() })
}
