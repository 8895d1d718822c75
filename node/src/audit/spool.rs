//! The local audit spool: one append-only file per node, every line chained to the one before
//! (see [`super::chain`]). With `sync = "always"` one thread writes it, grouping concurrent
//! appends into one write and one `fdatasync`; with `sync = <bound>` each caller writes its
//! line to the kernel under a mutex (no thread hand-off) and a sync thread syncs within the
//! bound.
//!
//! # Correctness
//! - An append completes only once its line is written: on disk (`always`), or in the kernel
//!   and on disk within the bound (`<bound>`: a kill -9 loses nothing, a power loss at most
//!   the bound). A caller that answers after `append` returned `Ok` has its record first.
//! - A failed write or sync fails every append of its group (the node fails closed) and marks
//!   the spool failing ([`Spool::failure`]); each later group first cuts the file back to what
//!   was last synced, then tries again, and the first that succeeds clears the failure: the
//!   node recovers by itself when space returns. A crash mid-write leaves a torn last line;
//!   reopening drops it before appending.
//! - The queue to the thread is bounded ([`QUEUE`]): a caller finding it full gets `Busy` at once
//!   rather than waiting behind a stalled disk.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use super::chain::{self, Head};

/// How many appends may wait for the spool thread.
pub const QUEUE: usize = 65_536;
/// The most lines one write and one sync carry.
pub const GROUP: usize = 4096;

/// Why an append failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// The spool could not be written or synced; every append fails until a write succeeds again.
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
    /// On disk (synced) before its caller hears back, whatever the sync mode: checkpoints.
    sync: bool,
    /// The last line of this file: once it is on disk the file is renamed and a new one begun.
    rotate: bool,
    done: tokio::sync::oneshot::Sender<Result<u64, SpoolError>>,
}

/// What the spool thread shares with the node: where the chain stands, and whether it failed.
#[derive(Debug, Default)]
struct Shared {
    /// The last line on disk.
    head: Mutex<Head>,
    /// Why the spool stopped writing, once it has.
    failure: Mutex<Option<String>>,
    /// The file has reached its rotation size.
    rotate_due: std::sync::atomic::AtomicBool,
    /// The seq of the last line written successfully (what sinks may send).
    confirmed: Arc<std::sync::atomic::AtomicU64>,
    /// Calls running that will append a record ([`Spool::reserve`]).
    reserved: Arc<std::sync::atomic::AtomicUsize>,
}

/// A place in the spool's queue, taken before a call runs and given back when its record is
/// appended (or the call is dropped).
#[derive(Debug)]
pub struct Reservation(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How appends reach the file.
enum Mode {
    /// To the spool thread, which groups them (`sync = "always"`).
    Thread(mpsc::SyncSender<Pending>),
    /// Written by the caller under the mutex (`sync = <bound>`): a write to the kernel's page
    /// cache, no thread hand-off; the sync thread syncs.
    Inline(Arc<Mutex<Writer>>),
}

/// A node's audit spool.
pub struct Spool {
    mode: Mode,
    path: PathBuf,
    shared: Arc<Shared>,
    ended_closed: bool,
    /// Woken each time another `every_records` records are on disk.
    pub(crate) filled: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Reads where the chain in `file` stands, dropping a torn last line (one without its newline),
/// whether the last line is a clean stop's `close` checkpoint, and the file's first seq.
fn resume(file: &mut File) -> std::io::Result<(Head, bool, Option<u64>)> {
    file.seek(SeekFrom::Start(0))?;
    let (mut head, mut good_len, mut text) = (Head::default(), 0u64, String::new());
    let mut closed = false;
    let mut first = None;
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
                first.get_or_insert(next.seq);
                head = next;
                closed = text.contains(r#""checkpoint":{"kind":"close""#);
            }
            good_len += n as u64;
        }
    }
    file.set_len(good_len)?;
    file.seek(SeekFrom::End(0))?;
    Ok((head, closed, first))
}

