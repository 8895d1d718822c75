//! The `coffer` command line: server, development node, HSM set-up, and the secrets client.
#![allow(clippy::print_stdout)] // printing results is what a command line is for

pub mod client;
pub mod dev;
pub mod hsm;

use crate::cluster::cli as operator;
use crate::keys::cli as key;
use crate::secrets::cli as secret;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Coffer: a secrets and key service whose master key never leaves an HSM.
#[derive(Debug, Parser)]
#[command(name = "coffer", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run a Coffer server node.
    Server {
        /// The node's TOML config file (see ARCHITECTURE.md or `coffer dev` for an example).
        #[arg(long, short, env = "COFFER_CONFIG")]
        config: PathBuf,
        /// Once listening, write the bound address (useful with `listen = "127.0.0.1:0"`) to this
        /// file.
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Start a local development node with its own SoftHSM token and root key, and print how to
    /// use it. Data lives in --dir (kept) or a temporary directory (removed on exit).
    Dev(dev::DevArgs),
    /// Set up the HSM: create a development token, create the root key, check it.
    #[command(subcommand)]
    Hsm(hsm::HsmCommand),
    /// Read and write secrets on a running server (found through COFFER_ADDR).
    Secret(secret::SecretArgs),
    /// Set up and inspect a cluster: init, join (with a join token), remove, transfer-leader,
    /// status, and certificates (tls).
    Operator(operator::OperatorArgs),
    /// Encryption as a service: named keys, encrypt, decrypt, sign, HMAC, data keys.
    Key(key::KeyArgs),
    /// Tokens: create (under yours), lookup, renew, revoke, list-accessors.
    Token(crate::auth::cli::TokenArgs),
    /// Log in: save a token (from stdin, or traded for this client's certificate) to a 0600
    /// file that every command then uses.
    Login(crate::auth::cli::LoginArgs),
    /// Policies: write, read, list, delete, and explain why a token is allowed or denied.
    Policy(crate::auth::cli::PolicyArgs),
    /// Login methods: certificate login roles.
    Auth(crate::auth::cli::AuthArgs),
    /// Audit files: verify their chains and checkpoints, tail them, hash a value to find it.
    Audit(crate::audit::cli::AuditArgs),
    /// Failover drills (runs `coffer-chaos`, installed next to `coffer`); see `coffer drill run --help`.
    #[command(disable_help_flag = true)]
    Drill {
        /// Arguments for coffer-chaos.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

/// How client commands print their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Human-readable text; `get` prints the raw value.
    #[default]
    Text,
    /// One JSON object.
    Json,
}

impl Cli {
    /// Runs the command.
    pub async fn run(self) -> ExitCode {
        let result = match self.command {
            Commands::Server { config, addr_file } => run_server(config, addr_file).await,
            Commands::Dev(args) => dev::run(args).await,
            Commands::Hsm(cmd) => hsm::run(cmd),
            Commands::Secret(args) => secret::run(args).await,
            Commands::Operator(args) => operator::run(args).await,
            Commands::Key(args) => key::run(args).await,
            Commands::Token(args) => crate::auth::cli::run_token(args).await,
            Commands::Login(args) => crate::auth::cli::run_login(args).await,
            Commands::Policy(args) => crate::auth::cli::run_policy(args).await,
            Commands::Auth(args) => crate::auth::cli::run_auth(args).await,
            Commands::Audit(args) => crate::audit::cli::run(args).await,
            Commands::Drill { args } => run_drill(args).await,
        };
        match result {
            Ok(code) => code,
            Err(err) => {
                eprintln!("error: {err:#}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs `coffer-chaos` from the directory `coffer` itself is in, with the given arguments.
async fn run_drill(args: Vec<std::ffi::OsString>) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let chaos = exe.with_file_name("coffer-chaos");
    if !chaos.exists() {
        anyhow::bail!(
            "coffer-chaos is not installed next to {} (build it with `cargo build --bin coffer-chaos`)",
            exe.display()
        );
    }
    let status = tokio::process::Command::new(&chaos).args(args).status().await?;
    Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Logs go to stderr; `RUST_LOG` filters them (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

async fn run_server(config_path: PathBuf, addr_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    init_logging();
    let config = crate::config::Config::load(&config_path)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    if let Some(path) = addr_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, listener.local_addr()?.to_string())?;
        std::fs::rename(&tmp, &path)?;
    }
    crate::server::run(config, listener, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("shutting down");
}
