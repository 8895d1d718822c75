//! `coffer dev`: a working local cluster in one command.
//!
//! For each node it makes a directory with a private SoftHSM config, random PINs in files
//! (mode 0600) and a node config. The first node's token gets a fresh root key; the others get a
//! copy of that token directory (the same root key, as a copied HSM backup would give them). It
//! starts every node as a `coffer server` child process, initialises the cluster on node 1, joins
//! the others through it, prints the addresses and how to use them, and stops the nodes on Ctrl-C.
//! Run again with the same `--dir`, it reuses the tokens and data.
//!
//! TLS is on, as in production: a dev CA in `<dir>/tls` issues each node a certificate (for
//! 127.0.0.1 and localhost) and the CLI a client certificate, and `coffer dev` prints the
//! environment variables the CLI needs. A node that dies (a `kill -9` to try a failover) leaves
//! the others running; `coffer dev` prints how to start it again.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use coffer_proto::v1::operator_client::OperatorClient;
use coffer_proto::v1::{CreateJoinTokenRequest, InitRequest, JoinRequest, StatusRequest};
use ring::rand::SecureRandom;
use tokio::process::{Child, Command};

use super::client::ConnectArgs;

/// Options of `coffer dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Keep tokens, configs and data here (created if missing; reused if it holds a dev cluster).
    /// Default: a temporary directory removed on exit.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// How many nodes to run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=7))]
    nodes: u16,
    /// The first node's address; node K listens on the next ports up.
    #[arg(long, default_value = "127.0.0.1:8200")]
    listen: SocketAddr,
}

const TOKEN_LABEL: &str = "coffer-dev";
/// A node's peer port is its client port plus this (the default, +1, is the next node's port).
const PEER_PORT_OFFSET: u16 = 100;
const START_TIMEOUT: Duration = Duration::from_secs(60);

struct DevNode {
    id: u16,
    dir: PathBuf,
    addr: SocketAddr,
    /// Node-to-node (mutual TLS): 100 ports above the client port.
    peer: SocketAddr,
}

impl DevNode {
    fn config(&self) -> PathBuf {
        self.dir.join("node.toml")
    }
    fn softhsm_conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// The dev CA and the CLI's certificate, in `<dir>/tls`.
struct DevTls {
    dir: PathBuf,
}

impl DevTls {
    fn ca_cert(&self) -> PathBuf {
        self.dir.join(coffer_tls::CA_CERT)
    }
    fn client_cert(&self) -> PathBuf {
        self.dir.join("cli.crt")
    }
    fn client_key(&self) -> PathBuf {
        self.dir.join("cli.key")
    }
    /// How the CLI (and `coffer dev` itself) connects to `node`.
    fn connect_args(&self, node: &DevNode) -> ConnectArgs {
        ConnectArgs {
            addr: node.url(),
            cacert: Some(self.ca_cert()),
            client_cert: Some(self.client_cert()),
            client_key: Some(self.client_key()),
            insecure: false,
            // The operator certificate speaks for dev's own calls: a token left in the
            // environment (from another dev cluster) would be refused here.
            no_token: true,
        }
    }

