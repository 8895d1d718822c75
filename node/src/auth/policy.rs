//! Policies: named documents of path rules, and the one decision rule.
//!
//! A document (TOML or JSON, so a platform team can keep it in git) is a list of rules:
//!
//! ```toml
//! [[rule]]
//! path = "secret/payments/**"
//! allow = ["read", "list"]
//!
//! [[rule]]
//! path = "secret/payments/admin/*"
//! deny = ["read"]
//! ```
//!
//! Paths name what a call touches: `secret/<secret path>`, `key/<key name>`,
//! `sys/policy/<name>`, `sys/token/<action>`, `sys/role/<name>`, `sys/operator/<action>`. In a
//! rule's path, a `*` segment matches exactly one segment and `**` any number (zero included).
//!
//! # Correctness
//! The decision counts every matching rule of every attached policy: any matching deny wins,
//! otherwise the union of the allows; nothing matching is a deny. Unlike Vault (where only the
//! most specific rule applies, so a narrower allow silently overrides a broad deny), a deny can
//! never be undone by another rule. The built-in `root` policy allows everything and cannot be
//! written or deleted.

use serde::Deserialize;

/// The built-in policy that allows everything (the root token's).
pub const ROOT_POLICY: &str = "root";

/// The most rules a policy document may hold.
pub const MAX_RULES: usize = 256;

/// What a call does to a path. The names are the ones policies use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Read a secret's value or its metadata.
    Read,
    /// List secret paths.
    List,
    /// Write the first version of a secret.
    Create,
    /// Write a new version of an existing secret.
    Update,
    /// Soft-delete secret versions.
    Delete,
    /// Restore soft-deleted versions.
    Undelete,
    /// Destroy secret versions for good.
    Destroy,
    /// Encrypt with a named key.
    Encrypt,
    /// Decrypt with a named key.
    Decrypt,
    /// Move a ciphertext to a key's newest version.
    Rewrap,
    /// Make a data key.
    Datakey,
    /// Sign with a named key.
    Sign,
    /// Verify a signature.
    Verify,
    /// Compute or verify an HMAC.
    Hmac,
    /// Create, rotate, configure, delete and describe named keys.
    KeyAdmin,
    /// Write, read, list and delete policies and login roles.
    PolicyAdmin,
    /// Create tokens for others, and look up or revoke tokens by accessor.
    TokenAdmin,
    /// Cluster operations: membership, leadership, join tokens.
    Operator,
    /// Configure, start, cancel and see a secret's rotation.
    Rotate,
    /// Follow a folder's metadata events (Watch).
    Watch,
}

/// Every capability, in the order `coffer policy` prints them.
pub const ALL: [Capability; 20] = [
    Capability::Read,
    Capability::List,
    Capability::Create,
    Capability::Update,
    Capability::Delete,
    Capability::Undelete,
    Capability::Destroy,
    Capability::Encrypt,
    Capability::Decrypt,
    Capability::Rewrap,
    Capability::Datakey,
    Capability::Sign,
    Capability::Verify,
    Capability::Hmac,
    Capability::KeyAdmin,
    Capability::PolicyAdmin,
    Capability::TokenAdmin,
    Capability::Operator,
    Capability::Rotate,
    Capability::Watch,
];

impl Capability {
    /// The name policies use.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::List => "list",
            Capability::Create => "create",
            Capability::Update => "update",
            Capability::Delete => "delete",
            Capability::Undelete => "undelete",
            Capability::Destroy => "destroy",
            Capability::Encrypt => "encrypt",
            Capability::Decrypt => "decrypt",
            Capability::Rewrap => "rewrap",
            Capability::Datakey => "datakey",
            Capability::Sign => "sign",
            Capability::Verify => "verify",
            Capability::Hmac => "hmac",
            Capability::KeyAdmin => "key-admin",
            Capability::PolicyAdmin => "policy-admin",
            Capability::TokenAdmin => "token-admin",
            Capability::Operator => "operator",
            Capability::Rotate => "rotate",
            Capability::Watch => "watch",
        }
    }

    /// Parses a capability's name.
    ///
    /// # Errors
    /// The name is not a capability: the message lists them.
    pub fn parse(name: &str) -> Result<Capability, String> {
        ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| {
            let names: Vec<&str> = ALL.iter().map(|c| c.name()).collect();
            format!("{name:?} is not a capability; the capabilities are: {}", names.join(" "))
        })
    }

    /// The first path segment the capability applies under.
    fn namespace(self) -> &'static str {
        match self {
            Capability::Read
            | Capability::List
            | Capability::Create
            | Capability::Update
            | Capability::Delete
            | Capability::Undelete
            | Capability::Destroy
            | Capability::Rotate
            | Capability::Watch => "secret",
            Capability::Encrypt
            | Capability::Decrypt
            | Capability::Rewrap
            | Capability::Datakey
            | Capability::Sign
            | Capability::Verify
            | Capability::Hmac
            | Capability::KeyAdmin => "key",
            Capability::PolicyAdmin | Capability::TokenAdmin | Capability::Operator => "sys",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of capabilities, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Caps(u32);

impl Caps {
    fn contains(self, c: Capability) -> bool {
        self.0 & c.bit() != 0
    }
}

/// A rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    path: String,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// A policy document as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    /// For people; the stored document keeps it, the decision never reads it.
    #[serde(default, rename = "description")]
    _description: Option<String>,
    #[serde(default)]
    rule: Vec<RuleDoc>,
}

