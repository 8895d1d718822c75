// Hot path: every public call (authenticate, then check the capability).
//! Identity and policy: who is calling, and whether their policies allow what they ask.
//!
//! | module | what |
//! |---|---|
//! | [`policy`] | policy documents, path globs, the deny-wins decision and its explanation |
//! | [`token`] | token text (prefix, base62 body, CRC-32), the keyed hash, accessors |
//! | [`ops`] | use cases: tokens, policies, login roles, cert login, the root token |
//! | [`service`] | the `coffer.v1.Auth` gRPC service |
//! | [`sweep`] | the leader's expiry sweep |
//! | [`cli`] | `coffer token`, `coffer login`, `coffer policy`, `coffer auth role` |
//!
//! Every call has a principal:
//! - a token in metadata (`authorization: Bearer cfr_s_…`), looked up by its keyed hash;
//! - else a client certificate that this node's TLS verified (Coffer terminates TLS itself, so
//!   no proxy header can claim an identity): its login name (first URI SAN, else `dns:` first
//!   DNS SAN) matched against the login roles, whose policies it gets for the call;
//! - an operator certificate (`spiffe://coffer/operator/<name>`) may always do `operator`
//!   things on `sys/operator/…` (cluster changes), and nothing else unless a role says so.
//!
//! # Correctness
//! - Checks run on the node that receives the call, from its local state, with no round trip.
//!   A node decides only while it has heard from the leader within `crypto-staleness` (the
//!   Keys service's bound): a revoked token, a deleted role or a changed policy is refused on
//!   every node within that bound of its commit, a node cut off from the leader included (it
//!   refuses everything with `UNAVAILABLE`).
//! - Expiry is checked against this node's clock on every call, whether or not the leader's
//!   sweep has removed the token yet.
//! - The cache of resolved principals is valid for one identity generation of the state: any
//!   change to tokens, policies or roles empties it (`StateReader::identity_generation`).

pub mod cli;
pub mod ops;
pub mod policy;
pub mod service;
pub mod sweep;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use coffer_raft::{TokenHash, TokenRecord, UnixMillis};
use tonic::Request;

pub use policy::{Capability, Explanation, Policy, PolicySet};

use crate::error::Error;
use crate::node::Node;

/// How a caller proved who it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A token, by its keyed hash.
    Token(TokenHash),
    /// A client certificate, by its login name (first URI SAN, else `dns:` and the first DNS
    /// SAN) or, for a certificate with neither, its subject CN, which only roles that ask for it
    /// (`cn:` identities) admit.
    Cert {
        /// The login name.
        login: String,
        /// The subject's common name, for a certificate with no SAN.
        cn: Option<String>,
    },
    /// An operator certificate, by its name.
    Operator(String),
}

/// Who a call runs as, with the policies that decide for it.
#[derive(Debug, Clone)]
pub struct Principal {
    /// How it was established.
    pub credential: Credential,
    /// For a token: its record (accessor, policies, expiry).
    pub token: Option<TokenRecord>,
    /// Login roles that gave a certificate its policies.
    pub roles: Vec<String>,
    /// The names of its policies (a token's, or its roles' together).
    pub policy_names: Vec<String>,
    /// The policies that decide.
    pub policies: PolicySet,
    /// An operator certificate: `operator` on `sys/operator/…` regardless of policies.
    operator: bool,
    /// The earliest expiry of the token and its ancestors.
    expires: Option<UnixMillis>,
}

impl Principal {
    /// Who, for logs and messages: an accessor, a certificate name. Never a token.
    pub fn display(&self) -> String {
        match (&self.credential, &self.token) {
            (Credential::Token(_), Some(t)) => format!("token {} ({})", t.accessor, t.display_name),
            (Credential::Token(_), None) => "a token".into(),
            (Credential::Cert { login, .. }, _) => format!("certificate {login}"),
            (Credential::Operator(name), _) => format!("operator certificate {name}"),
        }
    }

