//! `coffer-bench`: Coffer under load, beside its baselines, in one run.
//!
//! Starts a local three-node cluster (or uses `--target`), then runs every scenario closed loop
//! (or open loop with `--rate`) for a bounded time, reading the servers' CPU time before and
//! after each, and measures in the same run: ring AES-GCM on one core, SoftHSM wrap and unwrap at
//! the same concurrency, an empty gRPC call, and etcd put and linearizable get when `--etcd`
//! names a cluster. Writes `bench.json` and `bench.md`.
#![allow(clippy::print_stdout)] // the report is the output

mod baselines;
mod load;
mod report;
mod scenarios;

/// etcd's KV API (trimmed; see `proto/etcdserverpb/kv.proto`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)] // generated code
mod etcd {
    tonic::include_proto!("etcdserverpb");
}

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use coffer_testkit::{Cluster, Options};

use crate::load::Shape;
use crate::report::{Figure, Report};
use crate::scenarios::{EtcdScenario, Scenario, Target};

/// Coffer under load, beside its baselines (ring, SoftHSM, an empty RPC, etcd), in one run.
#[derive(Debug, Parser)]
#[command(name = "coffer-bench", version)]
struct Cli {
    /// Coffer nodes to load (`host:port`, comma-separated). Default: start a local 3-node cluster.
    #[arg(long, value_delimiter = ',')]
    target: Vec<String>,
    /// etcd members to load for the comparison (`host:port`, comma-separated); skipped if unset.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Files holding the PIDs of the etcd members, for their CPU time (cluster.sh writes them).
    #[arg(long, value_delimiter = ',')]
    etcd_pid_files: Vec<PathBuf>,
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Concurrent clients (closed loop), or the in-flight cap (open loop).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Open loop at this many operations a second instead of closed loop.
    #[arg(long)]
    rate: Option<u64>,
    /// How long each scenario is measured.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured load before each scenario.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warm_up: Duration,
    /// Secrets written for the memory figure (0: skip it).
    #[arg(long, default_value_t = 100_000)]
    memory_secrets: u64,
    /// Where to write bench.json and bench.md.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// The coffer binary for the local cluster (default: the one next to this binary).
    #[arg(long)]
    coffer: Option<PathBuf>,
    /// Skip the ring and SoftHSM baselines (for a second, open-loop pass).
    #[arg(long)]
    no_baselines: bool,
    /// Skip the TLS cost pass (empty RPC, get-linear and encrypt64 against the TLS cluster and a
    /// plaintext one, alternately).
    #[arg(long)]
    no_tls_cost: bool,
    /// Skip the authorisation cost pass (get-linear and encrypt64 with a least-privilege token
    /// and its policy check, against a cluster with `auth.checks = "off"`, alternately).
    #[arg(long)]
    no_auth_cost: bool,
    /// Skip the audit cost passes (put, get-linear, encrypt64 and encrypt64-batch against a
    /// cluster that audits every call, with `sync = "always"` and then `"10ms"`, and one with
    /// `[audit] enabled = false`, alternately).
    #[arg(long)]
    no_audit_cost: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shape = Shape {
        clients: cli.clients.max(1),
        rate: cli.rate,
        warm_up: cli.warm_up,
        duration: cli.duration,
        max_ops: 50_000_000,
    };
    let coffer = cli
        .coffer
        .clone()
        .or_else(|| std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("coffer"))))
        .unwrap_or_else(|| PathBuf::from("coffer"));
    let (cluster, urls, tls, token) = if cli.target.is_empty() {
        eprintln!("coffer-bench: starting a local 3-node cluster ({})", coffer.display());
        let cluster = tokio::task::block_in_place(|| Cluster::start(&coffer, 3, bench_options(true, Checks::On)))?;
        let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
        let tls = cluster.client_tls()?;
        let token = service_token(&cluster, &urls[0], tls.as_ref()).await?;
        (Some(cluster), urls, tls, Some(token))
    } else {
        let urls = cli.target.iter().map(|t| url(t)).collect::<Vec<_>>();
        // TLS to an operator's cluster: its CA and a client certificate, as the CLI takes them.
        let tls = if urls.iter().any(|u| u.starts_with("https://")) {
            let path = |var: &str| std::env::var_os(var).map(PathBuf::from);
            let ca = path("COFFER_CACERT")
                .ok_or_else(|| anyhow::anyhow!("https targets need COFFER_CACERT (the cluster's CA certificate)"))?;
            let identity = path("COFFER_CLIENT_CERT").zip(path("COFFER_CLIENT_KEY"));
            Some(coffer_tls::client_config(&coffer_tls::ClientFiles { ca, identity })?)
        } else {
            None
        };
        // An operator's cluster: the token the CLI would use (COFFER_TOKEN), if any.
        (None, urls, tls, std::env::var("COFFER_TOKEN").ok())
    };
    let pids: Vec<u32> =
        cluster.as_ref().map(|c| (0..c.nodes.len()).filter_map(|i| c.pid(i)).collect()).unwrap_or_default();
    let mut report = Report::new(cli.clients, cli.rate, cli.duration, urls.len());

    eprintln!("coffer-bench: preparing keys and {} secrets", scenarios::SEEDED);
    let target = Target::prepare(&urls, tls.as_ref(), token.as_deref()).await?;
    let chosen = if cli.scenario.is_empty() {
        <Scenario as clap::ValueEnum>::value_variants().to_vec()
    } else {
        cli.scenario.clone()
    };
    for scenario in chosen {
        let name = <Scenario as clap::ValueEnum>::to_possible_value(&scenario)
            .map_or_else(String::new, |v| v.get_name().to_owned());
        let before = baselines::total_cpu(&pids);
        let m = load::run(&name, shape, target.op(scenario)).await;
        let cpu = baselines::total_cpu(&pids).saturating_sub(before);
        report.push(Figure::new("coffer", &name, m, (!pids.is_empty()).then_some(cpu)));
    }

    // Baselines, in the same run.
    if !cli.no_baselines {
        eprintln!("coffer-bench: baselines");
        run_baselines(&cli, shape, cluster.as_ref(), &mut report).await?;
    }
    if !cli.etcd.is_empty() {
        let etcd_urls: Vec<String> = cli.etcd.iter().map(|e| url(e)).collect();
        let etcd_pids: Vec<u32> = cli
            .etcd_pid_files
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok().and_then(|s| s.trim().parse().ok()))
            .collect();
        let etcd = scenarios::Etcd::prepare(&etcd_urls).await?;
        for (name, s) in [("put", EtcdScenario::Put), ("get-linear", EtcdScenario::GetLinear)] {
            let before = baselines::total_cpu(&etcd_pids);
            let m = load::run(&format!("etcd {name}"), shape, etcd.op(s)).await;
            let cpu = baselines::total_cpu(&etcd_pids).saturating_sub(before);
            report.push(Figure::new(
                &format!("etcd ({} nodes)", etcd_urls.len()),
                name,
                m,
                (!etcd_pids.is_empty()).then_some(cpu),
            ));
        }
    }

    if cluster.is_some() && !cli.no_tls_cost && cli.rate.is_none() {
        eprintln!("coffer-bench: TLS cost: starting two fresh 3-node clusters, with TLS and without");
        let sides = [
            (report::PLAIN_PASS, bench_options(false, Checks::On)),
            (report::TLS_PASS, bench_options(true, Checks::On)),
        ];
        cost_pass(&coffer, shape, &mut report, sides, &report::TLS_COST_SCENARIOS).await?;
    }
    if cluster.is_some() && !cli.no_auth_cost && cli.rate.is_none() {
        eprintln!("coffer-bench: authorisation cost: starting two fresh 3-node clusters, checks off and on");
        let sides = [
            (report::UNCHECKED_PASS, bench_options(true, Checks::Off)),
            (report::CHECKED_PASS, bench_options(true, Checks::On)),
        ];
        cost_pass(&coffer, shape, &mut report, sides, &report::AUTH_COST_SCENARIOS).await?;
    }
    if cluster.is_some() && !cli.no_audit_cost && cli.rate.is_none() {
        // Twice: the default (each record on disk before its answer), and records synced
        // within 10 ms; each against a cluster with audit off, measured alongside.
        for (pass, sync) in [(report::AUDITED_PASS, "always"), (report::AUDITED_WITHIN_PASS, "10ms")] {
            eprintln!("coffer-bench: audit cost: two fresh 3-node clusters, audit off and on (sync = {sync})");
            let mut unaudited = bench_options(true, Checks::On);
            unaudited.extra_config.push_str("[audit]\nenabled = false\n");
            let mut audited = bench_options(true, Checks::On);
            audited.extra_config.push_str(&format!("[audit]\nsync = \"{sync}\"\n"));
            let sides = [(report::UNAUDITED_PASS, unaudited), (pass, audited)];
            cost_pass(&coffer, shape, &mut report, sides, &report::AUDIT_COST_SCENARIOS).await?;
        }
    }

    if cli.memory_secrets > 0 && !pids.is_empty() {
        eprintln!("coffer-bench: writing {} secrets for the memory figure", cli.memory_secrets);
        let rss_before: Vec<u64> = pids.iter().filter_map(|p| baselines::resident_bytes(*p)).collect();
        let fill = Shape {
            rate: None,
            warm_up: Duration::ZERO,
            duration: Duration::from_secs(300),
            max_ops: cli.memory_secrets,
            ..shape
        };
        let m = load::run("memory fill", fill, target.fill()).await;
        let rss_after: Vec<u64> = pids.iter().filter_map(|p| baselines::resident_bytes(*p)).collect();
        report.memory(m.ops, &rss_before, &rss_after);
    }

    std::fs::create_dir_all(&cli.out)?;
    std::fs::write(cli.out.join("bench.json"), serde_json::to_string_pretty(&report)?)?;
    let md = report.markdown();
    std::fs::write(cli.out.join("bench.md"), &md)?;
    println!("{md}");
    Ok(())
}

