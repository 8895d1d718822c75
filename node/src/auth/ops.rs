//! Identity use cases: the root token, tokens, certificate login, policies, login roles.
//!
//! Rules a platform team relies on:
//! - a caller that is not root attaches only policies it holds itself, to a token or a role, and
//!   may not rewrite or delete a policy it holds: `token-admin` or `policy-admin` never raises
//!   the caller's own rights (a `policy-admin` can still write policies for others to attach;
//!   re-creating a deleted policy's name gives it back to tokens that still name it);
//! - a child token never outlives its parent (expiry and maximum are capped at the parent's),
//!   and is revoked with it; an orphan needs `token-admin` on `sys/token/create-orphan`;
//! - every change goes through the log; the time, random token, hash and accessor are made here
//!   (the proposer), never in apply.

use std::time::Duration;

use coffer_raft::{
    BootstrapIdentity, CertRoleRecord, CreateToken, DeleteCertRole, DeletePolicy, IdentityKeyRecord, Op, Outcome,
    PolicyRecord, PutCertRole, PutPolicy, Rejection, RenewToken, RevokeToken, TokenHash, TokenRecord, UnixMillis,
    Write,
};
use zeroize::Zeroizing;

use crate::auth::policy::{self, Capability, Policy};
use crate::auth::{token, Credential, Principal};
use crate::error::Error;
use crate::node::Node;

/// A token's life when none is asked for.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// A token's maximum life when none is asked for.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// The longest life any token can have (the root token aside).
pub const LONGEST_TTL: Duration = Duration::from_secs(32 * 24 * 3600);

/// The associated data the token-hashing key is sealed with.
const IDENTITY_KEY_AAD: &[u8] = b"coffer/identity-key/v1";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn after(at: UnixMillis, d: Duration) -> UnixMillis {
    UnixMillis(at.0.saturating_add(ms(d)))
}

fn invalid(rule: impl Into<String>) -> Error {
    Error::InvalidArgument { rule: rule.into() }
}

/// Whether a role's identity pattern admits a login name: equal, or a prefix ending in `*`.
pub fn identity_matches(pattern: &str, login: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => login.starts_with(prefix),
        None => pattern == login,
    }
}

/// Proposes `op` and waits for it to apply: a rejection becomes its error.
async fn apply(node: &Node, op: Op, what: &'static str) -> Result<(), Error> {
    match node.propose(Write::new(op)).await? {
        Outcome::Applied => Ok(()),
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other @ Outcome::Put { .. } => Err(Error::Unexpected { what, outcome: Box::new(other) }),
    }
}

/// A new token's random text, its hash under `key`, and an accessor.
fn mint_with(node: &Node, key: &ring::hmac::Key) -> Result<(Zeroizing<String>, TokenHash, String), Error> {
    let random = node.keys.random_bytes(48)?;
    let mut body = [0u8; 32];
    body.copy_from_slice(&random[..32]);
    let mut acc = [0u8; 16];
    acc.copy_from_slice(&random[32..48]);
    let text = token::format(&body);
    let hash = token::hash(key, &text);
    Ok((text, hash, token::accessor(&acc)))
}

/// A new token under the cluster's token-hashing key.
async fn mint(node: &Node) -> Result<(Zeroizing<String>, TokenHash, String), Error> {
    let key = node.token_key().await?;
    mint_with(node, key)
}

/// A cluster's identity, made by the node that initialises it: a random token-hashing key sealed
/// by the first keyring key, and a root token (policy `root`, no expiry). Returned with the root
/// token's text and the plain hashing key; the caller proposes it with the cluster record, in one
/// entry (`InitClusterWithIdentity`), so no later call can mint a root token.
///
/// # Errors
/// The system random source or the keyring fails.
pub fn new_identity(node: &Node, keyring: &crate::envelope::Keyring) -> Result<NewIdentity, Error> {
    let key = node.keys.random_bytes(32)?;
    let (keyring_version, sealed) = keyring.wrap(IDENTITY_KEY_AAD, &key)?;
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    let (text, hash, accessor) = mint_with(node, &hmac_key)?;
    let root = CreateToken {
        hash,
        record: TokenRecord {
            accessor,
            policies: vec![policy::ROOT_POLICY.to_owned()],
            parent: None,
            display_name: "root".into(),
            created_at_ms: UnixMillis::now(),
            expires_at_ms: None,
            max_expires_at_ms: None,
            ttl_ms: 0,
            renewable: false,
        },
    };
    Ok(NewIdentity {
        identity: BootstrapIdentity { key: IdentityKeyRecord { keyring_version, sealed }, root },
        root_token: text,
        token_key: key,
    })
}

