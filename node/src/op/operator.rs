//! Operator use cases: init, join, remove, transfer leadership, status.

use std::collections::BTreeSet;

use coffer_proto::raft::v1::JoinRequest;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;

use crate::error::Error;
use crate::node::Node;

/// Joins the cluster that `peer` belongs to: the leader checks this node's KCV, adds it as a
/// learner, and promotes it to voter once it has caught up. Returns the cluster id.
///
/// # Errors
/// `AlreadyInitialized` when this node is in a cluster; `JoinRefused` (the leader's reason, such as
/// a different root key); `Unavailable` when the peer or leader cannot be reached.
pub async fn join(node: &Node, peer: &str) -> Result<String, Error> {
    // A node that is already a voter is done. A learner (a join that was cut short, say by a
    // leader failover before the promotion) may ask again: the leader promotes it.
    let is_voter =
        node.raft.metrics().borrow().membership_config.membership().voter_ids().any(|id| id == node.config.node_id);
    if is_voter {
        return Err(Error::AlreadyInitialized);
    }
    let mut client = node.channels.client(peer).map_err(|e| Error::InvalidArgument { rule: e.to_string() })?;
    let request =
        JoinRequest { node_id: node.config.node_id, addr: node.advertise.clone(), kcv: node.hsm.kcv().to_string() };
    let reply = client.join(request).await.map_err(|status| match status.code() {
        tonic::Code::FailedPrecondition => Error::JoinRefused { reason: status.message().to_owned() },
        _ => Error::Unavailable { reason: format!("joining through {peer} failed: {}", status.message()) },
    })?;
    Ok(reply.into_inner().cluster_id)
}

/// Removes a node from the cluster's membership. Run against the leader.
///
/// # Errors
/// `Unavailable` (with the leader's address) when this node is not the leader.
pub async fn remove(node: &Node, node_id: u64) -> Result<(), Error> {
    let metrics = node.raft.metrics().borrow().clone();
    let members: BTreeSet<u64> =
        metrics.membership_config.membership().voter_ids().filter(|id| *id != node_id).collect();
    if members.is_empty() {
        return Err(Error::InvalidArgument { rule: "cannot remove the last voter of a cluster".into() });
    }
    match node.raft.change_membership(members, false).await {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(Error::Unavailable {
            reason: format!(
                "this node is not the leader; run the command against the leader{}",
                f.leader_node.map(|n| format!(" at {}", n.addr)).unwrap_or_default()
            ),
        }),
        Err(e) => Err(Error::Internal(Box::new(e))),
    }
}

/// Makes this node stand for election now. A node whose log is up to date wins, and the old
/// leader steps down when it sees the higher term. openraft 0.9 has no leader-transfer message;
/// an election triggered on the target node is its equivalent.
///
/// # Errors
/// `InvalidArgument` when the node is not a voter; `Unavailable` when it did not win in time.
pub async fn take_leadership(node: &Node) -> Result<u64, Error> {
    let metrics = node.raft.metrics().borrow().clone();
    if metrics.state == ServerState::Leader {
        return Ok(node.config.node_id);
    }
    if !metrics.membership_config.membership().voter_ids().any(|id| id == node.config.node_id) {
        return Err(Error::InvalidArgument { rule: "only a voter can become leader".into() });
    }
    node.raft.trigger().elect().await.map_err(|e| Error::Internal(Box::new(e)))?;
    node.raft
        .wait(Some(std::time::Duration::from_secs(10)))
        .current_leader(node.config.node_id, "transfer-leader")
        .await
        .map_err(|e| Error::Unavailable { reason: format!("this node did not become leader: {e}") })?;
    Ok(node.config.node_id)
}