/// Whether a bench cluster checks credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checks {
    On,
    Off,
}

/// A bench cluster's options: the drills' (quiet logs), TLS on or off, checks on or off. The
/// per-token rate limit is raised far above what one machine can send, so the figures measure
/// the limiter's cost and never its cap.
fn bench_options(tls: bool, checks: Checks) -> Options {
    let checks = match checks {
        Checks::On => "",
        Checks::Off => "checks = \"off\"\n",
    };
    Options { tls, extra_config: format!("[auth]\n{checks}token-rate = 100000000\n"), ..Options::drills() }
}

/// A least-privilege token for the bench on `cluster`, made with its root token.
async fn service_token(
    cluster: &Cluster,
    url: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<String> {
    let root = cluster.root_token().ok_or_else(|| anyhow::anyhow!("the cluster printed no root token"))?;
    scenarios::least_privilege_token(url, tls, root).await
}

/// A cost comparison: two fresh 3-node clusters made with `sides`' options, seeded alike, and
/// each of `scenarios` run against the first and then the second, the other frozen (SIGSTOP)
/// meanwhile, so each has the machine to itself; after a warm-up round, [`COST_ROUNDS`] rounds
/// in alternating order (B A, A B), so a drift of the machine, or an advantage of going first,
/// falls on both sides alike. The goals compare the means.
/// Both are loaded with a least-privilege token.
/// Fresh, not the main pass's cluster: that one carries the main pass's writes (RocksDB
/// compacting them would be measured as the cost).
async fn cost_pass(
    coffer: &std::path::Path,
    shape: Shape,
    report: &mut Report,
    sides: [(&'static str, Options); 2],
    scenarios: &[&str],
) -> anyhow::Result<()> {
    let mut started = Vec::new();
    for (system, options) in sides {
        let cluster = tokio::task::block_in_place(|| Cluster::start(coffer, 3, options))?;
        let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
        let tls = cluster.client_tls()?;
        let token = service_token(&cluster, &urls[0], tls.as_ref()).await?;
        let target = Target::prepare(&urls, tls.as_ref(), Some(&token)).await?;
        let pids: Vec<u32> = (0..cluster.nodes.len()).filter_map(|i| cluster.pid(i)).collect();
        started.push((system, cluster, target, pids));
    }
    // Round 0 warms both sides up and is not recorded: the first side measured after the two
    // clusters start was measured up to 35 % slow, whichever side it was. Then A B, B A: drift
    // and order fall on both sides alike.
    let order = |round: usize, k: usize| if round % 2 == 1 { 1 - k } else { k };
    for (round, i) in (0..=COST_ROUNDS).flat_map(|r| (0..2).map(move |k| (r, order(r, k)))) {
        let idle: Vec<u32> =
            started.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, s)| s.3.clone()).collect();
        let (system, _, target, pids) = &started[i];
        let system = format!("{system} (round {round})");
        signal(&idle, "-STOP");
        tokio::time::sleep(SETTLE).await;
        for name in scenarios {
            let Some(scenario) = <Scenario as clap::ValueEnum>::from_str(name, true).ok() else { continue };
            let shape = if round == 0 { Shape { duration: WARM_ROUND, ..shape } } else { shape };
            let before = baselines::total_cpu(pids);
            let m = load::run(&format!("{system} {name}"), shape, target.op(scenario)).await;
            let cpu = baselines::total_cpu(pids).saturating_sub(before);
            if round > 0 {
                report.push(Figure::new(&system, name, m, Some(cpu)));
            }
        }
        signal(&idle, "-CONT");
    }
    Ok(())
}

/// Measured rounds of a cost pass (after an unrecorded warm-up round).
const COST_ROUNDS: usize = 2;
/// How long each scenario runs in the warm-up round.
const WARM_ROUND: Duration = Duration::from_secs(2);

/// How long a cluster resumed from SIGSTOP is left to settle before it is measured.
const SETTLE: Duration = Duration::from_secs(3);

/// Sends `signal` (`-STOP`, `-CONT`) to `pids`; best effort.
fn signal(pids: &[u32], signal: &str) {
    for pid in pids {
        let _ = std::process::Command::new("kill").args([signal, &pid.to_string()]).status();
    }
}

/// The ring and SoftHSM baselines, at the same concurrency as the Coffer scenarios.
async fn run_baselines(cli: &Cli, shape: Shape, cluster: Option<&Cluster>, report: &mut Report) -> anyhow::Result<()> {
    for bytes in [64, 1024] {
        let m = tokio::task::block_in_place(|| baselines::ring_seal(bytes, cli.duration))?;
        report.push(Figure::new("ring, 1 core", &format!("aes-256-gcm seal {bytes} B"), m, None));
    }
    if let Some(cluster) = cluster {
        let hsm = tokio::task::block_in_place(|| baselines::open_hsm(&cluster.nodes[0].dir))?;
        for (name, op) in [("wrap", baselines::HsmOp::Wrap), ("unwrap", baselines::HsmOp::Unwrap)] {
            let m = load::run(&format!("softhsm {name}"), shape, baselines::hsm_op(hsm.clone(), op).await?).await;
            report.push(Figure::new("softhsm (cryptoki)", name, m, None));
        }
        let gcm = Arc::new(tokio::task::block_in_place(|| baselines::HsmGcm::open(&cluster.nodes[0].dir))?);
        let m = load::run("softhsm aes-gcm 64 B", shape, gcm.op(64)).await;
        report.push(Figure::new("softhsm (cryptoki)", "aes-256-gcm encrypt 64 B", m, None));
    }
    Ok(())
}
