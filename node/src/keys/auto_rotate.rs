//! Automatic rotation: the leader rotates every named key whose primary version is older than its
//! `auto_rotate_period`, through the log like any rotation, so every node agrees on the result.
//! Followers do nothing; after a failover the new leader picks up where the old one stopped.

use std::sync::Arc;
use std::time::Duration;

use crate::keys::manage as manage_keys;
use coffer_raft::UnixMillis;

use crate::node::Node;

/// How often the leader looks for keys that are due.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Runs until the task is aborted (on shutdown).
pub async fn run(node: Arc<Node>) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if node.replica.role() != coffer_raft::Role::Leader {
            continue;
        }
        if let Err(e) = rotate_due(&node).await {
            tracing::warn!(error = %e, "automatic key rotation pass failed; retrying next tick");
        }
    }
}

/// One pass over every key. A key that cannot rotate (at `limits.max-key-versions`, say) is
/// logged and passed over: it never holds back the keys after it. A period set before
/// `limits.min-auto-rotate-period` existed is treated as that floor.
async fn rotate_due(node: &Node) -> Result<(), crate::error::Error> {
    let floor = u64::try_from(node.config.limits.min_auto_rotate_period.as_millis()).unwrap_or(u64::MAX);
    let mut after: Option<String> = None;
    loop {
        let names = node.reader().named_keys(after.as_deref(), 1000)?;
        let Some(last) = names.last().cloned() else { return Ok(()) };
        for name in names {
            let Some(record) = node.reader().named_key(&name)? else { continue };
            let period = record.auto_rotate_period_ms;
            if period == 0 || record.versions.len() >= node.config.limits.max_key_versions {
                continue;
            }
            let primary_at = record.versions.values().next_back().map_or(0, |v| v.created_at_ms.0);
            if UnixMillis::now().0.saturating_sub(primary_at) >= period.max(floor) {
                match manage_keys::rotate_key(node, name.as_str(), "").await {
                    Ok(rotated) => {
                        tracing::info!(key = %name, version = %rotated.primary(), "rotated key automatically");
                    }
                    Err(e) => tracing::warn!(key = %name, error = %e, "automatic rotation of this key failed"),
                }
            }
        }
        after = Some(last.to_string());
    }
}
