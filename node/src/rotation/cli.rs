//! `coffer secret rotate`, `coffer secret rotation …` and `coffer secret watch`.

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use coffer_proto::v1::rotation_config::Rotator;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{
    CancelRotationRequest, ConfigureRotationRequest, GeneratorRotator, PostgresRotator, RotateRequest, RotationConfig,
    RotationStatusRequest, WatchRequest,
};
use serde_json::json;

use crate::cli::Output;
use crate::secrets::cli::{millis, Failure};

/// `coffer secret rotation …`.
#[derive(Debug, Subcommand)]
pub enum RotationCommand {
    /// Set a secret's rotator and schedule (replaces the one it has).
    ///
    /// Examples:
    ///   coffer secret rotation configure app/api-key --generator password --length 40 --every 30d
    ///   coffer secret rotation configure db/app --postgres-admin db/admin \
    ///       --postgres-user app_a --postgres-user app_b --cron "0 3 * * *" --window 1h --grace 2h
    #[command(verbatim_doc_comment)]
    Configure(ConfigureArgs),
    /// Remove a secret's rotation (refused while one runs).
    Remove {
        /// The secret path.
        path: String,
    },
    /// Show the state, step, last success, next due time and failures of every rotation under a
    /// prefix.
    Status {
        /// Only paths that start with this.
        #[arg(default_value = "")]
        prefix: String,
    },
    /// End a running or failed rotation and clear its PENDING label (the version stays, unlabelled).
    Cancel {
        /// The secret path.
        path: String,
    },
}

/// What `coffer secret rotation configure` takes.
#[derive(Debug, Args)]
pub struct ConfigureArgs {
    /// The secret path.
    path: String,
    /// A generated value: password, bytes, ed25519 or p256.
    #[arg(long, conflicts_with = "postgres_admin")]
    generator: Option<String>,
    /// Password characters or bytes (default 32).
    #[arg(long, requires = "generator")]
    length: Option<u32>,
    /// Password character classes, comma-separated: lower, upper, digit, symbol (default all).
    #[arg(long, value_delimiter = ',', requires = "generator")]
    classes: Vec<String>,
    /// A PostgreSQL login: the secret holding the admin login (a role with CREATEROLE).
    #[arg(long, requires = "postgres_user")]
    postgres_admin: Option<String>,
    /// The PostgreSQL user whose password rotates; give two to alternate between them.
    #[arg(long)]
    postgres_user: Vec<String>,
    /// Rotate this often (e.g. 30d, 12h).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "cron")]
    every: Option<Duration>,
    /// Or on this cron expression, in UTC (e.g. "0 3 * * *").
    #[arg(long)]
    cron: Option<String>,
    /// Start due rotations at a point of this window, spread by path (default 0).
    #[arg(long, value_parser = humantime::parse_duration)]
    window: Option<Duration>,
    /// How long PREVIOUS stays readable after a rotation (default 24h; 0s: until the next one).
    #[arg(long, value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// Each attempt at a step must end within this (default 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    step_deadline: Option<Duration>,
    /// Attempts per step before the rotation fails (default 5).
    #[arg(long, default_value_t = 0)]
    max_attempts: u32,
}

fn wire(d: Option<Duration>) -> Option<prost_types::Duration> {
    d.map(|d| prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    })
}

impl ConfigureArgs {
    fn config(&self) -> anyhow::Result<RotationConfig> {
        let rotator = match (&self.generator, &self.postgres_admin) {
            (Some(kind), None) => Rotator::Generator(GeneratorRotator {
                kind: kind.clone(),
                length: self.length.unwrap_or(0),
                classes: self.classes.clone(),
            }),
            (None, Some(admin)) => {
                Rotator::Postgres(PostgresRotator { admin_secret: admin.clone(), users: self.postgres_user.clone() })
            }
            _ => anyhow::bail!("give a rotator: --generator KIND, or --postgres-admin PATH with --postgres-user NAME"),
        };
        Ok(RotationConfig {
            rotator: Some(rotator),
            every: wire(self.every),
            cron: self.cron.clone().unwrap_or_default(),
            window: wire(self.window),
            grace: wire(self.grace),
            step_deadline: wire(self.step_deadline),
            max_attempts: self.max_attempts,
        })
    }
}

