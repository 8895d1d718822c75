//! Membership: initialise a cluster, join one (and admit a node, on the leader), remove a node,
//! and hand leadership over.
//!
//! Leadership hand-off: openraft 0.9 has no TimeoutNow message, and voters refuse votes while
//! their lease from the leader lasts. The target asks the leader to hand off; the leader holds new
//! writes and read-index requests, waits for the target to match its log, and stops heartbeats
//! for at most eight election timeouts ([`Quiet`](crate::handoff::Quiet)). The target waits one
//! lease, then stands for election every two heartbeats until it wins.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;

use crate::command::{Op, Outcome, Rejection, UseJoinToken, Write};
use crate::error::{Error, JoinRefusal};
use crate::replica::{write_error, Inner, Leadership};
use crate::{join_token_hash, NodeId, UnixMillis};

/// How long `initialize` waits for this node to lead its new single-node cluster.
const LEADER_WAIT: Duration = Duration::from_secs(30);

impl Inner {
    pub(crate) async fn initialize(&self) -> Result<(), Error> {
        if self.raft.is_initialized().await.map_err(Error::raft)? {
            return Err(Error::AlreadyInitialized);
        }
        let me = self.config.node_id;
        let members = BTreeMap::from([(me, BasicNode { addr: self.config.advertise.clone().into() })]);
        self.raft.initialize(members).await.map_err(Error::raft)?;
        self.raft.wait(Some(LEADER_WAIT)).current_leader(me, "init").await.map_err(Error::raft)?;
        Ok(())
    }

    pub(crate) fn is_voter(&self) -> bool {
        let me = self.config.node_id;
        self.raft.metrics().borrow().membership_config.membership().voter_ids().any(|id| id == me)
    }

    pub(crate) async fn join(&self, peer: &str, kcv: &str, token: &str) -> Result<String, Error> {
        // A node that is already a voter is done. A learner (a join that was cut short, say by a
        // leader failover before the promotion) may ask again: the leader promotes it.
        if self.is_voter() {
            return Err(Error::AlreadyInitialized);
        }
        let me: String = self.config.advertise.clone().into();
        crate::network::join(&self.channels, peer, self.config.node_id, &me, kcv, token).await
    }

    /// The leader's side of a join: check the KCV and spend the join token (with peers
    /// authenticated), and only then add the node as a learner (the first time its address is
    /// dialled; blocking until it has caught up, so the promotion does not stall writes), then
    /// make it a voter.
    pub(crate) async fn admit(&self, node: NodeId, addr: &str, kcv: &str, token: &str) -> Result<String, Error> {
        let cluster = self.reader.cluster()?.ok_or(Error::JoinRefused(JoinRefusal::NotInitialized))?;
        if kcv != cluster.root_kcv {
            return Err(Error::JoinRefused(JoinRefusal::KcvMismatch {
                node,
                theirs: kcv.to_owned(),
                ours: cluster.root_kcv,
            }));
        }
        let member = self.raft.metrics().borrow().membership_config.membership().get_node(&node).is_some();
        // A member (a learner whose join was cut short) was admitted already.
        if self.config.authenticate_peers && !member {
            if token.is_empty() {
                return Err(Error::JoinRefused(JoinRefusal::TokenRequired));
            }
            let spend = UseJoinToken { hash: join_token_hash(token), node, at_ms: UnixMillis::now() };
            match self.batcher.propose(vec![Write::new(Op::UseJoinToken(spend))]).await?.pop() {
                Some(Outcome::Applied) => {}
                Some(Outcome::Rejected(Rejection::JoinToken(refusal))) => {
                    tracing::warn!(node_id = %node, %refusal, "refused a join");
                    return Err(Error::JoinRefused(JoinRefusal::Token(refusal)));
                }
                other => {
                    return Err(Error::InvalidInput { rule: format!("spending the join token answered {other:?}") })
                }
            }
        }
        self.raft
            .add_learner(node, BasicNode { addr: addr.to_owned() }, true)
            .await
            .map_err(|e| self.membership_error(e))?;
        let mut voters: BTreeSet<NodeId> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        voters.insert(node);
        self.raft.change_membership(voters, false).await.map_err(|e| self.membership_error(e))?;
        tracing::info!(node_id = %node, addr, "node joined as a voter");
        Ok(cluster.cluster_id)
    }

