//! The one local cluster launcher: real `coffer server` processes on fixed loopback ports (a
//! restarted node keeps the address its peers know), each with a copy of one SoftHSM token (one
//! root key), formed with `coffer operator init` on the first node and `join` on the others.
//!
//! Node tests and drills differ only in [`Options`]; every node's config names the HSM fault
//! file (`hsm-fault` in its directory), which does nothing until [`Cluster::hsm_fault`] writes it.
//! With `COFFER_KEEP_TEST_DIRS` set, the cluster's directory (every node's `server.log`) is kept
//! and its path printed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coffer_proto::v1::secrets_client::SecretsClient;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::pki::TestPki;
use crate::softhsm::{SoftHsm, TOKEN_LABEL};

/// The node's HSM fault-injection file (`hsm.fault-file`), relative to its directory.
const HSM_FAULT_FILE: &str = "hsm-fault";
/// How long a node may take to be ready after its process starts.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// When [`Cluster::start_node`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Once the node accepts connections: it may still be waiting for its HSM. The drills restart
    /// nodes into an HSM outage and time the fault from the restart.
    Listening,
    /// Once the node reports SERVING for `coffer.v1.Secrets` on gRPC health.
    Serving,
}

/// How the launcher sets up and starts nodes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Top-level config lines added to every node's `node.toml` (before its `[hsm]` section).
    pub extra_config: String,
    /// `RUST_LOG` of the node processes.
    pub log_filter: String,
    /// When starting a node returns.
    pub ready: Ready,
    /// `COFFER_TIMEOUT` of the CLI runs; `None`: the CLI's own default (60 s).
    pub cli_timeout: Option<Duration>,
    /// TLS on (the default, as a user runs Coffer), or the nodes' configs say `tls = "off"`.
    pub tls: bool,
}

impl Options {
    /// For tests: `info` logs to read when one fails, and a started node serves.
    pub fn tests(extra_config: &str) -> Options {
        Options {
            extra_config: extra_config.to_owned(),
            log_filter: "info".into(),
            ready: Ready::Serving,
            cli_timeout: None,
            tls: true,
        }
    }

    /// For drills and the benchmark: quiet logs over long runs; a node counts as started once it
    /// listens; a CLI call gives up after 5 s, as a node waiting for its HSM accepts connections
    /// but does not answer yet.
    pub fn drills() -> Options {
        Options {
            extra_config: String::new(),
            log_filter: "warn,openraft=error".into(),
            ready: Ready::Listening,
            cli_timeout: Some(Duration::from_secs(5)),
            tls: true,
        }
    }
}

/// One node of a cluster.
#[derive(Debug)]
pub struct Node {
    /// Raft node id (1-based).
    pub id: u64,
    /// Its directory: `node.toml`, the token set, `data/`, `server.log`.
    pub dir: PathBuf,
    /// Its loopback port.
    pub port: u16,
    /// Its node-to-node port (the client port with TLS off).
    pub peer_port: u16,
    /// Whether it speaks TLS.
    pub tls: bool,
    child: Option<Child>,
}

impl Node {
    /// `https://127.0.0.1:<port>` (`http://` with TLS off).
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "https" } else { "http" }, self.port)
    }

    /// `127.0.0.1:<peer port>`: what other nodes dial, and what `operator join --peer` takes.
    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    /// Whether its process runs (as far as the launcher knows).
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }
}

/// Local `coffer server` processes, killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Cluster {
    coffer: PathBuf,
    options: Options,
    root: tempfile::TempDir,
    pki: Option<TestPki>,
    /// The nodes, in the order they were added.
    pub nodes: Vec<Node>,
    /// The root token `operator init` printed, once formed.
    root_token: Option<String>,
}

