// Hot path: secret get.
//! Get: a linearizable read of one version (or a bounded-staleness one, from local state), opened
//! with the keyring.

use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::Error;
use crate::node::Node;
use coffer_raft::{SecretPath, SecretVersion, UnixMillis, VersionRead};

/// A readable secret version. Its `Debug` never shows the value.
pub struct Secret {
    /// The value; zeroized when dropped.
    pub value: Zeroizing<Vec<u8>>,
    /// The version read.
    pub version: SecretVersion,
    /// Its creation time, milliseconds since the Unix epoch.
    pub created_at_ms: UnixMillis,
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

/// Reads a version (the current one by default).
///
/// # Errors
/// `InvalidArgument` for a bad path or version 0; `SecretNotFound`, `VersionNotFound`,
/// `VersionDeleted` or `VersionDestroyed`; `Unavailable` when leadership cannot be confirmed or the
/// node is staler than `max_staleness`.
pub async fn get_secret(
    node: &Node,
    path: &str,
    version: Option<u64>,
    max_staleness: Option<Duration>,
) -> Result<Secret, Error> {
    let path = &SecretPath::parse(path)?;
    if version == Some(0) {
        return Err(Error::InvalidArgument { rule: "versions start at 1; 0 is not a version".into() });
    }
    let ready = node.read_barrier(max_staleness).await?;
    let Some(VersionRead { meta, version, sealed }) = node.reader().secret_version(path, version.map(SecretVersion))?
    else {
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
    Ok(Secret { value, version, created_at_ms: info.created_at_ms })
}
