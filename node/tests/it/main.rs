//! Node tests: real nodes on 127.0.0.1, driven through gRPC and through the CLI.
//!
//! API tests serve a node inside the test's runtime ([`InProcessNode`]: `coffer_node::run` on a
//! listener bound to port 0). What needs kill -9, a restart, a clean stop, a token of its own or
//! several nodes runs `coffer` processes through the test kit's launcher ([`TestNode`], a
//! one-node cluster, and [`must_start_cluster`]).
//!
//! Every in-process node of this binary uses one SoftHSM token with one root key (each node has
//! its own data directory and its own cluster): a process has one PKCS#11 state, and SoftHSM
//! reads its config once per process. Process nodes each have a token set of their own.

#![allow(missing_docs)] // test helpers are documented where it helps, not by rule

mod t10_secrets_api;
mod t12_auth;
mod t15_tls;
mod t16_peer_port;
mod t17_join;
mod t18_ca_rotation;
mod t20_bad_input;
mod t25_forged_and_retried;
mod t30_cli;
mod t40_crash;
mod t50_at_rest;
mod t55_audit;
mod t60_kcv;
mod t65_rotation;
mod t70_standard_tools;
mod t80_cluster;
mod t90_keys;

use std::path::{Path, PathBuf};
use std::process::Output;

use coffer_proto::v1::auth_client::AuthClient;
use coffer_proto::v1::operator_client::OperatorClient;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{InitRequest, WriteRoleRequest};
use coffer_testkit::{coffer_cli, process_softhsm, Cluster, InProcess, Options, SoftHsm, TestPki, TOKEN_LABEL};
use tonic::transport::Channel;

/// Gives certificates naming `identity` the root policy, through a login role written with the
/// root token: what lets tests written before tokens speak with their certificate alone.
pub async fn grant_root(channel: Channel, root_token: &str, identity: &str) -> anyhow::Result<()> {
    let role = WriteRoleRequest {
        name: coffer_testkit::TEST_ROLE.into(),
        identities: vec![identity.into()],
        policies: vec!["root".into()],
        token_ttl: None,
    };
    AuthClient::new(channel).write_role(coffer_testkit::with_token(role, root_token)?).await?;
    Ok(())
}

/// The `coffer` binary under test.
pub fn coffer_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_coffer"))
}

/// The limits the single-node tests check against (the bad-input and version tests rely on them).
/// Small limits, to reach them in tests: a 1 s rotation floor (the auto-rotation test), and at
/// most 40 key versions.
const SINGLE_NODE_CONFIG: &str = "max-value-bytes = 4096\ndefault-max-versions = 5\n\
                                  [limits]\nmin-auto-rotate-period = \"1s\"\nmax-key-versions = 40\n";

/// A process cluster of `n` nodes of the `coffer` under test (`extra` in every node's config),
/// started and formed.
pub fn must_start_cluster(n: usize, extra: &str) -> anyhow::Result<Cluster> {
    Cluster::start(coffer_bin(), n, Options::tests(extra))
}

/// A node served in this process over TLS (a CA of its own), initialised as a single-voter
/// cluster; stopped when dropped.
pub struct InProcessNode {
    server: InProcess,
    pub addr: String,
    /// `127.0.0.1:<port>` of its node-to-node listener.
    pub peer_addr: String,
    pub pki: TestPki,
    /// The root token its init returned.
    pub root_token: String,
}

