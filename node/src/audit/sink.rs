//! Sinks: the spool's lines copied to a collector over TCP, drained asynchronously.
//!
//! Each sink is a task that tails the spool files (the live one and, after a rotation, the one
//! renamed away) from its cursor, sends complete lines (the chain lines themselves, so the
//! collector can verify them too) as JSON lines, and moves its cursor once a batch is written.
//! Calls never wait for a sink: a hung or slow collector adds lag, shown by `operator status`,
//! not latency.
//!
//! # Correctness
//! - At least once, in order: a batch is kept until it is written in full; a failed or timed
//!   out write drops the connection and the same batch is sent first on the next one. The
//!   cursor (the last seq written) is saved next to the spool (`<spool>.sink-<name>`) after each
//!   batch, so a restart resumes there (and may send the last batch again).
//! - Every connect and write has the sink's `timeout`; then the sink backs off (up to 30 s) and
//!   tries again. The socket's send buffer is bounded ([`SEND_BUFFER`]), so "written" is close
//!   to "received": a stalled collector stalls the sink after at most that much.
//! - A new sink (no cursor yet) starts with the oldest spool file kept.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::config::SinkConfig;

/// What a sink has done, for `operator status`.
#[derive(Debug, Default)]
pub struct SinkState {
    /// The last seq written to the collector.
    pub delivered: AtomicU64,
    /// The last failure, while the sink is failing.
    pub error: Mutex<Option<String>>,
}

/// The most lines one write carries.
const BATCH_LINES: usize = 1024;
/// How often an idle sink looks for new lines.
const POLL: Duration = Duration::from_millis(100);

/// Where sink `name` keeps its cursor.
pub fn cursor_path(spool: &Path, name: &str) -> PathBuf {
    let mut file = spool.as_os_str().to_owned();
    file.push(format!(".sink-{name}"));
    PathBuf::from(file)
}

/// The name a rotated spool file gets: its first seq, zero-padded so names sort in order.
pub fn rotated_path(spool: &Path, first_seq: u64) -> PathBuf {
    let mut file = spool.as_os_str().to_owned();
    file.push(format!(".{first_seq:020}"));
    PathBuf::from(file)
}

/// The rotated files of `spool`, by first seq.
pub fn rotated_files(spool: &Path) -> Vec<(u64, PathBuf)> {
    let Some(dir) = spool.parent() else { return vec![] };
    let Some(name) = spool.file_name().and_then(|n| n.to_str()) else { return vec![] };
    let prefix = format!("{name}.");
    let mut found: Vec<(u64, PathBuf)> =
        std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let file = entry.file_name().into_string().ok()?;
                let seq = file.strip_prefix(&prefix)?;
                (seq.len() == 20).then(|| seq.parse().ok()).flatten().map(|seq| (seq, entry.path()))
            })
            .collect();
    found.sort();
    found
}

/// Reads the spool's lines in order, across rotations, never past what the writer has
/// confirmed (a group that failed is cut back and written again, with other records).
struct Tail {
    spool: PathBuf,
    reader: BufReader<std::fs::File>,
    /// Where in the current file the next line starts.
    offset: u64,
    partial: String,
}

fn inode(file: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| m.ino())
}

impl Tail {
    /// Opens the file that holds the line after `cursor`: the last rotated file that starts at
    /// or before it, else the live one.
    fn open(spool: &Path, cursor: u64) -> std::io::Result<Tail> {
        let from = rotated_files(spool).into_iter().rfind(|(first, _)| *first <= cursor + 1);
        let file = std::fs::File::open(from.as_ref().map_or(spool, |(_, p)| p.as_path()))?;
        Ok(Tail { spool: spool.to_owned(), reader: BufReader::new(file), offset: 0, partial: String::new() })
    }

    /// The next complete lines (up to `max`) the writer has confirmed (seq up to `confirmed`),
    /// as (seq, line with its newline).
    fn next(&mut self, max: usize, confirmed: u64) -> std::io::Result<Vec<(u64, String)>> {
        let mut lines = Vec::new();
        while lines.len() < max {
            if !self.partial.ends_with('\n') {
                let n = self.reader.read_line(&mut self.partial)?;
                if n == 0 || !self.partial.ends_with('\n') {
                    if lines.is_empty() && self.advance()? {
                        continue;
                    }
                    break;
                }
            }
            let seq = serde_json::from_str::<serde_json::Value>(&self.partial)
                .ok()
                .and_then(|v| v["seq"].as_u64())
                .unwrap_or(0);
            if seq > confirmed {
                // Not confirmed yet (or never: a failed group): read it again later.
                self.reader.seek(SeekFrom::Start(self.offset))?;
                self.partial.clear();
                break;
            }
            self.offset += self.partial.len() as u64;
            lines.push((seq, std::mem::take(&mut self.partial)));
        }
        Ok(lines)
    }

