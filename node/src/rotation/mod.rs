//! Secret rotation: a secret's rotator and schedule (`Spec`), the leader's worker that runs
//! rotations step by step through the log (`worker`), the rotators themselves (`rotators`), the
//! use cases behind the API (`ops`), the Watch stream (`watch`) and the CLI (`cli`).
//!
//! The replicated state (`coffer_raft::RotationRecord`) keeps the spec as JSON text; this module
//! is the only one that reads it. Due times are computed here, by the proposer, so `apply` stays
//! free of clocks and cron.

pub mod cli;
pub mod ops;
pub mod rotators;
pub mod watch;
pub mod worker;

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// `PREVIOUS`'s grace when neither the secret's rotation nor the request sets one.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Each attempt at a step must end within this, unless the rotation says otherwise.
pub const DEFAULT_STEP_DEADLINE: Duration = Duration::from_secs(30);
/// Attempts per step before a rotation fails, unless the rotation says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// The shortest period between scheduled rotations.
pub const MIN_PERIOD: Duration = Duration::from_secs(1);

/// A secret's rotator and schedule, as stored (JSON) in its rotation record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// What makes and installs the new value.
    pub rotator: RotatorSpec,
    /// A period between rotations, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<u64>,
    /// Or a cron expression, in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// Due rotations start within this window, at a point chosen by path.
    #[serde(default)]
    pub window_ms: u64,
    /// Each attempt at a step must end within this.
    pub step_deadline_ms: u64,
    /// Attempts per step before the rotation fails.
    pub max_attempts: u32,
}

/// The rotators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RotatorSpec {
    /// A generated value.
    Generator {
        /// What to generate.
        kind: GeneratorKind,
        /// Password characters or bytes.
        length: u32,
        /// Password character classes.
        classes: Vec<CharClass>,
    },
    /// A PostgreSQL login: one user (its password changes) or two (they alternate).
    Postgres {
        /// The secret holding the admin login (a role with CREATEROLE).
        admin_secret: String,
        /// The user, or the two alternating users.
        users: Vec<String>,
    },
}

/// What a generator makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GeneratorKind {
    /// A password of printable ASCII.
    Password,
    /// Random bytes.
    Bytes,
    /// An Ed25519 key pair (JSON with the PKCS#8 private key and the public key, base64).
    Ed25519,
    /// An ECDSA P-256 key pair (the same JSON).
    P256,
}

/// A password character class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CharClass {
    /// a-z
    Lower,
    /// A-Z
    Upper,
    /// 0-9
    Digit,
    /// Punctuation that needs no quoting in a shell's single quotes or a URL's password part.
    Symbol,
}

impl CharClass {
    /// The characters of the class.
    pub fn chars(self) -> &'static [u8] {
        match self {
            CharClass::Lower => b"abcdefghijklmnopqrstuvwxyz",
            CharClass::Upper => b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            CharClass::Digit => b"0123456789",
            CharClass::Symbol => b"-_.~!*+=^",
        }
    }

    fn parse(name: &str) -> Result<CharClass, Error> {
        match name {
            "lower" => Ok(CharClass::Lower),
            "upper" => Ok(CharClass::Upper),
            "digit" => Ok(CharClass::Digit),
            "symbol" => Ok(CharClass::Symbol),
            other => {
                Err(invalid(format!("password character class {other:?} is not one of: lower, upper, digit, symbol")))
            }
        }
    }
}

fn invalid(rule: String) -> Error {
    Error::InvalidArgument { rule }
}

fn ms(d: Option<&prost_types::Duration>, what: &str) -> Result<Option<u64>, Error> {
    let Some(d) = d else { return Ok(None) };
    crate::wire::duration(what, *d).map(|d| Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

/// A PostgreSQL role name Coffer manages: quoted in statements, so limited to what needs no
/// escaping.
fn check_role(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "PostgreSQL user {name:?} must be 1 to 63 letters, digits and underscores, not starting with a digit"
        )))
    }
}