    /// Writes who this is into an audit record: the display name, a token's accessor, a
    /// certificate's identity.
    pub fn describe(&self, info: &mut crate::audit::layer::AuditInfo) {
        info.principal = Some(self.display());
        match (&self.credential, &self.token) {
            (Credential::Token(_), Some(t)) => info.accessor = Some(t.accessor.clone()),
            (Credential::Cert { login, .. }, _) => info.identity = Some(login.clone()),
            (Credential::Operator(name), _) => info.identity = Some(name.clone()),
            (Credential::Token(_), None) => {}
        }
    }

    /// The rule that decides `capability` on `path`, as the audit record names it.
    pub fn deciding_rule(&self, path: &str, capability: Capability) -> String {
        if self.operator && capability == Capability::Operator && path.starts_with("sys/operator/") {
            return "operator-certificate".into();
        }
        self.policies.deciding_rule(path, capability)
    }

    /// Whether this principal may use `capability` on `path`.
    pub fn allows(&self, path: &str, capability: Capability) -> bool {
        (self.operator && capability == Capability::Operator && path.starts_with("sys/operator/"))
            || self.policies.allows(path, capability)
    }

    /// `Ok` when allowed; `PermissionDenied` naming the path and capability otherwise.
    ///
    /// # Errors
    /// `PermissionDenied`.
    pub fn require(&self, path: &str, capability: Capability) -> Result<(), Error> {
        let allowed = self.allows(path, capability);
        crate::audit::layer::note_check(path, capability.name(), allowed, || self.deciding_rule(path, capability));
        if allowed {
            return Ok(());
        }
        tracing::debug!(principal = %self.display(), path, %capability, "permission denied");
        Err(Error::PermissionDenied { capability, path: path.to_owned() })
    }

    /// Whether the root policy is attached.
    pub fn is_root(&self) -> bool {
        self.policies.is_root()
    }

    /// When a token principal stops working: its own expiry or an ancestor's, whichever comes
    /// first (a child never outlives its parent, even before the sweep removes them both).
    pub(crate) fn expires_at(&self) -> Option<UnixMillis> {
        self.expires
    }
}

/// The path a secret's capabilities are checked on, once the path is valid: the policy check
/// never sees a path the operation would refuse (nor a megabyte of one).
///
/// # Errors
/// `InvalidArgument` naming the rule the path breaks.
pub fn secret_path(path: &str) -> Result<String, Error> {
    coffer_raft::SecretPath::parse(path)?;
    Ok(format!("secret/{path}"))
}

/// The path a named key's capabilities are checked on, once the name is valid.
///
/// # Errors
/// `InvalidArgument` naming the rule the name breaks.
pub fn key_path(name: &str) -> Result<String, Error> {
    coffer_raft::KeyName::parse(name)?;
    Ok(format!("key/{name}"))
}

/// Resolved principals and parsed policies, valid for one identity generation.
#[derive(Debug, Default)]
struct Cache {
    generation: u64,
    principals: HashMap<Credential, Arc<Principal>>,
    policies: HashMap<String, Option<Arc<Policy>>>,
}

/// The cache never grows past this many principals; past it, it starts over (a flood of
/// distinct tokens costs lookups, not memory).
const MAX_CACHED_PRINCIPALS: usize = 100_000;

/// A node's authentication state: the token-hashing key, once loaded, and the cache.
pub struct Auth {
    hash_key: std::sync::OnceLock<ring::hmac::Key>,
    /// The key of values' HMACs in audit records (`coffer audit hash`).
    value_key: std::sync::OnceLock<ring::hmac::Key>,
    /// Per-credential call rate, when `auth.token-rate` sets one.
    limiter: Option<governor::DefaultKeyedRateLimiter<Credential>>,
    /// The principal of every call when checks are off.
    unchecked: std::sync::OnceLock<Arc<Principal>>,
    // A std lock: held only for map lookups and inserts, never across an `.await`.
    cache: RwLock<Cache>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("hash_key", &"[redacted]").finish_non_exhaustive()
    }
}

