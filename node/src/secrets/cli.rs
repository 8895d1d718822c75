//! `coffer secret …`: the Secrets API from the shell.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use base64::Engine;
use clap::{Args, Subcommand};
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{
    DeleteRequest, DescribeRequest, DestroyRequest, GetRequest, ListRequest, PutRequest, UndeleteRequest,
};
use serde_json::json;
use zeroize::Zeroizing;

use crate::cli::client::{connect, describe_status, ConnectArgs};
use crate::cli::Output;

/// Options shared by every secret command.
#[derive(Debug, Args)]
pub struct SecretArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: SecretCommand,
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Write a new version. The value comes from --file, the VALUE argument, or stdin (in that
    /// order of preference; an argument is visible to other users in `ps`, a file or stdin is not).
    Put {
        /// The secret path, e.g. db/password.
        path: String,
        /// The value. Omit it (or give "-") to read stdin.
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Check-and-set: write only if the current version is N (0: only if the secret is new).
        #[arg(long)]
        cas: Option<u64>,
        /// Keep at most N versions of this secret from now on.
        #[arg(long)]
        max_versions: Option<u32>,
        /// Idempotency key: retrying with the same id writes once. Default: a random id per call.
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Print a secret's value (the raw bytes, no newline added), so `$(coffer secret get p)` works.
    Get {
        /// The secret path.
        path: String,
        /// Read this version instead of the current one.
        #[arg(long, conflicts_with = "stage")]
        version: Option<u64>,
        /// Read the version a stage label points at: CURRENT (default), PENDING or PREVIOUS.
        #[arg(long)]
        stage: Option<String>,
        /// Serve from the node's local state if it is at most this stale (e.g. 500ms, 2s), without
        /// a round trip to the leader. Default: a linearizable read.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_staleness: Option<std::time::Duration>,
    },
    /// Show a secret's versions and their state, without values.
    Describe {
        /// The secret path.
        path: String,
    },
    /// List secret paths, one per line.
    List {
        /// Only paths that start with this prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Paths per request; all pages are fetched.
        #[arg(long, default_value_t = 1000)]
        page_size: u32,
    },
    /// Soft-delete versions (default: the current one); `undelete` restores them.
    Delete(VersionsArgs),
    /// Restore soft-deleted versions.
    Undelete(VersionsArgs),
    /// Remove versions' ciphertext and data key for good.
    Destroy(VersionsArgs),
    /// Start a rotation of a secret now (it needs a rotation: see `coffer secret rotation configure`).
    Rotate {
        /// The secret path.
        path: String,
    },
    /// Configure, follow and cancel rotations.
    #[command(subcommand)]
    Rotation(crate::rotation::cli::RotationCommand),
    /// Print metadata events (puts, deletes, label moves, rotations; never values) under a folder
    /// as they happen. Needs `watch` on the folder.
    Watch {
        /// The folder (empty: every secret).
        #[arg(default_value = "")]
        prefix: String,
        /// Start from this revision (to resume: the last one printed plus one). Default: now.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Also print the bookmarks a quiet stream gets.
        #[arg(long)]
        bookmarks: bool,
    },
}

#[derive(Debug, Args)]
struct VersionsArgs {
    /// The secret path.
    path: String,
    /// Versions, comma-separated (default: the current version, resolved when the call is taken).
    #[arg(long, value_delimiter = ',')]
    versions: Vec<u64>,
    /// Idempotency key: retrying with the same id changes the state once. Default: a random id.
    #[arg(long)]
    request_id: Option<String>,
}

impl VersionsArgs {
    fn request_id(&self) -> anyhow::Result<String> {
        self.request_id.clone().map_or_else(random_request_id, Ok)
    }
}

pub(crate) fn millis(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    let ts = ts?;
    let time = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs(u64::try_from(ts.seconds).ok()?)
        + std::time::Duration::from_nanos(u64::try_from(ts.nanos).ok()?);
    Some(humantime::format_rfc3339_millis(time).to_string())
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC.
pub(crate) fn format_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// A random idempotency key, so a put that a proxy or the client library retries applies once.
pub(crate) fn random_request_id() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("the system random source failed"))?;
    Ok(format!("cli-{}", hex::encode(bytes)))
}

