//! Keys service management: create, read, list, rotate, configure and delete named keys. Every
//! change goes through Raft; material is generated and wrapped by the node that takes the request.

use coffer_raft::{
    CreateKey, DeleteKey, KeyName, KeyVersion, NamedKeyRecord, NamedKeyType, NodeId, Op, Outcome, Rejection, RequestId,
    RotateKey, UnixMillis, UpdateKeyConfig, Write,
};

use crate::error::Error;
use crate::keys;
use crate::keys::Usage;
use crate::node::Node;

/// How many times a rotation retries after a concurrent rotation took its version number.
const MAX_ATTEMPTS: usize = 8;

/// Creates a key with its first version.
///
/// # Errors
/// `InvalidArgument`, `KeyExists`, `Unavailable`.
pub async fn create_key(
    node: &Node,
    name: &str,
    key_type: NamedKeyType,
    exportable: bool,
    request_id: &str,
) -> Result<NamedKeyRecord, Error> {
    let name = &KeyName::parse(name)?;
    let request_id = RequestId::parse(request_id)?;
    let ready = node.ready().await?;
    let at_ms = UnixMillis::now();
    let first = keys::new_version(&ready.keyring, name.as_str(), KeyVersion(1), key_type, at_ms)?;
    let record = NamedKeyRecord {
        key_type,
        exportable,
        created_at_ms: at_ms,
        min_decryption_version: KeyVersion(1),
        min_encryption_version: KeyVersion(1),
        deletion_allowed: false,
        auto_rotate_period_ms: 0,
        versions: [(KeyVersion(1), first)].into(),
        generation: 0,
    };
    let op = Op::CreateKey(CreateKey { name: name.clone(), record });
    match node.propose(Write { request_id, op }).await? {
        // A retry answered as the first time returns the key as it is now.
        Outcome::Applied => get_key(node, name.as_str()).await,
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other => Err(Error::Unexpected { what: "CreateKey", outcome: Box::new(other) }),
    }
}

/// Reads a key's record (linearizable).
///
/// # Errors
/// `InvalidArgument`, `KeyNotFound`, `Unavailable`.
pub async fn get_key(node: &Node, name: &str) -> Result<NamedKeyRecord, Error> {
    let name = &KeyName::parse(name)?;
    node.read_barrier(None).await?;
    node.reader().named_key(name)?.ok_or_else(|| Error::KeyNotFound { name: name.to_string() })
}

/// Lists key names, one page at a time; the token is the last name of the previous page.
///
/// # Errors
/// `InvalidArgument` for a bad page size or token; `Unavailable`.
pub async fn list_keys(node: &Node, page_size: u32, page_token: &str) -> Result<(Vec<String>, Option<String>), Error> {
    if page_size > 1000 {
        return Err(Error::InvalidArgument { rule: "page_size is at most 1000".into() });
    }
    let size = if page_size == 0 { 100 } else { page_size as usize };
    let after = if page_token.is_empty() {
        None
    } else {
        KeyName::parse(page_token).map_err(|_| Error::InvalidArgument {
            rule: "page_token is not a token from a previous ListKeys".into(),
        })?;
        Some(page_token)
    };
    node.read_barrier(None).await?;
    let mut names: Vec<String> = node.reader().named_keys(after, size + 1)?.into_iter().map(String::from).collect();
    let next = if names.len() > size {
        names.truncate(size);
        names.last().cloned()
    } else {
        None
    };
    Ok((names, next))
}

/// Adds a version and makes it primary.
///
/// # Errors
/// `InvalidArgument`, `KeyNotFound`, `VersionsExhausted`, `Contended`, `RequestIdReused`, or a
/// retryable replica error.
pub async fn rotate_key(node: &Node, name: &str, request_id: &str) -> Result<NamedKeyRecord, Error> {
    let name = &KeyName::parse(name)?;
    let request_id = RequestId::parse(request_id)?;
    let ready = node.ready().await?;
    node.read_barrier(None).await?;
    for _ in 0..MAX_ATTEMPTS {
        let record = node.reader().named_key(name)?.ok_or_else(|| Error::KeyNotFound { name: name.to_string() })?;
        // Every crypto call reads the key's record, versions and all, so versions are bounded
        // (`limits.max-key-versions`, default 1000: hourly rotation for 41 days). Old versions
        // are not erased yet (the key hierarchy's erasure is its own issue).
        if record.versions.len() >= node.config.limits.max_key_versions {
            return Err(Error::KeyVersionsCapped { name: name.to_string(), versions: record.versions.len() });
        }
        let version =
            record.primary().next().ok_or_else(|| Error::VersionsExhausted { what: format!("key {name}") })?;
        let material = keys::new_version(&ready.keyring, name.as_str(), version, record.key_type, UnixMillis::now())?;
        let op = Op::RotateKey(RotateKey { name: name.clone(), version, material });
        match node.propose(Write { request_id: request_id.clone(), op }).await? {
            Outcome::Applied => return get_key(node, name.as_str()).await,
            Outcome::Rejected(Rejection::KeyVersionTaken { .. }) => {
                node.read_barrier(None).await?;
            }
            Outcome::Rejected(r) => return Err(Error::rejected(r)),
            other => return Err(Error::Unexpected { what: "RotateKey", outcome: Box::new(other) }),
        }
    }
    Err(Error::Contended { target: name.to_string() })
}

