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
}

/// Runs `coffer audit …`.
pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { files } = args.command;
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