/// One segment of a rule's path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: any number of segments.
    Any,
}

/// A parsed rule.
#[derive(Debug, Clone)]
pub struct Rule {
    path: String,
    segments: Vec<Segment>,
    allow: Caps,
    deny: Caps,
}

impl Rule {
    fn matches(&self, path: &[&str]) -> bool {
        glob_match(&self.segments, path)
    }
}

/// `pattern` against `path`, segment by segment; `**` may take any number of segments.
///
/// The classic wildcard walk with one backtrack point (the last `**` seen): correct for globs
/// whose only multi-element wildcard is `**`, at most O(pattern × path) steps, no allocation.
/// (A naive recursive matcher is exponential in the number of `**`: a policy with many of them
/// and a long path would stall a worker.)
fn glob_match(pattern: &[Segment], path: &[&str]) -> bool {
    let (mut p, mut s) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while s < path.len() {
        match pattern.get(p) {
            Some(Segment::Any) => {
                star = Some((p, s));
                p += 1;
            }
            Some(Segment::One) => {
                p += 1;
                s += 1;
            }
            Some(Segment::Literal(literal)) if literal == path[s] => {
                p += 1;
                s += 1;
            }
            _ => match star {
                // Let the last `**` take one more segment, and try again from there.
                Some((star_p, star_s)) => {
                    star = Some((star_p, star_s + 1));
                    p = star_p + 1;
                    s = star_s + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|seg| *seg == Segment::Any)
}

/// A parsed, checked policy.
#[derive(Debug, Clone)]
pub struct Policy {
    name: String,
    rules: Vec<Rule>,
}

/// The format of a policy document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML (`[[rule]]` tables).
    Toml,
    /// JSON (`{"rule": [...]}`).
    Json,
}

impl Format {
    /// JSON when the text starts with `{`, TOML otherwise.
    pub fn sniff(text: &str) -> Format {
        if text.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Toml
        }
    }
}

/// Checks a policy's name: 1 to 64 of `A-Z a-z 0-9 . _ -`, and not `root`.
///
/// # Errors
/// The rule the name breaks.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("a policy name is 1 to 64 characters long".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("the policy name contains {c:?}; only A-Z a-z 0-9 . _ - are allowed"));
    }
    Ok(())
}

