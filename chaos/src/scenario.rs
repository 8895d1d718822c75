//! Drill scenarios: each starts a fresh local cluster, runs the workload, injects a real fault
//! (signals to real processes), heals it, checks the history and the state, and reports.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use coffer_proto::v1::keys_client::KeysClient;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{DecryptRequest, DescribeRequest, GetRequest};
use tonic::transport::Channel;

use coffer_testkit::{Cluster, Options, TestPki};

use crate::checker;
use crate::fault::{FaultKind, FaultLog, Hit, Role};
use crate::history::{Call, Op, Outcome};
use crate::links::Links;
use crate::report::{Latency, Report};
use crate::revoke;
use crate::workload::{self, Recorder, Targets, KEY_NAME};

/// The drills that run against a local cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// kill -9 the leader, restart it later.
    KillLeader,
    /// kill -9 a follower, restart it later.
    KillFollower,
    /// kill -9 whoever leads, every few seconds, restarting the previous victim each time.
    KillLeaderRepeatedly,
    /// SIGTERM and restart every node, one at a time.
    RollingRestart,
    /// kill -9 the leader while the Keys key is being rotated again and again.
    KillLeaderDuringRotation,
    /// kill -9 the leader while a fourth node is joining.
    KillLeaderDuringJoin,
    /// cut every link between the leader and the other nodes, then heal them.
    PartitionLeader,
    /// five nodes: cut the leader and one follower off from the other three, then heal.
    PartitionMinority,
    /// cut and heal the link between the leader and one follower, again and again.
    FlappingLink,
    /// one follower's HSM fails (and the node restarts during it), then every node's, then all recover.
    HsmOutage,
    /// cut a follower off, revoke a token that probes use on every node, heal: every node stops
    /// serving it within the stated bound, the cut-off one included.
    RevokeDuringPartition,
}

impl Scenario {
    /// Every scenario, in the order the suite runs them.
    pub const ALL: [Scenario; 11] = [
        Scenario::KillLeader,
        Scenario::KillFollower,
        Scenario::KillLeaderRepeatedly,
        Scenario::RollingRestart,
        Scenario::KillLeaderDuringRotation,
        Scenario::KillLeaderDuringJoin,
        Scenario::PartitionLeader,
        Scenario::PartitionMinority,
        Scenario::FlappingLink,
        Scenario::HsmOutage,
        Scenario::RevokeDuringPartition,
    ];

    /// The scenario's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::KillLeader => "kill-leader",
            Scenario::KillFollower => "kill-follower",
            Scenario::KillLeaderRepeatedly => "kill-leader-repeatedly",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::KillLeaderDuringRotation => "kill-leader-during-rotation",
            Scenario::KillLeaderDuringJoin => "kill-leader-during-join",
            Scenario::PartitionLeader => "partition-leader",
            Scenario::PartitionMinority => "partition-minority",
            Scenario::FlappingLink => "flapping-link",
            Scenario::HsmOutage => "hsm-outage",
            Scenario::RevokeDuringPartition => "revoke-during-partition",
        }
    }

    /// How many nodes the scenario's cluster has.
    fn nodes(self) -> usize {
        if self == Scenario::PartitionMinority {
            5
        } else {
            3
        }
    }

    /// Whether the scenario cuts node-to-node links (and so needs a proxy on each).
    fn cuts_links(self) -> bool {
        matches!(
            self,
            Scenario::PartitionLeader
                | Scenario::PartitionMinority
                | Scenario::FlappingLink
                | Scenario::RevokeDuringPartition
        )
    }
}

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The `coffer` binary.
    pub coffer: PathBuf,
    /// How long the fault phase lasts.
    pub fault_duration: Duration,
    /// Concurrent workload clients.
    pub clients: usize,
}

const WARM_UP: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(2);
const VERIFY_RETRY: Duration = Duration::from_secs(10);
/// How long a flapping link stays down, and then up, each time.
const FLAP: Duration = Duration::from_millis(400);

