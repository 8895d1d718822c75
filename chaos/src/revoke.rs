//! The revocation drill: a token is revoked while a follower is cut off from the cluster, under
//! the drill's workload, and every node must stop serving it within the bound Coffer states
//! (`crypto-staleness`, 1 s by default) of the revoke's acknowledgement, the cut-off node
//! included.
//!
//! One prober per node calls encrypt with the token every 10 ms and records each answer. The
//! findings are the time from the revoke's acknowledgement to each node's first refusal, and any
//! call served when it must not have been:
//! - on a connected node, a call started later than the bound after the acknowledgement;
//! - on the cut-off node, any call started after the acknowledgement (it stopped vouching for
//!   credentials one bound after the cut, before the revoke), and after the heal it must refuse
//!   the token as revoked (it applied the revoke) within 10 s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use coffer_proto::v1::keys_client::KeysClient;
use coffer_proto::v1::EncryptRequest;
use coffer_testkit::Cluster;
use tonic::Code;

use crate::fault::{FaultKind, FaultLog, Hit, Role};
use crate::links::Links;
use crate::workload::{Targets, KEY_NAME};

/// The bound Coffer states: a node checks credentials only while it has heard from the leader
/// within `crypto-staleness` (1 s by default, the drills' setting).
pub const BOUND: Duration = Duration::from_secs(1);

/// What a drill found beside its history: measurements, and broken promises.
#[derive(Debug, Default)]
pub struct Findings {
    /// Measurements, for the report.
    pub notes: Vec<String>,
    /// Broken promises: each fails the drill.
    pub violations: Vec<String>,
}

/// One probe call: when it started and ended, and its status code (`Ok` served).
#[derive(Debug, Clone, Copy)]
struct Sample {
    invoked: Instant,
    completed: Instant,
    code: Code,
}

/// One prober per node, calling encrypt with `token` until stopped (at most 10 minutes).
struct Probes {
    samples: Vec<Arc<Mutex<Vec<Sample>>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probes {
    fn start(targets: &Targets, token: &str) -> anyhow::Result<Probes> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut samples = Vec::new();
        let mut threads = Vec::new();
        for i in 0..targets.urls.len() {
            let endpoint = targets.endpoint(i)?.timeout(Duration::from_secs(2));
            let bearer: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}").parse()?;
            let (mine, stop) = (Arc::new(Mutex::new(Vec::new())), stop.clone());
            samples.push(mine.clone());
            threads.push(std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                runtime.block_on(async move {
                    let mut keys = KeysClient::new(endpoint.connect_lazy());
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(600) {
                        let mut request = tonic::Request::new(EncryptRequest {
                            name: KEY_NAME.into(),
                            plaintext: b"probe".to_vec(),
                            associated_data: vec![],
                        });
                        request.metadata_mut().insert("authorization", bearer.clone());
                        let invoked = Instant::now();
                        let code = keys.encrypt(request).await.map_or_else(|s| s.code(), |_| Code::Ok);
                        let sample = Sample { invoked, completed: Instant::now(), code };
                        mine.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(sample);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
            }));
        }
        Ok(Probes { samples, stop, threads })
    }

