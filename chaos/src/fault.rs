//! The faults a drill injected: what each was, which nodes it hit, and the instant it took effect,
//! on the history's clock.
//!
//! # Correctness
//!
//! A fault's instant is stamped only once the fault is in effect, never when the drill starts to
//! inject it: a kill -9 or SIGTERM once the process has been reaped, a partition or link cut once
//! the links are down, an HSM outage once the node's fault file is written. The report counts
//! "fault → first write" from that instant, and only operations invoked at or after it; stamped
//! earlier (before the leader lookup and the kill, as the drills once did), writes the old leader
//! committed in its last milliseconds passed for a failover of 14 ms.

use std::fmt;

use serde::Serialize;

use crate::workload::Recorder;

/// What a fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// SIGKILL; in effect once the process is reaped.
    Kill,
    /// SIGTERM (a graceful stop, restarted at once); in effect once the process is reaped.
    Stop,
    /// Every link between the nodes hit and the others cut; in effect once the links are down.
    Partition,
    /// The link between the two nodes hit cut (it comes back in turns); in effect once it is down.
    LinkCut,
    /// Every PKCS#11 call of the nodes hit fails; in effect once their fault files are written.
    HsmOutage,
    /// The operator's `--fault-cmd` against a cluster they run; in effect once the command returns,
    /// as far as the drill can tell.
    Command,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::Kill => "kill -9",
            FaultKind::Stop => "SIGTERM",
            FaultKind::Partition => "cut off",
            FaultKind::LinkCut => "link cut between",
            FaultKind::HsmOutage => "HSM outage on",
            FaultKind::Command => "the fault command",
        })
    }
}

/// A node's role when the fault hit it, as the drill knew it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It led the cluster.
    Leader,
    /// It followed the leader.
    Follower,
}

/// One node a fault hit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hit {
    /// The node's index in the drill, as in the history's `node` field.
    pub index: usize,
    /// Its Raft node id ("node 2" in the report).
    pub id: u64,
    /// Its role, if the drill knew it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

impl fmt::Display for Hit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Some(Role::Leader) => write!(f, "leader (node {})", self.id),
            Some(Role::Follower) => write!(f, "follower (node {})", self.id),
            None => write!(f, "node {}", self.id),
        }
    }
}

/// One fault the drill injected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    /// What it did.
    pub kind: FaultKind,
    /// When it took effect, microseconds on the history's clock.
    pub at_us: u64,
    /// The nodes it hit (none when the drill does not know them: `--fault-cmd`).
    pub nodes: Vec<Hit>,
}

impl fmt::Display for Fault {
    /// `kill -9 leader (node 2) at 2.04 s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind)?;
        for (i, hit) in self.nodes.iter().enumerate() {
            let sep = match (i, self.kind) {
                (0, _) => " ",
                (_, FaultKind::LinkCut) => " and ",
                _ => ", ",
            };
            write!(f, "{sep}{hit}")?;
        }
        write!(f, " at {:.2} s", self.at_us as f64 / 1e6)
    }
}

/// The faults of one drill, each stamped on the history's clock as it takes effect.
pub struct FaultLog {
    clock: Recorder,
    faults: Vec<Fault>,
}

impl FaultLog {
    /// An empty log reading the clock of `recorder`.
    pub fn new(recorder: &Recorder) -> FaultLog {
        FaultLog { clock: recorder.clone(), faults: Vec::new() }
    }

    /// Records that a fault is in effect now. Call it only once the fault has taken effect (see
    /// the module's "Correctness").
    pub fn in_effect(&mut self, kind: FaultKind, nodes: Vec<Hit>) {
        self.faults.push(Fault { kind, at_us: self.clock.now_us(), nodes });
    }

    /// The faults recorded, in order.
    pub fn into_faults(self) -> Vec<Fault> {
        self.faults
    }
}
