// Hot path: every linearizable read and every bounded-staleness read or crypto call.
//! Read barriers: linearizable (read index) and bounded staleness (freshness).
//!
//! - On the leader, a linearizable read joins a read-index round (openraft `get_read_log_id`:
//!   leadership confirmed by a quorum) that started after it arrived, shared with every read that
//!   queued meanwhile ([`crate::Coalescer`]), then waits until that index is applied.
//! - On a follower, it asks the leader for a read index (one shared `ReadIndex` call per round),
//!   then waits until it has applied that index itself.
//! - A bounded-staleness read makes no round trip: the leader serves while a quorum has
//!   acknowledged it within the bound, a follower while it has applied the commit index of an
//!   AppendEntries sent within the bound by a leader a quorum had acknowledged ([`LeaderContact`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, Fatal, RaftError};
use openraft::ServerState;

use crate::error::Error;
use crate::replica::{Inner, Leadership};

/// How long a read waits to apply up to a read index.
const READ_INDEX_WAIT: Duration = Duration::from_secs(5);

/// How fresh this node's applied state is, as a follower: as of when a quorum last acknowledged
/// the leader that sent the latest AppendEntries whose `leader_commit` this node has since
/// applied. Hearing from the leader is not enough twice over: a restarted or lagging follower
/// hears heartbeats long before it has caught up, and a leader cut off in a minority keeps
/// sending heartbeats while a new leader, elsewhere, acknowledges writes.
#[derive(Debug)]
pub(crate) struct LeaderContact {
    base: Instant,
    /// Milliseconds after `base` the applied state is known fresh as of; 0: never.
    fresh_ms: AtomicU64,
    /// (as-of milliseconds after `base`, leader commit index) of accepted AppendEntries not yet
    /// applied, oldest first. A std `Mutex`: held for a few pushes and pops, never across an `.await`.
    pending: Mutex<VecDeque<(u64, u64)>>,
}

/// At most this many unapplied AppendEntries are remembered; older ones are dropped (the node is
/// then simply considered staler than it is).
const MAX_PENDING: usize = 256;

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact { base: Instant::now(), fresh_ms: AtomicU64::new(0), pending: Mutex::new(VecDeque::new()) }
    }
}

impl LeaderContact {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Records an accepted AppendEntries carrying `leader_commit`, sent by a leader a quorum last
    /// acknowledged `quorum_ack_age_ms` before (unknown: now), then settles against `applied`.
    pub(crate) fn heard(&self, leader_commit: Option<u64>, quorum_ack_age_ms: Option<u64>, applied: Option<u64>) {
        let as_of = self.now_ms().saturating_sub(quorum_ack_age_ms.unwrap_or(0)).max(1);
        let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.push_back((as_of, leader_commit.unwrap_or(0)));
        if pending.len() > MAX_PENDING {
            pending.pop_front();
        }
        self.settle(&mut pending, applied);
    }

    fn settle(&self, pending: &mut VecDeque<(u64, u64)>, applied: Option<u64>) {
        let applied = applied.unwrap_or(0);
        while let Some(&(at, commit)) = pending.front() {
            if commit > applied {
                break;
            }
            self.fresh_ms.fetch_max(at, Ordering::Relaxed);
            pending.pop_front();
        }
    }

    /// How stale this node's state may be, given what it has applied now: the age of the newest
    /// leader contact whose commit index is applied. `None` if there is none.
    pub(crate) fn since(&self, applied: Option<u64>) -> Option<Duration> {
        self.settle(&mut self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner), applied);
        match self.fresh_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base.elapsed().saturating_sub(Duration::from_millis(ms))),
        }
    }
}

impl Inner {
    /// Waits until this node may serve a linearizable read of its local state.
    pub(crate) async fn linearizable(&self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + READ_INDEX_WAIT;
        // Long enough for one election to finish.
        let mut election_wait = self.config.election_timeout_max * 2;
        self.quiet.wait().await;
        let leader = loop {
            match self.leadership() {
                Leadership::Me => match self.leader_read_index().await {
                    Ok(index) => return self.wait_applied(index).await,
                    // Deposed between the metrics and the round: ask again.
                    Err(Error::NotLeader { .. }) if tokio::time::Instant::now() < deadline => continue,
                    Err(e) => return Err(e),
                },
                Leadership::Other(leader) => break leader,
                Leadership::Unknown => {
                    // No leader address yet: an election is under way, or this node is catching up
                    // (a restarted or wiped member learns the leader's id before the membership
                    // entry with its address). Wait a little for either to settle.
                    let known = self.raft.metrics().borrow().current_leader.is_some();
                    if (known || election_wait > Duration::ZERO) && tokio::time::Instant::now() < deadline {
                        let step = Duration::from_millis(20);
                        election_wait = election_wait.saturating_sub(step);
                        tokio::time::sleep(step).await;
                        continue;
                    }
                    if self.raft.metrics().borrow().membership_config.membership().voter_ids().next().is_none() {
                        return Err(Error::NotInitialized);
                    }
                    return Err(Error::NoLeader);
                }
            }
        };
        let channels = &self.channels;
        let index = self.follower_reads.run(|| crate::network::read_index(channels, &leader, READ_INDEX_WAIT)).await?;
        self.wait_applied(index).await
    }

