//! The node's one error type and its one mapping to a gRPC status.

use coffer_hsm::HsmError;
use coffer_raft::StoreError;

use crate::envelope::EnvelopeError;

/// Everything a request or the start-up of a node can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The request broke an input rule (named in `rule`).
    #[error("{rule}")]
    InvalidArgument {
        /// The rule that was broken, in words.
        rule: String,
    },
    /// No secret at the path.
    #[error("no secret at {path}")]
    SecretNotFound {
        /// The path.
        path: String,
    },
    /// The version was never written, or was pruned by max_versions.
    #[error("secret {path} has no version {version} (never written, or pruned by max_versions)")]
    VersionNotFound {
        /// The path.
        path: String,
        /// The version.
        version: u64,
    },
    /// The version is soft-deleted.
    #[error("version {version} of secret {path} is deleted (Undelete restores it)")]
    VersionDeleted {
        /// The path.
        path: String,
        /// The version.
        version: u64,
    },
    /// The version was destroyed.
    #[error("version {version} of secret {path} is destroyed; its value is gone for good")]
    VersionDestroyed {
        /// The path.
        path: String,
        /// The version.
        version: u64,
    },
    /// No named key with this name.
    #[error("no key named {name}")]
    KeyNotFound {
        /// The name.
        name: String,
    },
    /// A named key with this name exists.
    #[error("a key named {name} exists already")]
    KeyExists {
        /// The name.
        name: String,
    },
    /// The key has no such version.
    #[error("key {name} has no version {version}")]
    KeyVersionNotFound {
        /// The key name.
        name: String,
        /// The version.
        version: u32,
    },
    /// The version is below the key's `min_decryption_version`.
    #[error(
        "version {version} of key {name} is retired: min_decryption_version is {min}; rewrap old ciphertexts first"
    )]
    KeyVersionRetired {
        /// The key name.
        name: String,
        /// The version asked for.
        version: u32,
        /// The key's min_decryption_version.
        min: u32,
    },
    /// A ciphertext failed authentication under the key (altered, other associated data, other key).
    #[error("the ciphertext does not decrypt under key {name} with this associated data")]
    CiphertextInvalid {
        /// The key name.
        name: String,
    },
    /// A key config change or deletion broke a rule.
    #[error("{rule}")]
    KeyRefused {
        /// The rule, in words.
        rule: String,
    },
    /// A check-and-set did not match.
    #[error("check-and-set failed: expected version {expected}, current version is {current}")]
    CasMismatch {
        /// The version the client expected.
        expected: u64,
        /// The current version (0: no secret).
        current: u64,
    },
    /// Concurrent writers kept taking the version this write was sealed for.
    #[error("too many concurrent writes to {path}; retry")]
    Contended {
        /// The path.
        path: String,
    },
    /// The node is part of a cluster already.
    #[error("this node is already part of a cluster")]
    AlreadyInitialized,
    /// The cluster refused to admit this node (a different root key).
    #[error("the cluster refused this node: {reason}")]
    JoinRefused {
        /// The leader's reason.
        reason: String,
    },
    /// This node cannot serve the request now (no leader, shutting down); the client may retry.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why, in words.
        reason: String,
    },
    /// The HSM's root key is not the one the cluster recorded.
    #[error(
        "the HSM root key (KCV {token}) is not the cluster's root key (KCV {recorded}, recorded at init); refusing to start. \
         Point hsm.token-label and hsm.root-key-label at the token that holds the cluster's root key"
    )]
    KcvMismatch {
        /// The KCV recorded in the cluster state.
        recorded: String,
        /// The KCV of the key in the configured token.
        token: String,
    },
    /// The HSM failed.
    #[error("HSM: {0}")]
    Hsm(#[from] HsmError),
    /// The store failed.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    /// Stored ciphertext failed to open.
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    /// Something failed that is not the client's to fix or retry (Raft, transport set-up, an
    /// invariant); details go to the server log.
    #[error("internal: {0}")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// The same failure for another caller of a shared operation (a write batch): errors hold no
    /// clonable sources, so anything but `Unavailable`, which callers retry on, is passed on as
    /// `Internal` with its message.
    pub(crate) fn for_another_caller(&self) -> Error {
        match self {
            Error::Unavailable { reason } => Error::Unavailable { reason: reason.clone() },
            Error::Hsm(HsmError::Unavailable { reason }) => Error::Unavailable { reason: format!("HSM: {reason}") },
            other => Error::Internal(other.to_string().into()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic::Status;
        match &err {
            Error::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
            Error::SecretNotFound { .. }
            | Error::KeyNotFound { .. }
            | Error::KeyVersionNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::VersionDeleted { .. }
            | Error::VersionDestroyed { .. } => Status::not_found(err.to_string()),
            Error::CiphertextInvalid { .. } => Status::invalid_argument(err.to_string()),
            Error::KeyExists { .. } => Status::already_exists(err.to_string()),
            Error::CasMismatch { .. }
            | Error::AlreadyInitialized
            | Error::JoinRefused { .. }
            | Error::KeyVersionRetired { .. }
            | Error::KeyRefused { .. } => Status::failed_precondition(err.to_string()),
            Error::Contended { .. } => Status::aborted(err.to_string()),
            Error::Unavailable { .. } | Error::Hsm(HsmError::Unavailable { .. } | HsmError::PoolStopped) => {
                Status::unavailable(err.to_string())
            }
            Error::KcvMismatch { .. } | Error::Hsm(_) | Error::Store(_) | Error::Envelope(_) | Error::Internal(_) => {
                // Details stay in the server log; the client gets an id to quote.
                let id = incident_id();
                tracing::error!(incident = %id, error = %err, "internal error");
                Status::internal(format!("internal error (incident {id}; details are in the server log)"))
            }
        }
    }
}

fn incident_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 6];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    hex::encode(bytes)
}
