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
//! | [`sink`] | copies of the spool drained to collectors over TCP, asynchronously |
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
pub mod sink;
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
    sinks: Vec<(crate::config::SinkConfig, Arc<sink::SinkState>)>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").field("spool", &self.spool).finish_non_exhaustive()
    }
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
        let spool = Spool::open(&config.spool, config.checkpoint_records, config.rotate_bytes, config.sync)
            .map_err(|e| fail(format!("cannot open the audit spool {}: {e}", config.spool.display())))?;
        let key = hsm.signing_key(&key_label(node)).await.map_err(|e| {
            fail(format!("cannot get the audit checkpoint key from the HSM: {:#}", anyhow::Error::from(e)))
        })?;
        let public = spool.path().with_extension("log.pub");
        std::fs::write(&public, format!("{}\n", hex::encode(&key.public)))
            .map_err(|e| fail(format!("cannot write {}: {e}", public.display())))?;
        let unclean = !spool.ended_closed() && spool.head().seq > 0;
        let sinks = config.sinks.iter().map(|s| (s.clone(), Arc::default())).collect();
        let audit = Arc::new(Audit { spool, hsm: hsm.clone(), key, node, config: config.clone(), sinks });
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
        if kind == Kind::Rotate {
            self.spool.append_last(cp.record_json()).await?;
        } else {
            self.spool.append_synced(cp.record_json()).await?;
        }
        Ok(())
    }

    /// Starts one task per configured sink.
    pub fn start_sinks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.sinks
            .iter()
            .map(|(config, state)| {
                let head = self.spool.head_watch();
                let confirmed = move || head.load(std::sync::atomic::Ordering::Acquire);
                tokio::spawn(sink::run(self.config.spool.clone(), config.clone(), state.clone(), confirmed))
            })
            .collect()
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
            let written = if self.spool.rotate_due() {
                // The old file's last line, then the new file's first checkpoint.
                match self.checkpoint(Kind::Rotate, false).await {
                    Ok(()) => self.checkpoint(Kind::Open, false).await,
                    Err(e) => Err(e),
                }
            } else {
                self.checkpoint(Kind::Interval, false).await
            };
            if let Err(e) = written {
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

/// Free space below which the spool's filesystem is reported (`operator status`, a warning in
/// the log every minute): long before a write fails and the node must refuse calls.
pub const LOW_DISK_FRACTION: f64 = 0.10;
/// ... or below this many bytes, whichever is more.
pub const LOW_DISK_BYTES: u64 = 1 << 30;

/// Free and total bytes of the filesystem that holds `path`.
pub fn disk_space(path: &std::path::Path) -> Option<(u64, u64)> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some((stat.f_bavail.saturating_mul(stat.f_frsize), stat.f_blocks.saturating_mul(stat.f_frsize)))
}

/// Whether `free` of `total` bytes is low enough to warn about.
pub fn disk_low(free: u64, total: u64) -> bool {
    #[allow(clippy::cast_precision_loss)] // a fraction of a disk, not an exact count
    let fraction = free as f64 / total.max(1) as f64;
    fraction < LOW_DISK_FRACTION || free < LOW_DISK_BYTES.min(total / 2)
}

impl Audit {
    /// One line for `operator status`: the spool, where its chain stands, its disk.
    pub fn status(&self) -> String {
        let head = self.spool.head();
        let disk = match disk_space(self.spool.path()) {
            Some((free, total)) if disk_low(free, total) => {
                format!("; LOW DISK: {} MiB free of {} MiB", free >> 20, total >> 20)
            }
            Some((free, total)) => format!("; disk {} MiB free of {} MiB", free >> 20, total >> 20),
            None => String::new(),
        };
        let mut sinks = String::new();
        for (config, state) in &self.sinks {
            let delivered = state.delivered.load(std::sync::atomic::Ordering::Relaxed);
            sinks.push_str(&format!("; sink {}: lag {} record(s)", config.name, head.seq.saturating_sub(delivered)));
            if let Some(why) = state.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_deref() {
                sinks.push_str(&format!(" (failing: {why})"));
            }
        }
        match self.spool.failure() {
            Some(why) => format!("FAILING ({why}): {} refuses every call{disk}{sinks}", self.spool.path().display()),
            None => format!("ok: {} at seq {}{disk}{sinks}", self.spool.path().display(), head.seq),
        }
    }

    /// Watches the spool. While it fails, health reports NOT_SERVING for every service and a
    /// leader hands leadership to another voter (and this node stops standing for election),
    /// since it can no longer audit what it does; when it recovers, both are undone. Warns
    /// about low disk space once a minute meanwhile.
    pub async fn watch(self: Arc<Self>, node: Arc<crate::node::Node>, health: tonic_health::server::HealthReporter) {
        const SERVICES: [&str; 5] = ["", "coffer.v1.Secrets", "coffer.v1.Keys", "coffer.v1.Auth", "coffer.v1.Operator"];
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        let mut warned_at: Option<std::time::Instant> = None;
        let mut failing = false;
        loop {
            tick.tick().await;
            match (self.spool.failure(), failing) {
                (Some(why), false) => {
                    failing = true;
                    tracing::error!(spool = %self.spool.path().display(), error = %why, "audit spool failed: not serving, giving up leadership");
                    for service in SERVICES {
                        health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
                    }
                    self.give_up_leadership(&node).await;
                }
                (None, true) => {
                    failing = false;
                    tracing::warn!(spool = %self.spool.path().display(), "audit spool recovered: serving, standing for election again");
                    for service in SERVICES {
                        health.set_service_status(service, tonic_health::ServingStatus::Serving).await;
                    }
                    node.replica.allow_elections();
                }
                _ => {}
            }
            let recently = warned_at.is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(60));
            if let (Some((free, total)), false) = (disk_space(self.spool.path()), recently) {
                if disk_low(free, total) {
                    tracing::warn!(
                        spool = %self.spool.path().display(), free_mib = free >> 20, total_mib = total >> 20,
                        "the audit spool's disk is nearly full: when a write fails this node refuses every call"
                    );
                    warned_at = Some(std::time::Instant::now());
                }
            }
        }
    }

    /// Hands leadership off (retried while a hand-off is busy or the target lags, for as long
    /// as the spool still fails).
    async fn give_up_leadership(&self, node: &crate::node::Node) {
        for _ in 0..20 {
            match node.replica.step_down().await {
                Ok(Some(to)) => {
                    tracing::warn!(%to, "handed leadership off: this node's audit spool cannot be written");
                    return;
                }
                Ok(None) => return,
                Err(e) if self.spool.failure().is_some() => {
                    tracing::warn!(error = %e, "cannot hand leadership off yet; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(_) => return,
            }
        }
    }
}
