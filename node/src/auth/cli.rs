//! `coffer token …`, `coffer login`, `coffer policy …`, `coffer auth role …`: identity from the
//! shell. Tokens are read from `COFFER_TOKEN` or the token file (see `cli::client`), never from
//! an argument; a new token is printed once.
#![allow(clippy::print_stdout)] // printing results is what a command line is for

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use coffer_proto::v1::auth_client::AuthClient;
use coffer_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, DeletePolicyRequest, DeleteRoleRequest, ExplainRequest,
    ListAccessorsRequest, ListPoliciesRequest, ListRolesRequest, LoginRequest, LookupTokenRequest, ReadPolicyRequest,
    ReadRoleRequest, RenewTokenRequest, RevokeTokenRequest, TokenInfo, WritePolicyRequest, WriteRoleRequest,
};
use serde_json::json;

use crate::cli::client::{connect, describe_status, token_file, Conn, ConnectArgs, Credentials};
use crate::cli::Output;

/// Options shared by the identity commands.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
}

/// `coffer token …`
#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    common: IdentityArgs,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token under yours (revoked with it unless --orphan). Printed once.
    Create {
        /// A policy to attach; repeat for more (default: your own policies). Only root may
        /// attach policies it does not hold.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// Life until renewed.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Life it never passes, renewals included (capped at your token's).
        #[arg(long, value_parser = humantime::parse_duration)]
        max_ttl: Option<Duration>,
        /// Allow `coffer token renew`.
        #[arg(long)]
        renewable: bool,
        /// Not revoked with your token (needs token-admin on sys/token/create-orphan).
        #[arg(long)]
        orphan: bool,
        /// A name for logs and lookups (not secret).
        #[arg(long, default_value = "")]
        display_name: String,
    },
    /// Show a token's metadata: yours, or another's by accessor.
    Lookup {
        /// The token's accessor (default: your token).
        #[arg(long)]
        accessor: Option<String>,
    },
    /// Extend a renewable token's life, within its maximum.
    Renew {
        /// The token's accessor (default: your token).
        #[arg(long)]
        accessor: Option<String>,
        /// New life from now (default: the token's ttl).
        #[arg(long, value_parser = humantime::parse_duration)]
        increment: Option<Duration>,
    },
    /// Revoke a token and every token created under it.
    Revoke {
        /// The token's accessor (default: your token).
        #[arg(long)]
        accessor: Option<String>,
    },
    /// List the accessors of live tokens (needs token-admin on sys/token/accessor).
    ListAccessors,
}

/// `coffer login`
#[derive(Debug, Args)]
pub struct LoginArgs {
    #[command(flatten)]
    common: IdentityArgs,
    /// How to log in: `token` reads a token from stdin and checks it; `cert` trades this
    /// client's certificate (COFFER_CLIENT_CERT) for a token through the login roles.
    #[arg(long, default_value = "token", value_parser = ["token", "cert"])]
    method: String,
    /// Life of a token made by `--method cert` (default: the roles' token_ttl).
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Print the token instead of saving it.
    #[arg(long)]
    no_store: bool,
}

/// `coffer policy …`
#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(flatten)]
    common: IdentityArgs,
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Create or replace a policy from a TOML or JSON file (`-` or nothing: stdin).
    ///
    /// A policy is a list of rules: `[[rule]] path = "secret/app/**" allow = ["read"]`.
    /// `*` is one path segment, `**` any depth. Every matching rule of every policy counts; any
    /// matching deny wins; nothing matching is a deny.
    Write {
        /// The policy's name.
        name: String,
        /// The document.
        file: Option<PathBuf>,
    },
    /// Print a policy's document.
    Read {
        /// The policy's name.
        name: String,
    },
    /// List policy names.
    List,
    /// Delete a policy (tokens that name it get nothing from it).
    Delete {
        /// The policy's name.
        name: String,
    },
    /// Why a token is allowed or denied a capability on a path: the decision and every rule
    /// that made it.
    Explain {
        /// Whose token (default: yours).
        #[arg(long)]
        accessor: Option<String>,
        /// The path: secret/<path>, key/<name>, sys/…
        path: String,
        /// The capability: read list create update delete undelete destroy encrypt decrypt rewrap
        /// datakey sign verify hmac key-admin policy-admin token-admin operator.
        capability: String,
    },
}