/// Runs one scenario end to end.
pub async fn run(scenario: Scenario, settings: &Settings) -> anyhow::Result<Report> {
    let coffer = settings.coffer.clone();
    let (mut cluster, links) =
        tokio::task::block_in_place(|| start_cluster(&coffer, scenario.nodes(), scenario.cuts_links()))?;
    tokio::task::block_in_place(|| cluster.cli_ok(0, &["key", "create", KEY_NAME]))?;
    if scenario == Scenario::KillLeaderDuringJoin {
        // A fourth node, running but not a member: the drill joins it while killing the leader.
        tokio::task::block_in_place(|| {
            let i = cluster.add_node()?;
            cluster.start_node(i)
        })?;
    }
    let targets = Targets { urls: cluster.nodes.iter().map(|n| n.url()).collect(), tls: cluster.client_tls()? };
    // The rotation drill must actually rotate: at least a few versions by the end.
    let min_versions = if scenario == Scenario::KillLeaderDuringRotation { 3 } else { 1 };
    let mut findings = revoke::Findings::default();
    let mut report = drive(scenario.name(), &targets, settings, min_versions, |faults| {
        if scenario == Scenario::RevokeDuringPartition {
            let links = links.as_ref().context("this drill needs cuttable links")?;
            revoke::run(&cluster, links, &targets, settings.fault_duration, faults, &mut findings)
        } else {
            inject(scenario, &mut cluster, links.as_ref(), settings.fault_duration, faults)
        }
    })
    .await?;
    report.add_findings(findings.notes, findings.violations);
    Ok(report)
}

/// Prepares, starts and forms a local cluster of `n` nodes with the test kit's launcher. With
/// `cuttable_links`, every node-to-node link goes through its own proxy (see [`Links`]), set in
/// each node's `raft.dial-via` before it starts; call it within the Tokio runtime then.
fn start_cluster(coffer: &Path, n: usize, cuttable_links: bool) -> anyhow::Result<(Cluster, Option<Links>)> {
    let mut cluster = Cluster::prepare(coffer, n, Options::drills())?;
    let mut links = None;
    if cuttable_links {
        let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.peer_port).collect();
        let proxies = Links::start(&ports)?;
        for from in 0..n {
            let via: Vec<String> = (0..n)
                .filter_map(|to| proxies.port(from, to).map(|p| (ports[to], p)))
                .map(|(peer, proxy)| format!("\"127.0.0.1:{peer}\" = \"127.0.0.1:{proxy}\""))
                .collect();
            cluster.append_config(from, &format!("[raft]\ndial-via = {{ {} }}\n", via.join(", ")))?;
        }
        links = Some(proxies);
    }
    for i in 0..n {
        cluster.start_node(i)?;
    }
    cluster.form()?;
    Ok((cluster, links))
}

/// Runs the workload and checks against a cluster the operator runs, with the fault injected and
/// healed by the operator's own commands (`sh -c`). Secrets are written under `drill/`, and a Keys
/// key named `drill` is created if missing.
pub async fn run_against(
    targets: &[String],
    fault_cmd: &str,
    heal_cmd: &str,
    settings: &Settings,
) -> anyhow::Result<Report> {
    let urls: Vec<String> =
        targets.iter().map(|t| if t.contains("://") { t.clone() } else { format!("http://{t}") }).collect();
    // TLS to an operator's cluster: its CA and a client certificate, as the CLI takes them.
    let tls = if urls.iter().any(|u| u.starts_with("https://")) {
        let path = |var: &str| std::env::var_os(var).map(PathBuf::from);
        let ca = path("COFFER_CACERT").context("https targets need COFFER_CACERT (the cluster's CA certificate)")?;
        let identity = path("COFFER_CLIENT_CERT").zip(path("COFFER_CLIENT_KEY"));
        Some(coffer_tls::client_config(&coffer_tls::ClientFiles { ca, identity })?)
    } else {
        None
    };
    let targets = Targets { urls, tls };
    let channel = targets.endpoint(0)?.timeout(Duration::from_secs(5)).connect_lazy();
    let create = coffer_proto::v1::CreateKeyRequest {
        name: KEY_NAME.into(),
        r#type: coffer_proto::v1::KeyType::Aes256Gcm as i32,
        ..Default::default()
    };
    match KeysClient::new(channel).create_key(create).await {
        Ok(_) => {}
        Err(s) if s.code() == tonic::Code::AlreadyExists => {}
        Err(s) => anyhow::bail!("cannot create the drill key on {}: {}", targets.urls[0], s.message()),
    }
    let duration = settings.fault_duration;
    drive("target", &targets, settings, 1, |faults| {
        shell(fault_cmd)?;
        // Which nodes the command hits, and when it really takes effect, only the operator knows.
        faults.in_effect(FaultKind::Command, Vec::new());
        std::thread::sleep(duration);
        shell(heal_cmd)
    })
    .await
}

