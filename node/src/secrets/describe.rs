//! Describe: a secret's versions and their states, without values.

use coffer_raft::{SecretMeta, SecretPath};

use crate::error::Error;
use crate::node::Node;

/// Reads a secret's metadata (linearizable).
///
/// # Errors
/// `InvalidArgument` for a bad path, `SecretNotFound`, or `Unavailable`.
pub async fn describe_secret(node: &Node, path: &str) -> Result<SecretMeta, Error> {
    let path = &SecretPath::parse(path)?;
    node.read_barrier(None).await?;
    node.reader().secret(path)?.ok_or_else(|| Error::SecretNotFound { path: path.to_string() })
}
