//! The recorded history of a drill: every operation with its invoke and complete times, the node
//! it went to, and its result.

use serde::Serialize;

/// What an operation asked for.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// Put a unique value.
    Write {
        /// The secret path.
        key: String,
        /// The value (unique across the drill; also the request id).
        value: String,
    },
    /// Get the current version; `max_staleness_ms` set for a bounded-staleness read.
    Read {
        /// The secret path.
        key: String,
        /// The staleness bound, if any.
        max_staleness_ms: Option<u64>,
    },
    /// Encrypt a unique plaintext.
    Encrypt {
        /// The plaintext.
        plaintext: String,
    },
    /// Decrypt an earlier ciphertext.
    Decrypt {
        /// The ciphertext.
        ciphertext: String,
        /// The plaintext it must give.
        expect: String,
    },
}

/// How an operation ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// A write was acknowledged with this version.
    Written {
        /// The version.
        version: u64,
    },
    /// A read returned a value.
    Value {
        /// The version read.
        version: u64,
        /// The value read.
        value: String,
    },
    /// A read found no secret.
    Missing,
    /// An encrypt returned a ciphertext.
    Encrypted {
        /// The ciphertext.
        ciphertext: String,
    },
    /// A decrypt returned a plaintext.
    Decrypted {
        /// The plaintext.
        plaintext: String,
    },
    /// The call failed with this gRPC status code.
    Failed {
        /// The status code name.
        code: String,
    },
}

/// One operation of the history.
#[derive(Debug, Clone, Serialize)]
pub struct Op {
    /// The client that made it.
    pub client: usize,
    /// The node (index) it was sent to.
    pub node: usize,
    /// What was asked.
    #[serde(flatten)]
    pub call: Call,
    /// When it was invoked, microseconds since the drill started.
    pub invoke_us: u64,
    /// When it completed, microseconds since the drill started.
    pub complete_us: u64,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Op {
    /// Whether the call succeeded.
    pub fn ok(&self) -> bool {
        !matches!(self.outcome, Outcome::Failed { .. })
    }

    /// Latency in microseconds.
    pub fn latency_us(&self) -> u64 {
        self.complete_us.saturating_sub(self.invoke_us)
    }
}