impl Spec {
    /// Reads the API's config: fills defaults and checks every rule. Returns the spec and the
    /// grace of `PREVIOUS` in milliseconds.
    ///
    /// # Errors
    /// `InvalidArgument` naming the rule broken.
    pub fn from_config(config: &coffer_proto::v1::RotationConfig) -> Result<(Spec, u64), Error> {
        use coffer_proto::v1::rotation_config::Rotator;
        let rotator = match &config.rotator {
            None => return Err(invalid("a rotation needs a rotator: generator or postgres".into())),
            Some(Rotator::Generator(g)) => {
                let kind = match g.kind.as_str() {
                    "" | "password" => GeneratorKind::Password,
                    "bytes" => GeneratorKind::Bytes,
                    "ed25519" => GeneratorKind::Ed25519,
                    "p256" => GeneratorKind::P256,
                    other => {
                        return Err(invalid(format!(
                            "generator kind {other:?} is not one of: password, bytes, ed25519, p256"
                        )))
                    }
                };
                let length = if g.length == 0 { 32 } else { g.length };
                if matches!(kind, GeneratorKind::Password | GeneratorKind::Bytes) && !(8..=1024).contains(&length) {
                    return Err(invalid(format!("generator length {length} must be from 8 to 1024")));
                }
                let mut classes = g.classes.iter().map(|c| CharClass::parse(c)).collect::<Result<Vec<_>, _>>()?;
                if classes.is_empty() {
                    classes = vec![CharClass::Lower, CharClass::Upper, CharClass::Digit, CharClass::Symbol];
                }
                classes.dedup();
                if kind == GeneratorKind::Password && classes.len() > length as usize {
                    return Err(invalid(format!(
                        "a password of {length} characters cannot hold {} classes",
                        classes.len()
                    )));
                }
                RotatorSpec::Generator { kind, length, classes }
            }
            Some(Rotator::Postgres(p)) => {
                coffer_raft::SecretPath::parse(&p.admin_secret)
                    .map_err(|e| invalid(format!("postgres admin_secret: {e}")))?;
                if !(1..=2).contains(&p.users.len()) {
                    return Err(invalid(format!(
                        "postgres users: give one user (its password changes) or two (they alternate), not {}",
                        p.users.len()
                    )));
                }
                for user in &p.users {
                    check_role(user)?;
                }
                if p.users.len() == 2 && p.users[0] == p.users[1] {
                    return Err(invalid("postgres users: two alternating users must differ".into()));
                }
                RotatorSpec::Postgres { admin_secret: p.admin_secret.clone(), users: p.users.clone() }
            }
        };
        let every_ms = ms(config.every.as_ref(), "every")?.filter(|v| *v > 0);
        let cron = (!config.cron.trim().is_empty()).then(|| config.cron.trim().to_owned());
        if every_ms.is_some() && cron.is_some() {
            return Err(invalid("give a period (every) or a cron expression, not both".into()));
        }
        if let Some(every) = every_ms {
            if every < MIN_PERIOD.as_millis() as u64 {
                return Err(invalid(format!("every {every}ms is shorter than the minimum of 1s")));
            }
        }
        if let Some(expr) = &cron {
            parse_cron(expr)?;
        }
        let grace_ms = ms(config.grace.as_ref(), "grace")?.unwrap_or(DEFAULT_GRACE.as_millis() as u64);
        let spec = Spec {
            rotator,
            every_ms,
            cron,
            window_ms: ms(config.window.as_ref(), "window")?.unwrap_or(0),
            step_deadline_ms: ms(config.step_deadline.as_ref(), "step_deadline")?
                .filter(|v| *v > 0)
                .unwrap_or(DEFAULT_STEP_DEADLINE.as_millis() as u64),
            max_attempts: if config.max_attempts == 0 { DEFAULT_MAX_ATTEMPTS } else { config.max_attempts.min(100) },
        };
        Ok((spec, grace_ms))
    }

    /// Reads a stored spec.
    ///
    /// # Errors
    /// The text is not a spec this version understands.
    pub fn parse(text: &str) -> Result<Spec, String> {
        serde_json::from_str(text).map_err(|e| format!("the stored rotation spec cannot be read: {e}"))
    }

    /// The spec as stored.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether the rotator alternates two users (a rotation then must not start while
    /// `PREVIOUS` is within its grace: it would change the password its holders use).
    pub fn alternates(&self) -> bool {
        matches!(&self.rotator, RotatorSpec::Postgres { users, .. } if users.len() == 2)
    }

    /// When the next scheduled rotation of `path` is due, counting from `after_ms`; `None`
    /// without a schedule. The due time is spread over the window by a hash of the path, so
    /// many secrets on one schedule do not all start in the same second.
    pub fn next_due(&self, path: &str, after_ms: u64) -> Option<u64> {
        let base = if let Some(every) = self.every_ms {
            after_ms.saturating_add(every)
        } else {
            let cron = parse_cron(self.cron.as_deref()?).ok()?;
            let after = chrono::DateTime::from_timestamp_millis(i64::try_from(after_ms).ok()?)?;
            let next = cron.find_next_occurrence(&after, false).ok()?;
            u64::try_from(next.timestamp_millis()).ok()?
        };
        Some(base.saturating_add(spread(path, self.window_ms)))
    }

