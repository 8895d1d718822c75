//! The rotation domain's records and operations: a secret's stage labels (`CURRENT`, `PENDING`,
//! `PREVIOUS`), its rotation (config, schedule state and the step a running rotation is at), and
//! the metadata events a Watch stream reads.
//!
//! A rotation is a state machine in the replicated state: idle → create → set → test → finish →
//! idle. The leader's rotation worker (in the node) runs each step and commits its start, its end
//! and its outcome here, so a new leader resumes where the old one stopped. This crate knows no
//! rotator: the node stores its rotator and schedule as text (`spec`) and computes due times;
//! apply checks only that each step follows the one before, in the rotation it names.

use serde::{Deserialize, Serialize};

use crate::{NodeId, SealedValue, SecretPath, SecretVersion, UnixMillis};

/// The stage labels of one secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stages {
    /// The version readers get by default; 0 until a first version is current (a secret whose
    /// first version is still `PENDING`).
    pub current: SecretVersion,
    /// A rotation's new version, not yet current.
    pub pending: Option<SecretVersion>,
    /// The version `CURRENT` had before it last moved.
    pub previous: Option<SecretVersion>,
    /// When `PREVIOUS` stops being readable; `None`: until `CURRENT` moves again.
    pub previous_until_ms: Option<UnixMillis>,
}

/// A stage label, as a client names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// `CURRENT` (alias `AWSCURRENT`).
    Current,
    /// `PENDING` (alias `AWSPENDING`).
    Pending,
    /// `PREVIOUS` (alias `AWSPREVIOUS`).
    Previous,
}

impl Stage {
    /// Parses a label: the Coffer names and the AWS names, any case.
    ///
    /// # Errors
    /// A message naming the labels there are.
    pub fn parse(label: &str) -> Result<Stage, String> {
        match label.to_ascii_uppercase().as_str() {
            "CURRENT" | "AWSCURRENT" => Ok(Stage::Current),
            "PENDING" | "AWSPENDING" => Ok(Stage::Pending),
            "PREVIOUS" | "AWSPREVIOUS" => Ok(Stage::Previous),
            _ => Err(format!(
                "stage {label:?} is not a stage label: use CURRENT, PENDING or PREVIOUS (or AWSCURRENT, AWSPENDING, AWSPREVIOUS)"
            )),
        }
    }

    /// The label's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Current => "CURRENT",
            Stage::Pending => "PENDING",
            Stage::Previous => "PREVIOUS",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A step of a rotation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Step {
    /// Make the new value and write it as the `PENDING` version.
    Create,
    /// Install the new credential where it is used.
    Set,
    /// Check that the new credential works.
    Test,
    /// Move the labels: `PENDING` becomes `CURRENT`, `CURRENT` becomes `PREVIOUS`.
    Finish,
}

impl Step {
    /// The step's name, lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Set => "set",
            Step::Test => "test",
            Step::Finish => "finish",
        }
    }

    /// The step after this one (`None` after finish).
    pub fn next(self) -> Option<Step> {
        match self {
            Step::Create => Some(Step::Set),
            Step::Set => Some(Step::Test),
            Step::Test => Some(Step::Finish),
            Step::Finish => None,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret's rotation: its config and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationRecord {
    /// The rotator and schedule, as the node wrote them (JSON); opaque here.
    pub spec: String,
    /// How long `PREVIOUS` stays readable after `CURRENT` moves (0: until it moves again).
    pub grace_ms: u64,
    /// Where the rotation stands.
    pub state: RotationState,
    /// How many rotations were started: the id of the newest.
    pub started: u64,
    /// When a rotation last finished.
    pub last_success_ms: Option<UnixMillis>,
    /// When the next scheduled rotation is due (`None`: not scheduled).
    pub next_due_ms: Option<UnixMillis>,
    /// Rotations that failed since the last success.
    pub failures: u32,
    /// The last failure, in words.
    pub last_failure: Option<String>,
}

/// Where a rotation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RotationState {
    /// No rotation runs.
    Idle,
    /// A rotation runs.
    Running(Running),
    /// The last rotation failed; its `PENDING` version is kept for inspection. The next rotation
    /// (scheduled or asked for) replaces it; `cancel` clears it.
    Failed {
        /// The rotation.
        id: u64,
        /// The step that failed.
        step: Step,
        /// Why, in words.
        reason: String,
        /// When.
        at_ms: UnixMillis,
    },
}

/// A running rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The rotation's id (see [`RotationRecord::started`]).
    pub id: u64,
    /// When it started.
    pub started_at_ms: UnixMillis,
    /// Whether someone asked for it (`coffer secret rotate`), rather than the schedule.
    pub manual: bool,
    /// The step it is at.
    pub step: Step,
    /// The attempt at this step (0: not begun).
    pub attempt: u32,
    /// When the current attempt began, and on which node.
    pub attempt_started: Option<(UnixMillis, NodeId)>,
    /// The error of the last failed attempt at this step.
    pub last_error: Option<String>,
}

