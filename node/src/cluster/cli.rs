//! `coffer operator …`: cluster set-up and status, against the node at COFFER_ADDR.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use coffer_proto::v1::operator_client::OperatorClient;
use coffer_proto::v1::{
    CreateJoinTokenRequest, InitRequest, JoinRequest, RemoveRequest, StatusRequest, TransferLeaderRequest,
};
use serde_json::json;

use crate::cli::client::{connect, describe_status, ConnectArgs};
use crate::cli::Output;

/// Options shared by every operator command.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: OperatorCommand,
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Start a new cluster with this node as its first member: records the cluster id, the HSM root
    /// key's KCV and the first keyring key, and prints the root token (once). Needs an operator
    /// certificate.
    Init,
    /// Add this (new, empty) node to the cluster that PEER belongs to, with a join token from a
    /// member. The cluster checks this node's certificate, spends the token, checks that this
    /// node's HSM holds the same root key, adds it as a learner, and makes it a voter once it has
    /// caught up.
    Join {
        /// The node-to-node address (its peer-listen, host:port) of any node of the cluster.
        #[arg(long)]
        peer: String,
        /// A join token from `coffer operator join-token create` on a member (required with TLS).
        #[arg(long, env = "COFFER_JOIN_TOKEN", hide_env_values = true, default_value = "")]
        token: String,
    },
    /// Join tokens: single-use, short-lived permissions for one node to join.
    JoinToken {
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
    /// Remove a node from the cluster (run against the leader).
    Remove {
        /// The node id to remove.
        node_id: u64,
    },
    /// Make the node at COFFER_ADDR the leader (it stands for election; an up-to-date node wins).
    TransferLeader {
        /// The node that should lead; it must be the node at COFFER_ADDR (default).
        node_id: Option<u64>,
    },
    /// Show this node's role, term, leader, log indexes, members and their lag, and the HSM state.
    Status,
    /// Certificates for teams without a PKI: a cluster CA, and certificates it issues to nodes and
    /// clients. Works on files only; talks to no server.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
}

