//! Operator use cases: init, join, remove, transfer leadership, status.

use std::collections::BTreeSet;
use std::time::Duration;

use coffer_proto::raft::v1::{HandoffRequest, JoinRequest};
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

/// Makes this node the leader. It asks the leader to hand off (see `coffer_raft::Quiet`: the
/// leader waits for this node to hold its whole log, then goes quiet so the voters' leases lapse),
/// then stands for election, again and again, until it wins or the leader's quiet period is over. openraft 0.9 has no TimeoutNow message; this is its equivalent.
///
/// # Errors
/// `InvalidArgument` when the node is not a voter; `Unavailable` when there is no leader to hand
/// off, or this node did not win in time.
pub async fn take_leadership(node: &Node) -> Result<u64, Error> {
    let me = node.config.node_id;
    let metrics = node.raft.metrics().borrow().clone();
    if metrics.state == ServerState::Leader {
        return Ok(me);
    }
    let membership = metrics.membership_config.membership();
    if !membership.voter_ids().any(|id| id == me) {
        return Err(Error::InvalidArgument { rule: "only a voter can become leader".into() });
    }
    let leader = metrics.current_leader.and_then(|id| membership.get_node(&id)).ok_or_else(|| Error::Unavailable {
        reason: "no leader is known to hand leadership over; retry once the cluster has one".into(),
    })?;
    let mut client = node.channels.client(&leader.addr).map_err(|e| Error::Internal(Box::new(e)))?;
    let quiet = client.handoff(HandoffRequest { node_id: me }).await.map_err(|s| match s.code() {
        tonic::Code::FailedPrecondition => Error::InvalidArgument { rule: s.message().to_owned() },
        _ => {
            Error::Unavailable { reason: format!("the leader at {} would not hand off: {}", leader.addr, s.message()) }
        }
    })?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(quiet.into_inner().quiet_ms);
    // Voters refuse while their lease from the old leader lasts (election-timeout-max since its
    // last message; the leader's last commit notice can follow the hand-off by a heartbeat or
    // so): stand once it has surely lapsed. A try that has not won is repeated at a higher term
    // every two heartbeats, well before the other voters' own election timers (a lease plus an
    // election timeout) make them candidates too.
    let (lease, heartbeat) = (node.config.raft.election_timeout_max, node.config.raft.heartbeat_interval);
    tokio::time::sleep(lease + heartbeat * 2).await;
    loop {
        node.raft.trigger().elect().await.map_err(|e| Error::Internal(Box::new(e)))?;
        let won = node.raft.wait(Some(heartbeat * 2)).current_leader(me, "transfer-leader").await.is_ok();
        if won {
            return Ok(me);
        }
        if tokio::time::Instant::now() >= deadline {
            let leader = node.raft.metrics().borrow().current_leader;
            return Err(Error::Unavailable {
                reason: format!(
                    "this node did not win an election while the leader was quiet; the leader is now {}",
                    leader.map_or("unknown".to_owned(), |l| format!("node {l}"))
                ),
            });
        }
    }
}