    fn membership_error(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Error {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                Error::NotLeader { leader: self.leader_peer() }
            }
            other => write_error(other),
        }
    }

    pub(crate) async fn remove(&self, node: NodeId) -> Result<(), Error> {
        let (voters, known) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            (membership.voter_ids().collect::<BTreeSet<NodeId>>(), membership.get_node(&node).is_some())
        };
        if !known {
            return Err(Error::UnknownMember { node });
        }
        if !voters.contains(&node) {
            // A learner (a join cut short): removed from the nodes, or it would keep receiving
            // the log and could be promoted later without a token.
            let change = openraft::ChangeMembers::RemoveNodes(BTreeSet::from([node]));
            return self.raft.change_membership(change, false).await.map(|_| ()).map_err(|e| self.membership_error(e));
        }
        let members: BTreeSet<NodeId> = voters.into_iter().filter(|id| *id != node).collect();
        if members.is_empty() {
            return Err(Error::LastVoter);
        }
        self.raft.change_membership(members, false).await.map(|_| ()).map_err(|e| self.membership_error(e))
    }

    /// The leader's side of a hand-off to `target`: returns how long it stays quiet.
    pub(crate) async fn hand_off(&self, target: NodeId) -> Result<Duration, Error> {
        // One lease for the voters' leases to lapse, then the target's election tries; writes
        // held meanwhile still finish inside the default write-timeout (5 s).
        let quiet_for = self.config.election_timeout_max * 8;
        let catch_up = Duration::from_secs(2);
        self.quiet.hand_off(self, target, catch_up, quiet_for).await?;
        Ok(quiet_for)
    }

    pub(crate) async fn step_down(&self) -> Result<Option<NodeId>, Error> {
        // From now on this node never stands for election (until it restarts).
        self.raft.runtime_config().elect(false);
        if !matches!(self.leadership(), Leadership::Me) {
            return Ok(None);
        }
        let me = self.config.node_id;
        let target = {
            let metrics = self.raft.metrics().borrow().clone();
            let matched = |id: &NodeId| {
                metrics.replication.as_ref().and_then(|r| r.get(id)).and_then(|m| m.as_ref().map(|l| l.index))
            };
            metrics.membership_config.membership().voter_ids().filter(|id| *id != me).max_by_key(matched)
        };
        let Some(target) = target else { return Ok(None) };
        self.hand_off(target).await?;
        Ok(Some(target))
    }

    pub(crate) async fn take_leadership(&self) -> Result<NodeId, Error> {
        let me = self.config.node_id;
        let leader = match self.leadership() {
            Leadership::Me => return Ok(me),
            Leadership::Other(leader) => leader,
            Leadership::Unknown => return Err(Error::NoLeader),
        };
        if !self.is_voter() {
            return Err(Error::NotVoter { node: me });
        }
        let quiet = crate::network::handoff(&self.channels, &leader, me).await?;
        let deadline = tokio::time::Instant::now() + quiet;
        // Voters refuse while their lease from the old leader lasts (election-timeout-max since
        // its last message; the leader's last commit notice can follow the hand-off by a
        // heartbeat or so): stand once it has surely lapsed. A try that has not won is repeated
        // at a higher term every two heartbeats, well before the other voters' own election
        // timers (a lease plus an election timeout) make them candidates too.
        let (lease, heartbeat) = (self.config.election_timeout_max, self.config.heartbeat_interval);
        tokio::time::sleep(lease + heartbeat * 2).await;
        loop {
            self.raft.trigger().elect().await.map_err(Error::raft)?;
            if self.raft.wait(Some(heartbeat * 2)).current_leader(me, "transfer-leader").await.is_ok() {
                return Ok(me);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::ElectionLost { leader: self.raft.metrics().borrow().current_leader });
            }
        }
    }
}