impl Policy {
    /// Parses and checks a document: known fields only, at least one rule, every path a valid
    /// glob under `secret/`, `key/` or `sys/`, every capability known and meant for its path.
    ///
    /// # Errors
    /// The first broken rule, named by its number and path.
    pub fn parse(name: &str, text: &str) -> Result<Policy, String> {
        check_name(name)?;
        if name == ROOT_POLICY {
            return Err("\"root\" is built in (it allows everything) and cannot be written".into());
        }
        let doc: PolicyDoc = match Format::sniff(text) {
            Format::Json => serde_json::from_str(text).map_err(|e| format!("the policy is not valid JSON: {e}"))?,
            Format::Toml => toml::from_str(text).map_err(|e| format!("the policy is not valid TOML: {e}"))?,
        };
        if doc.rule.is_empty() {
            return Err("the policy has no rules: add at least one [[rule]] with a path and allow or deny".into());
        }
        if doc.rule.len() > MAX_RULES {
            return Err(format!("the policy has {} rules; at most {MAX_RULES} are allowed", doc.rule.len()));
        }
        let rules = doc
            .rule
            .into_iter()
            .enumerate()
            .map(|(i, r)| parse_rule(r).map_err(|e| format!("rule {}: {e}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { name: name.to_owned(), rules })
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn parse_rule(doc: RuleDoc) -> Result<Rule, String> {
    let path = doc.path;
    if path.is_empty() || path.len() > 1024 {
        return Err("a rule's path is 1 to 1024 characters long".into());
    }
    if path.split('/').count() > 64 {
        return Err(format!("path {path:?} has more than 64 segments"));
    }
    let mut segments: Vec<Segment> = Vec::new();
    for segment in path.split('/') {
        // Consecutive `**` say no more than one.
        if segment == "**" && segments.last() == Some(&Segment::Any) {
            continue;
        }
        segments.push(match segment {
            "" => return Err(format!("path {path:?} has an empty segment (a leading, trailing or doubled '/')")),
            "*" => Segment::One,
            "**" => Segment::Any,
            s if s.contains('*') => {
                return Err(format!(
                    "path {path:?}: '*' stands alone in a segment ('*' one segment, '**' any depth), not in {s:?}"
                ))
            }
            s => {
                if let Some(c) = s.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
                    return Err(format!("path {path:?} contains {c:?}; segments may only contain A-Z a-z 0-9 . _ -"));
                }
                Segment::Literal(s.to_owned())
            }
        });
    }
    let namespace = match &segments[0] {
        Segment::Literal(first) if matches!(first.as_str(), "secret" | "key" | "sys") => Some(first.clone()),
        Segment::Literal(first) => {
            return Err(format!("path {path:?} starts with {first:?}; paths start with secret/, key/ or sys/"))
        }
        Segment::One | Segment::Any => None,
    };
    let caps = |names: &[String]| -> Result<Caps, String> {
        let mut caps = Caps::default();
        for name in names {
            let c = Capability::parse(name)?;
            if let Some(ns) = &namespace {
                if c.namespace() != ns {
                    return Err(format!(
                        "{c} applies under {}/, so it grants nothing under {ns}/ (path {path:?})",
                        c.namespace()
                    ));
                }
            }
            caps.0 |= c.bit();
        }
        Ok(caps)
    };
    let allow = caps(&doc.allow)?;
    let deny = caps(&doc.deny)?;
    if allow == Caps::default() && deny == Caps::default() {
        return Err(format!("path {path:?} has neither allow nor deny"));
    }
    Ok(Rule { path, segments, allow, deny })
}

/// Whether a rule allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The rule allows the capability.
    Allow,
    /// The rule denies it.
    Deny,
}

/// A rule that counted in a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// The policy it belongs to.
    pub policy: String,
    /// Its number in the document, from 1.
    pub rule: usize,
    /// Its path glob.
    pub path: String,
    /// What it said about the capability.
    pub effect: Effect,
}

/// A decision, with the rules that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Allowed or not.
    pub allowed: bool,
    /// Every rule that matched the path and named the capability; empty for root (see
    /// [`Explanation::root`]) and for "no rule matched".
    pub reasons: Vec<Reason>,
    /// The root policy decided.
    pub root: bool,
}

/// The policies attached to one principal, ready to decide.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    root: bool,
    policies: Vec<std::sync::Arc<Policy>>,
}

impl PolicySet {
    /// A set of the given policies; `root` when the built-in root policy is among them.
    pub fn new(root: bool, policies: Vec<std::sync::Arc<Policy>>) -> PolicySet {
        PolicySet { root, policies }
    }

    /// Whether the root policy is attached.
    pub fn is_root(&self) -> bool {
        self.root
    }

    /// The decision for `capability` on `path`, without explanation: the hot path.
    pub fn allows(&self, path: &str, capability: Capability) -> bool {
        self.decide(path, capability).0
    }

    /// The decision and the rule that made it, as the audit record names it: `root`,
    /// `<policy>#<rule>` (the deny that won, else the first allow), or `default-deny`.
    pub fn deciding_rule(&self, path: &str, capability: Capability) -> String {
        match self.decide(path, capability) {
            _ if self.root => "root".to_owned(),
            (_, Some((policy, rule))) => format!("{policy}#{rule}"),
            (_, None) => "default-deny".to_owned(),
        }
    }