impl Auth {
    /// Authentication state for a node configured with `config`.
    pub(crate) fn new(config: &crate::config::AuthConfig) -> Auth {
        let limiter = config.token_rate.map(|rate| {
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(config.token_burst))
        });
        Auth {
            hash_key: Default::default(),
            value_key: Default::default(),
            limiter,
            unchecked: Default::default(),
            cache: Default::default(),
        }
    }

    /// Counts one call of `credential` against its rate.
    ///
    /// # Errors
    /// `RateLimited` with the wait until a call fits.
    fn admit(&self, credential: &Credential) -> Result<(), Error> {
        use governor::clock::Clock as _;
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(credential).map_err(|not_until| Error::RateLimited {
            retry_after: not_until.wait_time_from(governor::clock::DefaultClock::default().now()),
        })
    }

    /// Forgets rate state of credentials not seen lately (the sweep calls it): the limiter's
    /// memory follows the callers of the last seconds, not every token ever used.
    pub(crate) fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Sets the token-hashing key (once; later calls are ignored), and the audit value key
    /// derived from it (HMAC of a fixed label: one cluster-wide key, sealed like the identity
    /// key it comes from, never used for tokens).
    pub(crate) fn set_hash_key(&self, key: &[u8]) {
        let hash_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let derived = ring::hmac::sign(&hash_key, b"coffer audit value hmac, v1");
        let _ = self.value_key.set(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref()));
        let _ = self.hash_key.set(hash_key);
    }

    pub(crate) fn value_key(&self) -> Option<&ring::hmac::Key> {
        self.value_key.get()
    }

    pub(crate) fn hash_key(&self) -> Option<&ring::hmac::Key> {
        self.hash_key.get()
    }
}

/// Everything allowed: the principal of every call when `auth.checks = "off"`.
fn unchecked() -> Arc<Principal> {
    Arc::new(Principal {
        credential: Credential::Operator("unchecked".into()),
        token: None,
        roles: vec![],
        policy_names: vec![policy::ROOT_POLICY.into()],
        policies: PolicySet::new(true, vec![]),
        operator: true,
        expires: None,
    })
}

/// SHA-256 (hex) of the client certificate the call came with, for its audit record.
fn cert_sha256<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    let first = certs.first()?;
    Some(hex::encode(ring::digest::digest(&ring::digest::SHA256, first.as_ref())))
}

/// The metadata key a token travels in.
pub const AUTHORIZATION: &str = "authorization";

impl Node {
    /// Authenticates the caller and checks one capability on one path. The path comes as the
    /// result of validating the request: a caller is authenticated before it learns anything
    /// about its request's shape, and its audit record names it either way.
    ///
    /// # Errors
    /// As [`Node::authenticate`]; the path's own error; `PermissionDenied`.
    pub async fn authorize<T>(
        &self,
        request: &Request<T>,
        path: Result<String, Error>,
        capability: Capability,
    ) -> Result<Arc<Principal>, Error> {
        let principal = self.authenticate(request).await?;
        let path = path?;
        let path = path.as_str();
        let decided = principal.require(path, capability);
        if let Some(slot) = request.extensions().get::<crate::audit::layer::AuditSlot>() {
            slot.update(|info| {
                info.path = Some(path.to_owned());
                info.capability = Some(capability.name());
                info.decision = Some(if decided.is_ok() { "allowed" } else { "denied" });
                info.rule = Some(principal.deciding_rule(path, capability));
            });
        }
        decided.map(|()| principal)
    }