    /// The rotator, in words.
    pub fn describe(&self) -> String {
        let schedule = match (&self.every_ms, &self.cron) {
            (Some(every), _) => format!(", every {}", humantime::format_duration(Duration::from_millis(*every))),
            (None, Some(cron)) => format!(", cron \"{cron}\" UTC"),
            (None, None) => String::new(),
        };
        let rotator = match &self.rotator {
            RotatorSpec::Generator { kind, length, .. } => match kind {
                GeneratorKind::Password => format!("generator: password of {length}"),
                GeneratorKind::Bytes => format!("generator: {length} random bytes"),
                GeneratorKind::Ed25519 => "generator: Ed25519 key pair".to_owned(),
                GeneratorKind::P256 => "generator: P-256 key pair".to_owned(),
            },
            RotatorSpec::Postgres { users, .. } if users.len() == 2 => {
                format!("postgres: alternating users {} and {}", users[0], users[1])
            }
            RotatorSpec::Postgres { users, .. } => format!("postgres: single user {}", users.join("")),
        };
        format!("{rotator}{schedule}")
    }
}

fn parse_cron(expr: &str) -> Result<croner::Cron, Error> {
    croner::Cron::from_str(expr).map_err(|e| invalid(format!("cron expression {expr:?}: {e}")))
}

/// A point in `[0, window_ms)` chosen by `path` (FNV-1a): the same on every leader.
pub fn spread(path: &str, window_ms: u64) -> u64 {
    if window_ms == 0 {
        return 0;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash % window_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use coffer_proto::v1::rotation_config::Rotator;
    use coffer_proto::v1::{GeneratorRotator, PostgresRotator, RotationConfig};

    fn config(rotator: Rotator) -> RotationConfig {
        RotationConfig { rotator: Some(rotator), ..Default::default() }
    }

    #[test]
    fn configs_are_checked_and_defaulted() {
        let (spec, grace) =
            Spec::from_config(&config(Rotator::Generator(GeneratorRotator::default()))).expect("defaults");
        assert_eq!(grace, DEFAULT_GRACE.as_millis() as u64);
        assert!(matches!(spec.rotator, RotatorSpec::Generator { kind: GeneratorKind::Password, length: 32, .. }));
        assert_eq!(Spec::parse(&spec.to_text()).expect("round trip"), spec);
        let bad = [
            config(Rotator::Generator(GeneratorRotator { kind: "rsa".into(), ..Default::default() })),
            config(Rotator::Generator(GeneratorRotator { length: 4, ..Default::default() })),
            config(Rotator::Postgres(PostgresRotator { admin_secret: "db/admin".into(), users: vec![] })),
            config(Rotator::Postgres(PostgresRotator { admin_secret: "db/admin".into(), users: vec!["a\"b".into()] })),
            config(Rotator::Postgres(PostgresRotator {
                admin_secret: "db/admin".into(),
                users: vec!["a".into(), "a".into()],
            })),
            RotationConfig { cron: "not a cron".into(), ..config(Rotator::Generator(GeneratorRotator::default())) },
            RotationConfig::default(),
        ];
        for c in bad {
            assert!(matches!(Spec::from_config(&c), Err(Error::InvalidArgument { .. })), "{c:?} is refused");
        }
    }

    #[test]
    fn due_times_follow_the_schedule_and_spread_over_the_window() {
        let mut spec = Spec::from_config(&RotationConfig {
            cron: "0 0 * * *".into(),
            ..config(Rotator::Generator(GeneratorRotator::default()))
        })
        .expect("a cron spec")
        .0;
        // 2026-12-03T21:00:00Z → the next midnight UTC.
        let after = 1_796_331_600_000;
        assert_eq!(spec.next_due("a", after), Some(1_796_342_400_000));
        spec.window_ms = 3_600_000;
        let starts: std::collections::BTreeSet<u64> =
            (0..1000).filter_map(|i| spec.next_due(&format!("db/{i}"), after)).collect();
        assert!(starts.len() > 900, "a thousand secrets start at {} distinct times", starts.len());
        assert!(starts.iter().all(|t| (1_796_342_400_000..1_796_346_000_000).contains(t)));
        spec.cron = None;
        spec.every_ms = Some(60_000);
        spec.window_ms = 0;
        assert_eq!(spec.next_due("a", 1000), Some(61_000));
    }
}