    /// The decision, and the policy and rule number (from 1) that made it: the first deny that
    /// matches, else the first allow; `None` when no rule matched (or for root).
    fn decide(&self, path: &str, capability: Capability) -> (bool, Option<(&str, usize)>) {
        if self.root {
            return (true, None);
        }
        let segments: Vec<&str> = path.split('/').collect();
        let mut allowed = None;
        for policy in &self.policies {
            for (i, rule) in policy.rules.iter().enumerate() {
                let named = rule.allow.contains(capability) || rule.deny.contains(capability);
                if named && rule.matches(&segments) {
                    if rule.deny.contains(capability) {
                        return (false, Some((&policy.name, i + 1)));
                    }
                    allowed = allowed.or(Some((policy.name.as_str(), i + 1)));
                }
            }
        }
        (allowed.is_some(), allowed)
    }

    /// The decision for `capability` on `path` and every rule that counted in it.
    pub fn explain(&self, path: &str, capability: Capability) -> Explanation {
        if self.root {
            return Explanation { allowed: true, reasons: Vec::new(), root: true };
        }
        let segments: Vec<&str> = path.split('/').collect();
        let mut reasons = Vec::new();
        for policy in &self.policies {
            for (i, rule) in policy.rules.iter().enumerate() {
                if !rule.matches(&segments) {
                    continue;
                }
                let effect = if rule.deny.contains(capability) {
                    Effect::Deny
                } else if rule.allow.contains(capability) {
                    Effect::Allow
                } else {
                    continue;
                };
                reasons.push(Reason { policy: policy.name.clone(), rule: i + 1, path: rule.path.clone(), effect });
            }
        }
        let allowed = !reasons.is_empty() && reasons.iter().all(|r| r.effect == Effect::Allow);
        Explanation { allowed, reasons, root: false }
    }
}