    /// Authorises an operator call (`operator` on `sys/operator/<action>`). An operator
    /// certificate's own right needs no state, so it holds on a node cut off from the leader,
    /// which is when operators need it most; any other credential is resolved as usual.
    ///
    /// # Errors
    /// As [`Node::authorize`].
    pub async fn authorize_operator<T>(&self, request: &Request<T>, action: &str) -> Result<(), Error> {
        let path = format!("sys/operator/{action}");
        let slot = request.extensions().get::<crate::audit::layer::AuditSlot>();
        if let Some(slot) = slot {
            slot.update(|info| {
                info.peer = request.remote_addr().map(|a| a.to_string());
                info.cert_sha256 = cert_sha256(request);
                info.path = Some(path.clone());
                info.capability = Some(Capability::Operator.name());
            });
        }
        let credential = self.credential(request).await?;
        if let Credential::Operator(name) = &credential {
            if let Some(slot) = slot {
                slot.update(|info| {
                    info.principal = Some(format!("operator certificate {name}"));
                    info.identity = Some(name.clone());
                    info.decision = Some("allowed");
                    info.rule = Some("operator-certificate".into());
                });
            }
            return Ok(());
        }
        self.wait_fresh().await?;
        let principal = self.lookup(&credential)?;
        let decided = principal.require(&path, Capability::Operator);
        if let Some(slot) = slot {
            slot.update(|info| {
                principal.describe(info);
                info.rule = Some(principal.deciding_rule(&path, Capability::Operator));
                info.decision = Some(if decided.is_ok() { "allowed" } else { "denied" });
            });
        }
        decided
    }