/// What [`new_identity`] makes.
pub struct NewIdentity {
    /// What the cluster records.
    pub identity: BootstrapIdentity,
    /// The root token's text: shown once.
    pub root_token: Zeroizing<String>,
    /// The plain token-hashing key, for the node that made it.
    pub token_key: Zeroizing<Vec<u8>>,
}

impl Node {
    /// The token-hashing key: loaded from the state (through the keyring) the first time it is
    /// needed after the cluster's identity exists here.
    ///
    /// # Errors
    /// `Unauthenticated` while this node has no identity yet; keyring failures.
    pub(crate) async fn token_key(&self) -> Result<&ring::hmac::Key, Error> {
        if let Some(key) = self.auth.hash_key() {
            return Ok(key);
        }
        let not_yet = || Error::AuthUnavailable {
            reason: "this node has not applied the cluster's identity yet (not initialised, or catching up): retry, \
                     or call another node"
                .into(),
        };
        let ready = self.ready().await.map_err(|_| not_yet())?;
        let record = self.reader().identity_key()?.ok_or_else(not_yet)?;
        let key = ready.keyring.unwrap(record.keyring_version, IDENTITY_KEY_AAD, &record.sealed)?;
        self.auth.set_hash_key(&key);
        self.auth.hash_key().ok_or_else(not_yet)
    }

    /// The keyed HMAC of a value as audit records hold it (HMAC-SHA-256, hex), under a key
    /// derived from the cluster's identity key: equal values match across every node, and
    /// only someone allowed `hmac` on `sys/audit/hash` can compute one (`coffer audit hash`).
    ///
    /// # Errors
    /// `AuthUnavailable` before this node has the identity key.
    pub(crate) async fn audit_hmac(&self, value: &[u8]) -> Result<String, Error> {
        self.token_key().await?;
        let key = self.auth.value_key().ok_or_else(|| Error::AuthUnavailable { reason: "no audit key yet".into() })?;
        Ok(hex::encode(ring::hmac::sign(key, value)))
    }
}

/// What a caller asks a new token to be.
#[derive(Debug, Default)]
pub struct NewToken {
    /// Policies; empty: the caller's own.
    pub policies: Vec<String>,
    /// Life until renewed.
    pub ttl: Option<Duration>,
    /// Life it never passes.
    pub max_ttl: Option<Duration>,
    /// Renewable.
    pub renewable: bool,
    /// Not revoked with the caller's token.
    pub orphan: bool,
    /// A name for logs.
    pub display_name: String,
}

/// A token just made: its text (shown once) and record.
pub struct MadeToken {
    /// The token.
    pub token: Zeroizing<String>,
    /// What the cluster keeps of it.
    pub record: TokenRecord,
}

/// The policies a principal holds, by name (for the subset rule).
fn held_policies(principal: &Principal) -> Vec<String> {
    principal.policy_names.clone()
}

/// Refuses to grant policies the caller does not hold, unless the caller is root.
fn check_grant(principal: &Principal, held: &[String], wanted: &[String], as_: Capability) -> Result<(), Error> {
    if principal.is_root() {
        return Ok(());
    }
    if let Some(extra) = wanted.iter().find(|p| !held.contains(p)) {
        return Err(Error::PermissionDenied { capability: as_, path: format!("sys/policy/{extra}") })
            .inspect_err(|_| tracing::debug!(policy = %extra, "refused to grant a policy the caller does not hold"));
    }
    Ok(())
}

fn check_policy_names(names: &[String]) -> Result<(), Error> {
    if names.len() > 64 {
        return Err(invalid("at most 64 policies may be attached"));
    }
    for name in names {
        if name != policy::ROOT_POLICY {
            policy::check_name(name).map_err(invalid)?;
        }
    }
    Ok(())
}

