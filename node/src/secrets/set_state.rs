//! Delete, Undelete and Destroy: change the state of versions through Raft.

use coffer_raft::{Intent, Op, Outcome, RequestId, SecretPath, SetVersionState, UnixMillis, VersionState, Write};

use crate::error::Error;
use crate::node::Node;
use crate::validate;

/// Changes the state of versions; with no versions named, of the current version, resolved to
/// its number before proposing (after a linearizable read), so a retry never reaches a version
/// written after the call.
///
/// # Errors
/// `InvalidArgument`, `SecretNotFound`, `VersionNotFound`, `VersionDestroyed` (undelete of a
/// destroyed version; reported as NOT_FOUND), `RequestIdReused`, or a retryable replica error. On
/// error nothing changed.
pub async fn set_version_state(
    node: &Node,
    path: &str,
    versions: Vec<u64>,
    state: VersionState,
    request_id: &str,
) -> Result<(), Error> {
    let path = SecretPath::parse(path)?;
    let versions = validate::versions(&versions)?;
    let request_id = RequestId::parse(request_id)?;
    let versions = if versions.is_empty() {
        node.read_barrier(None).await?;
        let meta = node.reader().secret(&path)?.ok_or_else(|| Error::SecretNotFound { path: path.to_string() })?;
        // A retry names what its first attempt named, even if a newer version exists by now.
        let first = match &request_id {
            Some(id) => node.reader().request_intent(id)?,
            None => None,
        };
        match first {
            Some(Intent::SetVersionState { path: p, state: s, versions }) if p == path && s == state => versions,
            _ => vec![meta.current_version],
        }
    } else {
        node.ready().await?;
        versions
    };
    let op = Op::SetVersionState(SetVersionState { path, versions, state, at_ms: UnixMillis::now() });
    match node.propose(Write { request_id, op }).await? {
        Outcome::Applied => Ok(()),
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other => Err(Error::Unexpected { what: "SetVersionState", outcome: Box::new(other) }),
    }
}
