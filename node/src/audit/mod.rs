//! Audit (issue #13): a record of every public call, allowed or refused, written to the node's
//! spool before the answer leaves, hash-chained, and vouched for by checkpoints the HSM signs.
//!
//! | module | what |
//! |---|---|
//! | [`chain`] | the file format: JSON lines hash-chained to the line before |
//! | [`checkpoint`] | HSM-signed checkpoints: what makes the chain unforgeable and a cut visible |
//! | [`verify`] | the whole check of a file, as `coffer audit verify` runs it |
//! | [`spool`] | the node's spool: one writer thread, grouped appends, one fsync per group, fail closed |
//! | [`layer`] | one record per public call, written before the answer leaves |
//! | [`cli`] | `coffer audit verify FILE…`, `coffer audit tail FILE` with filters |
//!
//! On by default (`[audit] enabled = false` turns it off); the file is `<data-dir>/audit.log`.
//! The checkpoint key is an ECDSA P-256 pair in the HSM, labelled `coffer-audit-node-<id>`; its
//! public half is written next to the spool (`audit.log.pub`, hex) for auditors to pin
//! (`coffer audit verify --key`), and is in every checkpoint.

pub mod chain;
pub mod checkpoint;
pub mod cli;
pub mod layer;
pub mod spool;
pub mod verify;

use std::sync::Arc;

use coffer_hsm::{Hsm, SigningKey};

use self::checkpoint::{Checkpoint, Kind};
use self::spool::Spool;
use crate::config::AuditConfig;
use crate::error::Error;

/// A node's audit: its spool, and the HSM key that signs its checkpoints.
pub struct Audit {
    spool: Spool,
    hsm: Hsm,
    key: SigningKey,
    node: u64,
    config: AuditConfig,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("spool", &self.spool).finish_non_exhaustive()
    }
}

/// An error and its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The HSM label of node `node`'s checkpoint key.
pub fn key_label(node: u64) -> String {
    format!("coffer-audit-node-{node}")
}

impl Audit {
    /// Opens the spool, finds (or creates) the checkpoint key in the HSM, writes the public key
    /// next to the spool, and writes the `open` checkpoint.
    ///
    /// # Errors
    /// The spool cannot be opened or written, or the HSM cannot give the key or sign.
    pub async fn open(config: &AuditConfig, hsm: &Hsm, node: u64) -> Result<Arc<Audit>, Error> {
        let fail = |what: String| Error::Serve(what.into());
        let spool = Spool::open(&config.spool, config.checkpoint_records)
            .map_err(|e| fail(format!("cannot open the audit spool {}: {e}", config.spool.display())))?;
        let key = hsm
            .signing_key(&key_label(node))
            .await
            .map_err(|e| fail(format!("cannot get the audit checkpoint key from the HSM: {}", chain(&e))))?;
        let public = spool.path().with_extension("log.pub");
        std::fs::write(&public, format!("{}\n", hex::encode(&key.public)))
            .map_err(|e| fail(format!("cannot write {}: {e}", public.display())))?;
        let unclean = !spool.ended_closed() && spool.head().seq > 0;
        let audit = Arc::new(Audit { spool, hsm: hsm.clone(), key, node, config: config.clone() });
        audit
            .checkpoint(Kind::Open, unclean)
            .await
            .map_err(|e| fail(format!("cannot write the first audit checkpoint: {e:#}")))?;
        tracing::info!(spool = %config.spool.display(), "auditing every call");
        Ok(audit)
    }

    /// The spool.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Signs a checkpoint for what is on disk now and appends it.
    ///
    /// # Errors
    /// The HSM cannot sign, or the spool cannot be written.
    pub async fn checkpoint(&self, kind: Kind, unclean: bool) -> anyhow::Result<()> {
        let head = self.spool.head();
        let mut cp = Checkpoint {
            kind,
            node: self.node,
            time_ms: crate::node::now_ms(),
            seq: head.seq,
            hash: head.hash,
            every_ms: u64::try_from(self.config.checkpoint_every.as_millis()).unwrap_or(u64::MAX),
            unclean,
            key: hex::encode(&self.key.public),
            sig: String::new(),
        };
        cp.sig = hex::encode(self.hsm.sign(&self.key, cp.message().as_bytes()).await?);
        self.spool.append(cp.record_json()).await?;
        Ok(())
    }

    /// Writes a checkpoint every `checkpoint-every`, and after every `checkpoint-records`
    /// records, until aborted. A checkpoint that fails (the HSM away) is logged and tried again
    /// at the next tick: records keep being written meanwhile, and `verify` shows the gap.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.config.checkpoint_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.spool.filled.notified() => tick.reset(),
            }
            if let Err(e) = self.checkpoint(Kind::Interval, false).await {
                tracing::warn!(error = %e, "cannot write an audit checkpoint");
            }
        }
    }

    /// The clean stop's `close` checkpoint: call it once nothing else will be recorded.
    pub async fn close(&self) {
        if let Err(e) = self.checkpoint(Kind::Close, false).await {
            tracing::warn!(error = %e, "cannot write the closing audit checkpoint");
        }
    }
}