/// What a rotation operation does. One [`crate::Op::Rotation`] carries one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RotationOp {
    /// Sets (or with `spec` `None`, removes) a secret's rotation config. Removing it while a
    /// rotation runs is refused.
    Configure {
        /// The new spec (`None`: remove).
        spec: Option<String>,
        /// See [`RotationRecord::grace_ms`].
        grace_ms: u64,
        /// When the first scheduled rotation is due.
        next_due_ms: Option<UnixMillis>,
    },
    /// Starts rotation `id` (which must be the next id). Refused while one runs; replaces a
    /// failed one's `PENDING` label.
    Start {
        /// The next rotation id.
        id: u64,
        /// Asked for rather than scheduled.
        manual: bool,
    },
    /// Records the start of an attempt at the step rotation `id` is at.
    BeginStep {
        /// The rotation.
        id: u64,
        /// The step it must be at.
        step: Step,
        /// The attempt number (one more than the last).
        attempt: u32,
        /// The node that runs it.
        node: NodeId,
    },
    /// The create step's end: writes the new version with the `PENDING` label and moves to set.
    CreatePending {
        /// The rotation.
        id: u64,
        /// The new version (the secret's newest number plus one).
        version: SecretVersion,
        /// The value, sealed for `version`.
        sealed: SealedValue,
        /// `max_versions` of a new secret.
        default_max_versions: u32,
    },
    /// The end of the set or test step: moves to the next step.
    StepDone {
        /// The rotation.
        id: u64,
        /// The step that ended.
        step: Step,
    },
    /// An attempt at a step failed. With `last` the rotation ends `FAILED`.
    StepFailed {
        /// The rotation.
        id: u64,
        /// The step.
        step: Step,
        /// Why, in words.
        reason: String,
        /// No more attempts: the rotation fails.
        last: bool,
        /// When the next scheduled rotation is due (used when `last`).
        next_due_ms: Option<UnixMillis>,
    },
    /// The finish step: `PENDING` becomes `CURRENT` and `CURRENT` becomes `PREVIOUS`, in this
    /// one operation; the rotation ends.
    Finish {
        /// The rotation.
        id: u64,
        /// When the next scheduled rotation is due.
        next_due_ms: Option<UnixMillis>,
    },
    /// Ends a running or failed rotation and clears the `PENDING` label.
    Cancel,
}

/// A rotation operation on one secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// The secret.
    pub path: SecretPath,
    /// What to do.
    pub op: RotationOp,
    /// The proposer's clock.
    pub at_ms: UnixMillis,
}

/// What happened to a secret, as a Watch stream reports it: metadata only, never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The event's revision: one more than the one before, cluster-wide.
    pub revision: u64,
    /// When it was applied (the proposer's clock).
    pub at_ms: UnixMillis,
    /// The secret.
    pub path: String,
    /// What happened.
    pub kind: EventKind,
}

/// The kinds of [`Event`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A version was written (`stage` says which label it took).
    Put {
        /// The version.
        version: SecretVersion,
        /// The label it took.
        stage: Stage,
    },
    /// Versions were soft-deleted.
    Deleted {
        /// The versions.
        versions: Vec<SecretVersion>,
    },
    /// Versions were restored.
    Undeleted {
        /// The versions.
        versions: Vec<SecretVersion>,
    },
    /// Versions were destroyed.
    Destroyed {
        /// The versions.
        versions: Vec<SecretVersion>,
    },
    /// The labels moved; this is where they are now.
    LabelsMoved {
        /// `CURRENT`.
        current: SecretVersion,
        /// `PENDING`.
        pending: Option<SecretVersion>,
        /// `PREVIOUS`.
        previous: Option<SecretVersion>,
    },
    /// A rotation started.
    RotationStarted {
        /// The rotation.
        id: u64,
        /// Asked for rather than scheduled.
        manual: bool,
    },
    /// A rotation step ended.
    RotationStep {
        /// The rotation.
        id: u64,
        /// The step that ended.
        step: Step,
    },
    /// A rotation finished: its version is `CURRENT`.
    RotationFinished {
        /// The rotation.
        id: u64,
        /// The new `CURRENT`.
        version: SecretVersion,
    },
    /// A rotation failed.
    RotationFailed {
        /// The rotation.
        id: u64,
        /// The step.
        step: Step,
        /// Why.
        reason: String,
    },
    /// A rotation was cancelled.
    RotationCancelled {
        /// The rotation.
        id: u64,
    },
    /// The rotation config was set or removed.
    RotationConfigured {
        /// Whether the secret now has one.
        enabled: bool,
    },
}
