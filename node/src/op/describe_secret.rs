//! Describe: a secret's versions and their states, without values.

use coffer_raft::SecretMeta;

use crate::error::Error;
use crate::node::Node;
use crate::validate;

/// Reads a secret's metadata (linearizable).
///
/// # Errors
/// `InvalidArgument` for a bad path, `SecretNotFound`, or `Unavailable`.
pub async fn describe_secret(node: &Node, path: &str) -> Result<SecretMeta, Error> {
    validate::path(path)?;
    node.read_barrier(None).await?;
    node.reader().secret(path)?.ok_or_else(|| Error::SecretNotFound { path: path.to_owned() })
}
