// Hot path: secret put.
//! Put: validate, seal for the next version, propose, and reseal when a concurrent write took
//! that version.

use coffer_raft::{Command, Rejection, Response};
use zeroize::Zeroizing;

use crate::error::Error;
use crate::node::{now_ms, Node};
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
    /// The client's idempotency key, if any.
    pub request_id: Option<String>,
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
    pub version: u64,
    /// Its creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
}

/// Writes a new version.
///
/// # Errors
/// `InvalidArgument` (path, size, max_versions, request id), `CasMismatch`, `Contended`, or
/// `Unavailable` when no leader can take the write.
pub async fn put_secret(node: &Node, req: PutSecret) -> Result<Written, Error> {
    validate::path(&req.path)?;
    validate::value(&req.value, node.config.max_value_bytes)?;
    validate::max_versions(req.max_versions)?;
    if let Some(id) = &req.request_id {
        if id.len() > 128 {
            return Err(Error::InvalidArgument { rule: "request_id is longer than 128 bytes".into() });
        }
    }
    let ready = node.ready().await?;
    // Without CAS, the next version is a guess: the local current version, then whatever the state
    // machine reported as current when a concurrent write took the guessed one.
    let mut current = match req.cas {
        Some(cas) => cas,
        None => node.reader.secret(&req.path)?.map_or(0, |m| m.current_version),
    };
    for _ in 0..MAX_ATTEMPTS {
        let version = current + 1;
        let sealed = ready.keyring.seal(&req.path, version, &req.value)?;
        let command = Command::PutSecret {
            request_id: req.request_id.clone(),
            path: req.path.clone(),
            version,
            cas: req.cas,
            max_versions: req.max_versions,
            default_max_versions: node.config.default_max_versions,
            sealed,
            at_ms: now_ms(),
        };
        match node.propose(command).await? {
            Response::Put { version, created_at_ms } => return Ok(Written { version, created_at_ms }),
            Response::Rejected(Rejection::CasMismatch { expected, current }) => {
                return Err(Error::CasMismatch { expected, current })
            }
            // A concurrent write took the version: reseal for the one after the current.
            Response::Rejected(Rejection::VersionTaken { current: now, .. }) => current = now,
            other => return Err(Error::Internal(format!("unexpected response to PutSecret: {other:?}").into())),
        }
    }
    Err(Error::Contended { path: req.path })
}