/// `coffer auth …`
#[derive(Debug, Args)]
pub struct AuthArgs {
    #[command(flatten)]
    common: IdentityArgs,
    #[command(subcommand)]
    command: AuthCommand,
}

#[derive(Debug, Subcommand)]
enum AuthCommand {
    /// Certificate login roles: which client certificates get which policies.
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RoleCommand {
    /// Create or replace a role.
    Write {
        /// The role's name.
        name: String,
        /// A certificate identity it admits: spiffe://… (the first URI SAN), dns:<name> (the first
        /// DNS SAN, for certificates without a URI), or cn:<name> (the subject's CN); a trailing
        /// `*` matches any rest. Repeat for more.
        #[arg(long = "identity", required = true)]
        identities: Vec<String>,
        /// A policy it gives; repeat for more.
        #[arg(long = "policy", required = true)]
        policies: Vec<String>,
        /// Life of a token made by `coffer login --method cert`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        token_ttl: Duration,
    },
    /// Show a role.
    Read {
        /// The role's name.
        name: String,
    },
    /// List role names.
    List,
    /// Delete a role.
    Delete {
        /// The role's name.
        name: String,
    },
}

fn wire(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    t.map_or_else(
        || "never".to_owned(),
        |t| {
            let at = std::time::UNIX_EPOCH + Duration::new(u64::try_from(t.seconds).unwrap_or(0), 0);
            humantime::format_rfc3339_seconds(at).to_string()
        },
    )
}

fn info_json(i: &TokenInfo) -> serde_json::Value {
    json!({
        "accessor": i.accessor, "policies": i.policies, "display_name": i.display_name,
        "created_at": when(i.created_at.as_ref()), "expires_at": when(i.expires_at.as_ref()),
        "max_expires_at": when(i.max_expires_at.as_ref()), "renewable": i.renewable, "has_parent": i.has_parent,
    })
}

fn info_text(i: &TokenInfo) -> String {
    format!(
        "accessor      {}\npolicies      {}\ndisplay name  {}\ncreated       {}\nexpires       {}\nmax expires   {}\nrenewable     {}\nchild of a token  {}",
        i.accessor,
        i.policies.join(", "),
        i.display_name,
        when(i.created_at.as_ref()),
        when(i.expires_at.as_ref()),
        when(i.max_expires_at.as_ref()),
        i.renewable,
        i.has_parent
    )
}

fn made(r: &CreateTokenResponse, json_out: bool) -> String {
    let info = r.info.clone().unwrap_or_default();
    if json_out {
        let mut v = info_json(&info);
        v["token"] = json!(r.token);
        v.to_string()
    } else {
        format!("token         {}   (shown once: store it now)\n{}", r.token, info_text(&info))
    }
}

/// Prints `result`, or the status on stderr; the exit code says which.
fn finish(result: Result<String, tonic::Status>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            if !text.is_empty() && !text.ends_with('\n') {
                out.write_all(b"\n")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            eprintln!("error: {}", describe_status(&status));
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn client(args: &IdentityArgs) -> anyhow::Result<AuthClient<Conn>> {
    Ok(AuthClient::new(connect(&args.conn).await?))
}

/// Runs `coffer token …`.
pub async fn run_token(args: TokenArgs) -> anyhow::Result<ExitCode> {
    let mut c = client(&args.common).await?;
    let json_out = args.common.output == Output::Json;
    let info = |r: Result<tonic::Response<TokenInfo>, tonic::Status>| {
        r.map(|r| {
            let i = r.into_inner();
            if json_out {
                info_json(&i).to_string()
            } else {
                info_text(&i)
            }
        })
    };
    let result = match args.command {
        TokenCommand::Create { policies, ttl, max_ttl, renewable, orphan, display_name } => c
            .create_token(CreateTokenRequest {
                policies,
                ttl: Some(wire(ttl)),
                max_ttl: max_ttl.map(wire),
                renewable,
                orphan,
                display_name,
            })
            .await
            .map(|r| made(&r.into_inner(), json_out)),
        TokenCommand::Lookup { accessor } => {
            info(c.lookup_token(LookupTokenRequest { accessor: accessor.unwrap_or_default() }).await)
        }
        TokenCommand::Renew { accessor, increment } => info(
            c.renew_token(RenewTokenRequest { accessor: accessor.unwrap_or_default(), increment: increment.map(wire) })
                .await,
        ),
        TokenCommand::Revoke { accessor } => {
            let which = accessor.clone().unwrap_or_else(|| "your token".into());
            c.revoke_token(RevokeTokenRequest { accessor: accessor.unwrap_or_default() }).await.map(|_| {
                if json_out {
                    json!({"revoked": which}).to_string()
                } else {
                    format!("revoked {which} and every token created under it")
                }
            })
        }
        TokenCommand::ListAccessors => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                match c.list_accessors(ListAccessorsRequest { page_size: 1000, page_token: page_token.clone() }).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        all.extend(r.accessors);
                        if r.next_page_token.is_empty() {
                            break Ok(if json_out { json!({"accessors": all}).to_string() } else { all.join("\n") });
                        }
                        page_token = r.next_page_token;
                    }
                    Err(s) => break Err(s),
                }
            }
        }
    };
    finish(result)
}

