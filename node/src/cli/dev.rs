//! `coffer dev`: a working local node in one command.
//!
//! It makes a directory with a private SoftHSM config and token, random PINs in files (mode 0600),
//! a node config, and the root key; starts `coffer server` as a child process; waits until it
//! answers; prints how to use it; and stops it on Ctrl-C. Run again with the same `--dir`, it
//! reuses the token and data.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use ring::rand::SecureRandom;
use tokio::process::{Child, Command};

/// Options of `coffer dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Keep the token, config and data here (created if missing; reused if it holds a dev node).
    /// Default: a temporary directory removed on exit.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The address the node listens on.
    #[arg(long, default_value = "127.0.0.1:8200")]
    listen: SocketAddr,
}

const TOKEN_LABEL: &str = "coffer-dev";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the development node until Ctrl-C.
pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    ensure_softhsm()?;
    let (temp, dir) = match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            (None, std::fs::canonicalize(dir)?)
        }
        None => {
            let temp = tempfile::Builder::new().prefix("coffer-dev-").tempdir()?;
            let path = temp.path().to_owned();
            (Some(temp), path)
        }
    };
    let exe = std::env::current_exe()?;
    let config = dir.join("node.toml");
    let softhsm_conf = dir.join("softhsm2.conf");
    let fresh = !config.exists();
    if fresh {
        eprintln!("coffer dev: creating a SoftHSM token and root key in {}", dir.display());
        std::fs::create_dir_all(dir.join("tokens"))?;
        std::fs::write(
            &softhsm_conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )?;
        write_secret_file(&dir.join("hsm-pin"))?;
        write_secret_file(&dir.join("hsm-so-pin"))?;
        std::fs::write(
            &config,
            format!(
                "# Written by `coffer dev`.\nnode-id = 1\nlisten = \"{}\"\ndata-dir = \"data\"\n\n[hsm]\ntoken-label = \"{TOKEN_LABEL}\"\npin-file = \"hsm-pin\"\n",
                args.listen
            ),
        )?;
        step(
            &exe,
            &softhsm_conf,
            &["hsm", "init-token", "--config"],
            &config,
            &["--so-pin-file", &dir.join("hsm-so-pin").display().to_string()],
        )
        .await?;
        step(&exe, &softhsm_conf, &["hsm", "init-root-key", "--config"], &config, &[]).await?;
    } else {
        eprintln!("coffer dev: reusing the node in {}", dir.display());
    }

    let mut server = Command::new(&exe)
        .args(["server", "--config"])
        .arg(&config)
        .env("SOFTHSM2_CONF", &softhsm_conf)
        .env_remove("COFFER_LISTEN")
        .kill_on_drop(true)
        .spawn()?;
    let addr = format!("http://{}", args.listen);
    wait_until_serving(&addr, &mut server).await?;

    let bin_dir = exe.parent().map(Path::display).map(|d| d.to_string()).unwrap_or_default();
    println!();
    println!("Coffer dev node is running.");
    println!("  address:  {addr}");
    println!("  data:     {}{}", dir.display(), if temp.is_some() { " (temporary: removed on exit)" } else { "" });
    println!("  config:   {}", config.display());
    println!();
    println!("In another shell:");
    println!("  export PATH=\"{bin_dir}:$PATH\" COFFER_ADDR={addr}");
    println!("  printf hunter2 | coffer secret put db/password");
    println!("  coffer secret get db/password");
    println!("  coffer secret describe db/password");
    println!();
    println!("Press Ctrl-C to stop.");

    tokio::select! {
        _ = super::shutdown_signal() => {}
        status = server.wait() => anyhow::bail!("the server exited unexpectedly ({})", status?),
    }
    stop(&mut server).await;
    Ok(ExitCode::SUCCESS)
}

/// Runs one set-up step as a child process (so each gets its own PKCS#11 state) and fails with
/// its output when it fails.
async fn step(exe: &Path, softhsm_conf: &Path, args: &[&str], config: &Path, extra: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(exe).args(args).arg(config).args(extra).env("SOFTHSM2_CONF", softhsm_conf).output().await?;
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

async fn wait_until_serving(addr: &str, server: &mut Child) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_note = Instant::now();
    loop {
        if let Some(status) = server.try_wait()? {
            anyhow::bail!("the server exited during start-up ({status}); see its log above");
        }
        if let Ok(channel) = super::client::connect(addr).await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let req = tonic_health::pb::HealthCheckRequest { service: "coffer.v1.Secrets".into() };
            if let Ok(reply) = health.check(req).await {
                if reply.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                    return Ok(());
                }
            }
        }
        if started.elapsed() > START_TIMEOUT {
            anyhow::bail!("the server did not answer within {START_TIMEOUT:?}");
        }
        if last_note.elapsed() > Duration::from_secs(5) {
            eprintln!("coffer dev: waiting for the node to start ({}s)", started.elapsed().as_secs());
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks the server to stop (SIGTERM), then kills it if it has not within 10 s.
async fn stop(server: &mut Child) {
    if let Some(pid) = server.id() {
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
    }
    if tokio::time::timeout(Duration::from_secs(10), server.wait()).await.is_err() {
        let _ = server.kill().await;
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
