//! The local audit spool: one append-only file per node, written by one thread that groups
//! concurrent appends into one write and one `fdatasync`, and chains every line to the one
//! before (see [`super::chain`]).
//!
//! # Correctness
//! - An append completes only once its line is on disk: a caller that answers its client after
//!   `append` returned `Ok` has its record durable first.
//! - A failed write or sync poisons the spool: every later append fails (the node fails closed)
//!   until the node restarts and reopens it. A half-written group is then the file's last line,
//!   torn; reopening drops a torn last line before appending (the chain resumes from the last
//!   complete one, and [`super::chain::verify`] of the old copy shows the tear).
//! - The queue to the thread is bounded ([`QUEUE`]): a caller finding it full gets `Busy` at once
//!   rather than waiting behind a stalled disk.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use super::chain::{self, Head};

/// How many appends may wait for the spool thread.
pub const QUEUE: usize = 65_536;
/// The most lines one write and one sync carry.
pub const GROUP: usize = 4096;

/// Why an append failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// The spool could not be written or synced; it refuses every append until the node restarts.
    #[error("the audit spool {path} cannot be written ({why}); this node refuses calls until it can audit them")]
    Failed {
        /// The file.
        path: String,
        /// What the OS said.
        why: String,
    },
    /// Too many appends are waiting.
    #[error("the audit spool is {QUEUE} records behind; retry")]
    Busy,
    /// The spool thread has stopped (the node is shutting down).
    #[error("the audit spool is closed")]
    Closed,
}

struct Pending {
    record_json: String,
    done: tokio::sync::oneshot::Sender<Result<u64, SpoolError>>,
}

/// A node's audit spool.
pub struct Spool {
    tx: mpsc::SyncSender<Pending>,
    path: PathBuf,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Reads where the chain in `file` stands, dropping a torn last line (one without its newline).
fn resume(file: &mut File) -> std::io::Result<Head> {
    file.seek(SeekFrom::Start(0))?;
    let (mut head, mut good_len, mut text) = (Head::default(), 0u64, String::new());
    {
        let mut reader = BufReader::new(&mut *file);
        loop {
            text.clear();
            let n = reader.read_line(&mut text)?;
            if n == 0 || !text.ends_with('\n') {
                break;
            }
            // Lines that do not chain are left for `verify` to report; the chain resumes after
            // the last line that parses.
            if let Ok(next) = chain::check_line(0, text.trim_end_matches('\n'), &Head::default()) {
                head = next;
            }
            good_len += n as u64;
        }
    }
    file.set_len(good_len)?;
    file.seek(SeekFrom::End(0))?;
    Ok(head)
}

impl Spool {
    /// Opens (or creates, 0600) the spool at `path` and starts its thread.
    ///
    /// # Errors
    /// The file cannot be opened or read.
    pub fn open(path: &Path) -> std::io::Result<Spool> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
        let head = resume(&mut file)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let shown = path.display().to_string();
        std::thread::Builder::new().name("coffer-audit".into()).spawn(move || run(file, head, rx, shown))?;
        Ok(Spool { tx, path: path.to_owned() })
    }

    /// Appends one record (already JSON) and waits until it is on disk; returns its sequence
    /// number.
    ///
    /// # Errors
    /// [`SpoolError`]: the node must refuse the call it was auditing.
    pub async fn append(&self, record_json: String) -> Result<u64, SpoolError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx.try_send(Pending { record_json, done }).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => SpoolError::Busy,
            mpsc::TrySendError::Disconnected(_) => SpoolError::Closed,
        })?;
        wait.await.map_err(|_| SpoolError::Closed)?
    }
}

/// The spool thread: takes what is waiting (up to [`GROUP`]), writes it in one go, syncs, and
/// answers every caller of the group.
fn run(mut file: File, mut head: Head, rx: mpsc::Receiver<Pending>, path: String) {
    let mut poisoned: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < GROUP {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        if let Some(why) = &poisoned {
            for p in group {
                let _ = p.done.send(Err(SpoolError::Failed { path: path.clone(), why: why.clone() }));
            }
            continue;
        }
        let start = head.clone();
        let mut text = String::new();
        let mut seqs = Vec::with_capacity(group.len());
        for p in &group {
            let (line, hash) = chain::line(head.seq + 1, &head.hash, &p.record_json);
            head = Head { seq: head.seq + 1, hash };
            seqs.push(head.seq);
            text.push_str(&line);
        }
        let written = file.write_all(text.as_bytes()).and_then(|()| file.sync_data());
        match written {
            Ok(()) => {
                for (p, seq) in group.into_iter().zip(seqs) {
                    let _ = p.done.send(Ok(seq));
                }
            }
            Err(e) => {
                tracing::error!(path = %path, error = %e, "the audit spool cannot be written: refusing calls");
                head = start;
                poisoned = Some(e.to_string());
                for p in group {
                    let _ = p.done.send(Err(SpoolError::Failed { path: path.clone(), why: e.to_string() }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_appends_make_one_chain_that_survives_a_reopen_and_a_tear() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.log");
        let spool = std::sync::Arc::new(Spool::open(&path)?);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move { spool.append(format!("{{\"n\":{i}}}")).await }));
        }
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await??);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "each append got its own place");
        drop(spool);
        let verified = chain::verify(BufReader::new(File::open(&path)?))?;
        assert_eq!(verified.span, Some((1, 200)));
        // A torn last line (a crash mid-write) is dropped on reopen, and the chain goes on.
        OpenOptions::new().append(true).open(&path)?.write_all(b"{\"seq\":201,\"prev\":\"ab")?;
        let spool = Spool::open(&path)?;
        assert_eq!(spool.append("{\"n\":\"after\"}".into()).await?, 201);
        drop(spool);
        assert_eq!(chain::verify(BufReader::new(File::open(&path)?))?.span, Some((1, 201)));
        Ok(())
    }
}