/// Creates a token for `caller`, under it unless orphan.
///
/// # Errors
/// `PermissionDenied` (no token-admin, or a policy the caller does not hold);
/// `InvalidArgument` (ttl rules, names); replica errors.
pub async fn create_token(node: &Node, caller: &Principal, mut ask: NewToken) -> Result<MadeToken, Error> {
    let orphan = ask.orphan || !matches!(caller.credential, Credential::Token(_));
    caller.require(if orphan { "sys/token/create-orphan" } else { "sys/token/create" }, Capability::TokenAdmin)?;
    let held = held_policies(caller);
    if ask.policies.is_empty() {
        ask.policies = held.clone();
    }
    ask.policies.sort();
    ask.policies.dedup();
    check_policy_names(&ask.policies)?;
    check_grant(caller, &held, &ask.policies, Capability::TokenAdmin)?;
    let ttl = ask.ttl.unwrap_or(DEFAULT_TTL);
    let max_ttl = ask.max_ttl.unwrap_or(DEFAULT_MAX_TTL.max(ttl));
    if ttl.is_zero() || ttl > max_ttl || max_ttl > LONGEST_TTL {
        return Err(invalid(format!(
            "a token's ttl is more than 0 and at most its max_ttl, and max_ttl is at most {}",
            humantime::format_duration(LONGEST_TTL)
        )));
    }
    let display_name = if ask.display_name.is_empty() { "token".to_owned() } else { ask.display_name };
    if display_name.len() > 128 || display_name.chars().any(char::is_control) {
        return Err(invalid("display_name is at most 128 printable characters"));
    }
    let now = UnixMillis::now();
    let mut expires = after(now, ttl);
    let mut max = after(now, max_ttl);
    let parent = match (&caller.credential, orphan) {
        (Credential::Token(hash), false) => {
            // A child never outlives its parent: its maximum is the parent's, and it starts no
            // later than the parent's current expiry. (Renewals may take it past the parent's
            // current expiry; every call also checks the ancestors', see `Principal`.)
            if let Some(parent) = caller.token.as_ref() {
                if let Some(parent_max) = parent.max_expires_at_ms.or(parent.expires_at_ms) {
                    max = max.min(parent_max);
                }
                if let Some(parent_now) = caller.expires_at() {
                    expires = expires.min(parent_now);
                }
                expires = expires.min(max);
            }
            Some(hash.clone())
        }
        _ => None,
    };
    let (text, hash, accessor) = mint(node).await?;
    let record = TokenRecord {
        accessor,
        policies: ask.policies,
        parent,
        display_name,
        created_at_ms: now,
        expires_at_ms: Some(expires),
        max_expires_at_ms: Some(max),
        ttl_ms: ms(ttl),
        renewable: ask.renewable,
    };
    match node.propose(Write::new(Op::CreateToken(CreateToken { hash, record: record.clone() }))).await? {
        Outcome::Applied => Ok(MadeToken { token: text, record }),
        Outcome::Rejected(Rejection::TokenNotFound) => {
            Err(Error::Unauthenticated { reason: "the calling token was revoked or expired meanwhile".into() })
        }
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other @ Outcome::Put { .. } => Err(Error::Unexpected { what: "CreateToken", outcome: Box::new(other) }),
    }
}