fn shell(cmd: &str) -> anyhow::Result<()> {
    eprintln!("coffer-chaos: running `{cmd}`");
    let status = std::process::Command::new("sh").args(["-c", cmd]).status()?;
    anyhow::ensure!(status.success(), "`{cmd}` failed with {status}");
    Ok(())
}

/// Warm-up, fault and heal (`inject`, which records each fault as it takes effect), settle, then
/// every check.
async fn drive(
    name: &str,
    targets: &Targets,
    settings: &Settings,
    min_key_versions: u32,
    inject: impl FnOnce(&mut FaultLog) -> anyhow::Result<()>,
) -> anyhow::Result<Report> {
    let recorder = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let clients = workload::start(targets, settings.clients, 8, &recorder, &stop)?;
    tokio::time::sleep(WARM_UP).await;

    let mut faults = FaultLog::new(&recorder);
    let injected = tokio::task::block_in_place(|| inject(&mut faults));
    let heal_us = recorder.now_us();
    let faults = faults.into_faults();
    tokio::time::sleep(SETTLE).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await?;
    }
    injected?;
    anyhow::ensure!(!faults.is_empty(), "the drill injected no fault: is the fault phase too short?");
    let history = recorder.history();

    let mut violations = checker::linearizable(&history);
    let (found, search) = tokio::task::block_in_place(|| checker::search(&history));
    violations.extend(found);
    violations.extend(check_stale_reads(&history));
    violations.extend(verify_state(targets, &history, min_key_versions).await?);
    Ok(Report::new(name, &history, faults, heal_us, violations, search))
}

/// Node `i` as a fault's target.
fn hit(cluster: &Cluster, i: usize, role: Option<Role>) -> Hit {
    Hit { index: i, id: cluster.nodes[i].id, role }
}