pub(crate) fn read_value(value: Option<String>, file: Option<PathBuf>) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    if let Some(file) = file {
        return Ok(Zeroizing::new(
            std::fs::read(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?,
        ));
    }
    match value {
        Some(v) if v != "-" => Ok(Zeroizing::new(v.into_bytes())),
        _ => {
            if std::io::stdin().is_terminal() {
                eprintln!("reading the value from stdin; end with Ctrl-D");
            }
            let mut buf = Zeroizing::new(Vec::new());
            std::io::stdin().read_to_end(&mut buf)?;
            Ok(buf)
        }
    }
}

/// Runs a secret command; a gRPC error prints its code and message and exits 1.
pub async fn run(args: SecretArgs) -> anyhow::Result<ExitCode> {
    let channel = connect(&args.conn).await?;
    match execute(SecretsClient::new(channel), args.command, args.output).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(Failure::Status(status)) => {
            eprintln!("error: {}", describe_status(&status));
            Ok(ExitCode::FAILURE)
        }
        Err(Failure::Other(e)) => Err(e),
    }
}

/// Why a client command failed: the server said no (printed as a status), or something local.
pub(crate) enum Failure {
    Status(Box<tonic::Status>),
    Other(anyhow::Error),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure::Status(Box::new(s))
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Other(e.into())
    }
}