/// Writes the token file `0600` (replacing it), through a temporary file.
fn store_token(token: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = token_file().ok_or_else(|| anyhow::anyhow!("no HOME and no COFFER_TOKEN_FILE: use --no-store"))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Runs `coffer login`.
pub async fn run_login(mut args: LoginArgs) -> anyhow::Result<ExitCode> {
    let json_out = args.common.output == Output::Json;
    let (token, info) = if args.method == "cert" {
        // The certificate alone speaks: a token in the environment would be taken first.
        args.common.conn.no_token = true;
        let mut c = client(&args.common).await?;
        match c.login(LoginRequest { ttl: args.ttl.map(wire) }).await {
            Ok(r) => {
                let r = r.into_inner();
                (zeroize::Zeroizing::new(r.token), r.info.unwrap_or_default())
            }
            Err(s) => return finish(Err(s)),
        }
    } else {
        if std::io::stdin().is_terminal() {
            eprintln!("paste the token, then Enter and Ctrl-D:");
        }
        let mut text = zeroize::Zeroizing::new(String::new());
        std::io::stdin().read_to_string(&mut text)?;
        let token = zeroize::Zeroizing::new(text.trim().to_owned());
        if token.is_empty() {
            anyhow::bail!("no token on stdin (printf %s \"$TOKEN\" | coffer login)");
        }
        let channel = crate::cli::client::connect_channel(&args.common.conn).await?;
        let conn = tonic::service::interceptor::InterceptedService::new(channel, Credentials::token(&token)?);
        match AuthClient::new(conn).lookup_token(LookupTokenRequest { accessor: String::new() }).await {
            Ok(r) => (token, r.into_inner()),
            Err(s) => return finish(Err(s)),
        }
    };
    if args.no_store {
        return finish(Ok(made(&CreateTokenResponse { token: token.to_string(), info: Some(info) }, json_out)));
    }
    let path = store_token(&token)?;
    finish(Ok(if json_out {
        let mut v = info_json(&info);
        v["token_file"] = json!(path);
        v.to_string()
    } else {
        format!("logged in: token saved to {} (0600)\n{}", path.display(), info_text(&info))
    }))
}

/// Runs `coffer policy …`.
pub async fn run_policy(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let mut c = client(&args.common).await?;
    let json_out = args.common.output == Output::Json;
    let result = match args.command {
        PolicyCommand::Write { name, file } => {
            let document = match file {
                Some(f) if f.as_os_str() != "-" => {
                    std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?
                }
                _ => {
                    let mut s = String::new();
                    std::io::stdin().read_to_string(&mut s)?;
                    s
                }
            };
            c.write_policy(WritePolicyRequest { name: name.clone(), document }).await.map(|_| {
                if json_out {
                    json!({"written": name}).to_string()
                } else {
                    format!("wrote policy {name}")
                }
            })
        }
        PolicyCommand::Read { name } => c.read_policy(ReadPolicyRequest { name }).await.map(|r| {
            let p = r.into_inner();
            if json_out {
                json!({"name": p.name, "document": p.document, "updated_at": when(p.updated_at.as_ref())}).to_string()
            } else {
                p.document
            }
        }),
        PolicyCommand::List => c.list_policies(ListPoliciesRequest {}).await.map(|r| {
            let names = r.into_inner().names;
            if json_out {
                json!({"names": names}).to_string()
            } else {
                names.join("\n")
            }
        }),
        PolicyCommand::Delete { name } => c.delete_policy(DeletePolicyRequest { name: name.clone() }).await.map(|_| {
            if json_out {
                json!({"deleted": name}).to_string()
            } else {
                format!("deleted policy {name}")
            }
        }),
        PolicyCommand::Explain { accessor, path, capability } => {
            let req = ExplainRequest { accessor: accessor.unwrap_or_default(), path, capability };
            match c.explain(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    let text = if json_out {
                        json!({"allowed": r.allowed, "explanation": r.explanation}).to_string()
                    } else {
                        r.explanation
                    };
                    finish(Ok(text))?;
                    // The exit code is the decision: scripts can test it.
                    return Ok(if r.allowed { ExitCode::SUCCESS } else { ExitCode::from(2) });
                }
                Err(s) => Err(s),
            }
        }
    };
    finish(result)
}