    /// Creates the CA and the CLI's certificate if missing, and each node's certificate; adds a
    /// `[tls]` table to a node config written before TLS (a dev directory from an older release).
    fn ensure(&self, nodes: &[DevNode]) -> anyhow::Result<()> {
        let ca = if self.ca_cert().exists() {
            coffer_tls::Ca::load(&self.dir)?
        } else {
            eprintln!("coffer dev: creating a dev certificate authority in {}", self.dir.display());
            coffer_tls::Ca::create(&self.dir, Duration::from_secs(10 * 365 * 86_400))?
        };
        let until = SystemTime::now() + Duration::from_secs(365 * 86_400);
        if !self.client_cert().exists() {
            ca.issue(&coffer_tls::Subject::Operator("dev".into()), &[], until, &self.dir, "cli")?;
        }
        for node in nodes {
            let tls_dir = node.dir.join("tls");
            if !tls_dir.join("node.crt").exists() {
                let hosts = [node.addr.ip().to_string(), "localhost".to_owned()];
                ca.issue(&coffer_tls::Subject::Node(u64::from(node.id)), &hosts, until, &tls_dir, "node")?;
            }
            let config = node.config();
            if config.exists() && !std::fs::read_to_string(&config)?.contains("[tls]") {
                let mut text = std::fs::read_to_string(&config)?;
                text = text.replacen("\n\n[hsm]", &format!("\n{}\n[hsm]", peer_listen(node)), 1);
                text.push_str(&tls_table(self));
                std::fs::write(&config, text)?;
            }
        }
        Ok(())
    }
}

/// A node config's `peer-listen` line.
fn peer_listen(node: &DevNode) -> String {
    format!("peer-listen = \"{}\"", node.peer)
}

/// A node config's `[tls]` table (paths relative to the node's directory).
fn tls_table(tls: &DevTls) -> String {
    format!("\n[tls]\ncert = \"tls/node.crt\"\nkey = \"tls/node.key\"\nca = \"{}\"\n", tls.ca_cert().display())
}

/// Runs the development cluster until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    ensure_softhsm()?;
    let (temp, root) = match args.dir {
        Some(dir) => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
            (None, std::fs::canonicalize(dir)?)
        }
        None => {
            let temp = tempfile::Builder::new().prefix("coffer-dev-").tempdir()?;
            let path = temp.path().to_owned();
            (Some(temp), path)
        }
    };
    let exe = std::env::current_exe()?;
    let nodes: Vec<DevNode> = (1..=args.nodes)
        .map(|id| {
            let mut addr = args.listen;
            addr.set_port(args.listen.port() + id - 1);
            let mut peer = addr;
            peer.set_port(addr.port() + PEER_PORT_OFFSET);
            DevNode { id, dir: root.join(format!("node{id}")), addr, peer }
        })
        .collect();

    let tls = DevTls { dir: root.join("tls") };
    for node in &nodes {
        if !node.config().exists() {
            prepare(&exe, node, &nodes[0], &tls).await?;
        }
    }
    tls.ensure(&nodes)?;
    let mut children = Vec::new();
    for node in &nodes {
        let child = Command::new(&exe)
            .args(["server", "--config"])
            .arg(node.config())
            .env("SOFTHSM2_CONF", node.softhsm_conf())
            .env("RUST_LOG", "warn,openraft=error")
            .kill_on_drop(true)
            .spawn()?;
        children.push(child);
    }
    for (node, child) in nodes.iter().zip(children.iter_mut()) {
        wait_until_up(node, child, &tls).await?;
    }
    form_cluster(&nodes, &tls).await?;

    let bin_dir = exe.parent().map(|d| d.display().to_string()).unwrap_or_default();
    let addrs: Vec<String> = nodes.iter().map(DevNode::url).collect();
    println!();
    println!("Coffer dev cluster is running ({} node{}).", nodes.len(), if nodes.len() == 1 { "" } else { "s" });
    for node in &nodes {
        println!("  node {}:  {}", node.id, node.url());
    }
    println!("  data:    {}{}", root.display(), if temp.is_some() { " (temporary: removed on exit)" } else { "" });
    println!();
    println!("In another shell (any node will do; writes are forwarded to the leader):");
    println!("  export PATH=\"{bin_dir}:$PATH\" COFFER_ADDR={}", addrs[0]);
    println!(
        "  export COFFER_CACERT={} COFFER_CLIENT_CERT={} COFFER_CLIENT_KEY={}",
        tls.ca_cert().display(),
        tls.client_cert().display(),
        tls.client_key().display()
    );
    // Dev only: a production root token is shown once by `coffer operator init` and never kept.
    let root_token = std::fs::read_to_string(root.join("root-token")).unwrap_or_default();
    println!(
        "  export COFFER_TOKEN={}   # the dev root token (kept in {})",
        root_token.trim(),
        root.join("root-token").display()
    );
    println!("  printf hunter2 | coffer secret put db/password");
    println!("  coffer secret get db/password");
    println!("  coffer operator status");
    if let Some(first) = nodes.first() {
        // Every node audits every call to it (AUDIT.md).
        let audit = first.dir.join("data").join("audit.log");
        println!("  coffer audit tail {} -n 5      # node {}'s audit records", audit.display(), first.id);
    }
    println!();
    println!("Press Ctrl-C to stop.");

    // A node that exits (a `kill -9` to try a failover) is reported once; the others run on.
    let watch = async {
        let mut reported = vec![false; nodes.len()];
        loop {
            for (i, (node, child)) in nodes.iter().zip(children.iter_mut()).enumerate() {
                if let (false, Ok(Some(status))) = (reported[i], child.try_wait()) {
                    reported[i] = true;
                    eprintln!(
                        "coffer dev: node {} exited ({status}); the others keep running. Start it again with:\n  SOFTHSM2_CONF={} {} server --config {}",
                        node.id,
                        node.softhsm_conf().display(),
                        exe.display(),
                        node.config().display()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = super::shutdown_signal() => {}
        () = watch => {}
    }
    for child in &mut children {
        stop(child).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a node's SoftHSM config, PINs and node config. Node 1 gets a new token and root key;
/// the others copy node 1's token directory and PINs.
async fn prepare(exe: &Path, node: &DevNode, first: &DevNode, tls: &DevTls) -> anyhow::Result<()> {
    eprintln!("coffer dev: preparing node {} in {}", node.id, node.dir.display());
    // The node's directory holds its PINs and token: only its owner may enter it.
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(node.dir.join("tokens"))?;
    std::fs::set_permissions(&node.dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(
        node.softhsm_conf(),
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            node.dir.join("tokens").display()
        ),
    )?;
    if node.id == first.id {
        write_secret_file(&node.dir.join("hsm-pin"))?;
        write_secret_file(&node.dir.join("hsm-so-pin"))?;
    } else {
        std::fs::copy(first.dir.join("hsm-pin"), node.dir.join("hsm-pin"))?;
        copy_dir(&first.dir.join("tokens"), &node.dir.join("tokens"))?;
    }
    std::fs::write(
        node.config(),
        format!(
            "# Written by `coffer dev`.\nnode-id = {}\nlisten = \"{}\"\n{}\ndata-dir = \"data\"\n\n[hsm]\ntoken-label = \"{TOKEN_LABEL}\"\npin-file = \"hsm-pin\"\n{}",
            node.id,
            node.addr,
            peer_listen(node),
            tls_table(tls)
        ),
    )?;
    if node.id == first.id {
        let so_pin = node.dir.join("hsm-so-pin").display().to_string();
        step(exe, node, &["hsm", "init-token", "--so-pin-file", &so_pin]).await?;
        step(exe, node, &["hsm", "init-root-key"]).await?;
    }
    Ok(())
}

/// Initialises the cluster on node 1 and joins the others, unless they are members already.
async fn form_cluster(nodes: &[DevNode], tls: &DevTls) -> anyhow::Result<()> {
    let first = &nodes[0];
    let mut client = OperatorClient::new(super::client::connect(&tls.connect_args(first)).await?);
    let root_file = tls.dir.parent().unwrap_or(&tls.dir).join("root-token");
    // Dev keeps the root token init shows once in a 0600 file beside the nodes, so a kept
    // directory (--dir) still prints it next time. Production never stores it.
    if client.status(StatusRequest {}).await?.into_inner().cluster_id.is_empty() {
        let init = client.init(InitRequest {}).await.map_err(|s| anyhow::anyhow!("init failed: {}", s.message()))?;
        let init = init.into_inner();
        eprintln!("coffer dev: initialised cluster {} on node 1", init.cluster_id);
        let _ = std::fs::remove_file(&root_file);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&root_file)?;
        std::io::Write::write_all(&mut file, init.root_token.as_bytes())?;
    } else if !root_file.exists() {
        eprintln!(
            "coffer dev: {} is missing, and a root token is shown only once, at init: use a token you made",
            root_file.display()
        );
    }
    for node in &nodes[1..] {
        let mut client = OperatorClient::new(super::client::connect(&tls.connect_args(node)).await?);
        let status = client.status(StatusRequest {}).await?.into_inner();
        if status.members.is_empty() {
            eprintln!("coffer dev: node {} joins through node 1", node.id);
            let token = OperatorClient::new(super::client::connect(&tls.connect_args(first)).await?)
                .create_join_token(CreateJoinTokenRequest { ttl: None })
                .await
                .map_err(|s| anyhow::anyhow!("cannot create a join token for node {}: {}", node.id, s.message()))?
                .into_inner()
                .token;
            client
                .join(JoinRequest { peer: first.peer.to_string(), token })
                .await
                .map_err(|s| anyhow::anyhow!("node {} could not join: {}", node.id, s.message()))?;
        }
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

/// Runs one set-up step as a child process (so each gets its own PKCS#11 state) and fails with
/// its output when it fails.
async fn step(exe: &Path, node: &DevNode, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(exe)
        .args(args)
        .arg("--config")
        .arg(node.config())
        .env("SOFTHSM2_CONF", node.softhsm_conf())
        .output()
        .await?;
    if !out.status.success() {
        anyhow::bail!("`coffer {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    eprint!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// A random PIN in a file only the owner can read.
fn write_secret_file(path: &Path) -> anyhow::Result<()> {
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut file, hex::encode(bytes).as_bytes())?;
    Ok(())
}

/// Waits until the node answers gRPC health checks.
async fn wait_until_up(node: &DevNode, child: &mut Child, tls: &DevTls) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_note = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("node {} exited during start-up ({status}); see its log above", node.id);
        }
        if let Ok(channel) = super::client::connect(&tls.connect_args(node)).await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
            if health.check(req).await.is_ok() {
                return Ok(());
            }
        }
        if started.elapsed() > START_TIMEOUT {
            anyhow::bail!("node {} did not answer within {START_TIMEOUT:?}", node.id);
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            eprintln!("coffer dev: waiting for node {} to start ({}s)", node.id, started.elapsed().as_secs());
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks a node to stop (SIGTERM), then kills it if it has not within 10 s.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Makes sure SoftHSM2 is installed: as root, installs it with apt-get; otherwise prints the line.
fn ensure_softhsm() -> anyhow::Result<()> {
    if coffer_hsm::resolve_module(None).is_ok() {
        return Ok(());
    }
    let is_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    if !is_root {
        anyhow::bail!("SoftHSM2 is not installed. Install it with:\n  sudo apt-get install -y softhsm2");
    }
    eprintln!("coffer dev: installing SoftHSM2 (apt-get install -y softhsm2)");
    let ok = std::process::Command::new("apt-get").args(["update", "-qq"]).status()?.success()
        && std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq", "softhsm2"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
    if !ok || coffer_hsm::resolve_module(None).is_err() {
        anyhow::bail!("could not install SoftHSM2; install it with: apt-get install -y softhsm2");
    }
    Ok(())
}