impl Explanation {
    /// A few lines for a person: the decision, then the rules.
    pub fn render(&self, path: &str, capability: Capability) -> String {
        let verdict = if self.allowed { "ALLOWED" } else { "DENIED" };
        let mut out = format!("{verdict}: {capability} on {path}\n");
        if self.root {
            out.push_str("  the root policy allows everything\n");
        } else if self.reasons.is_empty() {
            out.push_str(&format!(
                "  no rule of the attached policies grants {capability} on this path (default deny)\n"
            ));
        }
        for r in &self.reasons {
            let effect = match r.effect {
                Effect::Allow => "allows",
                Effect::Deny => "DENIES",
            };
            out.push_str(&format!(
                "  policy {:?} rule {} (path {:?}) {effect} {capability}\n",
                r.policy, r.rule, r.path
            ));
        }
        if !self.allowed && self.reasons.iter().any(|r| r.effect == Effect::Deny) {
            out.push_str("  a matching deny wins over every allow\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn set(docs: &[(&str, &str)]) -> Result<PolicySet, String> {
        let policies =
            docs.iter().map(|(name, text)| Policy::parse(name, text).map(Arc::new)).collect::<Result<_, _>>()?;
        Ok(PolicySet::new(false, policies))
    }

    #[test]
    fn star_is_one_segment_and_double_star_any_depth() -> Result<(), String> {
        let s = set(&[("p", "[[rule]]\npath = \"secret/app/*\"\nallow = [\"read\"]\n")])?;
        assert!(s.allows("secret/app/db", Capability::Read));
        assert!(!s.allows("secret/app/db/password", Capability::Read), "* is one segment");
        assert!(!s.allows("secret/app", Capability::Read), "* is exactly one segment, not zero");
        let s = set(&[("p", "[[rule]]\npath = \"secret/app/**\"\nallow = [\"read\"]\n")])?;
        assert!(s.allows("secret/app/db/password", Capability::Read));
        assert!(s.allows("secret/app", Capability::Read), "** takes zero segments too");
        assert!(!s.allows("secret/other/db", Capability::Read));
        let s = set(&[("p", "[[rule]]\npath = \"secret/**/db\"\nallow = [\"read\"]\n")])?;
        assert!(s.allows("secret/a/b/c/db", Capability::Read));
        assert!(s.allows("secret/db", Capability::Read));
        assert!(!s.allows("secret/a/b/c/dbx", Capability::Read));
        assert!(!s.allows("secret/a/db/c", Capability::Read));
        let s = set(&[("p", "[[rule]]\npath = \"secret/**/x/*/**/y\"\nallow = [\"read\"]\n")])?;
        assert!(s.allows("secret/x/m/y", Capability::Read));
        assert!(s.allows("secret/a/x/x/m/n/y", Capability::Read), "the walk backtracks into the first **");
        assert!(!s.allows("secret/a/x/y", Capability::Read), "* needs a segment between x and the rest");
        Ok(())
    }

    /// Many `**` against a long path: linear-ish, not exponential (a recursive matcher took
    /// C(n+k, k) steps here, a stalled worker).
    #[test]
    fn many_double_stars_against_a_long_path_finish() -> Result<(), String> {
        let rule = format!("secret/{}z", "**/a/".repeat(20));
        let s = set(&[("p", &format!("[[rule]]\npath = \"{rule}\"\nallow = [\"read\"]\n"))])?;
        let path = format!("secret/{}", "a/".repeat(250)) + "b";
        assert!(!s.allows(&path, Capability::Read));
        Ok(())
    }

    #[test]
    fn a_broad_deny_wins_over_a_narrower_allow_in_another_policy() -> Result<(), String> {
        let s = set(&[
            ("broad-deny", "[[rule]]\npath = \"secret/**\"\ndeny = [\"destroy\"]\n"),
            ("narrow-allow", "[[rule]]\npath = \"secret/app/db\"\nallow = [\"destroy\", \"read\"]\n"),
        ])?;
        assert!(!s.allows("secret/app/db", Capability::Destroy), "the deny wins");
        assert!(s.allows("secret/app/db", Capability::Read), "a deny of one capability leaves the others");
        let e = s.explain("secret/app/db", Capability::Destroy);
        assert!(!e.allowed);
        assert_eq!(e.reasons.len(), 2, "both rules are named: {e:?}");
        assert!(e.render("secret/app/db", Capability::Destroy).contains("deny wins"));
        Ok(())
    }

    #[test]
    fn nothing_matching_is_a_deny() -> Result<(), String> {
        let s = set(&[("p", "[[rule]]\npath = \"key/orders\"\nallow = [\"encrypt\"]\n")])?;
        assert!(s.allows("key/orders", Capability::Encrypt));
        assert!(!s.allows("key/orders", Capability::Decrypt), "encrypt does not grant decrypt");
        assert!(!s.allows("key/other", Capability::Encrypt));
        assert!(!PolicySet::default().allows("secret/a", Capability::Read), "no policies: deny");
        assert!(PolicySet::new(true, vec![]).allows("sys/operator/remove", Capability::Operator));
        Ok(())
    }

    #[test]
    fn json_and_toml_say_the_same() -> Result<(), String> {
        let json = set(&[("j", r#"{"rule": [{"path": "secret/*", "allow": ["list"]}]}"#)])?;
        let toml = set(&[("t", "[[rule]]\npath = \"secret/*\"\nallow = [\"list\"]\n")])?;
        for s in [json, toml] {
            assert!(s.allows("secret/x", Capability::List));
            assert!(!s.allows("secret/x", Capability::Read));
        }
        Ok(())
    }

    #[test]
    fn bad_documents_name_the_rule_they_break() -> Result<(), String> {
        let cases = [
            ("root", "[[rule]]\npath = \"secret/*\"\nallow = [\"read\"]\n", "built in"),
            ("p", "", "no rules"),
            ("p", "[[rule]]\npath = \"secret/*\"\nallow = [\"reed\"]\n", "not a capability"),
            ("p", "[[rule]]\npath = \"secret/a*\"\nallow = [\"read\"]\n", "stands alone"),
            ("p", "[[rule]]\npath = \"secrets/a\"\nallow = [\"read\"]\n", "start with secret/"),
            ("p", "[[rule]]\npath = \"key/a\"\nallow = [\"read\"]\n", "grants nothing under key/"),
            ("p", "[[rule]]\npath = \"secret//a\"\nallow = [\"read\"]\n", "empty segment"),
            ("p", "[[rule]]\npath = \"secret/a\"\n", "neither allow nor deny"),
            ("p", "[[rule]]\npath = \"secret/a\"\nallow = [\"read\"]\ncolour = 1\n", "unknown field"),
            ("bad name", "[[rule]]\npath = \"secret/a\"\nallow = [\"read\"]\n", "only A-Z"),
        ];
        for (name, text, want) in cases {
            match Policy::parse(name, text) {
                Ok(_) => return Err(format!("{text:?} was accepted")),
                Err(e) => assert!(e.contains(want), "{text:?}: {e:?} does not say {want:?}"),
            }
        }
        Ok(())
    }
}