impl Cluster {
    /// Prepares `n` nodes running `coffer`, starts them, initialises the cluster on the first and
    /// joins the others through it.
    ///
    /// # Errors
    /// A node cannot be prepared or started, or a `coffer operator` command fails.
    pub fn start(coffer: &Path, n: usize, options: Options) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::prepare(coffer, n, options)?;
        for i in 0..n {
            cluster.start_node(i)?;
        }
        cluster.form()?;
        Ok(cluster)
    }

    /// Writes `n` nodes' directories without starting anything.
    ///
    /// # Errors
    /// A directory, config or token cannot be made.
    pub fn prepare(coffer: &Path, n: usize, options: Options) -> anyhow::Result<Cluster> {
        let mut root = tempfile::Builder::new().prefix("coffer-cluster-").tempdir()?;
        if std::env::var_os("COFFER_KEEP_TEST_DIRS").is_some() {
            root.disable_cleanup(true);
            eprintln!("cluster directory kept: {}", root.path().display());
        }
        let pki = if options.tls { Some(TestPki::create(&root.path().join("tls"))?) } else { None };
        let mut cluster =
            Cluster { coffer: coffer.to_owned(), options, root, pki, nodes: Vec::new(), root_token: None };
        for _ in 0..n {
            cluster.add_node()?;
        }
        Ok(cluster)
    }

    /// Prepares one more node (not started, not joined): the first gets a new token and root
    /// key, the others a copy of the first one's. Returns its index.
    ///
    /// # Errors
    /// A directory, config or token cannot be made.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let id = self.nodes.len() as u64 + 1;
        let dir = self.root.path().join(format!("node{id}"));
        match self.nodes.first() {
            None => SoftHsm::create_with_coffer(&dir, &self.coffer)?,
            Some(first) => SoftHsm::at(&first.dir).copy_to(&dir)?,
        };
        let port = free_port()?;
        let (tls_top, tls_table, peer_port) = match &self.pki {
            Some(pki) => {
                pki.issue_node(id, &dir.join("tls"))?;
                let peer_port = free_port()?;
                (format!("peer-listen = \"127.0.0.1:{peer_port}\"\n"), pki.tls_table(&dir.join("tls")), peer_port)
            }
            None => ("tls = \"off\"\n".to_owned(), String::new(), port),
        };
        std::fs::write(
            dir.join("node.toml"),
            format!(
                "node-id = {id}\nlisten = \"127.0.0.1:{port}\"\ndata-dir = \"data\"\nwrite-timeout = \"2s\"\n{tls_top}{}\n\
                 [hsm]\ntoken-label = \"{TOKEN_LABEL}\"\npin-file = \"pin\"\nfault-file = \"{HSM_FAULT_FILE}\"\n{tls_table}",
                self.options.extra_config
            ),
        )?;
        self.nodes.push(Node { id, dir, port, peer_port, tls: self.pki.is_some(), child: None });
        Ok(self.nodes.len() - 1)
    }

    /// Appends `text` to node `i`'s `node.toml` (a table of its own, such as `[raft]`; not one the
    /// extra config already opened).
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub fn append_config(&self, i: usize, text: &str) -> anyhow::Result<()> {
        let path = self.nodes[i].dir.join("node.toml");
        let config = std::fs::read_to_string(&path)? + "\n" + text;
        std::fs::write(path, config)?;
        Ok(())
    }

    /// Gives stopped node `i` a token of its own in place of its copy: same label and PIN, another
    /// root key.
    ///
    /// # Errors
    /// The token cannot be replaced.
    pub fn replace_token(&self, i: usize) -> anyhow::Result<()> {
        let hsm = SoftHsm::at(&self.nodes[i].dir);
        std::fs::remove_dir_all(hsm.tokens())?;
        SoftHsm::create_with_coffer(hsm.dir(), &self.coffer)?;
        Ok(())
    }

    /// Initialises the cluster on node 1 (keeping the root token it prints), gives the tests'
    /// operator certificate the root policy through a login role ([`TEST_ROLE`]), and joins
    /// every other node through node 1.
    ///
    /// # Errors
    /// A `coffer operator` command fails.
    pub fn form(&mut self) -> anyhow::Result<()> {
        let init: serde_json::Value = serde_json::from_str(&self.cli_ok(0, &["operator", "init", "-o", "json"])?)?;
        let root = init["root_token"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(root.starts_with("cfr_s_"), "operator init printed no root token: {init}");
        if self.pki.is_some() {
            let args = ["auth", "role", "write", TEST_ROLE, "--identity", TEST_IDENTITY, "--policy", "root"];
            let out = self.cli_as(0, Some(&root), &args)?;
            anyhow::ensure!(out.status.success(), "writing the tests' role: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.root_token = Some(root);
        let first = self.nodes[0].peer_addr();
        for i in 1..self.nodes.len() {
            let token = self.join_token(0)?;
            self.cli_ok(i, &["operator", "join", "--peer", &first, "--token", &token])?;
        }
        Ok(())
    }

    /// The root token, once the cluster is formed.
    pub fn root_token(&self) -> Option<&str> {
        self.root_token.as_deref()
    }

    /// Runs the CLI against node `i` with `token` (`COFFER_TOKEN`), or none.
    ///
    /// # Errors
    /// The CLI cannot be run.
    pub fn cli_as(&self, i: usize, token: Option<&str>, args: &[&str]) -> anyhow::Result<Output> {
        coffer_cli(&self.coffer, &self.nodes[i].url(), self.pki.as_ref(), args, None, self.options.cli_timeout, token)
    }

    /// A new join token, created through node `i` (`coffer operator join-token create`).
    ///
    /// # Errors
    /// The CLI fails or prints no token.
    pub fn join_token(&self, i: usize) -> anyhow::Result<String> {
        let text = self.cli_ok(i, &["operator", "join-token", "create", "--ttl", "10m"])?;
        let token = text.trim().to_owned();
        anyhow::ensure!(token.starts_with("cfr_join_"), "no join token in {text:?}");
        Ok(token)
    }

    /// Starts node `i` and waits until it is [`Ready`] as the options say, or fails with its log
    /// if it exits first.
    ///
    /// # Errors
    /// The process cannot start, exits, or is not ready within 60 s.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let (dir, url, port) = (node.dir.clone(), node.url(), node.port);
        let tls = self.client_tls()?;
        let log_path = dir.join("server.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(&self.coffer)
            .args(["server", "--config"])
            .arg(dir.join("node.toml"))
            .env("SOFTHSM2_CONF", SoftHsm::at(&dir).conf())
            .env("RUST_LOG", &self.options.log_filter)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.coffer.display()))?;
        let child = self.nodes[i].child.insert(child);
        let started = Instant::now();
        loop {
            let ready = match self.options.ready {
                Ready::Listening => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
                Ready::Serving => crate::in_process::serving_blocking(&url, tls.clone()),
            };
            if ready {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                self.nodes[i].child = None;
                bail!("node {} exited with {status}: {}", i + 1, std::fs::read_to_string(&log_path)?);
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("node {} was not ready within {START_TIMEOUT:?}", i + 1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9 node `i`. Returns once the process has been reaped: from then on it holds no
    /// socket and answers nothing (the instant the drills count the fault from).
    ///
    /// # Errors
    /// The signal cannot be sent or the process reaped.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM node `i`; returns its exit status once it has exited (`None` if it was not running).
    ///
    /// # Errors
    /// The signal cannot be sent or the process reaped.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut child) = self.nodes[i].child.take() else { return Ok(None) };
        let sent = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {} failed", child.id());
        Ok(Some(child.wait()?))
    }

    /// The process id of node `i`, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    /// The exit status of node `i` if its process has exited by itself; `None` while it runs.
    ///
    /// # Errors
    /// The process cannot be waited for.
    pub fn exited(&mut self, i: usize) -> anyhow::Result<Option<ExitStatus>> {
        match self.nodes[i].child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// Starts (`true`) or ends an HSM outage on node `i`: while its fault file exists, every
    /// PKCS#11 call of the node fails as if the token were gone.
    ///
    /// # Errors
    /// The file cannot be written or removed.
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

    /// Node `i`'s directory.
    pub fn node_dir(&self, i: usize) -> &Path {
        &self.nodes[i].dir
    }

    /// Node `i`'s data directory.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("data")
    }

    /// A Secrets client of node `i` (connects on first use; each call times out after 5 s).
    ///
    /// # Errors
    /// The URL is malformed.
    pub fn client(&self, i: usize) -> anyhow::Result<SecretsClient<Channel>> {
        Ok(SecretsClient::new(self.channel(i)?))
    }

    /// A channel to node `i`, over TLS with the test client certificate when the cluster runs TLS
    /// (connects on first use; each call times out after 5 s).
    ///
    /// # Errors
    /// The URL is malformed or the TLS files cannot be read.
    pub fn channel(&self, i: usize) -> anyhow::Result<Channel> {
        let mut endpoint =
            tonic::transport::Endpoint::from_shared(self.nodes[i].url())?.timeout(Duration::from_secs(5));
        if let Some(tls) = self.client_tls()? {
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// A channel to node `i` for streams that run as long as the test (no per-call timeout).
    ///
    /// # Errors
    /// The URL is malformed or the TLS files cannot be read.
    pub fn stream_channel(&self, i: usize) -> anyhow::Result<Channel> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.nodes[i].url())?;
        if let Some(tls) = self.client_tls()? {
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// The test PKI, when the cluster runs TLS.
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// The clients' TLS configuration, when the cluster runs TLS.
    ///
    /// # Errors
    /// The TLS files cannot be read.
    pub fn client_tls(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        self.pki.as_ref().map(TestPki::client_tls).transpose()
    }

    /// Runs the CLI against node `i`: with the tests' operator certificate, or without TLS
    /// (no certificate to speak) with the root token.
    ///
    /// # Errors
    /// The CLI cannot be run.
    pub fn cli(&self, i: usize, args: &[&str]) -> anyhow::Result<Output> {
        let token = if self.pki.is_none() { self.root_token.as_deref() } else { None };
        coffer_cli(&self.coffer, &self.nodes[i].url(), self.pki.as_ref(), args, None, self.options.cli_timeout, token)
    }

    /// Runs the CLI and fails with its stderr unless it succeeds; returns its stdout.
    ///
    /// # Errors
    /// The CLI cannot be run or fails.
    pub fn cli_ok(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(i, args)?;
        if !out.status.success() {
            bail!("node {}: coffer {args:?}: {}", i + 1, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The index of the leader as the running nodes report it, waiting up to 10 s for one.
    ///
    /// # Errors
    /// No running node names a running leader within 10 s.
    pub fn leader(&self) -> anyhow::Result<usize> {
        let started = Instant::now();
        loop {
            for i in (0..self.nodes.len()).filter(|&i| self.nodes[i].is_up()) {
                let Ok(text) = self.cli_ok(i, &["operator", "status", "-o", "json"]) else { continue };
                let status: serde_json::Value = serde_json::from_str(&text)?;
                let leader = status["leader_id"].as_u64();
                if let Some(j) = self.nodes.iter().position(|n| Some(n.id) == leader && n.is_up()) {
                    return Ok(j);
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("no leader among the running nodes within 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until node `i` knows a leader (after a restart, before it is asked anything).
    ///
    /// # Errors
    /// It names none within 20 s.
    pub fn wait_member(&self, i: usize) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(text) = self.cli_ok(i, &["operator", "status", "-o", "json"]) {
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

/// Runs `coffer ARGS` as a client of the node at `url` (with `pki`'s CA and client certificate
/// when given), with `input` on its stdin if given, `COFFER_TIMEOUT` if `timeout` is given, and
/// `COFFER_TOKEN` if `token` is given. Never a token from the test's environment or home.
///
/// # Errors
/// The CLI cannot be run.
pub fn coffer_cli(
    coffer: &Path,
    url: &str,
    pki: Option<&TestPki>,
    args: &[&str],
    input: Option<&[u8]>,
    timeout: Option<Duration>,
    token: Option<&str>,
) -> anyhow::Result<Output> {
    let mut command = Command::new(coffer);
    command
        .args(args)
        .env("COFFER_ADDR", url)
        .env("COFFER_TOKEN_FILE", "/dev/null")
        .env_remove("COFFER_TOKEN")
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(timeout) = timeout {
        command.env("COFFER_TIMEOUT", format!("{}ms", timeout.as_millis()));
    }
    if let Some(token) = token {
        command.env("COFFER_TOKEN", token);
    }
    for (var, path) in pki.map(TestPki::cli_env).unwrap_or_default() {
        command.env(var, path);
    }
    let mut child = command.spawn().with_context(|| format!("running {}", coffer.display()))?;
    if let (Some(bytes), Some(mut pipe)) = (input, child.stdin.take()) {
        std::io::Write::write_all(&mut pipe, bytes)?;
    }
    Ok(child.wait_with_output()?)
}

/// The login role `form` writes: it gives the tests' operator certificate the root policy, so
/// tests written before tokens still speak with their certificate alone.
pub const TEST_ROLE: &str = "tests";
/// The identity of the tests' client certificate.
pub const TEST_IDENTITY: &str = "spiffe://coffer/operator/test";

/// `message` with `token` in its metadata (`authorization: Bearer …`), as a client sends it.
///
/// # Errors
/// The token cannot travel in a header.
pub fn with_token<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// A loopback port that was free a moment ago, and that no other call in this process has
/// handed out.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), walked from an
/// offset chosen by process id. A port from `bind(":0")` is an ephemeral port: between being
/// released here and bound by a node, an outgoing connection could take it as its source port
/// (CI once lost a node's peer port that way). Below the range, only another listener can take
/// it, and the bind check skips those.
///
/// # Errors
/// No port in the range can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    const LOW: u32 = 10_000;
    let high = ephemeral_low().unwrap_or(0);
    if high < LOW + 2_000 {
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    }
    let span = high - LOW;
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = LOW + NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = u16::try_from(port)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port between {LOW} and {high}")
}

/// The first port of the kernel's ephemeral range, when Linux says.
fn ephemeral_low() -> Option<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}
