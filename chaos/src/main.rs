//! `coffer-chaos`: run failover drills and write their reports.
#![allow(clippy::print_stdout)] // the report is the output

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use coffer_chaos::scenario::{self, Scenario, Settings};

/// Failover drills: real faults against a local Coffer cluster, a checker, and a report.
#[derive(Debug, Parser)]
#[command(name = "coffer-chaos", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run drills, each on a fresh local cluster (3 nodes, 5 for partition-minority); exits 1 if any finds a violation.
    Run {
        /// The scenarios to run (default: all).
        #[arg(long, value_enum, value_delimiter = ',')]
        scenario: Vec<Scenario>,
        /// How long each fault phase lasts.
        #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
        fault_duration: Duration,
        /// Concurrent workload clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Where to write report.md, and per scenario a JSON report and its history (JSON lines).
        #[arg(long, default_value = "drill-reports")]
        out: PathBuf,
        /// The coffer binary (default: the one next to this binary).
        #[arg(long)]
        coffer: Option<PathBuf>,
        /// Drill a cluster you already run instead of local ones: its nodes' addresses,
        /// comma-separated. Writes secrets under drill/ and uses a Keys key named drill.
        #[arg(long, value_delimiter = ',', requires_all = ["fault_cmd", "heal_cmd"])]
        target: Vec<String>,
        /// With --target: the shell command that injects the fault (e.g. `ssh n1 systemctl kill -s KILL coffer`).
        #[arg(long)]
        fault_cmd: Option<String>,
        /// With --target: the shell command that heals it, run after --fault-duration.
        #[arg(long)]
        heal_cmd: Option<String>,
    },
}

fn main() -> ExitCode {
    let Command::Run { scenario, fault_duration, clients, out, coffer, target, fault_cmd, heal_cmd } =
        Cli::parse().command;
    let coffer = coffer
        .or_else(|| std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("coffer"))))
        .unwrap_or_else(|| PathBuf::from("coffer"));
    let scenarios = if scenario.is_empty() { Scenario::ALL.to_vec() } else { scenario };
    let settings = Settings { coffer, fault_duration, clients: clients.max(1) };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let remote = match (target.is_empty(), fault_cmd, heal_cmd) {
        (false, Some(fault), Some(heal)) => Some((target, fault, heal)),
        _ => None,
    };
    match runtime.block_on(run_all(&scenarios, remote, &settings, &out)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_all(
    scenarios: &[Scenario],
    remote: Option<(Vec<String>, String, String)>,
    settings: &Settings,
    out: &std::path::Path,
) -> anyhow::Result<bool> {
    std::fs::create_dir_all(out)?;
    let mut markdown = String::from("# Drill reports\n\n");
    let mut reports = Vec::new();
    if let Some((targets, fault, heal)) = remote {
        eprintln!("coffer-chaos: drilling {} (fault phase {:?})", targets.join(","), settings.fault_duration);
        reports.push(scenario::run_against(&targets, &fault, &heal, settings).await?);
    } else {
        for s in scenarios {
            eprintln!("coffer-chaos: running {} (fault phase {:?})", s.name(), settings.fault_duration);
            // A drill that hangs is a finding, not a reason to hang CI: bound each one.
            let bound = Duration::from_secs(600) + settings.fault_duration * 3;
            let report = tokio::time::timeout(bound, scenario::run(*s, settings)).await.map_err(|_| {
                anyhow::anyhow!(
                    "drill {} did not finish within {}: something hung",
                    s.name(),
                    humantime::format_duration(bound)
                )
            })??;
            eprintln!("coffer-chaos: {} — {}", s.name(), report.verdict);
            reports.push(report);
        }
    }
    let mut all_passed = true;
    for report in &reports {
        std::fs::write(out.join(format!("{}.json", report.scenario)), serde_json::to_string_pretty(report)?)?;
        let mut lines = String::new();
        for op in &report.history {
            lines.push_str(&serde_json::to_string(op)?);
            lines.push('\n');
        }
        std::fs::write(out.join(format!("{}.history.jsonl", report.scenario)), lines)?;
        markdown.push_str(&report.markdown());
        markdown.push('\n');
        all_passed &= report.passed();
    }
    std::fs::write(out.join("report.md"), &markdown)?;
    println!("{markdown}");
    Ok(all_passed)
}
