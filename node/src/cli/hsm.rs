//! `coffer hsm …`: create a development token, create the root key, check the HSM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use coffer_hsm::PinSource;

use crate::config::Config;

/// HSM set-up commands. Each reads the `[hsm]` section of a node config.
#[derive(Debug, Subcommand)]
pub enum HsmCommand {
    /// Create the AES-256 root key in the token (sensitive, never extractable, wrap/unwrap only).
    /// Refuses to replace an existing key. Prints the key check value (KCV).
    InitRootKey {
        /// The node config whose [hsm] section names the token, PIN and root-key label.
        #[arg(long, short, env = "COFFER_CONFIG")]
        config: PathBuf,
    },
    /// Initialise a SoftHSM token for development or tests, with the config's label and user PIN.
    /// Production tokens are set up with the HSM vendor's tools.
    InitToken {
        /// The node config whose [hsm] section names the token label and user PIN.
        #[arg(long, short, env = "COFFER_CONFIG")]
        config: PathBuf,
        /// A file holding the security officer PIN to give the new token.
        #[arg(long, conflicts_with = "so_pin_env", required_unless_present = "so_pin_env")]
        so_pin_file: Option<PathBuf>,
        /// An environment variable holding the security officer PIN.
        #[arg(long)]
        so_pin_env: Option<String>,
    },
    /// Log in, find and check the root key, and print its KCV.
    Status {
        /// The node config.
        #[arg(long, short, env = "COFFER_CONFIG")]
        config: PathBuf,
    },
}

/// Runs an HSM command. PKCS#11 calls block, which is fine for a one-shot command (on a worker of
/// the multi-threaded runtime, which `block_in_place` hands its other tasks away from).
pub fn run(command: HsmCommand) -> anyhow::Result<ExitCode> {
    tokio::task::block_in_place(|| match command {
        HsmCommand::InitRootKey { config } => {
            let config = Config::load(&config)?;
            let kcv = coffer_hsm::init_root_key(&config.hsm)?;
            println!(
                "created root key {:?} in token {:?}; KCV {kcv}",
                config.hsm.root_key_label, config.hsm.token_label
            );
            Ok(ExitCode::SUCCESS)
        }
        HsmCommand::InitToken { config, so_pin_file, so_pin_env } => {
            let config = Config::load(&config)?;
            let so_pin = match (so_pin_file, so_pin_env) {
                (Some(file), _) => PinSource::File(file),
                (None, Some(var)) => PinSource::Env(var),
                (None, None) => anyhow::bail!("give --so-pin-file or --so-pin-env"),
            }
            .read()?;
            coffer_hsm::init_token(&config.hsm, &so_pin)?;
            println!("initialised token {:?}", config.hsm.token_label);
            Ok(ExitCode::SUCCESS)
        }
        HsmCommand::Status { config } => {
            let config = Config::load(&config)?;
            let hsm = coffer_hsm::Hsm::open(&config.hsm)?;
            println!(
                "token {:?}: root key {:?} OK, KCV {}",
                config.hsm.token_label,
                config.hsm.root_key_label,
                hsm.kcv()
            );
            Ok(ExitCode::SUCCESS)
        }
    })
}
