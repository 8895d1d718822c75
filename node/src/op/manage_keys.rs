//! Keys service management: create, read, list, rotate, configure and delete named keys. Every
//! change goes through Raft; material is generated and wrapped by the node that takes the request.

use coffer_raft::{Command, NamedKeyRecord, NamedKeyType, Rejection, Response};

use crate::error::Error;
use crate::keys;
use crate::node::{now_ms, Node};

/// How many times a rotation retries after a concurrent rotation took its version number.
const MAX_ATTEMPTS: usize = 8;

/// Checks a key name: 1 to 128 characters of `[A-Za-z0-9._-]`.
///
/// # Errors
/// `InvalidArgument` naming the rule.
pub fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 128 {
        return Err(Error::InvalidArgument { rule: "a key name is 1 to 128 characters long".into() });
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(Error::InvalidArgument {
            rule: format!("the key name contains {c:?}; only A-Z a-z 0-9 . _ - are allowed"),
        });
    }
    Ok(())
}

fn rejected(rejection: Rejection) -> Error {
    match rejection {
        Rejection::KeyExists { name } => Error::KeyExists { name },
        Rejection::KeyNotFound { name } => Error::KeyNotFound { name },
        Rejection::KeyConfigRefused { rule } => Error::KeyRefused { rule },
        other => Error::Internal(format!("unexpected rejection: {other}").into()),
    }
}

/// Creates a key with its first version.
///
/// # Errors
/// `InvalidArgument`, `KeyExists`, `Unavailable`.
pub async fn create_key(
    node: &Node,
    name: &str,
    key_type: NamedKeyType,
    exportable: bool,
) -> Result<NamedKeyRecord, Error> {
    validate_name(name)?;
    let ready = node.ready().await?;
    let at_ms = now_ms();
    let first = keys::new_version(&ready.keyring, name, 1, key_type, at_ms)?;
    let record = NamedKeyRecord {
        key_type,
        exportable,
        created_at_ms: at_ms,
        min_decryption_version: 1,
        min_encryption_version: 1,
        deletion_allowed: false,
        auto_rotate_period_ms: 0,
        versions: [(1, first)].into(),
        generation: 0,
    };
    match node.propose(Command::CreateKey { name: name.to_owned(), record: record.clone() }).await? {
        Response::Applied => Ok(record),
        Response::Rejected(r) => Err(rejected(r)),
        other => Err(Error::Internal(format!("unexpected response to CreateKey: {other:?}").into())),
    }
}

/// Reads a key's record (linearizable).
///
/// # Errors
/// `InvalidArgument`, `KeyNotFound`, `Unavailable`.
pub async fn get_key(node: &Node, name: &str) -> Result<NamedKeyRecord, Error> {
    validate_name(name)?;
    node.read_barrier(None).await?;
    node.reader.named_key(name)?.ok_or_else(|| Error::KeyNotFound { name: name.to_owned() })
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
        validate_name(page_token).map_err(|_| Error::InvalidArgument {
            rule: "page_token is not a token from a previous ListKeys".into(),
        })?;
        Some(page_token)
    };
    node.read_barrier(None).await?;
    let mut names = node.reader.named_keys(after, size + 1)?;
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
/// `InvalidArgument`, `KeyNotFound`, `Contended`, `Unavailable`.
pub async fn rotate_key(node: &Node, name: &str) -> Result<NamedKeyRecord, Error> {
    validate_name(name)?;
    let ready = node.ready().await?;
    node.read_barrier(None).await?;
    for _ in 0..MAX_ATTEMPTS {
        let record = node.reader.named_key(name)?.ok_or_else(|| Error::KeyNotFound { name: name.to_owned() })?;
        let version = record.primary() + 1;
        let material = keys::new_version(&ready.keyring, name, version, record.key_type, now_ms())?;
        match node.propose(Command::RotateKey { name: name.to_owned(), version, material }).await? {
            Response::Applied => return get_key(node, name).await,
            Response::Rejected(Rejection::VersionTaken { .. }) => {
                node.read_barrier(None).await?;
            }
            Response::Rejected(r) => return Err(rejected(r)),
            other => return Err(Error::Internal(format!("unexpected response to RotateKey: {other:?}").into())),
        }
    }
    Err(Error::Contended { path: name.to_owned() })
}