impl Spool {
    /// Opens (or creates, 0600) the spool at `path` and starts its thread; [`Spool::filled`] is
    /// woken every `every_records` records, and when the file passes `rotate_bytes` (0: never).
    ///
    /// # Errors
    /// The file cannot be opened or read.
    pub fn open(path: &Path, every_records: u64, rotate_bytes: u64, sync: Sync) -> std::io::Result<Spool> {
        let mut file = create(path)?;
        let (mut head, mut ended_closed, first) = resume(&mut file)?;
        if head.seq == 0 {
            // An empty live file after a rotation (a stop right after it): the chain goes on from
            // the newest rotated file.
            if let Some((_, newest)) = super::sink::rotated_files(path).pop() {
                let (last, closed, _) = resume(&mut OpenOptions::new().read(true).write(true).open(newest)?)?;
                // It ends with its `rotate` line, never a `close`: the next `open` says unclean.
                (head, ended_closed) = (last, closed);
            }
        }
        let shared = Arc::new(Shared {
            head: Mutex::new(head.clone()),
            confirmed: Arc::new(std::sync::atomic::AtomicU64::new(head.seq)),
            ..Shared::default()
        });
        let filled = Arc::new(tokio::sync::Notify::new());
        let writer = Writer {
            path: path.to_owned(),
            shared: shared.clone(),
            filled: filled.clone(),
            every_records: every_records.max(1),
            rotate_bytes,
            first_seq: first.unwrap_or(head.seq + 1),
            always: sync == Sync::Always,
            good_len: file.metadata().map_or(0, |m| m.len()),
            file,
            head,
            failing: false,
            dirty: false,
        };
        let mode = match sync {
            Sync::Always => {
                // Room past the reserved places for checkpoints and the records of streams ending.
                let (tx, rx) = mpsc::sync_channel(QUEUE + 1024);
                std::thread::Builder::new().name("coffer-audit".into()).spawn(move || writer.run(&rx))?;
                Mode::Thread(tx)
            }
            Sync::Within(bound) => {
                let writer = Arc::new(Mutex::new(writer));
                let weak = Arc::downgrade(&writer);
                std::thread::Builder::new()
                    .name("coffer-audit-sync".into())
                    .spawn(move || sync_within(&weak, bound))?;
                Mode::Inline(writer)
            }
        };
        Ok(Spool { mode, path: path.to_owned(), shared, ended_closed, filled })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the chain on disk stands.
    pub fn head(&self) -> Head {
        self.shared.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether the file ended with a `close` checkpoint when it was opened.
    pub fn ended_closed(&self) -> bool {
        self.ended_closed
    }

    /// The seq of the last line written successfully, as it moves: a line past it may yet be
    /// cut back (a failed group) and must not be sent anywhere.
    pub fn head_watch(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.shared.confirmed.clone()
    }

    /// Takes a place in the queue for a call about to run: refused (`Busy`) when [`QUEUE`]
    /// calls already wait for theirs, so a call the spool could not record never runs.
    ///
    /// # Errors
    /// [`SpoolError::Busy`].
    pub fn reserve(&self) -> Result<Reservation, SpoolError> {
        let reserved = &self.shared.reserved;
        if reserved.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= QUEUE {
            reserved.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            return Err(SpoolError::Busy);
        }
        Ok(Reservation(reserved.clone()))
    }

    /// Whether the file has reached its rotation size (the checkpointer then rotates it).
    pub fn rotate_due(&self) -> bool {
        self.shared.rotate_due.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the spool stopped writing, if it has.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Appends one record (already JSON) and waits until it is on disk; returns its sequence
    /// number.
    ///
    /// # Errors
    /// [`SpoolError`]: the node must refuse the call it was auditing.
    pub async fn append(&self, record_json: String) -> Result<u64, SpoolError> {
        self.send(record_json, false, false).await
    }

    /// Appends one record and waits until it is synced to disk, whatever the sync mode: a
    /// checkpoint.
    ///
    /// # Errors
    /// As [`Spool::append`].
    pub async fn append_synced(&self, record_json: String) -> Result<u64, SpoolError> {
        self.send(record_json, false, true).await
    }

    /// Appends the last record of this file (a `rotate` checkpoint): once it is on disk, the
    /// file is renamed `<spool>.<its first seq, 20 digits>` and a new file continues the chain.
    ///
    /// # Errors
    /// As [`Spool::append`].
    pub async fn append_last(&self, record_json: String) -> Result<u64, SpoolError> {
        self.send(record_json, true, true).await
    }

    async fn send(&self, record_json: String, rotate: bool, sync: bool) -> Result<u64, SpoolError> {
        match &self.mode {
            Mode::Thread(tx) => {
                let (done, wait) = tokio::sync::oneshot::channel();
                tx.try_send(Pending { record_json, sync, rotate, done }).map_err(|e| match e {
                    mpsc::TrySendError::Full(_) => SpoolError::Busy,
                    mpsc::TrySendError::Disconnected(_) => SpoolError::Closed,
                })?;
                wait.await.map_err(|_| SpoolError::Closed)?
            }
            // Held for one write to the page cache (a sync only for a checkpoint or a rotation,
            // every 10 s or so): the one blocking call on a request path, on purpose.
            Mode::Inline(writer) => {
                let item = Item { record_json: &record_json, sync, rotate };
                let mut writer = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                writer.write(&[item]).map(|seqs| seqs.into_iter().next().unwrap_or_default())
            }
        }
    }
}

/// When the spool syncs what it wrote to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// Before any call of a group hears back: one `fdatasync` per group. A record is on disk
    /// before its answer leaves, power loss included.
    Always,
    /// Records are written (to the kernel) before their answers leave, and synced at most this
    /// long after: a crash of the node loses nothing; a power loss, at most this much.
    /// Checkpoints are always synced before they count.
    Within(std::time::Duration),
}

/// Opens (or creates, 0600) a spool file.
fn create(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)
}

/// One record to write.
struct Item<'a> {
    record_json: &'a str,
    sync: bool,
    rotate: bool,
}