#[derive(Debug, Subcommand)]
enum JoinTokenCommand {
    /// Create a token; it is printed once, and the cluster keeps only its hash.
    Create {
        /// How long it admits a node (at most 24h).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// The cluster's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Issue a certificate signed by the CA in --ca-dir.
    Issue {
        #[command(subcommand)]
        subject: IssueSubject,
        /// The CA's directory (ca.crt, ca.key).
        #[arg(long, default_value = "coffer-ca", global = true)]
        ca_dir: PathBuf,
        /// Where to write <name>.crt and <name>.key (0600).
        #[arg(long, default_value = ".", global = true)]
        out: PathBuf,
        /// How long the certificate is valid (such as 90d, 1y).
        #[arg(long, default_value = "365d", value_parser = humantime::parse_duration, global = true)]
        valid_for: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a CA: writes ca.crt (give it to every node and client) and ca.key (0600; keep it
    /// off the nodes once they have their certificates).
    Create {
        /// The directory to write (created 0700).
        #[arg(long, default_value = "coffer-ca")]
        dir: PathBuf,
        /// How long the CA is valid.
        #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
}

#[derive(Debug, Subcommand)]
enum IssueSubject {
    /// A node's certificate (server and client use), naming spiffe://coffer/node/<ID>.
    Node {
        /// The node's id (node-id in its config).
        #[arg(long)]
        id: u64,
        /// A DNS name or IP address clients and peers dial it at; repeat for more.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
    /// A client's certificate, naming spiffe://coffer/client/<NAME>.
    Client {
        /// The client's name: A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
    },
    /// An operator's certificate, naming spiffe://coffer/operator/<NAME>: allowed to initialise,
    /// join, remove nodes, move leadership and create join tokens.
    Operator {
        /// The operator's name: A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
    },
}

/// Runs `coffer operator tls …`: files only.
fn run_tls(command: TlsCommand, json: bool) -> anyhow::Result<String> {
    match command {
        TlsCommand::Ca { command: CaCommand::Create { dir, valid_for } } => {
            coffer_tls::Ca::create(&dir, valid_for)?;
            let (cert, key) = (dir.join(coffer_tls::CA_CERT), dir.join(coffer_tls::CA_KEY));
            Ok(if json {
                json!({"cert": cert, "key": key}).to_string()
            } else {
                format!("created a CA: {} (give to nodes and clients), {} (keep safe)", cert.display(), key.display())
            })
        }
        TlsCommand::Issue { subject, ca_dir, out, valid_for } => {
            let ca = coffer_tls::Ca::load(&ca_dir)?;
            let until = SystemTime::now() + valid_for;
            let issued = match &subject {
                IssueSubject::Node { id, hosts } => {
                    ca.issue(&coffer_tls::Subject::Node(*id), hosts, until, &out, &format!("node-{id}"))?
                }
                IssueSubject::Client { name } => {
                    ca.issue(&coffer_tls::Subject::Client(name.clone()), &[], until, &out, name)?
                }
                IssueSubject::Operator { name } => {
                    ca.issue(&coffer_tls::Subject::Operator(name.clone()), &[], until, &out, name)?
                }
            };
            Ok(if json {
                json!({"cert": issued.cert, "key": issued.key}).to_string()
            } else {
                format!("issued {} and {}", issued.cert.display(), issued.key.display())
            })
        }
    }
}

/// Runs an operator command; a gRPC error prints its code and message and exits 1.
pub async fn run(args: OperatorArgs) -> anyhow::Result<ExitCode> {
    let json = args.output == Output::Json;
    if let OperatorCommand::Tls { command } = args.command {
        writeln!(std::io::stdout().lock(), "{}", run_tls(command, json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut client = OperatorClient::new(connect(&args.conn).await?);
    let mut out = std::io::stdout().lock();
    let result = match args.command {
        OperatorCommand::Tls { .. } => unreachable!("handled above"),
        OperatorCommand::Init => client.init(InitRequest {}).await.map(|r| {
            let r = r.into_inner();
            if json {
                json!({"cluster_id": r.cluster_id, "kcv": r.kcv, "root_token": r.root_token}).to_string()
            } else {
                format!(
                    "initialised cluster {} (root key KCV {})\n\nroot token: {}\n\nThe root token is shown once and can do anything. Use it to write policies and \
                     make least-privilege tokens (coffer policy write, coffer token create), then revoke it \
                     (coffer token revoke).",
                    r.cluster_id, r.kcv, r.root_token
                )
            }
        }),
        OperatorCommand::JoinToken { command: JoinTokenCommand::Create { ttl } } => {
            let ttl = prost_types::Duration::try_from(ttl).map_err(|_| anyhow::anyhow!("--ttl is too long"))?;
            client.create_join_token(CreateJoinTokenRequest { ttl: Some(ttl) }).await.map(|r| {
                let r = r.into_inner();
                let expires = r.expires_at.map(|t| t.to_string()).unwrap_or_default();
                if json {
                    json!({"token": r.token, "expires_at": expires}).to_string()
                } else {
                    // The token alone on stdout, for $(…); the note for people on stderr.
                    eprintln!(
                        "single-use, expires {expires}; join with: coffer operator join --peer <a member's peer address> --token <token>"
                    );
                    r.token
                }
            })
        }
        OperatorCommand::Join { peer, token } => client.join(JoinRequest { peer, token }).await.map(|r| {
            let id = r.into_inner().cluster_id;
            if json {
                json!({"cluster_id": id}).to_string()
            } else {
                format!("joined cluster {id}")
            }
        }),
        OperatorCommand::Remove { node_id } => client.remove(RemoveRequest { node_id }).await.map(|_| {
            if json {
                json!({"removed": node_id}).to_string()
            } else {
                format!("removed node {node_id}")
            }
        }),
        OperatorCommand::TransferLeader { node_id } => {
            client.transfer_leader(TransferLeaderRequest { node_id: node_id.unwrap_or(0) }).await.map(|r| {
                let id = r.into_inner().leader_id;
                if json {
                    json!({"leader_id": id}).to_string()
                } else {
                    format!("node {id} is the leader")
                }
            })
        }
        OperatorCommand::Status => client.status(StatusRequest {}).await.map(|r| {
            let s = r.into_inner();
            let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            if json {
                let members: Vec<_> = s
                    .members
                    .iter()
                    .map(|m| json!({"node_id": m.node_id, "addr": m.addr, "voter": m.voter, "lag": m.lag}))
                    .collect();
                json!({
                    "node_id": s.node_id, "role": s.role, "term": s.term, "leader_id": s.leader_id,
                    "last_log_index": s.last_log_index, "committed_index": s.committed_index, "applied_index": s.applied_index,
                    "cluster_id": s.cluster_id, "kcv": s.kcv, "hsm": s.hsm, "members": members, "transport": s.transport,
                    "audit": s.audit,
                })
                .to_string()
            } else {
                let mut text = format!(
                    "node {} ({}), term {}, leader {}\nlast log {}, committed {}, applied {}\ncluster {}\nHSM {} (KCV {})\ntransport {}\naudit {}\nmembers:",
                    s.node_id,
                    s.role,
                    s.term,
                    opt(s.leader_id),
                    opt(s.last_log_index),
                    opt(s.committed_index),
                    opt(s.applied_index),
                    if s.cluster_id.is_empty() { "(not initialised)" } else { &s.cluster_id },
                    s.hsm,
                    s.kcv,
                    if s.transport == "plaintext" { "PLAINTEXT (tls = \"off\" in the node's config)" } else { &s.transport },
                    s.audit
                );
                for m in &s.members {
                    text.push_str(&format!(
                        "\n  {:>4}  {:<22} {:<8} lag {}",
                        m.node_id,
                        m.addr,
                        if m.voter { "voter" } else { "learner" },
                        opt(m.lag)
                    ));
                }
                text
            }
        }),
    };
    match result {
        Ok(text) => {
            writeln!(out, "{text}")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(status) => {
            eprintln!("error: {}", describe_status(&status));
            Ok(ExitCode::FAILURE)
        }
    }
}
