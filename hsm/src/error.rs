//! The one error type of the HSM layer.

use std::path::PathBuf;

/// What went wrong while reaching or using the HSM.
///
/// Messages are written for the operator who has to fix the setup: each names what was looked for
/// and, where there is one, the command that fixes it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HsmError {
    /// Too many calls are waiting for an HSM session: shed rather than queued without bound.
    #[error("the HSM is busy ({capacity} calls waiting); retry with backoff")]
    Busy {
        /// How many may wait.
        capacity: usize,
    },
    /// No PKCS#11 module was configured and none was found in the usual places.
    #[error(
        "no PKCS#11 module found (looked in {}); install SoftHSM2 (`apt-get install softhsm2`) or set hsm.module",
        searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    ModuleNotFound {
        /// The paths that were tried.
        searched: Vec<PathBuf>,
    },
    /// The configured module could not be loaded or initialised.
    #[error("cannot load the PKCS#11 module {path}")]
    ModuleLoad {
        /// The module path.
        path: PathBuf,
        /// What the loader said.
        #[source]
        source: cryptoki::error::Error,
    },
    /// No initialised token carries the configured label.
    #[error("no HSM token labelled {label:?} (tokens present: {available:?}); create one with `softhsm2-util --init-token --free --label {label}`")]
    TokenNotFound {
        /// The label that was looked for.
        label: String,
        /// The labels of the tokens that do exist.
        available: Vec<String>,
    },
    /// `init-token` was asked to create a token whose label is taken.
    #[error("an HSM token labelled {label:?} exists already")]
    TokenExists {
        /// The label.
        label: String,
    },
    /// No slot offers an uninitialised token.
    #[error("the PKCS#11 module offers no free slot for a new token")]
    NoFreeSlot,
    /// The token refused the user PIN.
    #[error("the HSM token {label:?} refused the PIN (wrong PIN)")]
    WrongPin {
        /// The token label.
        label: String,
    },
    /// The PIN could not be read from its file or environment variable.
    #[error("cannot read the HSM PIN: {reason}")]
    PinUnavailable {
        /// Which source was tried and what went wrong.
        reason: String,
    },
    /// The root key is not in the token.
    #[error("no root key labelled {label:?} in HSM token {token:?}; create it with `coffer hsm init-root-key`")]
    RootKeyMissing {
        /// The root-key label.
        label: String,
        /// The token label.
        token: String,
    },
    /// More than one key carries the root-key label: which one is the root is ambiguous.
    #[error("{count} keys are labelled {label:?} in the HSM token; exactly one root key is expected")]
    RootKeyAmbiguous {
        /// The root-key label.
        label: String,
        /// How many objects carry it.
        count: usize,
    },
    /// The object under the root-key label is not safe or not usable as a root key.
    #[error("refusing to use the key labelled {label:?} as root key: {reason}")]
    RootKeyUnsafe {
        /// The root-key label.
        label: String,
        /// The attribute that disqualifies it.
        reason: &'static str,
    },
    /// `init-root-key` was asked to create a key that already exists.
    #[error("a root key labelled {label:?} already exists in HSM token {token:?}; refusing to replace it")]
    RootKeyExists {
        /// The root-key label.
        label: String,
        /// The token label.
        token: String,
    },
    /// A wrapped key failed its integrity check: it was altered, or wrapped by another root key.
    #[error("the wrapped key failed its integrity check (altered, or wrapped by a different root key)")]
    Integrity,
    /// A PKCS#11 call failed.
    #[error("PKCS#11 call failed")]
    Pkcs11(#[source] cryptoki::error::Error),
    /// The HSM cannot be reached (token gone, device down); also what an injected fault reports.
    #[error("the HSM is unavailable: {reason}")]
    Unavailable {
        /// What was seen.
        reason: String,
    },
    /// The session pool has stopped (the node is shutting down).
    #[error("the HSM session pool has stopped")]
    PoolStopped,
}

impl From<cryptoki::error::Error> for HsmError {
    fn from(source: cryptoki::error::Error) -> Self {
        HsmError::Pkcs11(source)
    }
}