/// The file and where its chain stands: written by the spool thread (`sync = "always"`) or,
/// under a mutex, by the callers themselves (`sync = <bound>`).
struct Writer {
    path: PathBuf,
    shared: Arc<Shared>,
    filled: Arc<tokio::sync::Notify>,
    every_records: u64,
    rotate_bytes: u64,
    /// The first seq of the file being written.
    first_seq: u64,
    /// Sync every write (`sync = "always"`), or leave it to the sync thread.
    always: bool,
    file: File,
    head: Head,
    /// The length of what was written successfully: a failed write is cut back to it before
    /// the next try, so a torn group never stays in the chain.
    good_len: u64,
    failing: bool,
    /// Written since the last sync.
    dirty: bool,
}

impl Writer {
    /// Writes `items` as one group (one `write`, and one `fdatasync` when the mode or an item
    /// asks for it); returns their seqs, or why nothing was written.
    fn write(&mut self, items: &[Item<'_>]) -> Result<Vec<u64>, SpoolError> {
        let rotate = items.last().is_some_and(|i| i.rotate);
        let start = self.head.clone();
        let mut text = String::new();
        let mut seqs = Vec::with_capacity(items.len());
        for item in items {
            let (line, hash) = chain::line(self.head.seq + 1, &self.head.hash, item.record_json);
            self.head = Head { seq: self.head.seq + 1, hash };
            seqs.push(self.head.seq);
            text.push_str(&line);
        }
        // A failed sync is cleared only by one that succeeds.
        let must_sync = self.always || self.failing || rotate || items.iter().any(|i| i.sync);
        let good_len = self.good_len;
        let cut_back = |file: &mut File| -> std::io::Result<()> {
            file.set_len(good_len)?;
            file.seek(SeekFrom::Start(good_len)).map(|_| ())
        };
        let written = if self.failing { cut_back(&mut self.file) } else { Ok(()) }
            .and_then(|()| self.file.write_all(text.as_bytes()))
            .and_then(|()| if must_sync { self.file.sync_data() } else { Ok(()) });
        let path = self.path.display().to_string();
        if let Err(e) = written {
            if !self.failing {
                tracing::error!(path = %path, error = %e, "the audit spool cannot be written: refusing calls");
            }
            self.failing = true;
            self.head = start;
            *self.shared.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
            return Err(SpoolError::Failed { path, why: e.to_string() });
        }
        self.good_len += text.len() as u64;
        self.dirty = !must_sync;
        *self.shared.head.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = self.head.clone();
        self.shared.confirmed.store(self.head.seq, std::sync::atomic::Ordering::Release);
        if self.failing {
            self.failing = false;
            *self.shared.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
            tracing::warn!(path = %path, "the audit spool is writable again: serving calls");
        }
        if rotate {
            match self.rotate() {
                Ok(next) => {
                    self.file = next;
                    self.good_len = 0;
                }
                Err(e) => tracing::error!(path = %path, error = %e, "cannot rotate the audit spool; writing on"),
            }
        }
        let due = self.rotate_bytes != 0 && self.good_len >= self.rotate_bytes;
        self.shared.rotate_due.store(due, std::sync::atomic::Ordering::Relaxed);
        if due || start.seq / self.every_records != self.head.seq / self.every_records {
            self.filled.notify_one();
        }
        Ok(seqs)
    }

    /// The spool thread (`sync = "always"`): takes what is waiting (up to [`GROUP`]), writes it
    /// in one go, syncs, and answers every caller of the group.
    fn run(mut self, rx: &mpsc::Receiver<Pending>) {
        // However this thread ends (a panic included), the node stops taking calls it could
        // not record.
        let _stopped = Stopped(self.shared.clone());
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            // A file's last line ends its group.
            while group.len() < GROUP && !group.last().is_some_and(|p| p.rotate) {
                match rx.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
                }
            }
            let items: Vec<Item<'_>> =
                group.iter().map(|p| Item { record_json: &p.record_json, sync: p.sync, rotate: p.rotate }).collect();
            match self.write(&items) {
                Ok(seqs) => {
                    for (p, seq) in group.into_iter().zip(seqs) {
                        let _ = p.done.send(Ok(seq));
                    }
                }
                Err(e) => {
                    for p in group {
                        let _ = p.done.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// The sync thread (`sync = <bound>`): every `bound`, syncs what was written since the last
/// sync, on a second handle so writers are not held meanwhile; ends with the spool.
fn sync_within(writer: &std::sync::Weak<Mutex<Writer>>, bound: std::time::Duration) {
    loop {
        std::thread::sleep(bound);
        let Some(writer) = writer.upgrade() else { return };
        let handle = {
            let mut w = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !w.dirty {
                continue;
            }
            w.dirty = false;
            w.file.try_clone()
        };
        if let Err(e) = handle.and_then(|file| file.sync_data()) {
            let mut w = writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            tracing::error!(path = %w.path.display(), error = %e, "the audit spool cannot be synced: refusing calls");
            // The next write cuts back, writes and syncs before it clears this.
            w.failing = true;
            *w.shared.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.dirty {
            let _ = self.file.sync_data();
        }
    }
}

/// Marks the spool failed when the writer thread ends.
struct Stopped(Arc<Shared>);

impl Drop for Stopped {
    fn drop(&mut self) {
        *self.0.failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some("the audit spool's writer has stopped".into());
    }
}

impl Writer {
    /// Renames the file just ended to `<spool>.<first seq>` and puts a new, empty file in its
    /// place; the next line continues the chain from `head`. The new file is made first under
    /// a temporary name, so the live name is never missing for long and nothing is overwritten:
    /// on any error before the first rename, nothing changed (the file goes on, and rotation is
    /// tried again later).
    fn rotate(&mut self) -> std::io::Result<File> {
        let rotated = super::sink::rotated_path(&self.path, self.first_seq);
        if rotated.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists already; not overwriting it", rotated.display()),
            ));
        }
        let mut next_name = self.path.as_os_str().to_owned();
        next_name.push(".next");
        let next_name = PathBuf::from(next_name);
        let _ = std::fs::remove_file(&next_name);
        let file = create(&next_name)?;
        std::fs::rename(&self.path, &rotated)?;
        std::fs::rename(&next_name, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The renames, durable.
            File::open(dir)?.sync_all()?;
        }
        self.first_seq = self.head.seq + 1;
        tracing::info!(rotated = %rotated.display(), "audit spool rotated");
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first and last seq of an intact chain in `path`.
    fn span(path: &Path) -> Result<(u64, u64), chain::Broken> {
        let (mut head, mut first) = (Head::default(), None);
        for (i, text) in std::fs::read_to_string(path).unwrap_or_default().lines().enumerate() {
            head = chain::check_line(i as u64 + 1, text, &head)?;
            first.get_or_insert(head.seq);
        }
        Ok((first.unwrap_or(0), head.seq))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn synced_within_a_bound_every_append_is_written_before_it_returns() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.log");
        let spool = Spool::open(&path, 1000, 0, Sync::Within(std::time::Duration::from_millis(10)))?;
        for i in 1..=20 {
            assert_eq!(spool.append(format!("{{\"n\":{i}}}")).await?, i);
            // Written (to the kernel) before append returned: another reader sees it at once.
            assert_eq!(span(&path)?, (1, i));
        }
        assert_eq!(spool.append_synced("{\"checkpoint\":{}}".into()).await?, 21);
        // Concurrent callers, each writing its own line: one chain.
        let spool = std::sync::Arc::new(spool);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let spool = spool.clone();
                tokio::spawn(async move { spool.append(format!("{{\"c\":{i}}}")).await })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        assert_eq!(span(&path)?, (1, 121));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_appends_make_one_chain_that_survives_a_reopen_and_a_tear() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.log");
        let spool = std::sync::Arc::new(Spool::open(&path, 1000, 0, Sync::Always)?);
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
        assert_eq!(span(&path)?, (1, 200));
        // A torn last line (a crash mid-write) is dropped on reopen, and the chain goes on.
        OpenOptions::new().append(true).open(&path)?.write_all(b"{\"seq\":201,\"prev\":\"ab")?;
        let spool = Spool::open(&path, 1000, 0, Sync::Always)?;
        assert_eq!(spool.append("{\"n\":\"after\"}".into()).await?, 201);
        drop(spool);
        assert_eq!(span(&path)?, (1, 201));
        Ok(())
    }
}
