//! Describe: a secret's versions and their states, without values.

use coffer_raft::{SecretMeta, SecretPath, Stages};

use crate::error::Error;
use crate::node::Node;

/// Reads a secret's metadata and stage labels (linearizable). A secret written before labels
/// existed has `CURRENT` at its newest version.
///
/// # Errors
/// `InvalidArgument` for a bad path, `SecretNotFound`, or `Unavailable`.
pub async fn describe_secret(node: &Node, path: &str) -> Result<(SecretMeta, Stages), Error> {
    let path = &SecretPath::parse(path)?;
    node.read_barrier(None).await?;
    let meta = node.reader().secret(path)?.ok_or_else(|| Error::SecretNotFound { path: path.to_string() })?;
    let stages = node.reader().stages(path)?.unwrap_or(Stages {
        current: meta.current_version,
        pending: None,
        previous: None,
        previous_until_ms: None,
    });
    Ok((meta, stages))
}