/// Injects the fault and heals it; returns when the cluster is whole again. Each fault goes into
/// `faults` as soon as it is in effect, not before: after the killed process is reaped, after the
/// links are cut, after the HSM fault files are written.
#[allow(clippy::too_many_lines)] // one arm per scenario reads better than ten small functions
fn inject(
    scenario: Scenario,
    cluster: &mut Cluster,
    links: Option<&Links>,
    duration: Duration,
    faults: &mut FaultLog,
) -> anyhow::Result<()> {
    let leader_hit = |cluster: &Cluster, i| hit(cluster, i, Some(Role::Leader));
    let follower_hit = |cluster: &Cluster, i| hit(cluster, i, Some(Role::Follower));
    match scenario {
        Scenario::KillLeader | Scenario::KillFollower => {
            let leader = cluster.leader()?;
            let (victim, role) = if scenario == Scenario::KillLeader {
                (leader, Role::Leader)
            } else {
                ((leader + 1) % cluster.nodes.len(), Role::Follower)
            };
            cluster.kill(victim)?;
            faults.in_effect(FaultKind::Kill, vec![hit(cluster, victim, Some(role))]);
            std::thread::sleep(duration);
            cluster.start_node(victim)?;
        }
        Scenario::KillLeaderRepeatedly => {
            let started = Instant::now();
            let mut down: Option<usize> = None;
            while started.elapsed() < duration {
                let leader = cluster.leader()?;
                cluster.kill(leader)?;
                faults.in_effect(FaultKind::Kill, vec![leader_hit(cluster, leader)]);
                if let Some(previous) = down.replace(leader) {
                    cluster.start_node(previous)?;
                }
                std::thread::sleep(Duration::from_secs(3).min(duration));
            }
            if let Some(previous) = down {
                cluster.start_node(previous)?;
            }
        }
        Scenario::KillLeaderDuringRotation => {
            // Rotations through every node, several a second, while the leader dies and returns.
            let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
            let coffer = cluster.coffer().to_owned();
            let tls_env = cluster.pki().map(TestPki::cli_env).unwrap_or_default();
            let rotating = Arc::new(AtomicBool::new(true));
            let flag = rotating.clone();
            let rotator = std::thread::spawn(move || {
                let mut i = 0usize;
                while flag.load(Ordering::Relaxed) && i < 10_000 {
                    let _ = std::process::Command::new(&coffer)
                        .args(["key", "rotate", KEY_NAME])
                        .env("COFFER_ADDR", &urls[i % urls.len()])
                        .envs(tls_env.iter().cloned())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status();
                    i += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            std::thread::sleep(Duration::from_millis(500));
            let leader = cluster.leader()?;
            cluster.kill(leader)?;
            faults.in_effect(FaultKind::Kill, vec![leader_hit(cluster, leader)]);
            std::thread::sleep(duration);
            cluster.start_node(leader)?;
            std::thread::sleep(Duration::from_millis(500));
            rotating.store(false, Ordering::Relaxed);
            let _ = rotator.join();
        }
        Scenario::KillLeaderDuringJoin => {
            let joiner = cluster.nodes.len() - 1;
            let leader = cluster.leader()?;
            let peer = cluster.nodes[leader].peer_addr();
            let token = cluster.join_token(leader)?;
            let retry_token = token.clone();
            let (coffer, url) = (cluster.coffer().to_owned(), cluster.nodes[joiner].url());
            let tls_env = cluster.pki().map(TestPki::cli_env).unwrap_or_default();
            let join = std::thread::spawn(move || {
                std::process::Command::new(coffer)
                    .args(["operator", "join", "--peer", &peer, "--token", &token])
                    .env("COFFER_ADDR", url)
                    .envs(tls_env)
                    .output()
            });
            std::thread::sleep(Duration::from_millis(30));
            cluster.kill(leader)?;
            faults.in_effect(FaultKind::Kill, vec![leader_hit(cluster, leader)]);
            std::thread::sleep(duration);
            cluster.start_node(leader)?;
            let first_try = join.join().map_err(|_| anyhow::anyhow!("the join thread panicked"))??;
            // As an operator would: if the join was cut short, run it again until the node is a voter.
            let started = Instant::now();
            let mut joined = first_try.status.success();
            while !joined && started.elapsed() < Duration::from_secs(30) {
                let leader = cluster.leader()?;
                let peer = cluster.nodes[leader].peer_addr();
                // The same token: spent on this node already, or not at all.
                let out = cluster.cli(joiner, &["operator", "join", "--peer", &peer, "--token", &retry_token])?;
                let text = String::from_utf8_lossy(&out.stderr);
                // A join that did land leaves the node a voter; asking again says so. A join cut
                // short leaves a learner, and asking again promotes it.
                joined = out.status.success() || text.contains("already part of a cluster");
                if !joined {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            anyhow::ensure!(joined, "node {} could not join after the leader came back", joiner + 1);
            wait_for_voter(cluster, cluster.nodes[joiner].id)?;
        }
        Scenario::PartitionLeader | Scenario::PartitionMinority => {
            let links = links.context("this drill needs cuttable links")?;
            let leader = cluster.leader()?;
            let n = cluster.nodes.len();
            // The minority: the leader alone, or with one follower in five nodes.
            let minority: Vec<usize> =
                if scenario == Scenario::PartitionMinority { vec![leader, (leader + 1) % n] } else { vec![leader] };
            let majority: Vec<usize> = (0..n).filter(|i| !minority.contains(i)).collect();
            links.set_between(&minority, &majority, false);
            let cut_off = minority
                .iter()
                .map(|&i| if i == leader { leader_hit(cluster, i) } else { follower_hit(cluster, i) })
                .collect();
            faults.in_effect(FaultKind::Partition, cut_off);
            std::thread::sleep(duration);
            links.set_between(&minority, &majority, true);
        }
        Scenario::FlappingLink => {
            let links = links.context("this drill needs cuttable links")?;
            let leader = cluster.leader()?;
            let follower = (leader + 1) % cluster.nodes.len();
            let started = Instant::now();
            // Down and up in turns of a few election timeouts, bounded in count as in time.
            for _ in 0..1000 {
                if started.elapsed() >= duration {
                    break;
                }
                links.set(leader, follower, false);
                faults
                    .in_effect(FaultKind::LinkCut, vec![leader_hit(cluster, leader), follower_hit(cluster, follower)]);
                std::thread::sleep(FLAP);
                links.set(leader, follower, true);
                std::thread::sleep(FLAP);
            }
        }
        Scenario::RevokeDuringPartition => anyhow::bail!("the revocation drill runs through revoke::run"),
        Scenario::HsmOutage => {
            let leader = cluster.leader()?;
            let follower = (leader + 1) % cluster.nodes.len();
            let third = duration / 3;
            // A running node does not need its HSM: one follower's goes, then it restarts and must
            // wait for the HSM instead of exiting.
            cluster.hsm_fault(follower, true)?;
            faults.in_effect(FaultKind::HsmOutage, vec![follower_hit(cluster, follower)]);
            std::thread::sleep(third);
            cluster.kill(follower)?;
            faults.in_effect(FaultKind::Kill, vec![follower_hit(cluster, follower)]);
            cluster.start_node(follower)?;
            std::thread::sleep(third.max(Duration::from_secs(1)));
            anyhow::ensure!(
                cluster.exited(follower)?.is_none(),
                "node {} exited when it found its HSM unavailable at start, instead of waiting for it",
                follower + 1
            );
            // Then every node's HSM; the nodes say so in their status, and go on serving.
            for i in 0..cluster.nodes.len() {
                cluster.hsm_fault(i, true)?;
            }
            // Roles as the drill found them at its start; only a follower has restarted since.
            let every = (0..cluster.nodes.len())
                .map(|i| if i == leader { leader_hit(cluster, i) } else { follower_hit(cluster, i) })
                .collect();
            faults.in_effect(FaultKind::HsmOutage, every);
            let status: serde_json::Value =
                serde_json::from_str(&cluster.cli_ok(leader, &["operator", "status", "-o", "json"])?)?;
            let hsm = status["hsm"].as_str().unwrap_or_default().to_owned();
            anyhow::ensure!(hsm != "ok", "operator status reports the HSM {hsm:?} during the outage");
            std::thread::sleep(third);
            for i in 0..cluster.nodes.len() {
                cluster.hsm_fault(i, false)?;
            }
        }
        Scenario::RollingRestart => {
            let pause = duration / cluster.nodes.len() as u32;
            for i in 0..cluster.nodes.len() {
                cluster.stop(i)?;
                // Roles unknown: asking who leads before each stop would change the drill's timing.
                faults.in_effect(FaultKind::Stop, vec![hit(cluster, i, None)]);
                cluster.start_node(i)?;
                std::thread::sleep(pause);
            }
        }
    }
    cluster.leader().map(|_| ())
}

/// Waits until the leader lists `id` as a voter.
fn wait_for_voter(cluster: &Cluster, id: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let leader = cluster.leader()?;
        let status: serde_json::Value =
            serde_json::from_str(&cluster.cli_ok(leader, &["operator", "status", "-o", "json"])?)?;
        let voter = status["members"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["node_id"].as_u64() == Some(id) && m["voter"] == true));
        if voter {
            return Ok(());
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "node {id} did not become a voter within 30 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A bounded-staleness read must reflect every write acknowledged more than the bound (plus one
/// bound of slack for heartbeat and apply delays) before it began.
fn check_stale_reads(history: &[Op]) -> Vec<String> {
    let mut out = Vec::new();
    for read in history {
        let Call::Read { key, max_staleness_ms: Some(bound) } = &read.call else { continue };
        let seen = match &read.outcome {
            Outcome::Value { version, .. } => *version,
            Outcome::Missing => 0,
            _ => continue,
        };
        let horizon = read.invoke_us.saturating_sub(2 * bound * 1000);
        let required = history
            .iter()
            .filter(|w| w.complete_us < horizon)
            .filter_map(|w| match (&w.call, &w.outcome) {
                (Call::Write { key: k, .. }, Outcome::Written { version }) if k == key => Some(*version),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        if seen < required {
            out.push(format!(
                "{key}: a read bounded to {bound} ms at {}us saw version {seen}, older than version {required} acknowledged before {}us",
                read.invoke_us, horizon
            ));
        }
    }
    out
}

async fn retrying<T, F, Fut>(mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = Instant::now();
    loop {
        match f().await {
            Err(s) if s.code() == tonic::Code::Unavailable && started.elapsed() < VERIFY_RETRY => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

/// After recovery: every acknowledged write reads back on every node, every acknowledged ciphertext
/// decrypts on every node, and no value was applied twice.
async fn verify_state(targets: &Targets, history: &[Op], min_key_versions: u32) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let channels: Vec<Channel> = (0..targets.urls.len())
        .map(|i| Ok(targets.endpoint(i)?.timeout(Duration::from_secs(5)).connect_lazy()))
        .collect::<anyhow::Result<_>>()?;
    // The workload keeps 1000 versions a secret: in a long drill the oldest are pruned by design.
    // A version below the oldest kept one counts as pruned only if the secret keeps a full set.
    let mut oldest_kept: HashMap<String, u64> = HashMap::new();
    {
        let secrets = SecretsClient::new(channels[0].clone());
        let keys: std::collections::BTreeSet<&str> = history
            .iter()
            .filter_map(|op| match &op.call {
                Call::Write { key, .. } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        for key in keys {
            let described = retrying(|| {
                let (mut c, path) = (secrets.clone(), key.to_owned());
                async move { c.describe(DescribeRequest { path }).await }
            })
            .await;
            if let Ok(d) = described {
                let d = d.into_inner();
                if d.versions.len() as u32 >= d.max_versions {
                    if let Some(first) = d.versions.first() {
                        oldest_kept.insert(key.to_owned(), first.version);
                    }
                }
            }
        }
    }
    for (i, channel) in channels.iter().enumerate() {
        let secrets = SecretsClient::new(channel.clone());
        for op in history {
            if let (Call::Write { key, value }, Outcome::Written { version }) = (&op.call, &op.outcome) {
                if oldest_kept.get(key).is_some_and(|oldest| version < oldest) {
                    continue;
                }
                let req = GetRequest {
                    path: key.clone(),
                    version: Some(*version),
                    max_staleness: None,
                    stage: String::new(),
                };
                match retrying(|| {
                    let (mut c, req) = (secrets.clone(), req.clone());
                    async move { c.get(req).await }
                })
                .await
                {
                    Ok(r) if r.get_ref().value == value.as_bytes() => {}
                    Ok(r) => out.push(format!(
                        "node {}: {key} v{version} reads {:?}, acknowledged as {value:?}",
                        i + 1,
                        String::from_utf8_lossy(&r.get_ref().value)
                    )),
                    Err(s) => out.push(format!(
                        "node {}: acknowledged write {key} v{version} is lost: {}",
                        i + 1,
                        s.message()
                    )),
                }
            }
        }
        let keys = KeysClient::new(channel.clone());
        for op in history {
            if let (Call::Encrypt { plaintext }, Outcome::Encrypted { ciphertext }) = (&op.call, &op.outcome) {
                let req =
                    DecryptRequest { name: KEY_NAME.into(), ciphertext: ciphertext.clone(), associated_data: vec![] };
                match retrying(|| {
                    let (mut c, req) = (keys.clone(), req.clone());
                    async move { c.decrypt(req).await }
                })
                .await
                {
                    Ok(r) if r.get_ref().plaintext == plaintext.as_bytes() => {}
                    Ok(_) => out.push(format!("node {}: a ciphertext decrypts to the wrong plaintext", i + 1)),
                    Err(s) => out.push(format!(
                        "node {}: an acknowledged ciphertext no longer decrypts: {}",
                        i + 1,
                        s.message()
                    )),
                }
            }
        }
    }
    // Every node agrees on the Keys key's versions (rotations went through the log).
    let mut views = Vec::new();
    for channel in &channels {
        let key = retrying(|| {
            let mut c = KeysClient::new(channel.clone());
            async move { c.get_key(coffer_proto::v1::GetKeyRequest { name: KEY_NAME.into() }).await }
        })
        .await;
        match key {
            Ok(k) => {
                let k = k.into_inner();
                views.push((
                    k.primary_version,
                    k.versions.iter().map(|v| (v.version, v.public_key.clone())).collect::<Vec<_>>(),
                ));
            }
            Err(s) => out.push(format!("the drill key cannot be read: {}", s.message())),
        }
    }
    if let Some((primary, _)) = views.first() {
        if *primary < min_key_versions {
            out.push(format!("the drill key reached only version {primary}; expected at least {min_key_versions}"));
        }
    }
    if views.windows(2).any(|w| w[0] != w[1]) {
        out.push(format!(
            "nodes disagree on the drill key's versions: primaries {:?}",
            views.iter().map(|v| v.0).collect::<Vec<_>>()
        ));
    }
    // Every value at most once across a key's versions: a retried or forwarded write was not applied twice.
    let secrets = SecretsClient::new(channels[0].clone());
    let keys: std::collections::BTreeSet<&str> = history
        .iter()
        .filter_map(|op| match &op.call {
            Call::Write { key, .. } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    for key in keys {
        let Ok(described) = retrying(|| {
            let (mut c, path) = (secrets.clone(), key.to_owned());
            async move { c.describe(DescribeRequest { path }).await }
        })
        .await
        else {
            continue;
        };
        let mut seen: HashMap<Vec<u8>, u64> = HashMap::new();
        for v in &described.get_ref().versions {
            let req = GetRequest {
                path: key.to_owned(),
                version: Some(v.version),
                max_staleness: None,
                stage: String::new(),
            };
            let fetched = retrying(|| {
                let (mut c, req) = (secrets.clone(), req.clone());
                async move { c.get(req).await }
            })
            .await;
            if let Ok(r) = fetched {
                if let Some(first) = seen.insert(r.into_inner().value, v.version) {
                    out.push(format!("{key}: one write was applied twice (versions {first} and {})", v.version));
                }
            }
        }
    }
    Ok(out)
}

/// p50 and p99 of successful operations' latency in a window.
pub fn latency(history: &[Op], from_us: u64, to_us: u64) -> Latency {
    let mut lat: Vec<u64> = history
        .iter()
        .filter(|o| o.ok() && o.invoke_us >= from_us && o.invoke_us < to_us)
        .map(Op::latency_us)
        .collect();
    lat.sort_unstable();
    let pick = |q: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
        }
    };
    Latency { count: lat.len(), p50_ms: pick(0.5), p99_ms: pick(0.99) }
}

/// Errors by gRPC status name.
pub fn errors(history: &[Op]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for op in history {
        if let Outcome::Failed { code } = &op.outcome {
            *out.entry(code.clone()).or_insert(0) += 1;
        }
    }
    out
}