/// Changes a key's config; `None` leaves a setting as it is.
///
/// # Errors
/// `InvalidArgument`, `KeyNotFound`, `KeyRefused` (a rule of the config), `Unavailable`.
pub async fn update_key_config(
    node: &Node,
    name: &str,
    min_decryption_version: Option<u32>,
    min_encryption_version: Option<u32>,
    deletion_allowed: Option<bool>,
    auto_rotate_period_ms: Option<u64>,
) -> Result<NamedKeyRecord, Error> {
    validate_name(name)?;
    node.ready().await?;
    let command = Command::UpdateKeyConfig {
        name: name.to_owned(),
        min_decryption_version,
        min_encryption_version,
        deletion_allowed,
        auto_rotate_period_ms,
    };
    match node.propose(command).await? {
        Response::Applied => get_key(node, name).await,
        Response::Rejected(r) => Err(rejected(r)),
        other => Err(Error::Internal(format!("unexpected response to UpdateKeyConfig: {other:?}").into())),
    }
}

/// Deletes a key whose config allows it.
///
/// # Errors
/// `InvalidArgument`, `KeyNotFound`, `KeyRefused` (deletion not allowed), `Unavailable`.
pub async fn delete_key(node: &Node, name: &str) -> Result<(), Error> {
    validate_name(name)?;
    node.ready().await?;
    match node.propose(Command::DeleteKey { name: name.to_owned() }).await? {
        Response::Applied => {
            node.keys.forget(name);
            Ok(())
        }
        Response::Rejected(r) => Err(rejected(r)),
        other => Err(Error::Internal(format!("unexpected response to DeleteKey: {other:?}").into())),
    }
}

/// Usage of one key version summed over the cluster.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    /// Encrypts, signatures and HMACs.
    pub encrypts: u64,
    /// Decrypts, verifications and HMAC checks.
    pub decrypts: u64,
    /// Latest use on any node, milliseconds since the Unix epoch; 0: never.
    pub last_used_ms: u64,
}

/// How long a node may take to report its usage counters.
const USAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Sums every member's usage counters of a key (each since it started). Returns the per-version
/// sums, how many members answered, and how many there are.
pub async fn cluster_usage(node: &Node, name: &str) -> (std::collections::BTreeMap<u32, Usage>, u32, u32) {
    use coffer_proto::raft::v1::node_stats_client::NodeStatsClient;
    use coffer_proto::raft::v1::KeyUsageRequest;

    let mut sums: std::collections::BTreeMap<u32, Usage> = Default::default();
    let mut add = |version: u32, encrypts: u64, decrypts: u64, last: u64| {
        let u = sums.entry(version).or_default();
        u.encrypts += encrypts;
        u.decrypts += decrypts;
        u.last_used_ms = u.last_used_ms.max(last);
    };
    let members: Vec<(u64, String)> = node
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, n)| (*id, n.addr.clone()))
        .collect();
    let total = members.len().max(1) as u32;
    let mut answered = 0;
    for (id, addr) in members {
        if id == node.config.node_id {
            for (v, e, d, l) in node.keys.usage(name) {
                add(v, e, d, l);
            }
            answered += 1;
            continue;
        }
        let Ok(channel) = node.channels.channel(&addr) else { continue };
        let mut request = tonic::Request::new(KeyUsageRequest { name: name.to_owned() });
        request.set_timeout(USAGE_TIMEOUT);
        if let Ok(reply) = NodeStatsClient::new(channel).key_usage(request).await {
            for v in reply.into_inner().versions {
                add(v.version, v.encrypts, v.decrypts, v.last_used_ms);
            }
            answered += 1;
        }
    }
    if answered == 0 {
        // Not in a membership yet (a single node that was never initialised): report itself.
        for (v, e, d, l) in node.keys.usage(name) {
            add(v, e, d, l);
        }
        answered = 1;
    }
    (sums, answered, total)
}