/// Runs a rotation command.
pub(crate) async fn rotation(
    client: &mut SecretsClient<crate::cli::client::Conn>,
    command: RotationCommand,
    output: Output,
) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        RotationCommand::Configure(args) => {
            let config = args.config()?;
            let reply = client
                .configure_rotation(ConfigureRotationRequest { path: args.path.clone(), config: Some(config) })
                .await?
                .into_inner();
            let due = millis(reply.next_due.as_ref());
            match output {
                Output::Text => match &due {
                    Some(due) => writeln!(out, "{}: rotation set; next due {due}", args.path)?,
                    None => writeln!(out, "{}: rotation set; no schedule (coffer secret rotate {0})", args.path)?,
                },
                Output::Json => writeln!(out, "{}", json!({"path": args.path, "next_due": due}))?,
            }
        }
        RotationCommand::Remove { path } => {
            client.configure_rotation(ConfigureRotationRequest { path: path.clone(), config: None }).await?;
            writeln!(out, "{path}: rotation removed")?;
        }
        RotationCommand::Cancel { path } => {
            client.cancel_rotation(CancelRotationRequest { path: path.clone() }).await?;
            writeln!(out, "{path}: rotation cancelled; PENDING cleared")?;
        }
        RotationCommand::Status { prefix } => {
            let reply = client.rotation_status(RotationStatusRequest { prefix }).await?.into_inner();
            match output {
                Output::Json => {
                    let list: Vec<_> = reply
                        .rotations
                        .iter()
                        .map(|r| {
                            json!({
                                "path": r.path, "state": r.state, "rotation": r.rotation, "step": r.step,
                                "attempt": r.attempt, "last_error": r.last_error,
                                "last_success": millis(r.last_success.as_ref()),
                                "next_due": millis(r.next_due.as_ref()), "failures": r.failures,
                                "rotator": r.rotator,
                            })
                        })
                        .collect();
                    writeln!(out, "{}", json!({ "rotations": list }))?;
                }
                Output::Text => {
                    writeln!(
                        out,
                        "{:<32} {:<8} {:>4} {:<7} {:<25} {:<25} {:>5}  ROTATOR / LAST ERROR",
                        "PATH", "STATE", "#", "STEP", "LAST SUCCESS", "NEXT DUE", "FAILS"
                    )?;
                    for r in &reply.rotations {
                        let step = if r.attempt > 0 { format!("{}/{}", r.step, r.attempt) } else { r.step.clone() };
                        writeln!(
                            out,
                            "{:<32} {:<8} {:>4} {:<7} {:<25} {:<25} {:>5}  {}",
                            r.path,
                            r.state,
                            r.rotation,
                            step,
                            millis(r.last_success.as_ref()).unwrap_or_else(|| "-".into()),
                            millis(r.next_due.as_ref()).unwrap_or_else(|| "-".into()),
                            r.failures,
                            if r.last_error.is_empty() {
                                r.rotator.clone()
                            } else {
                                format!("{} / {}", r.rotator, r.last_error)
                            },
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `coffer secret rotate PATH`.
pub(crate) async fn rotate(
    client: &mut SecretsClient<crate::cli::client::Conn>,
    path: String,
    output: Output,
) -> Result<(), Failure> {
    let reply = client.rotate(RotateRequest { path: path.clone() }).await?.into_inner();
    let mut out = std::io::stdout().lock();
    match output {
        Output::Text => writeln!(
            out,
            "{path}: rotation {} started; follow it with: coffer secret rotation status {path}",
            reply.rotation
        )?,
        Output::Json => writeln!(out, "{}", json!({"path": path, "rotation": reply.rotation}))?,
    }
    Ok(())
}

/// `coffer secret watch PREFIX`: one line per event until interrupted.
pub(crate) async fn watch(
    client: &mut SecretsClient<crate::cli::client::Conn>,
    prefix: String,
    from: u64,
    bookmarks: bool,
    output: Output,
) -> Result<(), Failure> {
    let mut stream = client.watch(WatchRequest { prefix, from_revision: from }).await?.into_inner();
    while let Some(event) = stream.message().await? {
        if event.kind == "bookmark" && !bookmarks {
            continue;
        }
        let mut out = std::io::stdout().lock();
        match output {
            Output::Json => writeln!(
                out,
                "{}",
                json!({
                    "revision": event.revision, "at": millis(event.at.as_ref()), "path": event.path,
                    "kind": event.kind, "versions": event.versions, "current": event.current,
                    "pending": event.pending, "previous": event.previous, "rotation": event.rotation,
                    "step": event.step, "reason": event.reason,
                })
            )?,
            Output::Text => {
                let mut detail = String::new();
                if !event.versions.is_empty() {
                    detail.push_str(&format!(" versions={:?}", event.versions));
                }
                if event.kind == "labels-moved" {
                    detail.push_str(&format!(
                        " CURRENT={} PENDING={} PREVIOUS={}",
                        event.current, event.pending, event.previous
                    ));
                }
                if event.rotation > 0 {
                    detail.push_str(&format!(" rotation={}", event.rotation));
                }
                if !event.step.is_empty() {
                    detail.push_str(&format!(" {}", event.step));
                }
                if !event.reason.is_empty() {
                    detail.push_str(&format!(" ({})", event.reason));
                }
                writeln!(
                    out,
                    "{:>8} {} {} {}{detail}",
                    event.revision,
                    millis(event.at.as_ref()).unwrap_or_default(),
                    event.kind,
                    event.path
                )?;
            }
        }
        out.flush()?;
    }
    Ok(())
}