async fn execute(
    mut client: SecretsClient<crate::cli::client::Conn>,
    command: SecretCommand,
    output: Output,
) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match command {
        SecretCommand::Put { path, value, file, cas, max_versions, request_id } => {
            let value = read_value(value, file)?;
            let reply = client
                .put(PutRequest {
                    path: path.clone(),
                    value: value.to_vec(),
                    cas,
                    max_versions,
                    request_id: match request_id {
                        Some(id) => id,
                        None => random_request_id()?,
                    },
                })
                .await?
                .into_inner();
            match output {
                Output::Text => writeln!(out, "{path}: version {}", reply.version)?,
                Output::Json => writeln!(
                    out,
                    "{}",
                    json!({"path": path, "version": reply.version, "created_at": millis(reply.created_at.as_ref())})
                )?,
            }
        }
        SecretCommand::Rotate { path } => crate::rotation::cli::rotate(&mut client, path, output).await?,
        SecretCommand::Rotation(command) => crate::rotation::cli::rotation(&mut client, command, output).await?,
        SecretCommand::Watch { prefix, from, bookmarks } => {
            drop(out);
            return crate::rotation::cli::watch(&mut client, prefix, from, bookmarks, output).await;
        }
        SecretCommand::Get { path, version, stage, max_staleness } => {
            let max_staleness = max_staleness.map(|d| prost_types::Duration {
                seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
            });
            let stage = stage.unwrap_or_default();
            let reply =
                client.get(GetRequest { path: path.clone(), version, max_staleness, stage }).await?.into_inner();
            let value = Zeroizing::new(reply.value);
            match output {
                Output::Text => out.write_all(&value)?,
                Output::Json => {
                    let mut obj = json!({"path": path, "version": reply.version, "stages": reply.stages, "created_at": millis(reply.created_at.as_ref())});
                    match std::str::from_utf8(&value) {
                        Ok(text) => obj["value"] = json!(text),
                        Err(_) => {
                            obj["value_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&*value))
                        }
                    }
                    writeln!(out, "{obj}")?;
                }
            }
        }
        SecretCommand::Describe { path } => {
            let reply = client.describe(DescribeRequest { path }).await?.into_inner();
            let versions: Vec<_> = reply
                .versions
                .iter()
                .map(|v| {
                    let state = if v.destroyed {
                        "destroyed"
                    } else if v.deleted_at.is_some() {
                        "deleted"
                    } else {
                        "live"
                    };
                    (v.version, state, millis(v.created_at.as_ref()), millis(v.deleted_at.as_ref()))
                })
                .collect();
            match output {
                Output::Text => {
                    writeln!(out, "path:            {}", reply.path)?;
                    writeln!(out, "newest version:  {}", reply.current_version)?;
                    writeln!(out, "CURRENT:         {}", reply.current)?;
                    if reply.pending > 0 {
                        writeln!(out, "PENDING:         {}", reply.pending)?;
                    }
                    if reply.previous > 0 {
                        let until =
                            millis(reply.previous_until.as_ref()).map_or(String::new(), |u| format!(" (until {u})"));
                        writeln!(out, "PREVIOUS:        {}{until}", reply.previous)?;
                    }
                    writeln!(out, "max versions:    {}", reply.max_versions)?;
                    writeln!(out, "created:         {}", millis(reply.created_at.as_ref()).unwrap_or_default())?;
                    writeln!(out, "updated:         {}", millis(reply.updated_at.as_ref()).unwrap_or_default())?;
                    writeln!(out, " VERSION  STATE      CREATED                   DELETED")?;
                    for (version, state, created, deleted) in &versions {
                        writeln!(
                            out,
                            "{version:>8}  {state:<10} {:<25} {}",
                            created.clone().unwrap_or_default(),
                            deleted.clone().unwrap_or_default()
                        )?;
                    }
                }
                Output::Json => {
                    let list: Vec<_> = versions
                        .iter()
                        .map(|(v, s, c, d)| json!({"version": v, "state": s, "created_at": c, "deleted_at": d}))
                        .collect();
                    writeln!(
                        out,
                        "{}",
                        json!({
                            "path": reply.path,
                            "current_version": reply.current_version,
                            "max_versions": reply.max_versions,
                            "created_at": millis(reply.created_at.as_ref()),
                            "updated_at": millis(reply.updated_at.as_ref()),
                            "versions": list,
                            "current": reply.current,
                            "pending": reply.pending,
                            "previous": reply.previous,
                            "previous_until": millis(reply.previous_until.as_ref()),
                        })
                    )?;
                }
            }
        }
        SecretCommand::List { prefix, page_size } => {
            let mut token = String::new();
            let mut all = Vec::new();
            loop {
                let reply = client
                    .list(ListRequest { prefix: prefix.clone(), page_size, page_token: token.clone() })
                    .await?
                    .into_inner();
                if output == Output::Text {
                    for path in &reply.paths {
                        writeln!(out, "{path}")?;
                    }
                } else {
                    all.extend(reply.paths);
                }
                if reply.next_page_token.is_empty() {
                    break;
                }
                token = reply.next_page_token;
            }
            if output == Output::Json {
                writeln!(out, "{}", json!({"paths": all}))?;
            }
        }
        SecretCommand::Delete(v) => {
            let request_id = v.request_id()?;
            client.delete(DeleteRequest { path: v.path.clone(), versions: v.versions.clone(), request_id }).await?;
            report(&mut out, output, "deleted", &v)?;
        }
        SecretCommand::Undelete(v) => {
            let request_id = v.request_id()?;
            client.undelete(UndeleteRequest { path: v.path.clone(), versions: v.versions.clone(), request_id }).await?;
            report(&mut out, output, "undeleted", &v)?;
        }
        SecretCommand::Destroy(v) => {
            let request_id = v.request_id()?;
            client.destroy(DestroyRequest { path: v.path.clone(), versions: v.versions.clone(), request_id }).await?;
            report(&mut out, output, "destroyed", &v)?;
        }
    }
    Ok(())
}

fn report(out: &mut impl Write, output: Output, verb: &str, v: &VersionsArgs) -> std::io::Result<()> {
    match output {
        Output::Text if v.versions.is_empty() => writeln!(out, "{}: {verb} the current version", v.path),
        Output::Text => writeln!(out, "{}: {verb} versions {:?}", v.path, v.versions),
        Output::Json => writeln!(out, "{}", json!({"path": v.path, verb: v.versions})),
    }
}
