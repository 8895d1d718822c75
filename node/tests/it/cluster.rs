//! A multi-process test cluster: real `coffer` nodes on fixed 127.0.0.1 ports (so a restarted
//! node keeps the address its peers know), one copied SoftHSM token each, all holding one root key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coffer_chaos::cluster::{copy_dir, free_port, write_softhsm_conf};
use coffer_proto::v1::secrets_client::SecretsClient;
use tonic::transport::Channel;

use crate::{coffer_bin, TestNode};

pub(crate) struct ClusterNode {
    pub id: u64,
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl ClusterNode {
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub(crate) struct TestCluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<ClusterNode>,
}

impl TestCluster {
    /// Prepares `n` nodes (`extra` is appended to each config), starts them, initialises the
    /// cluster on node 1 and joins the others.
    pub(crate) fn must_start(n: usize, extra: &str) -> anyhow::Result<TestCluster> {
        let mut cluster = Self::must_prepare(n, extra)?;
        for i in 0..n {
            cluster.must_restart(i)?;
        }
        cluster.must_cli_ok(0, &["operator", "init"])?;
        let first = format!("127.0.0.1:{}", cluster.nodes[0].port);
        for i in 1..n {
            cluster.must_cli_ok(i, &["operator", "join", "--peer", &first])?;
        }
        Ok(cluster)
    }

    /// Writes every node's directory without starting anything. With `COFFER_KEEP_TEST_DIRS` set,
    /// the directory (node logs included) is kept after the test and its path printed.
    pub(crate) fn must_prepare(n: usize, extra: &str) -> anyhow::Result<TestCluster> {
        let mut root = tempfile::tempdir()?;
        if std::env::var_os("COFFER_KEEP_TEST_DIRS").is_some() {
            root.disable_cleanup(true);
            eprintln!("cluster directory kept: {}", root.path().display());
        }
        let mut cluster = TestCluster { root, nodes: Vec::new() };
        for _ in 0..n {
            cluster.must_add_node(extra)?;
        }
        Ok(cluster)
    }

    /// Prepares one more node (not started, not joined); returns its index.
    pub(crate) fn must_add_node(&mut self, extra: &str) -> anyhow::Result<usize> {
        let id = self.nodes.len() as u64 + 1;
        let dir = self.root.path().join(format!("node{id}"));
        if id == 1 {
            TestNode::must_prepare(&dir, "tokens")?;
        } else {
            let first = &self.nodes[0].dir;
            std::fs::create_dir_all(&dir)?;
            copy_dir(&first.join("tokens"), &dir.join("tokens"))?;
            std::fs::copy(first.join("pin"), dir.join("pin"))?;
            write_softhsm_conf(&dir)?;
        }
        let port = free_port()?;
        std::fs::write(
            dir.join("node.toml"),
            format!(
                "node-id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata-dir = \"data\"\nwrite-timeout = \"2s\"\n{extra}\n\
                 [hsm]\ntoken-label = \"test\"\npin-file = \"pin\"\n"
            ),
        )?;
        self.nodes.push(ClusterNode { id, dir, port, child: None });
        Ok(self.nodes.len() - 1)
    }

    pub(crate) fn must_restart(&mut self, i: usize) -> anyhow::Result<()> {
        let (child, _) = TestNode::spawn(&self.nodes[i].dir)?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    pub(crate) fn must_kill9(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    pub(crate) fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(coffer_bin())
            .args(args)
            .env("COFFER_ADDR", self.nodes[i].url())
            .stdin(Stdio::null())
            .output()?)
    }

    pub(crate) fn must_cli_ok(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(i, args)?;
        if !out.status.success() {
            bail!("node {}: coffer {args:?} failed: {}", i + 1, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The index of the leader as seen by running node `i`, waiting up to 10 s for one to exist.
    pub(crate) fn must_leader(&self) -> anyhow::Result<usize> {
        let started = Instant::now();
        loop {
            for (i, node) in self.nodes.iter().enumerate() {
                if !node.is_running() {
                    continue;
                }
                let Ok(text) = self.must_cli_ok(i, &["operator", "status", "-o", "json"]) else { continue };
                let status: serde_json::Value = serde_json::from_str(&text)?;
                if let Some(id) = status["leader_id"].as_u64() {
                    if let Some(j) = self.nodes.iter().position(|n| n.id == id && n.is_running()) {
                        return Ok(j);
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("no leader among the running nodes after 10 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn client(&self, i: usize) -> anyhow::Result<SecretsClient<Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(self.nodes[i].url())?
            .timeout(Duration::from_secs(5))
            .connect_lazy();
        Ok(SecretsClient::new(channel))
    }

    pub(crate) fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("data")
    }

    pub(crate) fn node_dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    /// Waits until node `i` has been told about node membership (used after a restart).
    pub(crate) fn must_wait_member(&self, i: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(text) = self.must_cli_ok(i, &["operator", "status", "-o", "json"]) {
                let status: serde_json::Value = serde_json::from_str(&text).context("status json")?;
                if status["leader_id"].is_u64() {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("node {} found no leader within 20 s", i + 1)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