/// Logs in with a certificate principal: a token with its roles' policies, orphan, renewable.
///
/// # Errors
/// `InvalidArgument` when the caller is not a certificate a role admits; replica errors.
pub async fn login(node: &Node, caller: &Principal, ttl: Option<Duration>) -> Result<MadeToken, Error> {
    let name = match &caller.credential {
        Credential::Cert { login, .. } => login,
        Credential::Operator(name) => name,
        Credential::Token(_) => return Err(invalid("login needs a client certificate (this call carried a token)")),
    };
    if caller.roles.is_empty() {
        return Err(Error::Unauthenticated { reason: format!("the certificate {name} matches no login role") });
    }
    let mut policies = Vec::new();
    let mut role_ttl = LONGEST_TTL;
    for role in node.reader().cert_roles()? {
        if caller.roles.contains(&role.name) {
            policies.extend(role.policies.iter().cloned());
            role_ttl = role_ttl.min(Duration::from_millis(role.token_ttl_ms));
        }
    }
    policies.sort();
    policies.dedup();
    let ttl = ttl.unwrap_or(role_ttl).min(role_ttl);
    if ttl.is_zero() {
        return Err(invalid("a login's ttl is more than 0"));
    }
    let now = UnixMillis::now();
    let (text, hash, accessor) = mint(node).await?;
    let record = TokenRecord {
        accessor,
        policies,
        parent: None,
        display_name: format!("cert:{name}"),
        created_at_ms: now,
        expires_at_ms: Some(after(now, ttl)),
        max_expires_at_ms: Some(after(now, role_ttl.max(ttl))),
        ttl_ms: ms(ttl),
        renewable: true,
    };
    match node.propose(Write::new(Op::CreateToken(CreateToken { hash, record: record.clone() }))).await? {
        Outcome::Applied => Ok(MadeToken { token: text, record }),
        other => Err(Error::Unexpected { what: "CreateToken (login)", outcome: Box::new(other) }),
    }
}

/// The token a lookup, renewal or revocation is about: the caller's own (empty accessor), or
/// another by accessor (needs `token-admin` on `sys/token/accessor`).
///
/// # Errors
/// `PermissionDenied`; `TokenNotFound`; `InvalidArgument` for "own" without a token.
pub fn target(node: &Node, caller: &Principal, accessor: &str) -> Result<(TokenHash, TokenRecord), Error> {
    if accessor.is_empty() {
        return match (&caller.credential, &caller.token) {
            (Credential::Token(hash), Some(record)) => Ok((hash.clone(), record.clone())),
            _ => Err(invalid("this call carries no token: name one by accessor")),
        };
    }
    if caller.token.as_ref().is_none_or(|t| t.accessor != accessor) {
        caller.require("sys/token/accessor", Capability::TokenAdmin)?;
    }
    node.reader().token_by_accessor(accessor)?.ok_or(Error::TokenNotFound)
}

/// Extends a token's life by `increment` (default its ttl) from now, within its maximum.
///
/// # Errors
/// `TokenNotRenewable`, `TokenNotFound`; replica errors.
pub async fn renew(
    node: &Node,
    hash: TokenHash,
    record: &TokenRecord,
    increment: Option<Duration>,
) -> Result<TokenRecord, Error> {
    if !record.renewable || record.expires_at_ms.is_none() {
        return Err(Error::TokenNotRenewable);
    }
    let now = UnixMillis::now();
    let mut expires = after(now, increment.unwrap_or(Duration::from_millis(record.ttl_ms)));
    if let Some(max) = record.max_expires_at_ms {
        expires = expires.min(max);
    }
    match node.propose(Write::new(Op::RenewToken(RenewToken { hash, expires_at_ms: expires, at_ms: now }))).await? {
        Outcome::Applied => Ok(TokenRecord { expires_at_ms: Some(expires), ..record.clone() }),
        Outcome::Rejected(r) => Err(Error::rejected(r)),
        other @ Outcome::Put { .. } => Err(Error::Unexpected { what: "RenewToken", outcome: Box::new(other) }),
    }
}

/// Revokes a token and everything created under it.
///
/// # Errors
/// Replica errors.
pub async fn revoke(node: &Node, hash: TokenHash) -> Result<(), Error> {
    apply(node, Op::RevokeToken(RevokeToken { hash }), "RevokeToken").await
}

/// A caller that is not root may not change a policy it holds itself: rewriting it (or deleting
/// a deny it is bound by) would raise its own rights. With the subset rule on tokens and roles,
/// a non-root `policy-admin` can write policies but never attach them to anything it controls.
fn refuse_own_policy(caller: &Principal, name: &str) -> Result<(), Error> {
    if !caller.is_root() && caller.policy_names.iter().any(|p| p == name) {
        return Err(Error::InvalidArgument {
            rule: format!("policy {name:?} is attached to the caller; only another principal (or root) may change it"),
        });
    }
    Ok(())
}