/// Runs `coffer auth …`.
pub async fn run_auth(args: AuthArgs) -> anyhow::Result<ExitCode> {
    let mut c = client(&args.common).await?;
    let json_out = args.common.output == Output::Json;
    let AuthCommand::Role { command } = args.command;
    let result = match command {
        RoleCommand::Write { name, identities, policies, token_ttl } => c
            .write_role(WriteRoleRequest { name: name.clone(), identities, policies, token_ttl: Some(wire(token_ttl)) })
            .await
            .map(|_| if json_out { json!({"written": name}).to_string() } else { format!("wrote login role {name}") }),
        RoleCommand::Read { name } => c.read_role(ReadRoleRequest { name }).await.map(|r| {
            let r = r.into_inner();
            let ttl = r.token_ttl.map_or(0, |d| u64::try_from(d.seconds).unwrap_or(0));
            if json_out {
                json!({"name": r.name, "identities": r.identities, "policies": r.policies, "token_ttl_seconds": ttl})
                    .to_string()
            } else {
                format!(
                    "role        {}\nidentities  {}\npolicies    {}\ntoken ttl   {}",
                    r.name,
                    r.identities.join(", "),
                    r.policies.join(", "),
                    humantime::format_duration(Duration::from_secs(ttl))
                )
            }
        }),
        RoleCommand::List => c.list_roles(ListRolesRequest {}).await.map(|r| {
            let names = r.into_inner().names;
            if json_out {
                json!({"names": names}).to_string()
            } else {
                names.join("\n")
            }
        }),
        RoleCommand::Delete { name } => c.delete_role(DeleteRoleRequest { name: name.clone() }).await.map(|_| {
            if json_out {
                json!({"deleted": name}).to_string()
            } else {
                format!("deleted login role {name}")
            }
        }),
    };
    finish(result)
}
