//! The token expiry sweep: the leader reads the expiry index (tokens in due order, never a full
//! scan) and commits `ExpireTokens` with its own clock, so every node removes the same tokens.
//! Followers do nothing; a new leader resumes from the committed state. Access never waits for
//! the sweep: every node checks expiry itself on each call.

use std::sync::Arc;
use std::time::Duration;

use coffer_raft::{ExpireTokens, Op, Outcome, UnixMillis, Write};

use crate::error::Error;
use crate::node::Node;

/// How often the leader looks for expired tokens.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The most tokens one sweep entry removes (a bounded log entry; the next tick takes the rest).
pub const MAX_PER_ENTRY: usize = 512;

/// Runs until the task is aborted (on shutdown).
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        node.auth.forget_idle();
        if node.replica.role() != coffer_raft::Role::Leader {
            continue;
        }
        // Drain: a full entry means more may be due (a flood of short-lived tokens).
        loop {
            match sweep(&node).await {
                Ok(n) if n == MAX_PER_ENTRY => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "token expiry sweep failed; retrying next tick");
                    break;
                }
            }
        }
    }
}

/// One pass: commits the removal of up to [`MAX_PER_ENTRY`] tokens due now. Returns how many.
///
/// # Errors
/// Store and replica errors.
pub async fn sweep(node: &Node) -> Result<usize, Error> {
    let now = UnixMillis::now();
    let hashes = node.reader().tokens_due(now, MAX_PER_ENTRY)?;
    if hashes.is_empty() {
        return Ok(0);
    }
    let n = hashes.len();
    match node.propose(Write::new(Op::ExpireTokens(ExpireTokens { at_ms: now, hashes }))).await? {
        Outcome::Applied => {
            tracing::debug!(tokens = n, "expired tokens swept");
            Ok(n)
        }
        other => Err(Error::Unexpected { what: "ExpireTokens", outcome: Box::new(other) }),
    }
}