    /// A read-index round on the leader, shared with concurrent reads: the index a read must see.
    pub(crate) async fn leader_read_index(&self) -> Result<u64, Error> {
        let raft = &self.raft;
        self.leader_reads
            .run(|| async {
                match raft.get_read_log_id().await {
                    Ok((read, applied)) => Ok(read.map_or(0, |l| l.index).max(applied.map_or(0, |l| l.index))),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                        Err(Error::NotLeader { leader: self.leader_peer() })
                    }
                    Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_))) => Err(Error::NoQuorum),
                    Err(RaftError::Fatal(Fatal::Stopped)) => Err(Error::ShuttingDown),
                    Err(RaftError::Fatal(f)) => Err(Error::raft(f)),
                }
            })
            .await
    }

    async fn wait_applied(&self, index: u64) -> Result<(), Error> {
        if self.raft.metrics().borrow().last_applied.map_or(0, |l| l.index) >= index {
            return Ok(());
        }
        self.raft
            .wait(Some(READ_INDEX_WAIT))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map(|_| ())
            .map_err(|_| Error::ReadIndexNotApplied { waited: READ_INDEX_WAIT })
    }

    /// How stale this node's state may be, and whether it leads. `None`: unknown (never heard).
    pub(crate) fn staleness(&self) -> Option<(Duration, bool)> {
        // On every Keys call: read the few fields needed under the watch's read guard instead of
        // cloning the whole metrics (its replication map allocates), and drop the guard at once.
        let (is_leader, sole_voter, quorum_ack_ms, applied) = {
            let receiver = self.raft.metrics();
            let m = receiver.borrow();
            (
                m.state == ServerState::Leader,
                m.membership_config.membership().voter_ids().eq([self.config.node_id]),
                m.millis_since_quorum_ack,
                m.last_applied.map(|l| l.index),
            )
        };
        let staleness = if is_leader && sole_voter {
            // A single-node cluster is its own quorum.
            Some(Duration::ZERO)
        } else if is_leader {
            quorum_ack_ms.map(Duration::from_millis)
        } else {
            self.contact.since(applied)
        };
        staleness.map(|s| (s, is_leader))
    }

    /// Whether this node may serve a read from local state at most `bound` stale.
    pub(crate) fn fresh_within(&self, bound: Duration) -> Result<(), Error> {
        match self.staleness() {
            Some((s, _)) if s <= bound => Ok(()),
            Some((staleness, leading)) => Err(Error::Stale { staleness, bound, leading }),
            None => Err(Error::NeverHeardFromLeader),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the kill-leader drill: a restarted node heard heartbeats before it had caught up,
    /// and served bounded-staleness reads from old state. Contact now counts only once the
    /// leader's commit index it carried has been applied.
    #[test]
    fn drill_kill_leader_contact_counts_only_once_caught_up() {
        let contact = LeaderContact::default();
        assert_eq!(contact.since(Some(0)), None, "never heard from a leader");
        contact.heard(Some(10), None, Some(3));
        assert_eq!(contact.since(Some(3)), None, "heard, but commit 10 is not applied yet");
        assert_eq!(contact.since(Some(9)), None);
        let fresh = contact.since(Some(10)).expect("caught up to the contact's commit");
        assert!(fresh < Duration::from_secs(1));
        // A newer contact with a higher commit does not count until applied; the older one still does.
        std::thread::sleep(Duration::from_millis(30));
        contact.heard(Some(20), None, Some(10));
        let older = contact.since(Some(10)).expect("still the first contact");
        assert!(older >= Duration::from_millis(25), "{older:?}"); // millisecond clock
        let newer = contact.since(Some(20)).expect("the second contact");
        assert!(newer < older);
    }

    /// Found by the partition-minority drill: a follower cut off with the old leader kept
    /// applying its heartbeats and served 500 ms bounded-staleness reads for a minute while the
    /// majority, under a new leader, acknowledged newer writes. Freshness now dates from the
    /// leader's last quorum acknowledgement, which stops in a minority.
    #[test]
    fn drill_partition_minority_freshness_dates_from_the_leaders_quorum_ack() {
        let contact = LeaderContact::default();
        std::thread::sleep(Duration::from_millis(50));
        contact.heard(Some(5), Some(0), Some(5));
        let fresh = contact.since(Some(5)).expect("applied");
        assert!(fresh < Duration::from_millis(40), "a leader acknowledged just now: {fresh:?}");
        // The deposed leader's heartbeat: commit unchanged, applied, but its quorum is 40 ms old.
        contact.heard(Some(5), Some(40), Some(5));
        let stale = contact.since(Some(5)).expect("applied");
        assert!(stale < Duration::from_millis(40), "an older proof does not make the node staler: {stale:?}");
        let later = LeaderContact::default();
        std::thread::sleep(Duration::from_millis(50));
        later.heard(Some(5), Some(45), Some(5));
        let age = later.since(Some(5)).expect("applied");
        assert!(age >= Duration::from_millis(40), "fresh only as of the quorum ack, 45 ms ago: {age:?}");
    }
}