/// A change to a key's config; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigChange {
    /// Versions below it stop decrypting and verifying; only moves forward.
    pub min_decryption_version: Option<KeyVersion>,
    /// Whether DeleteKey is allowed.
    pub deletion_allowed: Option<bool>,
    /// How often the leader rotates the key (zero: never).
    pub auto_rotate_period: Option<std::time::Duration>,
}

/// Changes a key's config.
///
/// # Errors
/// `InvalidArgument`, `KeyNotFound`, `KeyRule` (a rule of the config), `RequestIdReused`, or a
/// retryable replica error.
pub async fn update_key_config(
    node: &Node,
    name: &str,
    change: ConfigChange,
    request_id: &str,
) -> Result<NamedKeyRecord, Error> {
    let name = &KeyName::parse(name)?;
    let request_id = RequestId::parse(request_id)?;
    let floor = node.config.limits.min_auto_rotate_period;
    if change.auto_rotate_period.is_some_and(|p| !p.is_zero() && p < floor) {
        return Err(Error::InvalidArgument {
            rule: format!(
                "auto_rotate_period is 0 (off) or at least {} (limits.min-auto-rotate-period): each rotation adds a version for good",
                humantime::format_duration(floor)
            ),
        });
    }
    node.ready().await?;
    let op = Op::UpdateKeyConfig(UpdateKeyConfig {
        name: name.clone(),
        min_decryption_version: change.min_decryption_version,
        min_encryption_version: None,
        deletion_allowed: change.deletion_allowed,
        auto_rotate_period_ms: change.auto_rotate_period.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    });
    match node.propose(Write { request_id, op }).await? {
        Outcome::Applied => get_key(node, name.as_str()).await,
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other => Err(Error::Unexpected { what: "UpdateKeyConfig", outcome: Box::new(other) }),
    }
}

/// Deletes a key whose config allows it.
///
/// # Errors
/// `InvalidArgument`, `KeyNotFound`, `KeyRule` (deletion not allowed), `RequestIdReused`, or a
/// retryable replica error.
pub async fn delete_key(node: &Node, name: &str, request_id: &str) -> Result<(), Error> {
    let name = &KeyName::parse(name)?;
    let request_id = RequestId::parse(request_id)?;
    node.ready().await?;
    match node.propose(Write { request_id, op: Op::DeleteKey(DeleteKey { name: name.clone() }) }).await? {
        Outcome::Applied => {
            node.keys.forget(name.as_str());
            Ok(())
        }
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other => Err(Error::Unexpected { what: "DeleteKey", outcome: Box::new(other) }),
    }
}

/// A key's usage summed over the cluster: per version, and how many members reported.
#[derive(Debug, Default, Clone)]
pub struct ClusterUsage {
    /// Usage per version, summed over the members that answered.
    pub versions: std::collections::BTreeMap<KeyVersion, Usage>,
    /// How many members answered.
    pub answered: u32,
    /// How many members there are.
    pub total: u32,
}

impl ClusterUsage {
    fn add(&mut self, version: KeyVersion, usage: Usage) {
        let sum = self.versions.entry(version).or_default();
        sum.encrypts += usage.encrypts;
        sum.decrypts += usage.decrypts;
        sum.last_used_ms = sum.last_used_ms.max(usage.last_used_ms);
    }
}

/// How long a node may take to report its usage counters.
const USAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Sums every member's usage counters of a key (each since it started).
pub async fn cluster_usage(node: &Node, name: &str) -> ClusterUsage {
    use coffer_proto::raft::v1::node_stats_client::NodeStatsClient;
    use coffer_proto::raft::v1::KeyUsageRequest;

    let members: Vec<(NodeId, String)> = node.replica.members().into_iter().map(|m| (m.id, m.addr.peer)).collect();
    let mut sums = ClusterUsage { total: members.len().max(1) as u32, ..ClusterUsage::default() };
    for (id, addr) in members {
        if id == node.config.node_id {
            for (version, usage) in node.keys.usage(name) {
                sums.add(version, usage);
            }
            sums.answered += 1;
            continue;
        }
        let Ok(channel) = node.replica.peer_channel(&addr) else { continue };
        let mut request = tonic::Request::new(KeyUsageRequest { name: name.to_owned() });
        request.set_timeout(USAGE_TIMEOUT);
        if let Ok(reply) = NodeStatsClient::new(channel).key_usage(request).await {
            for v in reply.into_inner().versions {
                let usage = Usage { encrypts: v.encrypts, decrypts: v.decrypts, last_used_ms: v.last_used_ms };
                sums.add(KeyVersion(v.version), usage);
            }
            sums.answered += 1;
        }
    }
    if sums.answered == 0 {
        // Not in a membership yet (a single node that was never initialised): report itself.
        for (version, usage) in node.keys.usage(name) {
            sums.add(version, usage);
        }
        sums.answered = 1;
    }
    sums
}
