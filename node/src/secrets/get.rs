// Hot path: secret get.
//! Get: a linearizable read of one version (or a bounded-staleness one, from local state), opened
//! with the keyring.

use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::Error;
use crate::node::Node;
use coffer_raft::{SecretPath, SecretVersion, Stage, Stages, UnixMillis, VersionRead};

/// A readable secret version. Its `Debug` never shows the value.
pub struct Secret {
    /// The value; zeroized when dropped.
    pub value: Zeroizing<Vec<u8>>,
    /// The version read.
    pub version: SecretVersion,
    /// Its creation time, milliseconds since the Unix epoch.
    pub created_at_ms: UnixMillis,
    /// The stage labels it holds.
    pub stages: Vec<Stage>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("value", &"[redacted]")
            .field("version", &self.version)
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

/// Reads a version: the one asked for, else the one `stage` labels (default `CURRENT`).
///
/// # Errors
/// `InvalidArgument` for a bad path, version 0, or both a version and a stage; `SecretNotFound`,
/// `VersionNotFound`, `VersionDeleted`, `VersionDestroyed`, or `StageEmpty` (no `PENDING`, or
/// `PREVIOUS` past its grace); `Unavailable` when leadership cannot be confirmed or the node is
/// staler than `max_staleness`.
pub async fn get_secret(
    node: &Node,
    path: &str,
    version: Option<u64>,
    stage: Option<Stage>,
    max_staleness: Option<Duration>,
) -> Result<Secret, Error> {
    let path = &SecretPath::parse(path)?;
    if version == Some(0) {
        return Err(Error::InvalidArgument { rule: "versions start at 1; 0 is not a version".into() });
    }
    if version.is_some() && stage.is_some() {
        return Err(Error::InvalidArgument { rule: "ask for a version or a stage, not both".into() });
    }
    let ready = node.read_barrier(max_staleness).await?;
    let stages = node.reader().stages(path)?;
    let version = match (version, stage, &stages) {
        (Some(v), _, _) => Some(SecretVersion(v)),
        (None, Some(stage), Some(stages)) => Some(staged(path, stage, stages)?),
        (None, Some(stage @ (Stage::Pending | Stage::Previous)), None) => {
            return Err(Error::StageEmpty { path: path.to_string(), stage, why: "no version holds it".into() })
        }
        (None, _, Some(stages)) if stages.current != SecretVersion(0) => Some(stages.current),
        (None, _, Some(_)) => {
            return Err(Error::StageEmpty {
                path: path.to_string(),
                stage: Stage::Current,
                why: "its first version is still PENDING (a rotation has not finished)".into(),
            })
        }
        (None, _, None) => None,
    };
    let Some(VersionRead { meta, version, sealed }) = node.reader().secret_version(path, version)? else {
        return Err(Error::SecretNotFound { path: path.to_string() });
    };
    let not_found = || Error::VersionNotFound { path: path.to_string(), version };
    let info = meta.versions.get(&version).ok_or_else(not_found)?;
    if info.destroyed {
        return Err(Error::VersionDestroyed { path: path.to_string(), version });
    }
    if info.deleted_at_ms.is_some() {
        return Err(Error::VersionDeleted { path: path.to_string(), version });
    }
    let sealed = sealed.ok_or_else(not_found)?;
    let value = ready.keyring.open(path.as_str(), version, &sealed)?;
    let stages = stages.map(|s| crate::rotation::worker::labels_of(&s, version)).unwrap_or_else(|| {
        if version == meta.current_version {
            vec![Stage::Current]
        } else {
            Vec::new()
        }
    });
    Ok(Secret { value, version, created_at_ms: info.created_at_ms, stages })
}

/// The version a label points at, if it is readable now.
fn staged(path: &SecretPath, stage: Stage, stages: &Stages) -> Result<SecretVersion, Error> {
    let empty = |why: String| Error::StageEmpty { path: path.to_string(), stage, why };
    match stage {
        Stage::Current if stages.current == SecretVersion(0) => {
            Err(empty("its first version is still PENDING (a rotation has not finished)".into()))
        }
        Stage::Current => Ok(stages.current),
        Stage::Pending => stages.pending.ok_or_else(|| empty("no rotation is in progress".into())),
        Stage::Previous => {
            let previous = stages.previous.ok_or_else(|| empty("CURRENT has not moved yet".into()))?;
            match stages.previous_until_ms {
                Some(until) if until.0 <= UnixMillis::now().0 => Err(empty(format!(
                    "version {previous}'s grace period ended at {}",
                    crate::secrets::cli::format_ms(until.0)
                ))),
                _ => Ok(previous),
            }
        }
    }
}
