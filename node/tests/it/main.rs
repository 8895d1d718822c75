//! Node tests: real `coffer` processes on 127.0.0.1:0, each with its own SoftHSM token, driven
//! through gRPC and through the CLI.

#![allow(missing_docs)] // test helpers are documented where it helps, not by rule

mod cluster;
mod t10_secrets_api;
mod t20_bad_input;
mod t25_forged_and_retried;
mod t30_cli;
mod t40_crash;
mod t50_at_rest;
mod t60_kcv;
mod t70_standard_tools;
mod t80_cluster;
mod t90_keys;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use coffer_proto::v1::secrets_client::SecretsClient;
use tonic::transport::Channel;

/// The `coffer` binary under test.
pub fn coffer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_coffer")
}

/// A node process with its own directory, SoftHSM token and root key.
pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub addr: String,
    child: Option<Child>,
}

impl TestNode {
    /// Creates a token and root key and starts a node.
    pub fn must_start() -> anyhow::Result<TestNode> {
        let dir = tempfile::tempdir()?;
        Self::must_prepare(dir.path(), "tokens")?;
        let mut node = TestNode { dir, addr: String::new(), child: None };
        node.must_restart()?;
        let out = node.cli(&["operator", "init"], None)?;
        anyhow::ensure!(out.status.success(), "operator init failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(node)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    /// Writes the SoftHSM config (tokens in `dir/<tokens>`), PINs and the node config, then creates
    /// the token and the root key through the CLI.
    pub fn must_prepare(dir: &Path, tokens: &str) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir.join(tokens))?;
        std::fs::write(
            dir.join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join(tokens).display()
            ),
        )?;
        std::fs::write(dir.join("pin"), "4321\n")?;
        std::fs::write(dir.join("so-pin"), "87654321\n")?;
        std::fs::write(
            dir.join("node.toml"),
            "listen = \"127.0.0.1:0\"\ndata-dir = \"data\"\nmax-value-bytes = 4096\ndefault-max-versions = 5\n\
             [hsm]\ntoken-label = \"test\"\npin-file = \"pin\"\n",
        )?;
        let so_pin = dir.join("so-pin");
        for args in [
            vec!["hsm", "init-token", "--so-pin-file", so_pin.to_str().context("utf-8 path")?],
            vec!["hsm", "init-root-key"],
        ] {
            let out = Command::new(coffer_bin())
                .args(&args)
                .arg("--config")
                .arg(dir.join("node.toml"))
                .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
                .output()?;
            if !out.status.success() {
                bail!("coffer {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        Ok(())
    }

    /// Starts the node process (again) and waits until it serves.
    pub fn must_restart(&mut self) -> anyhow::Result<()> {
        let (child, addr) = Self::spawn(self.path())?;
        self.child = Some(child);
        self.addr = addr;
        Ok(())
    }

    /// Starts `coffer server` in `dir` and waits for its address; fails if it exits first.
    pub fn spawn(dir: &Path) -> anyhow::Result<(Child, String)> {
        let addr_file = dir.join("addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("server.log"))?;
        let mut child = Command::new(coffer_bin())
            .args(["server", "--config"])
            .arg(dir.join("node.toml"))
            .arg("--addr-file")
            .arg(&addr_file)
            .env("SOFTHSM2_CONF", dir.join("softhsm2.conf"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("coffer server exited with {status}: {}", std::fs::read_to_string(dir.join("server.log"))?);
            }
            if let Ok(addr) = std::fs::read_to_string(&addr_file) {
                let addr = format!("http://{addr}");
                if must_serving(&addr) {
                    return Ok((child, addr));
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                bail!("coffer server did not serve within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9.
    pub fn must_kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit.
    pub fn must_stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
            anyhow::ensure!(status.success(), "kill -TERM failed");
            let status = child.wait()?;
            anyhow::ensure!(status.success(), "coffer server exited with {status} after SIGTERM");
        }
        Ok(())
    }

    pub async fn client(&self) -> anyhow::Result<SecretsClient<Channel>> {
        Ok(SecretsClient::connect(self.addr.clone()).await?)
    }

    /// Runs the CLI against this node.
    pub fn cli(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
        let mut child = Command::new(coffer_bin())
            .args(args)
            .env("COFFER_ADDR", &self.addr)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            std::io::Write::write_all(&mut pipe, bytes)?;
        }
        Ok(child.wait_with_output()?)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether the node at `addr` reports SERVING for coffer.v1.Secrets (one try, on its own runtime).
fn must_serving(addr: &str) -> bool {
    let addr = addr.to_owned();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
        rt.block_on(async {
            let Ok(channel) = tonic::transport::Endpoint::from_shared(addr).map(|e| e.timeout(Duration::from_secs(2)))
            else {
                return false;
            };
            let Ok(channel) = channel.connect().await else { return false };
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let req = tonic_health::pb::HealthCheckRequest { service: "coffer.v1.Secrets".into() };
            health.check(req).await.map(|r| r.into_inner().status == 1).unwrap_or(false)
        })
    })
    .join()
    .unwrap_or(false)
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
    coffer_proto::v1::GetRequest { path: path.into(), version, max_staleness: None }
}
