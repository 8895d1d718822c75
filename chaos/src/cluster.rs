//! A local drill cluster: real `coffer server` processes on fixed loopback ports, each with a copy
//! of one SoftHSM token (one root key), formed with `coffer operator init` and `join`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::links::Links;

/// The node's HSM fault-injection file (`hsm.fault-file`), relative to its directory.
const HSM_FAULT_FILE: &str = "hsm-fault";

/// One node of the drill cluster.
pub struct Node {
    /// Raft node id (1-based).
    pub id: u64,
    /// Its directory (config, token, data, log).
    pub dir: PathBuf,
    /// Its loopback port.
    pub port: u16,
    child: Option<Child>,
}

impl Node {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether the process is running (as far as the drill knows).
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of local nodes, stopped (SIGKILL) when dropped.
pub struct Cluster {
    coffer: PathBuf,
    _root: tempfile::TempDir,
    /// The nodes.
    pub nodes: Vec<Node>,
    links: Option<Links>,
}

/// Writes `DIR/softhsm2.conf`, pointing SoftHSM at the token directory `DIR/tokens`.
///
/// # Errors
/// The file cannot be written.
pub fn write_softhsm_conf(dir: &Path) -> std::io::Result<()> {
    std::fs::write(
        dir.join("softhsm2.conf"),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )
}

/// A loopback port that was free a moment ago.
///
/// # Errors
/// No port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Copies a directory tree (a SoftHSM token directory, so every node holds the same root key).
///
/// # Errors
/// Any IO failure.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

impl Cluster {
    /// Prepares, starts and forms a cluster of `n` nodes. With `cuttable_links`, every
    /// node-to-node link goes through its own proxy (see [`Links`]); call it within the Tokio
    /// runtime then.
    pub fn start(coffer: &Path, n: usize, cuttable_links: bool) -> anyhow::Result<Cluster> {
        let root = tempfile::Builder::new().prefix("coffer-drill-").tempdir()?;
        let mut cluster = Cluster { coffer: coffer.to_owned(), _root: root, nodes: Vec::new(), links: None };
        for _ in 0..n {
            cluster.add_node()?;
        }
        if cuttable_links {
            let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
            let links = Links::start(&ports)?;
            for (from, node) in cluster.nodes.iter().enumerate() {
                let via: Vec<String> = (0..n)
                    .filter_map(|to| links.port(from, to).map(|p| (ports[to], p)))
                    .map(|(peer, proxy)| format!("\"127.0.0.1:{peer}\" = \"127.0.0.1:{proxy}\""))
                    .collect();
                let config = node.dir.join("node.toml");
                let text =
                    std::fs::read_to_string(&config)? + &format!("\n[raft]\ndial-via = {{ {} }}\n", via.join(", "));
                std::fs::write(config, text)?;
            }
            cluster.links = Some(links);
        }
        for i in 0..n {
            cluster.start_node(i)?;
        }
        cluster.cli_ok(0, &["operator", "init"])?;
        let first = format!("127.0.0.1:{}", cluster.nodes[0].port);
        for i in 1..n {
            cluster.cli_ok(i, &["operator", "join", "--peer", &first])?;
        }
        Ok(cluster)
    }

    /// Prepares one more node (token copied from node 1, not started, not joined); returns its index.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let id = self.nodes.len() as u64 + 1;
        let dir = self._root.path().join(format!("node{id}"));
        std::fs::create_dir_all(dir.join("tokens"))?;
        write_softhsm_conf(&dir)?;
        let port = free_port()?;
        std::fs::write(
            dir.join("node.toml"),
            format!(
                "node-id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata-dir = \"data\"\nwrite-timeout = \"2s\"\n\
                 [hsm]\ntoken-label = \"drill\"\npin-file = \"pin\"\nfault-file = \"{HSM_FAULT_FILE}\"\n"
            ),
        )?;
        let node = Node { id, dir, port, child: None };
        if let Some(first) = self.nodes.first() {
            std::fs::copy(first.dir.join("pin"), node.dir.join("pin"))?;
            copy_dir(&first.dir.join("tokens"), &node.dir.join("tokens"))?;
        } else {
            std::fs::write(node.dir.join("pin"), "4321")?;
            std::fs::write(node.dir.join("so-pin"), "87654321")?;
            let so_pin = node.dir.join("so-pin").display().to_string();
            run_ok(&self.coffer, &node, &["hsm", "init-token", "--so-pin-file", &so_pin, "--config"])?;
            run_ok(&self.coffer, &node, &["hsm", "init-root-key", "--config"])?;
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    /// The cuttable node-to-node links, if the cluster was started with them.
    pub fn links(&self) -> Option<&Links> {
        self.links.as_ref()
    }

    /// Starts (`true`) or ends an HSM outage on node `i`: while its fault file exists, every
    /// PKCS#11 call of the node fails as if the token were gone.
    pub fn hsm_fault(&self, i: usize, on: bool) -> anyhow::Result<()> {
        let file = self.nodes[i].dir.join(HSM_FAULT_FILE);
        if on {
            std::fs::write(file, "drill")?;
        } else if file.exists() {
            std::fs::remove_file(file)?;
        }
        Ok(())
    }

    /// The `coffer` binary the cluster runs.
    pub fn coffer(&self) -> &Path {
        &self.coffer
    }

    /// Starts node `i` and waits until it answers.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(node.dir.join("server.log"))?;
        let child = Command::new(&self.coffer)
            .args(["server", "--config"])
            .arg(node.dir.join("node.toml"))
            .env("SOFTHSM2_CONF", node.dir.join("softhsm2.conf"))
            .env("RUST_LOG", "warn,openraft=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.coffer.display()))?;
        self.nodes[i].child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].port)).is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("node {} did not listen within 30 s", i + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// kill -9 node `i`. Returns once the process has been reaped: from then on it holds no socket
    /// and answers nothing, which is the instant the drills count the fault from.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(std::process::Child::id)
    }

    /// The exit status of node `i` if its process has exited by itself; `None` while it runs.
    pub fn exited(&mut self, i: usize) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match self.nodes[i].child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// SIGTERM node `i`; returns once the process has exited and been reaped.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Runs the CLI against node `i`.
    pub fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Ok(Command::new(&self.coffer)
            .args(args)
            .env("COFFER_ADDR", self.nodes[i].url())
            // A node waiting for its HSM accepts connections but does not answer yet.
            .env("COFFER_TIMEOUT", "5s")
            .stdin(Stdio::null())
            .output()?)
    }

    /// Runs the CLI and fails with its stderr unless it succeeds.
    pub fn cli_ok(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(i, args)?;
        if !out.status.success() {
            bail!("node {}: coffer {args:?}: {}", i + 1, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The index of the current leader among running nodes, waiting up to 10 s.
    pub fn leader(&self) -> anyhow::Result<usize> {
        let started = Instant::now();
        loop {
            for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| n.is_up()) {
                if let Ok(text) = self.cli_ok(i, &["operator", "status", "-o", "json"]) {
                    let status: serde_json::Value = serde_json::from_str(&text)?;
                    let leader = status["leader_id"].as_u64();
                    if let Some(j) = self.nodes.iter().position(|n| Some(n.id) == leader && n.is_up()) {
                        return Ok(j);
                    }
                }
                let _ = node;
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("no leader among the running nodes within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn run_ok(coffer: &Path, node: &Node, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(coffer)
        .args(args)
        .arg(node.dir.join("node.toml"))
        .env("SOFTHSM2_CONF", node.dir.join("softhsm2.conf"))
        .output()?;
    if !out.status.success() {
        bail!("coffer {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
