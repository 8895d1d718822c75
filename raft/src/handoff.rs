//! Leadership hand-off, on the leader's side.
//!
//! openraft 0.9 has no TimeoutNow message, and a voter that heard from the leader within the
//! leader lease (`election-timeout-max`) refuses to vote for anyone else. An election started on
//! the target alone therefore wins only when the leases happen to have lapsed, which made
//! `transfer-leader` flaky (and hopeless in a five-node cluster under load). So the leader, asked
//! to hand off, first waits for the target to hold its whole log, then goes *quiet*: it stops
//! heartbeats and holds new writes and read-index requests, which would otherwise renew the
//! leases. One lease later the target's election wins. The leader speaks again as soon as it has
//! stepped down (held requests then go to the new leader) or when the quiet period ends.

use std::time::Duration;

use openraft::ServerState;
use tokio::sync::watch;

use crate::error::Error;
use crate::replica::Inner;
use crate::NodeId;

/// Whether this node, as leader, is handing leadership off. Shared by the node's write and read
/// paths and the Raft service; cheap to check when nobody is handing off.
#[derive(Debug)]
pub(crate) struct Quiet {
    quiet: watch::Sender<bool>,
}

impl Default for Quiet {
    fn default() -> Self {
        Quiet { quiet: watch::Sender::new(false) }
    }
}

impl Quiet {
    /// Returns at once unless a hand-off is under way; then waits until it ends (bounded by the
    /// quiet period the leader set).
    pub(crate) async fn wait(&self) {
        if !*self.quiet.borrow() {
            return;
        }
        let mut rx = self.quiet.subscribe();
        // The sender lives as long as `self`: the error cannot happen while we borrow it.
        let _ = rx.wait_for(|quiet| !*quiet).await;
    }

    /// Hands leadership to `target`: holds new writes and reads, waits up to `catch_up` for the
    /// target to match the leader's log, stops heartbeats for at most `quiet_for` and returns; a background task ends the quiet period
    /// when this node steps down or the period runs out.
    ///
    /// # Errors
    /// [`Error::NotLeader`], [`Error::NotVoter`], [`Error::HandoffBusy`], [`Error::Lagging`];
    /// nothing changes on error.
    pub(crate) async fn hand_off(
        self: &std::sync::Arc<Self>,
        replica: &Inner,
        target: NodeId,
        catch_up: Duration,
        quiet_for: Duration,
    ) -> Result<(), Error> {
        let raft = &replica.raft;
        {
            let metrics = raft.metrics().borrow().clone();
            if metrics.state != ServerState::Leader {
                return Err(Error::NotLeader { leader: replica.leader_peer() });
            }
            if !metrics.membership_config.membership().voter_ids().any(|id| id == target) {
                return Err(Error::NotVoter { node: target });
            }
        }
        // Hold new writes first, so the target can catch up with a log that has stopped growing.
        if self.quiet.send_replace(true) {
            return Err(Error::HandoffBusy);
        }
        let caught_up = raft
            .wait(Some(catch_up))
            .metrics(
                |m| {
                    let last = m.last_log_index;
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&target))
                        .is_some_and(|matched| matched.as_ref().map(|l| l.index) == last)
                },
                "hand-off target caught up",
            )
            .await;
        if caught_up.is_err() {
            self.quiet.send_replace(false);
            return Err(Error::Lagging { node: target, waited: catch_up });
        }
        raft.runtime_config().heartbeat(false);
        tracing::info!(%target, ?quiet_for, "handing leadership off: quiet until it moves");
        let (quiet, raft) = (self.clone(), raft.clone());
        tokio::spawn(async move {
            let stepped_down = raft
                .wait(Some(quiet_for))
                .metrics(|m| m.state != ServerState::Leader, "stepped down after hand-off")
                .await
                .is_ok();
            raft.runtime_config().heartbeat(true);
            quiet.quiet.send_replace(false);
            if stepped_down {
                tracing::info!(%target, "leadership handed off");
            } else {
                tracing::warn!(%target, "leadership did not move within the quiet period; leading on");
            }
        });
        Ok(())
    }
}
