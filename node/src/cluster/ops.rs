//! Operator use cases: join, remove, transfer leadership. Each is one call on the replica; this
//! module states what the node adds (its HSM's KCV, the rule that a node transfers leadership to
//! itself).

use std::time::Duration;

use coffer_raft::{CreateJoinToken, NodeId, Op, Outcome, UnixMillis, Write};

use crate::error::Error;
use crate::node::Node;

/// Joins the cluster that `peer` belongs to: the leader checks this node's KCV, adds it as a
/// learner, and promotes it to voter once it has caught up. Returns the cluster id.
///
/// # Errors
/// `AlreadyInitialized` when this node is a voter; `JoinRefused` (a different root key, say);
/// retryable replica errors when the peer or leader cannot be reached.
pub async fn join(node: &Node, peer: &str, token: &str) -> Result<String, Error> {
    Ok(node.replica.join(peer, &node.hsm.kcv().to_string(), token).await?)
}

/// The longest a join token may live.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// A join token's life when none is asked for.
pub const DEFAULT_JOIN_TOKEN_TTL: Duration = Duration::from_secs(600);

/// A new join token, valid for `ttl`: returned once, kept in the cluster only as its SHA-256.
///
/// # Errors
/// `InvalidArgument` for a TTL of zero or above a day; retryable replica errors.
pub async fn create_join_token(node: &Node, ttl: Option<Duration>) -> Result<(String, UnixMillis), Error> {
    let ttl = ttl.unwrap_or(DEFAULT_JOIN_TOKEN_TTL);
    if ttl.is_zero() || ttl > MAX_JOIN_TOKEN_TTL {
        return Err(Error::InvalidArgument { rule: "a join token's ttl is more than 0 and at most 24h".into() });
    }
    node.ready().await?;
    let token = format!("cfr_join_{}", hex::encode(node.keys.random_bytes(32)?.as_slice()));
    let now = UnixMillis::now();
    let expires = UnixMillis(now.0.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)));
    let op = Op::CreateJoinToken(CreateJoinToken {
        hash: coffer_raft::join_token_hash(&token),
        created_at_ms: now,
        expires_at_ms: expires,
    });
    match node.propose(Write::new(op)).await? {
        Outcome::Applied => Ok((token, expires)),
        other => Err(Error::Unexpected { what: "CreateJoinToken", outcome: Box::new(other) }),
    }
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
