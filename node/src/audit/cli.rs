//! `coffer audit …`: audit files from the shell. Works on files only; talks to no server.
#![allow(clippy::print_stdout)] // printing results is what a command line is for

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::chain::{self, Broken};

/// `coffer audit …`
#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check audit files' hash chains and report the first broken link: an edited line, a line
    /// removed, inserted or reordered, a line that is not an audit line. Give a node's rotated
    /// files oldest first to check the chain across them. Exits 1 on a broken chain.
    Verify {
        /// The files, oldest first.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the last records of an audit file (JSON lines, one record each), filtered.
    Tail {
        /// The file.
        file: PathBuf,
        /// How many records to print (the last ones that match).
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
pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let files = match args.command {
        AuditCommand::Verify { files } => files,
        AuditCommand::Tail { file, lines, principal, path, method, decision } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let mut shown = std::collections::VecDeque::with_capacity(lines);
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
    let mut broken = false;
    for file in files {
        let reader = std::io::BufReader::new(
            std::fs::File::open(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
        );
        match chain::verify(reader) {
            Ok(v) => match v.span {
                Some((first, last)) => {
                    println!("{}: {} records, seq {first}..{last}, chain intact", file.display(), v.lines);
                }
                None => println!("{}: empty", file.display()),
            },
            Err(e @ (Broken::Unreadable { .. } | Broken::Edited { .. } | Broken::OutOfChain { .. })) => {
                println!("{}: BROKEN: {e}", file.display());
                broken = true;
            }
        }
    }
    Ok(if broken { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