/// Writes a policy after parsing and checking it.
///
/// # Errors
/// `PermissionDenied`; `InvalidArgument` naming the broken rule; replica errors.
pub async fn write_policy(node: &Node, caller: &Principal, name: &str, document: &str) -> Result<(), Error> {
    caller.require(&format!("sys/policy/{name}"), Capability::PolicyAdmin)?;
    refuse_own_policy(caller, name)?;
    if document.len() > 64 * 1024 {
        return Err(invalid("a policy document is at most 64 KiB"));
    }
    Policy::parse(name, document).map_err(invalid)?;
    let record =
        PolicyRecord { name: name.to_owned(), document: document.to_owned(), updated_at_ms: UnixMillis::now() };
    apply(node, Op::PutPolicy(PutPolicy { record }), "PutPolicy").await
}

/// Deletes a policy.
///
/// # Errors
/// `PermissionDenied`; `PolicyNotFound`; replica errors.
pub async fn delete_policy(node: &Node, caller: &Principal, name: &str) -> Result<(), Error> {
    caller.require(&format!("sys/policy/{name}"), Capability::PolicyAdmin)?;
    refuse_own_policy(caller, name)?;
    apply(node, Op::DeletePolicy(DeletePolicy { name: name.to_owned() }), "DeletePolicy").await
}

/// Writes a certificate login role.
///
/// # Errors
/// `PermissionDenied` (no policy-admin, or a policy the caller does not hold);
/// `InvalidArgument`; replica errors.
pub async fn write_role(
    node: &Node,
    caller: &Principal,
    name: &str,
    identities: Vec<String>,
    mut policies: Vec<String>,
    token_ttl: Option<Duration>,
) -> Result<(), Error> {
    caller.require(&format!("sys/role/{name}"), Capability::PolicyAdmin)?;
    policy::check_name(name).map_err(|e| invalid(e.replace("policy", "role")))?;
    if identities.is_empty() {
        return Err(invalid("a role admits at least one identity (spiffe://… or dns:…)"));
    }
    for identity in &identities {
        let known = ["spiffe://", "dns:", "cn:"].iter().any(|p| identity.starts_with(p) && identity.len() > p.len());
        if !known || identity.len() > 512 {
            return Err(invalid(format!(
                "identity {identity:?}: identities are spiffe://… URIs, dns:<name> or cn:<common name>"
            )));
        }
        if identity.find('*').is_some_and(|at| at != identity.len() - 1) {
            return Err(invalid(format!("identity {identity:?}: '*' is allowed only at the end")));
        }
    }
    policies.sort();
    policies.dedup();
    check_policy_names(&policies)?;
    check_grant(caller, &held_policies(caller), &policies, Capability::PolicyAdmin)?;
    let token_ttl = token_ttl.unwrap_or(DEFAULT_TTL);
    if token_ttl.is_zero() || token_ttl > LONGEST_TTL {
        return Err(invalid("a role's token_ttl is more than 0 and at most 32 days"));
    }
    let record = CertRoleRecord {
        name: name.to_owned(),
        identities,
        policies,
        token_ttl_ms: ms(token_ttl),
        updated_at_ms: UnixMillis::now(),
    };
    apply(node, Op::PutCertRole(PutCertRole { record }), "PutCertRole").await
}

/// Deletes a certificate login role.
///
/// # Errors
/// `PermissionDenied`; `RoleNotFound`; replica errors.
pub async fn delete_role(node: &Node, caller: &Principal, name: &str) -> Result<(), Error> {
    caller.require(&format!("sys/role/{name}"), Capability::PolicyAdmin)?;
    apply(node, Op::DeleteCertRole(DeleteCertRole { name: name.to_owned() }), "DeleteCertRole").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_patterns_match_whole_names_or_prefixes() {
        assert!(identity_matches("spiffe://coffer/client/web", "spiffe://coffer/client/web"));
        assert!(!identity_matches("spiffe://coffer/client/web", "spiffe://coffer/client/web2"));
        assert!(identity_matches("spiffe://coffer/client/*", "spiffe://coffer/client/web2"));
        assert!(!identity_matches("spiffe://coffer/client/*", "spiffe://coffer/operator/x"));
    }
}