impl InProcessNode {
    /// Serves a new node with `coffer_node::run` on `127.0.0.1:0` and runs `operator init` on it.
    pub async fn must_start() -> anyhow::Result<InProcessNode> {
        // Made once per process, with the commands a process node's token is made with.
        let tokens = process_softhsm(|dir| SoftHsm::create_with_coffer(dir, coffer_bin()))?;
        let dir = tempfile::tempdir()?;
        let pki = TestPki::create(&dir.path().join("ca"))?;
        pki.issue_node(1, &dir.path().join("tls"))?;
        let config_path = dir.path().join("node.toml");
        let peer_addr = format!("127.0.0.1:{}", coffer_testkit::free_port()?);
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:0\"\npeer-listen = \"{peer_addr}\"\ndata-dir = \"data\"\n{SINGLE_NODE_CONFIG}\
                 [hsm]\ntoken-label = \"{TOKEN_LABEL}\"\npin-file = \"{}\"\n{}",
                tokens.pin_file().display(),
                pki.tls_table(&dir.path().join("tls"))
            ),
        )?;
        let config = coffer_node::Config::load(&config_path)?;
        let server = InProcess::start_with(dir, Some(pki.client_tls()?), |listener, shutdown| {
            coffer_node::run(config, listener, shutdown)
        })
        .await?;
        let addr = server.url().to_owned();
        let mut node = InProcessNode { server, addr, peer_addr, pki, root_token: String::new() };
        node.root_token =
            OperatorClient::new(node.channel().await?).init(InitRequest {}).await?.into_inner().root_token;
        // The tests' operator certificate gets the root policy, as the launcher's clusters do.
        grant_root(node.channel().await?, &node.root_token, coffer_testkit::TEST_IDENTITY).await?;
        Ok(node)
    }

    /// A channel to the node's peer port with `tls` (a node certificate, a client one, another
    /// CA's, …); `None`: plaintext.
    pub async fn peer_channel(&self, tls: Option<tonic::transport::ClientTlsConfig>) -> anyhow::Result<Channel> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", self.peer_addr))?
            .timeout(std::time::Duration::from_secs(5));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls)?;
        }
        Ok(endpoint.connect().await?)
    }

    /// TLS as this node (node 1) dials its peers.
    pub fn node_tls(&self) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
        self.pki.node_tls(&self.path().join("tls"))
    }

    /// A channel to the node over TLS, with the test client certificate.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(tonic::transport::Endpoint::from_shared(self.addr.clone())?
            .tls_config(self.pki.client_tls()?)?
            .connect()
            .await?)
    }

    /// The node's directory (config and data).
    pub fn path(&self) -> &Path {
        self.server.dir()
    }

    pub async fn client(&self) -> anyhow::Result<SecretsClient<Channel>> {
        Ok(SecretsClient::new(self.channel().await?))
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
        coffer_cli(coffer_bin(), &self.addr, Some(&self.pki), args, stdin, None, None)
    }
}

/// A node process with its own directory, token and root key: a one-node cluster of the launcher.
pub struct TestNode {
    cluster: Cluster,
    pub addr: String,
}

impl TestNode {
    /// Creates a token and root key, starts a node and initialises it.
    pub fn must_start() -> anyhow::Result<TestNode> {
        let cluster = Cluster::start(coffer_bin(), 1, Options::tests(SINGLE_NODE_CONFIG))?;
        let addr = cluster.nodes[0].url();
        Ok(TestNode { cluster, addr })
    }

    pub fn path(&self) -> &Path {
        self.cluster.node_dir(0)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.cluster.data_dir(0)
    }

    /// Starts the node process (again, on the same port) and waits until it serves.
    pub fn must_restart(&mut self) -> anyhow::Result<()> {
        self.cluster.start_node(0)
    }

    /// kill -9.
    pub fn must_kill9(&mut self) -> anyhow::Result<()> {
        self.cluster.kill(0)
    }

    /// SIGTERM and wait for a clean exit.
    pub fn must_stop(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.cluster.stop(0)? {
            anyhow::ensure!(status.success(), "coffer server exited with {status} after SIGTERM");
        }
        Ok(())
    }

    /// Gives the stopped node a new token: same label and PIN, another root key.
    pub fn must_replace_token(&self) -> anyhow::Result<()> {
        self.cluster.replace_token(0)
    }

    pub async fn client(&self) -> anyhow::Result<SecretsClient<Channel>> {
        Ok(SecretsClient::new(self.channel().await?))
    }

    /// A channel to the node over TLS, with the test client certificate.
    #[allow(clippy::unused_async)] // the shape of InProcessNode::channel, so tests take either
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        self.cluster.channel(0)
    }
}

/// A Put request with only the fields that matter to most tests.
pub fn put(path: &str, value: &[u8], cas: Option<u64>) -> coffer_proto::v1::PutRequest {
    coffer_proto::v1::PutRequest {
        path: path.into(),
        value: value.to_vec(),
        cas,
        max_versions: None,
        request_id: String::new(),
    }
}

/// A Get request.
pub fn get(path: &str, version: Option<u64>) -> coffer_proto::v1::GetRequest {
    coffer_proto::v1::GetRequest { path: path.into(), version, max_staleness: None, stage: String::new() }
}