    /// The samples of node `i` so far.
    fn of(&self, i: usize) -> Vec<Sample> {
        self.samples[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn stop(self) -> Vec<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.samples.iter().map(|s| s.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()).collect()
    }
}

fn root_cli(cluster: &Cluster, i: usize, root: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = cluster.cli_as(i, Some(root), args)?;
    anyhow::ensure!(out.status.success(), "coffer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The drill's fault phase (see the module documentation): the follower after the leader is
/// cut off through `links` for `duration`; the cut goes into `faults` once it holds.
pub fn run(
    cluster: &Cluster,
    links: &Links,
    targets: &Targets,
    duration: Duration,
    faults: &mut FaultLog,
    findings: &mut Findings,
) -> anyhow::Result<()> {
    let leader = cluster.leader()?;
    let cut = (leader + 1) % cluster.nodes.len();
    let others: Vec<usize> = (0..cluster.nodes.len()).filter(|i| *i != cut).collect();
    let cut_off = |down: bool| links.set_between(&[cut], &others, !down);
    let root = cluster.root_token().context("the cluster printed no root token")?.to_owned();
    let policy = cluster.node_dir(leader).join("drill-encrypt.toml");
    std::fs::write(&policy, format!("[[rule]]\npath = \"key/{KEY_NAME}\"\nallow = [\"encrypt\"]\n"))?;
    let policy = policy.to_str().context("a UTF-8 temp path")?;
    root_cli(cluster, leader, &root, &["policy", "write", "drill-encrypt", policy])?;
    let made: serde_json::Value = serde_json::from_str(&root_cli(
        cluster,
        leader,
        &root,
        &["token", "create", "--policy", "drill-encrypt", "--ttl", "1h", "-o", "json"],
    )?)?;
    let token = made["token"].as_str().context("no token in the CLI's answer")?.to_owned();
    let accessor = made["accessor"].as_str().context("no accessor in the CLI's answer")?.to_owned();

    let probes = Probes::start(targets, &token)?;
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..targets.urls.len() {
        let served = probes.of(i).iter().any(|s| s.code == Code::Ok);
        anyhow::ensure!(served, "node {} never served the token before the fault", i + 1);
    }
    cut_off(true);
    let cut_at = Instant::now();
    let hit = Hit { index: cut, id: cluster.nodes[cut].id, role: Some(Role::Follower) };
    faults.in_effect(FaultKind::Partition, vec![hit]);
    // Past the bound, the cut-off node no longer vouches for any credential.
    std::thread::sleep(BOUND + Duration::from_millis(500));
    let sent = Instant::now();
    root_cli(cluster, leader, &root, &["token", "revoke", "--accessor", &accessor])?;
    let acked = Instant::now();
    findings.notes.push(format!(
        "revoke: sent {} after the cut, acknowledged in {}",
        ms(sent - cut_at),
        ms(acked - sent)
    ));
    // Long enough that the cut-off node, which holds each call up to the bound before refusing,
    // answers at least one probe started after the bound and before the heal.
    std::thread::sleep(duration.saturating_sub(BOUND + Duration::from_millis(500)).max(Duration::from_millis(2500)));
    cut_off(false);
    let healed = Instant::now();
    // The cut-off node catches up and refuses the token as revoked.
    let caught_up = loop {
        let last = probes.of(cut).into_iter().filter(|s| s.invoked >= healed).find(|s| s.code == Code::Unauthenticated);
        if let Some(s) = last {
            break Some(s.completed);
        }
        if healed.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let samples = probes.stop();

    for (i, node) in samples.iter().enumerate() {
        let role = if i == cut {
            "cut off"
        } else if i == leader {
            "leader"
        } else {
            "follower"
        };
        // A connected node refuses the token as revoked; the cut-off one because it cannot vouch.
        let refusal_code = if i == cut { Code::Unavailable } else { Code::Unauthenticated };
        let first_refusal =
            node.iter().filter(|s| s.invoked >= sent && s.code == refusal_code).map(|s| s.completed).min();
        if i != cut {
            // The cut must not have stopped the connected nodes: they served the token between
            // the cut (plus the bound) and the revoke.
            let served_meanwhile =
                node.iter().any(|s| s.invoked > cut_at + BOUND && s.completed < sent && s.code == Code::Ok);
            if !served_meanwhile {
                findings
                    .violations
                    .push(format!("node {} ({role}) did not serve the token between the cut and the revoke", i + 1));
            }
        }
        let refusal = first_refusal.map_or("never".to_owned(), |at| ms(at.saturating_duration_since(acked)));
        let late = if i == cut { acked } else { acked + BOUND };
        let served_late = node.iter().filter(|s| s.invoked > late && s.code == Code::Ok).count();
        findings.notes.push(format!(
            "node {} ({role}): first refusal {refusal} after the revoke was acknowledged; {} calls served after it",
            i + 1,
            node.iter().filter(|s| s.invoked > acked && s.code == Code::Ok).count()
        ));
        if served_late > 0 {
            findings.violations.push(format!(
                "node {} ({role}) served the revoked token {served_late} times past the bound ({} after the acknowledgement)",
                i + 1,
                ms(late - acked)
            ));
        }
        if first_refusal.is_none() {
            findings.violations.push(format!("node {} ({role}) never refused the revoked token", i + 1));
        }
    }
    let during: Vec<Code> = samples[cut]
        .iter()
        .filter(|s| s.invoked > cut_at + BOUND + Duration::from_millis(200) && s.completed < healed)
        .map(|s| s.code)
        .collect();
    if during.contains(&Code::Ok) {
        findings.violations.push(format!("node {} served the token while cut off past the bound", cut + 1));
    }
    if during.is_empty() || !during.iter().all(|c| *c == Code::Unavailable) {
        findings.violations.push(format!(
            "node {} was not refusing with UNAVAILABLE while cut off ({} calls: {during:?}): was it cut off?",
            cut + 1,
            during.len()
        ));
    }
    findings.notes.push(format!(
        "node {} refused {} calls while cut off ({}), and after the heal {}",
        cut + 1,
        during.len(),
        if during.iter().all(|c| *c == Code::Unavailable) {
            "all UNAVAILABLE: it cannot vouch"
        } else {
            "not all UNAVAILABLE"
        },
        caught_up.map_or("never refused it as revoked".to_owned(), |at| format!(
            "refused it as revoked {} after the heal",
            ms(at - healed)
        ))
    ));
    if caught_up.is_none() {
        findings
            .violations
            .push(format!("node {} did not refuse the revoked token as revoked within 10 s of the heal", cut + 1));
    }
    Ok(())
}
