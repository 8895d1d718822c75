//! Delete, Undelete and Destroy: change the state of versions through Raft.

use coffer_raft::{Command, Rejection, Response, VersionState};

use crate::error::Error;
use crate::node::{now_ms, Node};
use crate::validate;

/// Changes the state of versions (the current version when `versions` is empty).
///
/// # Errors
/// `InvalidArgument`, `SecretNotFound`, `VersionNotFound`, `VersionDestroyed` (undelete of a
/// destroyed version; reported as NOT_FOUND), or `Unavailable`. On error nothing changed.
pub async fn set_version_state(node: &Node, path: &str, versions: Vec<u64>, state: VersionState) -> Result<(), Error> {
    validate::path(path)?;
    validate::versions(&versions)?;
    node.ready().await?;
    let command = Command::SetVersionState { path: path.to_owned(), versions, state, at_ms: now_ms() };
    match node.propose(command).await? {
        Response::Applied => Ok(()),
        Response::Rejected(Rejection::SecretNotFound { path }) => Err(Error::SecretNotFound { path }),
        Response::Rejected(Rejection::VersionNotFound { path, version }) => {
            Err(Error::VersionNotFound { path, version })
        }
        Response::Rejected(Rejection::VersionDestroyed { path, version }) => {
            Err(Error::VersionDestroyed { path, version })
        }
        other => Err(Error::Internal(format!("unexpected response to SetVersionState: {other:?}").into())),
    }
}
