//! `coffer operator …`: cluster set-up and status, against the node at COFFER_ADDR.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use coffer_proto::v1::operator_client::OperatorClient;
use coffer_proto::v1::{InitRequest, JoinRequest, RemoveRequest, StatusRequest, TransferLeaderRequest};
use serde_json::json;

use crate::cli::client::{connect, describe_status, DEFAULT_ADDR};
use crate::cli::Output;

/// Options shared by every operator command.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// The node to talk to.
    #[arg(long, env = "COFFER_ADDR", default_value = DEFAULT_ADDR, global = true)]
    addr: String,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    #[command(subcommand)]
    command: OperatorCommand,
}

#[derive(Debug, Subcommand)]
enum OperatorCommand {
    /// Start a new cluster with this node as its first member: records the cluster id, the HSM root
    /// key's KCV and the first keyring key.
    Init,
    /// Add this (new, empty) node to the cluster that PEER belongs to. The cluster checks that this
    /// node's HSM holds the same root key, adds it as a learner, and makes it a voter once it has
    /// caught up.
    Join {
        /// host:port of any node of the cluster.
        #[arg(long)]
        peer: String,
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
}

/// Runs an operator command; a gRPC error prints its code and message and exits 1.
pub async fn run(args: OperatorArgs) -> anyhow::Result<ExitCode> {
    let mut client = OperatorClient::new(connect(&args.addr).await?);
    let mut out = std::io::stdout().lock();
    let json = args.output == Output::Json;
    let result = match args.command {
        OperatorCommand::Init => client.init(InitRequest {}).await.map(|r| {
            let r = r.into_inner();
            if json {
                json!({"cluster_id": r.cluster_id, "kcv": r.kcv}).to_string()
            } else {
                format!("initialised cluster {} (root key KCV {})", r.cluster_id, r.kcv)
            }
        }),
        OperatorCommand::Join { peer } => client.join(JoinRequest { peer }).await.map(|r| {
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
                    "cluster_id": s.cluster_id, "kcv": s.kcv, "hsm": s.hsm, "members": members,
                })
                .to_string()
            } else {
                let mut text = format!(
                    "node {} ({}), term {}, leader {}\nlast log {}, committed {}, applied {}\ncluster {}\nHSM {} (KCV {})\nmembers:",
                    s.node_id,
                    s.role,
                    s.term,
                    opt(s.leader_id),
                    opt(s.last_log_index),
                    opt(s.committed_index),
                    opt(s.applied_index),
                    if s.cluster_id.is_empty() { "(not initialised)" } else { &s.cluster_id },
                    s.hsm,
                    s.kcv
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
