//! Operator use cases: join, remove, transfer leadership. Each is one call on the replica; this
//! module states what the node adds (its HSM's KCV, the rule that a node transfers leadership to
//! itself).

use coffer_raft::NodeId;

use crate::error::Error;
use crate::node::Node;

/// Joins the cluster that `peer` belongs to: the leader checks this node's KCV, adds it as a
/// learner, and promotes it to voter once it has caught up. Returns the cluster id.
///
/// # Errors
/// `AlreadyInitialized` when this node is a voter; `JoinRefused` (a different root key, say);
/// retryable replica errors when the peer or leader cannot be reached.
pub async fn join(node: &Node, peer: &str) -> Result<String, Error> {
    Ok(node.replica.join(peer, &node.hsm.kcv().to_string()).await?)
}

/// Removes a node from the cluster's membership. Run against the leader.
///
/// # Errors
/// `NotLeader` (with the leader's address); `LastVoter`.
pub async fn remove(node: &Node, node_id: NodeId) -> Result<(), Error> {
    Ok(node.replica.remove(node_id).await?)
}

/// Makes this node the leader (see `coffer_raft::Replica::take_leadership`).
///
/// # Errors
/// `NotVoter`; retryable replica errors when there is no leader to hand off, or this node did
/// not win in time.
pub async fn take_leadership(node: &Node) -> Result<NodeId, Error> {
    Ok(node.replica.take_leadership().await?)
}