    /// At the end of this file: moves to the next one if this one is complete (it is no longer
    /// the live spool, and nothing was left to read). Returns whether there may be more now.
    fn advance(&mut self) -> std::io::Result<bool> {
        let this = inode(self.reader.get_ref());
        let live = std::fs::File::open(&self.spool).ok();
        if live.as_ref().and_then(inode) == this {
            return Ok(false);
        }
        // No longer live: the writer renamed it after its last write, which may have landed
        // after the end seen just now.
        if self.reader.read_line(&mut self.partial)? > 0 {
            return Ok(self.partial.ends_with('\n'));
        }
        self.partial.clear();
        let files = rotated_files(&self.spool);
        let at = files.iter().position(|(_, p)| std::fs::File::open(p).ok().as_ref().and_then(inode) == this);
        let next = match at.and_then(|i| files.get(i + 1)) {
            Some((_, path)) => std::fs::File::open(path)?,
            None => match live {
                Some(live) => live,
                None => return Ok(false),
            },
        };
        self.reader = BufReader::new(next);
        self.offset = 0;
        Ok(true)
    }
}

/// Drains the spool to the sink's collector, until aborted; `confirmed` says up to which seq
/// the writer has written successfully.
pub async fn run(
    spool: PathBuf,
    config: SinkConfig,
    state: Arc<SinkState>,
    confirmed: impl Fn() -> u64 + Send + 'static,
) {
    let cursor_file = cursor_path(&spool, &config.name);
    let cursor = std::fs::read_to_string(&cursor_file).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
    state.delivered.store(cursor, Ordering::Relaxed);
    let mut tail = loop {
        match Tail::open(&spool, cursor) {
            Ok(tail) => break tail,
            Err(e) => {
                fail(&state, &config, format!("cannot read the spool: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut batch: Vec<(u64, String)> = Vec::new();
    let mut connection: Option<tokio::net::TcpStream> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        if batch.is_empty() {
            let confirmed = confirmed();
            match tokio::task::block_in_place(|| tail.next(BATCH_LINES, confirmed)) {
                // Lines up to the cursor (the start of a file read again) were sent already.
                Ok(lines) => batch = lines.into_iter().filter(|(seq, _)| *seq > cursor).collect(),
                Err(e) => fail(&state, &config, format!("cannot read the spool: {e}")),
            }
            if batch.is_empty() {
                tokio::time::sleep(POLL).await;
                continue;
            }
        }
        let failed = match send(&mut connection, &config, &batch).await {
            Ok(()) => {
                let last = batch.last().map_or(cursor, |(seq, _)| *seq);
                state.delivered.store(last, Ordering::Relaxed);
                *state.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                batch.clear();
                backoff = Duration::from_millis(200);
                let mut tmp = cursor_file.as_os_str().to_owned();
                tmp.push(".tmp");
                if std::fs::write(&tmp, format!("{last}\n")).and_then(|()| std::fs::rename(&tmp, &cursor_file)).is_err()
                {
                    tracing::warn!(sink = %config.name, "cannot save the sink's cursor");
                }
                None
            }
            Err(why) => Some(why),
        };
        if let Some(why) = failed {
            connection = None;
            fail(&state, &config, why);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// Writes one batch, connecting first if need be; each step within the sink's timeout.
async fn send(
    connection: &mut Option<tokio::net::TcpStream>,
    config: &SinkConfig,
    batch: &[(u64, String)],
) -> Result<(), String> {
    let stream = match connection {
        Some(stream) => stream,
        None => match tokio::time::timeout(config.timeout, connect(&config.address)).await {
            Ok(Ok(stream)) => connection.insert(stream),
            Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", config.address)),
            Err(_) => return Err(format!("connecting to {} timed out", config.address)),
        },
    };
    let bytes: String = batch.iter().map(|(_, line)| line.as_str()).collect();
    let written = tokio::time::timeout(config.timeout, async {
        stream.write_all(bytes.as_bytes()).await?;
        stream.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("writing to {} failed: {e}", config.address)),
        Err(_) => Err(format!("writing to {} timed out after {:?}", config.address, config.timeout)),
    }
}

/// The most a sink leaves in its socket's send buffer: what the cursor counts as delivered but
/// the collector may not have read yet, and what a write waits behind when the collector stalls.
const SEND_BUFFER: u32 = 64 * 1024;

/// Connects to `address` (`host:port`) with a bounded send buffer.
async fn connect(address: &str) -> std::io::Result<tokio::net::TcpStream> {
    let addr = tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address"))?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_send_buffer_size(SEND_BUFFER)?;
    socket.connect(addr).await
}

fn fail(state: &SinkState, config: &SinkConfig, why: String) {
    let mut error = state.error.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if error.as_deref() != Some(why.as_str()) {
        tracing::warn!(sink = %config.name, error = %why, "audit sink failing; retrying (calls are not held)");
    }
    *error = Some(why);
}