    /// Who is calling: a token in metadata, else the verified client certificate.
    ///
    /// # Errors
    /// `Unauthenticated` (no credential, a malformed, unknown, revoked or expired token, a
    /// certificate no role admits); `UNAVAILABLE` errors while this node is not fresh.
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Arc<Principal>, Error> {
        if self.config.auth.checks == crate::config::Checks::Off {
            return Ok(self.auth.unchecked.get_or_init(unchecked).clone());
        }
        let slot = request.extensions().get::<crate::audit::layer::AuditSlot>();
        if let Some(slot) = slot {
            slot.update(|info| {
                info.peer = request.remote_addr().map(|a| a.to_string());
                info.cert_sha256 = cert_sha256(request);
            });
        }
        let resolved = match self.credential(request).await {
            Ok(credential) => match self.wait_fresh().await {
                Ok(()) => self.lookup(&credential),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        if let Some(slot) = slot {
            slot.update(|info| match &resolved {
                Ok(principal) => principal.describe(info),
                Err(Error::Unauthenticated { .. }) => info.decision = Some("unauthenticated"),
                Err(_) => {}
            });
        }
        resolved
    }

    /// Waits (up to `crypto-staleness`, at most 2 s) until this node is fresh enough to check
    /// credentials: a node that has just started, is catching up, or just missed a heartbeat
    /// answers a moment late rather than refuse. A node cut off holds each call that long before
    /// it refuses. The first check costs one clock read and no wait.
    async fn wait_fresh(&self) -> Result<(), Error> {
        let bound = self.config.crypto_staleness;
        let started = std::time::Instant::now();
        loop {
            match self.fresh_within(bound) {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() >= bound.min(std::time::Duration::from_secs(2)) => {
                    return Err(self.cannot_vouch(e))
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    /// The credential a request carries, checked for shape only.
    ///
    /// # Errors
    /// `Unauthenticated`.
    pub async fn credential<T>(&self, request: &Request<T>) -> Result<Credential, Error> {
        if self.config.auth.checks == crate::config::Checks::Off {
            return Ok(Credential::Operator("unchecked".into()));
        }
        let unauthenticated = |reason: &str| Error::Unauthenticated { reason: reason.to_owned() };
        if let Some(value) = request.metadata().get(AUTHORIZATION) {
            let value = value.to_str().map_err(|_| unauthenticated("the authorization header is not ASCII"))?;
            let token = value
                .strip_prefix("Bearer ")
                .ok_or_else(|| unauthenticated("the authorization header is not \"Bearer <token>\""))?;
            token::check(token.trim()).map_err(unauthenticated)?;
            let key = self.token_key().await?;
            return Ok(Credential::Token(token::hash(key, token.trim())));
        }
        let certs = request.peer_certs();
        let first = certs.as_ref().and_then(|c| c.first());
        if let Some(cert) = first {
            if let Some(coffer_tls::Identity::Operator(name)) = coffer_tls::identity(cert) {
                return Ok(Credential::Operator(name));
            }
            // The CN only for a certificate with no SAN: a certificate has one name (node and
            // operator certificates always carry a URI SAN, so no `cn:` role can reach them).
            if let Some(login) = coffer_tls::login_name(cert) {
                return Ok(Credential::Cert { login, cn: None });
            }
            if let Some(name) = coffer_tls::common_name(cert) {
                return Ok(Credential::Cert { login: format!("cn:{name}"), cn: Some(name) });
            }
            return Err(unauthenticated("the client certificate names no URI, DNS or CN identity to log in with"));
        }
        Err(unauthenticated(
            "no credential: send a token (authorization: Bearer cfr_s_…; the CLI reads COFFER_TOKEN or \
             `coffer login`) or a client certificate a login role admits",
        ))
    }

    /// The principal for a credential, from the cache or the local state; checked for expiry
    /// against this node's clock, and only while this node is fresh.
    ///
    /// # Errors
    /// `Unauthenticated`; `Stale` and friends (`UNAVAILABLE`) on a node cut off from the leader.
    pub fn resolve(&self, credential: &Credential) -> Result<Arc<Principal>, Error> {
        if self.config.auth.checks == crate::config::Checks::Off {
            return Ok(self.auth.unchecked.get_or_init(unchecked).clone());
        }
        self.fresh_within(self.config.crypto_staleness).map_err(|e| self.cannot_vouch(e))?;
        self.lookup(credential)
    }

    /// The principal for a credential from the cache or the local state, checked for expiry;
    /// the caller has checked freshness.
    fn lookup(&self, credential: &Credential) -> Result<Arc<Principal>, Error> {
        let generation = self.reader().identity_generation();
        let cached = {
            let cache = self.auth.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            if cache.generation == generation {
                cache.principals.get(credential).cloned()
            } else {
                None
            }
        };
        let principal = match cached {
            Some(p) => p,
            None => {
                {
                    let mut cache = self.auth.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if cache.generation != generation {
                        *cache = Cache { generation, ..Cache::default() };
                    }
                }
                // State read now is at least as new as `generation` (it moves after a write).
                let principal = Arc::new(self.load_principal(credential, generation)?);
                let mut cache = self.auth.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.generation != generation {
                    return Ok(principal);
                }
                if cache.principals.len() >= MAX_CACHED_PRINCIPALS {
                    cache.principals.clear();
                }
                cache.principals.insert(credential.clone(), principal.clone());
                principal
            }
        };
        if principal.expires_at().is_some_and(|at| at <= UnixMillis::now()) {
            return Err(Error::Unauthenticated { reason: "the token has expired".into() });
        }
        self.auth.admit(credential)?;
        Ok(principal)
    }

    /// Why a node that is not fresh refuses to check a credential.
    fn cannot_vouch(&self, stale: Error) -> Error {
        let bound = humantime::format_duration(self.config.crypto_staleness);
        let reason = match stale {
            Error::Replica(coffer_raft::Error::Stale { staleness, leading, .. }) => format!(
                "this node last heard from the {} {} ago, more than crypto-staleness ({bound}): it cannot vouch that a \
                 credential is still valid; retry, or call another node",
                if leading { "quorum" } else { "leader" },
                humantime::format_duration(std::time::Duration::from_millis(
                    u64::try_from(staleness.as_millis()).unwrap_or(u64::MAX)
                ))
            ),
            other => format!("{other}: this node cannot check credentials until it hears from the leader"),
        };
        Error::AuthUnavailable { reason }
    }

    fn load_principal(&self, credential: &Credential, generation: u64) -> Result<Principal, Error> {
        let reader = self.reader();
        match credential {
            Credential::Token(hash) => {
                let Some(record) = reader.token(hash)? else {
                    return Err(Error::Unauthenticated { reason: "the token is revoked, expired or unknown".into() });
                };
                let policies = self.policy_set(&record.policies, generation)?;
                let expires = self.lineage_expiry(&record)?;
                Ok(Principal {
                    credential: credential.clone(),
                    policy_names: record.policies.clone(),
                    token: Some(record),
                    roles: vec![],
                    policies,
                    operator: false,
                    expires,
                })
            }
            Credential::Cert { .. } | Credential::Operator(_) => {
                let (login, cn) = match credential {
                    Credential::Operator(name) => (format!("spiffe://coffer/operator/{name}"), None),
                    Credential::Cert { login, cn } => (login.clone(), cn.as_deref()),
                    Credential::Token(_) => unreachable!("matched above"),
                };
                let name = &login;
                // A `cn:` identity looks at the CN; every other at the login name.
                let admits = |pattern: &String| match pattern.strip_prefix("cn:") {
                    Some(cn_pattern) => cn.is_some_and(|cn| ops::identity_matches(cn_pattern, cn)),
                    None => ops::identity_matches(pattern, &login),
                };
                let mut roles = Vec::new();
                let mut names = Vec::new();
                for role in reader.cert_roles()? {
                    if role.identities.iter().any(admits) {
                        roles.push(role.name.clone());
                        names.extend(role.policies.iter().cloned());
                    }
                }
                let operator = matches!(credential, Credential::Operator(_));
                if roles.is_empty() && !operator {
                    return Err(Error::Unauthenticated {
                        reason: format!(
                            "the client certificate {name} matches no login role (coffer auth role write … --identity {name})"
                        ),
                    });
                }
                names.sort();
                names.dedup();
                let policies = self.policy_set(&names, generation)?;
                Ok(Principal {
                    credential: credential.clone(),
                    token: None,
                    roles,
                    policy_names: names,
                    policies,
                    operator,
                    expires: None,
                })
            }
        }
    }

    /// The earliest expiry along a token's line of parents. A revoke removes a subtree in one
    /// batch, so a missing parent means a revoke this node applies in the same generation.
    fn lineage_expiry(&self, record: &TokenRecord) -> Result<Option<UnixMillis>, Error> {
        let mut earliest = record.expires_at_ms;
        let mut parent = record.parent.clone();
        // Bounded: a chain longer than this is cut (its tokens still expire on their own).
        for _ in 0..64 {
            let Some(hash) = parent else { break };
            let Some(up) = self.reader().token(&hash)? else {
                return Err(Error::Unauthenticated { reason: "the token is revoked, expired or unknown".into() });
            };
            earliest = match (earliest, up.expires_at_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            parent = up.parent;
        }
        Ok(earliest)
    }

    /// The parsed policies of these names (unknown names count as empty policies).
    pub(crate) fn policy_set(&self, names: &[String], generation: u64) -> Result<PolicySet, Error> {
        let root = names.iter().any(|n| n == policy::ROOT_POLICY);
        let mut policies = Vec::new();
        for name in names.iter().filter(|n| *n != policy::ROOT_POLICY) {
            let cached = {
                let cache = self.auth.cache.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                if cache.generation == generation {
                    cache.policies.get(name).cloned()
                } else {
                    None
                }
            };
            let parsed = match cached {
                Some(p) => p,
                None => {
                    let parsed = match self.reader().policy(name)? {
                        // Checked when written; a document that no longer parses (a newer
                        // node's syntax) grants nothing rather than failing every call.
                        Some(record) => match Policy::parse(name, &record.document) {
                            Ok(p) => Some(Arc::new(p)),
                            Err(e) => {
                                tracing::warn!(policy = %name, error = %e, "a stored policy does not parse; it grants nothing");
                                None
                            }
                        },
                        None => None,
                    };
                    let mut cache = self.auth.cache.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if cache.generation == generation {
                        cache.policies.insert(name.clone(), parsed.clone());
                    }
                    parsed
                }
            };
            if let Some(p) = parsed {
                policies.push(p);
            }
        }
        Ok(PolicySet::new(root, policies))
    }
}
