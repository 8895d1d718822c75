//! The node's one error type and its one mapping to a gRPC status.

use coffer_hsm::HsmError;
use coffer_raft::{KeyVersion, SecretVersion};

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
        version: SecretVersion,
    },
    /// The version is soft-deleted.
    #[error("version {version} of secret {path} is deleted (Undelete restores it)")]
    VersionDeleted {
        /// The path.
        path: String,
        /// The version.
        version: SecretVersion,
    },
    /// The version was destroyed.
    #[error("version {version} of secret {path} is destroyed; its value is gone for good")]
    VersionDestroyed {
        /// The path.
        path: String,
        /// The version.
        version: SecretVersion,
    },
    /// A stage label that points at no readable version.
    #[error("secret {path} has no {stage} version: {why}")]
    StageEmpty {
        /// The path.
        path: String,
        /// The label.
        stage: coffer_raft::Stage,
        /// Why, and what to do.
        why: String,
    },
    /// A Watch asked for a revision no longer kept (the message names the oldest kept).
    #[error("{0}")]
    OutOfRange(String),
    /// The secret's rotation is not in a state that allows the request (named in the message).
    #[error("{0}")]
    RotationState(String),
    /// A rotation step lost a race with another leader's step; the worker reads the state again.
    #[error("{0}")]
    RotationMoved(String),
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
        version: KeyVersion,
    },
    /// The version is below the key's `min_decryption_version`.
    #[error(
        "version {version} of key {name} is retired: min_decryption_version is {min}; rewrap old ciphertexts first"
    )]
    KeyVersionRetired {
        /// The key name.
        name: String,
        /// The version asked for.
        version: KeyVersion,
        /// The key's min_decryption_version.
        min: KeyVersion,
    },
    /// A ciphertext failed authentication under the key (altered, other associated data, other key).
    #[error("the ciphertext does not decrypt under key {name} with this associated data")]
    CiphertextInvalid {
        /// The key name.
        name: String,
    },
    /// A key config change or deletion broke a rule.
    #[error("{0}")]
    KeyRule(coffer_raft::KeyRule),
    /// The request id was first used with another write.
    #[error("request_id {request_id:?} was already used for {first}; use a new request_id for {now}")]
    RequestIdReused {
        /// The request id.
        request_id: String,
        /// What it was first used for.
        first: Box<coffer_raft::Intent>,
        /// What it is used for now.
        now: Box<coffer_raft::Intent>,
    },
    /// The key has as many versions as a key may have (`limits.max-key-versions`).
    #[error(
        "key {name} has {versions} versions, the most a key may have (limits.max-key-versions; every version is read \
         on every call): create a new key and move to it"
    )]
    KeyVersionsCapped {
        /// The key.
        name: String,
        /// How many it has.
        versions: usize,
    },
    /// A secret or key has reached the largest version number.
    #[error("{what} has reached the largest version number; write to a new path or key")]
    VersionsExhausted {
        /// The secret or key, in words.
        what: String,
    },
    /// A check-and-set did not match.
    #[error("check-and-set failed: expected version {expected}, current version is {current}")]
    CasMismatch {
        /// The version the client expected.
        expected: SecretVersion,
        /// The current version (0: no secret).
        current: SecretVersion,
    },
    /// Concurrent writers kept taking the version this write was sealed for.
    #[error("too many concurrent writes to {target}; retry")]
    Contended {
        /// The secret path or key name.
        target: String,
    },
    /// Replication failed or refused: no leader, no quorum, too stale, shutting down, a join
    /// refused, storage (see [`coffer_raft::Error`]).
    #[error(transparent)]
    Replica(#[from] coffer_raft::Error),
    /// The listener or the gRPC server failed.
    #[error("serving gRPC: {0}")]
    Serve(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A cluster change from a caller without an operator certificate.
    #[error(
        "{action} needs an operator certificate (coffer operator tls issue operator); this call came with {presented}"
    )]
    OperatorRequired {
        /// What was asked.
        action: &'static str,
        /// What the caller presented, in words.
        presented: String,
    },
    /// The call carries no credential Coffer accepts (no token, a malformed, unknown, revoked or
    /// expired one, a client certificate no login role admits).
    #[error("{reason}")]
    Unauthenticated {
        /// What was wrong, in words (never the token).
        reason: String,
    },
    /// This node cannot check credentials now: it has not heard from the leader within
    /// `crypto-staleness`, so a revocation may not have reached it.
    #[error("{reason}")]
    AuthUnavailable {
        /// Why, in words.
        reason: String,
    },
    /// The caller's policies do not allow this capability on this path.
    #[error("permission denied: {capability} on {path} (`coffer policy explain {path} {capability}` shows why)")]
    PermissionDenied {
        /// The capability asked for.
        capability: crate::auth::Capability,
        /// The path it was asked on.
        path: String,
    },
    /// The token is revoked, expired or unknown (a lookup, renewal or revocation of it).
    #[error("the token is revoked, expired or unknown")]
    TokenNotFound,
    /// The token is not renewable, or not that far.
    #[error("the token is not renewable, or not past its maximum life (fixed when it was made)")]
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
    /// The caller went over its rate limit; `retry_after` says when the next call fits.
    #[error("rate limit exceeded for this token; retry after {} ms", retry_after.as_millis())]
    RateLimited {
        /// How long until a call is allowed again.
        retry_after: std::time::Duration,
    },
    /// A server limit was reached (a queue full, too many streams, a stream too long).
    #[error("{limit}")]
    Overloaded {
        /// Which limit, in words.
        limit: String,
    },
    /// The TLS files cannot be used (missing, exposed key, mismatched pair).
    #[error(transparent)]
    Tls(#[from] coffer_tls::Error),
    /// The state answered a write with an outcome its proposer cannot have caused: a broken
    /// invariant.
    #[error("unexpected outcome of {what}: {outcome:?}")]
    Unexpected {
        /// The write.
        what: &'static str,
        /// What it was answered with.
        outcome: Box<coffer_raft::Outcome>,
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
    /// Stored ciphertext failed to open.
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
}

impl Error {
    /// The node's error for a refusal by the replicated state that no use case handles itself.
    pub(crate) fn rejected(rejection: coffer_raft::Rejection) -> Error {
        use coffer_raft::Rejection as R;
        match rejection {
            R::CasMismatch { expected, current } => Error::CasMismatch { expected, current },
            R::SecretNotFound { path } => Error::SecretNotFound { path },
            R::VersionNotFound { path, version } => Error::VersionNotFound { path, version },
            R::VersionDestroyed { path, version } => Error::VersionDestroyed { path, version },
            R::AlreadyInitialized => coffer_raft::Error::AlreadyInitialized.into(),
            R::KeyExists { name } => Error::KeyExists { name },
            R::KeyNotFound { name } => Error::KeyNotFound { name },
            R::KeyRule(rule) => Error::KeyRule(rule),
            R::SecretVersionsExhausted { path } => Error::VersionsExhausted { what: format!("secret {path}") },
            R::KeyVersionsExhausted { name } => Error::VersionsExhausted { what: format!("key {name}") },
            R::RequestIdReused { request_id, first, now } => {
                Error::RequestIdReused { request_id: request_id.into(), first: Box::new(first), now: Box::new(now) }
            }
            R::TokenNotFound => Error::TokenNotFound,
            R::TokenNotRenewable => Error::TokenNotRenewable,
            R::PolicyNotFound { name } => Error::PolicyNotFound { name },
            R::RoleNotFound { name } => Error::RoleNotFound { name },
            r @ (R::RotationNotConfigured { .. } | R::RotationInProgress { .. } | R::NoRotationToCancel { .. }) => {
                Error::RotationState(r.to_string())
            }
            r @ R::RotationMoved { .. } => Error::RotationMoved(r.to_string()),
            // Proposers retry these themselves, or never cause them (format 1 only).
            other @ (R::VersionTaken { .. }
            | R::TokenExists
            | R::KeyVersionTaken { .. }
            | R::KeyConfigRefused { .. }
            | R::NestedBatch
            | R::JoinToken(_)) => {
                Error::Unexpected { what: "a write", outcome: Box::new(coffer_raft::Outcome::Rejected(other)) }
            }
        }
    }
}

/// The one mapping from an error to what a client sees. Exhaustive, without a catch-all: a new
/// variant, here or in `coffer_raft::Error`, does not compile until its status is decided.
impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use coffer_raft::Error as R;
        use tonic::Code;
        let code = match &err {
            Error::InvalidArgument { .. } | Error::CiphertextInvalid { .. } | Error::RequestIdReused { .. } => {
                Code::InvalidArgument
            }
            Error::SecretNotFound { .. }
            | Error::KeyNotFound { .. }
            | Error::KeyVersionNotFound { .. }
            | Error::VersionNotFound { .. }
            | Error::VersionDeleted { .. }
            | Error::VersionDestroyed { .. }
            | Error::StageEmpty { .. } => Code::NotFound,
            Error::RotationState(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::RotationMoved(_) => Code::Aborted,
            Error::KeyExists { .. } => Code::AlreadyExists,
            Error::OperatorRequired { .. } | Error::PermissionDenied { .. } => Code::PermissionDenied,
            Error::Unauthenticated { .. } => Code::Unauthenticated,
            Error::TokenNotFound | Error::PolicyNotFound { .. } | Error::RoleNotFound { .. } => Code::NotFound,
            Error::TokenNotRenewable => Code::FailedPrecondition,
            Error::Overloaded { .. } => Code::ResourceExhausted,
            Error::AuthUnavailable { .. } => Code::Unavailable,
            Error::RateLimited { retry_after } => {
                let mut status = tonic::Status::resource_exhausted(err.to_string());
                let ms = retry_after.as_millis().max(1).to_string();
                if let Ok(value) = ms.parse() {
                    status.metadata_mut().insert(RETRY_AFTER_METADATA, value);
                }
                return status;
            }
            Error::CasMismatch { .. }
            | Error::KeyVersionRetired { .. }
            | Error::KeyRule(_)
            | Error::KeyVersionsCapped { .. } => Code::FailedPrecondition,
            Error::VersionsExhausted { .. } => Code::ResourceExhausted,
            Error::Contended { .. } => Code::Aborted,
            Error::Hsm(HsmError::Unavailable { .. } | HsmError::PoolStopped) => Code::Unavailable,
            Error::Hsm(HsmError::Busy { .. }) => Code::ResourceExhausted,
            Error::Replica(replica) => match replica {
                R::NotLeader { leader } => {
                    let mut status = tonic::Status::unavailable(err.to_string());
                    if let Some(addr) = leader.as_ref().and_then(|l| l.addr.client.parse().ok()) {
                        status.metadata_mut().insert(LEADER_METADATA, addr);
                    }
                    return status;
                }
                R::NoLeader
                | R::LeaderCutOff { .. }
                | R::NoQuorum
                | R::NotInitialized
                | R::ShuttingDown
                | R::Stale { .. }
                | R::NeverHeardFromLeader
                | R::OutcomeUnknown { .. }
                | R::LeadershipMoved { .. }
                | R::ReadIndexNotApplied { .. }
                | R::PeerUnreachable { .. }
                | R::HandoffBusy
                | R::Lagging { .. }
                | R::ElectionLost { .. } => Code::Unavailable,
                R::AlreadyInitialized
                | R::JoinRefused(_)
                | R::NotVoter { .. }
                | R::UnknownMember { .. }
                | R::LastVoter => Code::FailedPrecondition,
                R::BadPeerAddr { .. } | R::InvalidInput { .. } => Code::InvalidArgument,
                R::PeerUnauthenticated => Code::Unauthenticated,
                R::Overloaded { .. } => Code::ResourceExhausted,
                R::PeerMismatch { .. } | R::PeerNotMember { .. } => Code::PermissionDenied,
                R::Rocks { .. }
                | R::Decode { .. }
                | R::SnapshotIo { .. }
                | R::BadMessage { .. }
                | R::PeerInternal { .. }
                | R::Raft { .. } => Code::Internal,
            },
            Error::KcvMismatch { .. }
            | Error::Hsm(_)
            | Error::Envelope(_)
            | Error::Serve(_)
            | Error::Tls(_)
            | Error::Unexpected { .. } => Code::Internal,
        };
        if code == Code::Internal {
            // Details stay in the server log; the client gets an id to quote.
            let id = incident_id();
            tracing::error!(incident = %id, error = %err, "internal error");
            return tonic::Status::internal(format!("internal error (incident {id}; details are in the server log)"));
        }
        tonic::Status::new(code, err.to_string())
    }
}

/// The metadata key that carries, on a `RESOURCE_EXHAUSTED` for a rate limit, the milliseconds
/// until a call fits.
pub const RETRY_AFTER_METADATA: &str = "retry-after-ms";

/// The metadata key that carries the leader's address on a "not the leader" status.
pub const LEADER_METADATA: &str = "coffer-leader";

fn incident_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 6];
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    hex::encode(bytes)
}
