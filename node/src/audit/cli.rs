//! `coffer audit …`: audit files from the shell. `verify` and `tail` work on files and talk to
//! no server; `hash` asks a node for a value's keyed HMAC.
#![allow(clippy::print_stdout)] // printing results is what a command line is for

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::chain;
use super::verify::{self, Ending};

/// `coffer audit …`
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check audit files and report the first broken link: an edited line, a line removed,
    /// inserted or reordered, a checkpoint forged or signed by another key, records rewritten
    /// under a checkpoint, a file cut short after a checkpoint. Exits 1 on a broken file.
    ///
    /// Give a node's rotated files in order (audit.log.<first seq>…, then audit.log): each is
    /// checked, and each must continue the chain of the one before it when that one ended with
    /// a rotation. Pin the node's checkpoint key with --key (it is in
    /// `audit.log.pub` next to the node's spool; keep a copy where the node's host cannot
    /// change it): without it, the file's first checkpoint names the key, which proves only
    /// that the file is consistent with itself.
    Verify {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The public key the checkpoints must be signed by: hex, or a file holding it.
        #[arg(long)]
        key: Option<String>,
    },
    /// The keyed HMAC of a value, as audit records hold it in `value_hmac`: find the calls that
    /// wrote or read it (`grep` the files for the hex). Needs `hmac` on sys/audit/hash. The
    /// value is read from standard input (kept out of the process list), or from --file.
    Hash {
        /// Read the value from this file instead of standard input (taken as is, bytes and all).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Where and how to connect.
        #[command(flatten)]
        conn: crate::cli::client::ConnectArgs,
    },
    /// Print the last records of an audit file (JSON lines, one record each), filtered.
    Tail {
        /// The file.
        file: PathBuf,
        /// How many records to print (the last ones that match; 0: all of them).
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: usize,
        /// Only records whose principal contains this (an accessor, a certificate name).
        #[arg(long)]
        principal: Option<String>,
        /// Only records whose path starts with this (secret/app/, key/payments).
        #[arg(long)]
        path: Option<String>,
        /// Only records whose method contains this (Secrets/Get, Keys/).
        #[arg(long)]
        method: Option<String>,
        /// Only records with this decision.
        #[arg(long, value_parser = ["allowed", "denied", "unauthenticated"])]
        decision: Option<String>,
    },
}

/// Whether a record (the `record` object of a line) passes the filters.
fn matches(
    record: &serde_json::Value,
    principal: Option<&str>,
    path: Option<&str>,
    method: Option<&str>,
    decision: Option<&str>,
) -> bool {
    let field = |name: &str| record[name].as_str().unwrap_or_default();
    principal.is_none_or(|p| field("principal").contains(p))
        && path.is_none_or(|p| field("path").starts_with(p))
        && method.is_none_or(|m| field("method").contains(m))
        && decision.is_none_or(|d| field("decision") == d)
}

/// Runs `coffer audit …`.
pub async fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let (files, key) = match args.command {
        AuditCommand::Hash { file, conn } => {
            use std::io::Read;
            let mut value = zeroize::Zeroizing::new(Vec::new());
            match file {
                Some(path) => {
                    *value =
                        std::fs::read(&path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                }
                None => {
                    std::io::stdin().read_to_end(&mut value)?;
                }
            }
            let mut client = coffer_proto::v1::auth_client::AuthClient::new(crate::cli::client::connect(&conn).await?);
            let request = coffer_proto::v1::AuditHashRequest { value: value.to_vec() };
            let reply = client
                .audit_hash(request)
                .await
                .map_err(|s| anyhow::anyhow!("{}", crate::cli::client::describe_status(&s)))?;
            println!("{}", reply.into_inner().hmac);
            return Ok(ExitCode::SUCCESS);
        }
        AuditCommand::Verify { files, key } => (files, key),
        AuditCommand::Tail { file, lines, principal, path, method, decision } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            // 0: every matching record.
            let lines = if lines == 0 { usize::MAX } else { lines };
            let mut shown = std::collections::VecDeque::with_capacity(lines.min(4096));
            for line in text.lines() {
                let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
                if matches(
                    &value["record"],
                    principal.as_deref(),
                    path.as_deref(),
                    method.as_deref(),
                    decision.as_deref(),
                ) {
                    if shown.len() == lines {
                        shown.pop_front();
                    }
                    shown.push_back(value["record"].to_string());
                }
            }
            for record in shown {
                println!("{record}");
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let pinned = match key {
        None => None,
        Some(key) => {
            let text = match std::fs::read_to_string(&key) {
                Ok(text) => text,
                Err(_) => key.clone(),
            };
            Some(hex::decode(text.trim()).map_err(|_| {
                anyhow::anyhow!("--key {key:?}: not a hex public key, nor a file holding one (see audit.log.pub)")
            })?)
        }
    };
    let mut broken = false;
    // The place where the last file given ended, when it ended with a rotation.
    let mut rotated_at: Option<(PathBuf, chain::Head)> = None;
    for file in files {
        let reader = std::io::BufReader::new(
            std::fs::File::open(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
        );
        match verify::verify(reader, pinned.as_deref(), crate::node::now_ms()) {
            Ok(report) => {
                let Some((first, last)) = report.span else {
                    println!("{}: empty", file.display());
                    continue;
                };
                // A rotated file is named for its first seq.
                let named = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.rsplit_once('.'))
                    .filter(|(_, seq)| seq.len() == 20)
                    .and_then(|(_, seq)| seq.parse::<u64>().ok());
                if named.is_some_and(|seq| seq != first) {
                    println!(
                        "{}: BROKEN: named for seq {} but starts at seq {first} (lines removed from its start)",
                        file.display(),
                        named.unwrap_or_default()
                    );
                    broken = true;
                }
                if first != 1 && rotated_at.is_none() {
                    println!(
                        "  note: {} starts at seq {first}, continuing an earlier file not given: its start is checked only when that file is given before it",
                        file.display()
                    );
                }
                if let (Some((before, end)), Some((prev, _))) = (&rotated_at, &report.joins) {
                    if *prev != end.hash || first != end.seq + 1 {
                        println!(
                            "{}: BROKEN: does not continue {} (which ended at seq {} with a rotation): files missing or out of order",
                            file.display(),
                            before.display(),
                            end.seq
                        );
                        broken = true;
                    }
                }
                rotated_at = match (&report.ending, &report.joins) {
                    (Ending::Rotated, Some((_, end))) => Some((file.clone(), end.clone())),
                    _ => None,
                };
                let ending = match report.ending {
                    Ending::Closed => "ends with a clean stop".to_owned(),
                    Ending::Rotated => "ends with a rotation (the next file continues it)".to_owned(),
                    Ending::Live { unvouched: 0 } => "live (its node is writing it)".to_owned(),
                    Ending::Live { unvouched } => {
                        format!("live; {unvouched} record(s) after the last checkpoint are not vouched for yet")
                    }
                    Ending::Empty => "empty".to_owned(),
                };
                let key = report.key.as_deref().unwrap_or_default();
                let pin = if pinned.is_some() { "pinned" } else { "not pinned: pass --key" };
                println!(
                    "{}: {} lines, seq {first}..{last}, chain intact, {} checkpoint(s) signed by key {}… ({pin}), {ending}",
                    file.display(),
                    report.lines,
                    report.checkpoints,
                    &key[..key.len().min(16)],
                );
                for note in report.notes {
                    println!("  note: {note}");
                }
            }
            Err(e) => {
                println!("{}: BROKEN: {e}", file.display());
                broken = true;
            }
        }
    }
    Ok(if broken { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
