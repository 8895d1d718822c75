//! Checkpoints: what makes an audit file's chain unforgeable.
//!
//! A checkpoint is a record in the chain, `{"checkpoint":{…}}`, that vouches for every line up to
//! one sequence number: it names that line's seq and hash and carries an ECDSA P-256 signature
//! by a key pair the HSM holds (the private half never leaves it; label `coffer-audit-node-<id>`).
//! Someone with root on the host can edit the file and recompute every hash, but cannot sign the
//! next checkpoint, so [`super::verify`] finds the edit at the first checkpoint after it.
//!
//! A node writes one when its spool opens (`open`; `unclean` when the file did not end with a
//! `close`, that is after a crash or a cut), every `checkpoint-every` (even when idle: a file
//! whose last checkpoint is older than that, and not a `close`, was cut short or its node
//! killed) and every `checkpoint-records` records (`interval`), on a clean stop (`close`), and as
//! the last line of a file that is rotated away (`rotate`).

use serde::{Deserialize, Serialize};

/// Which moment a checkpoint marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The spool was opened (the node started).
    Open,
    /// A periodic checkpoint (time or record count).
    Interval,
    /// The node stopped cleanly: nothing follows in this run.
    Close,
    /// The file's last line: it is renamed `<spool>.<first seq>`, and the chain goes on in a
    /// new file, which starts with records and an `open` checkpoint.
    Rotate,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Open => "open",
            Kind::Interval => "interval",
            Kind::Close => "close",
            Kind::Rotate => "rotate",
        }
    }
}

/// A checkpoint as written in a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Which moment.
    pub kind: Kind,
    /// The node that wrote it.
    pub node: u64,
    /// When (node clock, ms since the epoch).
    pub time_ms: u64,
    /// The last line it vouches for.
    pub seq: u64,
    /// That line's hash.
    pub hash: String,
    /// The node's checkpoint interval: a live file has a checkpoint at least this recent.
    pub every_ms: u64,
    /// For `open`: the file did not end with a `close` (the node crashed, or the file was cut).
    #[serde(default)]
    pub unclean: bool,
    /// The public key (uncompressed P-256 point, hex).
    pub key: String,
    /// The signature (`r ‖ s`, hex) over [`Checkpoint::message`].
    pub sig: String,
}

impl Checkpoint {
    /// The bytes signed: every field but the key and the signature, in a fixed order.
    pub fn message(&self) -> String {
        format!(
            "coffer-audit-checkpoint-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.kind.name(),
            self.node,
            self.time_ms,
            self.seq,
            self.hash,
            self.every_ms,
            self.unclean
        )
    }

    /// Whether the signature verifies under `key` (the pinned key, else the one it names).
    pub fn signature_holds(&self, key: &[u8]) -> bool {
        let Ok(sig) = hex::decode(&self.sig) else { return false };
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, key)
            .verify(self.message().as_bytes(), &sig)
            .is_ok()
    }

    /// The record JSON that carries it.
    pub fn record_json(&self) -> String {
        serde_json::json!({ "checkpoint": self }).to_string()
    }
}
