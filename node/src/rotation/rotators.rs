//! The rotators: what each step does for each kind of secret. Every step is idempotent (a new
//! leader may run a step again after the old one ran it and died before recording it), and
//! every error is a sentence that names what failed, never a value.
//!
//! | step | generator | postgres, one user | postgres, two users |
//! |---|---|---|---|
//! | create | a new random value | CURRENT's login, new password | the other user's login, new password |
//! | set | nothing | `ALTER ROLE user PASSWORD` | `ALTER ROLE other PASSWORD … VALID UNTIL 'infinity'` |
//! | test | the value parses | log in with it | log in with it |
//! | finish | nothing | nothing | `ALTER ROLE old VALID UNTIL now + grace` (grace > 0) |
//!
//! Passwords reach PostgreSQL as SCRAM-SHA-256 verifiers computed here, so the server's logs and
//! `pg_stat_activity` never see one in clear. The admin role needs `CREATEROLE`, not superuser
//! (PostgreSQL 15 lets it change the passwords of non-superuser roles).

use std::time::Duration;

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{CharClass, GeneratorKind, RotatorSpec};

/// How long a connection to PostgreSQL may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL login, as a secret's value holds it (JSON).
#[derive(Clone, Serialize, Deserialize)]
pub struct Login {
    /// Host name or address (or a Unix socket directory).
    pub host: String,
    /// Port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Database.
    #[serde(default = "default_dbname")]
    pub dbname: String,
    /// Role.
    pub username: String,
    /// Password.
    pub password: String,
}

fn default_port() -> u16 {
    5432
}

fn default_dbname() -> String {
    "postgres".into()
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Login {
    /// Reads a login from a secret's value.
    ///
    /// # Errors
    /// The value is not the JSON a PostgreSQL secret holds.
    pub fn parse(value: &[u8], what: &str) -> Result<Login, String> {
        serde_json::from_slice(value).map_err(|e| {
            format!(
                "{what} is not a PostgreSQL login: expected JSON {{\"host\", \"port\", \"dbname\", \"username\", \"password\"}} ({})",
                e.classify_name()
            )
        })
    }

    fn to_value(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Opens a connection; the connection's task ends when the client is dropped.
    async fn connect(&self) -> Result<tokio_postgres::Client, String> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .dbname(&self.dbname)
            .user(&self.username)
            .password(self.password.as_bytes())
            .application_name("coffer-rotation")
            .connect_timeout(CONNECT_TIMEOUT);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.map_err(|e| {
            format!("cannot log in to PostgreSQL at {}:{} as {}: {}", self.host, self.port, self.username, pg_error(&e))
        })?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "a field is missing or of the wrong type",
            serde_json::error::Category::Eof => "cut short",
        }
    }
}

/// A PostgreSQL error in words: the server's message when there is one.
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            if let Some(source) = std::error::Error::source(e) {
                text = format!("{text}: {source}");
            }
            text
        }
    }
}

fn random(bytes: &mut [u8]) -> Result<(), String> {
    SystemRandom::new().fill(bytes).map_err(|_| "the system random source failed".to_owned())
}

/// A password of `length` characters from `classes`, each class at least once, uniform
/// otherwise (rejection sampling: no modulo bias).
pub fn password(length: u32, classes: &[CharClass]) -> Result<Zeroizing<String>, String> {
    let alphabet: Vec<u8> = classes.iter().flat_map(|c| c.chars().iter().copied()).collect();
    let limit = 256 - (256 % alphabet.len());
    for _ in 0..1000 {
        let mut out = Zeroizing::new(String::with_capacity(length as usize));
        while out.len() < length as usize {
            let mut byte = [0u8; 1];
            random(&mut byte)?;
            if usize::from(byte[0]) < limit {
                out.push(char::from(alphabet[usize::from(byte[0]) % alphabet.len()]));
            }
        }
        if classes.iter().all(|c| out.bytes().any(|b| c.chars().contains(&b))) {
            return Ok(out);
        }
    }
    Err("could not draw a password holding every character class".into())
}

fn key_pair_value(kind: GeneratorKind) -> Result<Zeroizing<Vec<u8>>, String> {
    use ring::signature::KeyPair;
    let rng = SystemRandom::new();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (name, pkcs8, public) = match kind {
        GeneratorKind::Ed25519 => {
            let doc =
                ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "Ed25519 key generation failed")?;
            let pair =
                ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| "Ed25519 key unreadable")?;
            ("ed25519", Zeroizing::new(doc.as_ref().to_vec()), pair.public_key().as_ref().to_vec())
        }
        _ => {
            let alg = &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING;
            let doc =
                ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| "P-256 key generation failed")?;
            let pair = ring::signature::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng)
                .map_err(|_| "P-256 key unreadable")?;
            ("p256", Zeroizing::new(doc.as_ref().to_vec()), pair.public_key().as_ref().to_vec())
        }
    };
    let value = serde_json::json!({
        "algorithm": name,
        "private_key_pkcs8": b64(&pkcs8),
        "public_key": b64(&public),
    });
    Ok(Zeroizing::new(serde_json::to_vec(&value).unwrap_or_default()))
}

/// What a step needs: the secret's current value, and the admin login (postgres).
pub struct Inputs {
    /// `CURRENT`'s value, if there is one.
    pub current: Option<Zeroizing<Vec<u8>>>,
    /// The admin login (postgres rotators only).
    pub admin: Option<Login>,
}

/// The create step: the new value.
///
/// # Errors
/// A sentence naming what is wrong (a current value that is not a login, say).
pub fn create(spec: &RotatorSpec, inputs: &Inputs) -> Result<Zeroizing<Vec<u8>>, String> {
    match spec {
        RotatorSpec::Generator { kind, length, classes } => match kind {
            GeneratorKind::Password => Ok(Zeroizing::new(password(*length, classes)?.as_bytes().to_vec())),
            GeneratorKind::Bytes => {
                let mut bytes = Zeroizing::new(vec![0u8; *length as usize]);
                random(&mut bytes)?;
                Ok(bytes)
            }
            GeneratorKind::Ed25519 | GeneratorKind::P256 => key_pair_value(*kind),
        },
        RotatorSpec::Postgres { users, .. } => {
            let current = inputs.current.as_ref().ok_or_else(|| {
                "a PostgreSQL secret needs a CURRENT version to rotate from (put the login JSON first)".to_owned()
            })?;
            let mut login = Login::parse(current, "CURRENT")?;
            login.username = match users.as_slice() {
                [one] => one.clone(),
                [a, b] if login.username == *a => b.clone(),
                [a, b] if login.username == *b => a.clone(),
                [a, b] => {
                    return Err(format!(
                        "CURRENT's username {} is neither of the rotation's users {a} and {b}",
                        login.username
                    ))
                }
                _ => return Err("a postgres rotation has one or two users".into()),
            };
            login.password = password(32, &[CharClass::Lower, CharClass::Upper, CharClass::Digit])?.as_str().to_owned();
            Ok(login.to_value())
        }
    }
}

fn admin(inputs: &Inputs) -> Result<&Login, String> {
    inputs.admin.as_ref().ok_or_else(|| "the postgres rotator's admin login was not read".to_owned())
}

/// The set step: installs `pending` where it is used.
///
/// # Errors
/// A sentence naming what failed.
pub async fn set(spec: &RotatorSpec, inputs: &Inputs, pending: &[u8]) -> Result<(), String> {
    match spec {
        RotatorSpec::Generator { .. } => Ok(()),
        RotatorSpec::Postgres { .. } => {
            let login = Login::parse(pending, "PENDING")?;
            let verifier = postgres_protocol::password::scram_sha_256(login.password.as_bytes());
            let client = admin(inputs)?.connect().await?;
            let statement =
                format!("ALTER ROLE \"{}\" WITH LOGIN PASSWORD '{verifier}' VALID UNTIL 'infinity'", login.username);
            client.simple_query(&statement).await.map_err(|e| {
                format!("ALTER ROLE {} (setting its new password) failed: {}", login.username, pg_error(&e))
            })?;
            Ok(())
        }
    }
}

/// The test step: checks that `pending` works.
///
/// # Errors
/// A sentence naming what failed.
pub async fn test(spec: &RotatorSpec, pending: &[u8]) -> Result<(), String> {
    match spec {
        RotatorSpec::Generator { kind: GeneratorKind::Ed25519 | GeneratorKind::P256, .. } => {
            serde_json::from_slice::<serde_json::Value>(pending)
                .map(|_| ())
                .map_err(|_| "the PENDING key pair is not JSON".to_owned())
        }
        RotatorSpec::Generator { .. } => Ok(()),
        RotatorSpec::Postgres { .. } => {
            let login = Login::parse(pending, "PENDING")?;
            let client = login.connect().await?;
            client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| format!("SELECT 1 as {} failed: {}", login.username, pg_error(&e)))?;
            Ok(())
        }
    }
}

/// The finish step's work before the labels move: with two users, the old one's password
/// expires when `PREVIOUS`'s grace ends (`until_ms`; `None`: it stays until the next rotation).
///
/// # Errors
/// A sentence naming what failed.
pub async fn finish(spec: &RotatorSpec, inputs: &Inputs, pending: &[u8], until_ms: Option<u64>) -> Result<(), String> {
    let RotatorSpec::Postgres { users, .. } = spec else { return Ok(()) };
    let (Some(until_ms), Some(current), 2) = (until_ms, &inputs.current, users.len()) else { return Ok(()) };
    let old = Login::parse(current, "CURRENT")?;
    let new = Login::parse(pending, "PENDING")?;
    if old.username == new.username {
        return Ok(());
    }
    let until = chrono::DateTime::from_timestamp_millis(i64::try_from(until_ms).unwrap_or(i64::MAX))
        .ok_or("the grace period ends past the calendar")?
        .format("%Y-%m-%d %H:%M:%S%.3f+00");
    let client = admin(inputs)?.connect().await?;
    client
        .simple_query(&format!("ALTER ROLE \"{}\" VALID UNTIL '{until}'", old.username))
        .await
        .map_err(|e| format!("ALTER ROLE {} (ending its grace) failed: {}", old.username, pg_error(&e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hold_every_class_and_only_their_characters() {
        let classes = [CharClass::Digit, CharClass::Symbol];
        for _ in 0..50 {
            let p = password(8, &classes).expect("a password");
            assert_eq!(p.len(), 8);
            assert!(p.bytes().any(|b| b.is_ascii_digit()) && p.bytes().any(|b| CharClass::Symbol.chars().contains(&b)));
            assert!(p.bytes().all(|b| b.is_ascii_digit() || CharClass::Symbol.chars().contains(&b)), "{}", *p);
        }
        assert_ne!(*password(32, &classes).expect("one"), *password(32, &classes).expect("two"));
    }

    #[test]
    fn alternating_users_take_turns_and_a_stranger_is_refused() {
        let spec =
            RotatorSpec::Postgres { admin_secret: "db/admin".into(), users: vec!["app_a".into(), "app_b".into()] };
        let login = |user: &str| Login {
            host: "127.0.0.1".into(),
            port: 5432,
            dbname: "postgres".into(),
            username: user.into(),
            password: "old".into(),
        };
        let inputs = |user: &str| Inputs { current: Some(login(user).to_value()), admin: None };
        let next = create(&spec, &inputs("app_a")).expect("a login");
        let next = Login::parse(&next, "new").expect("JSON");
        assert_eq!(next.username, "app_b");
        assert_ne!(next.password, "old");
        let back = Login::parse(&create(&spec, &inputs("app_b")).expect("a login"), "new").expect("JSON");
        assert_eq!(back.username, "app_a");
        let err = create(&spec, &inputs("mallory")).expect_err("not one of ours");
        assert!(err.contains("neither"), "{err}");
        let err = create(&spec, &Inputs { current: None, admin: None }).expect_err("nothing to rotate from");
        assert!(err.contains("CURRENT"), "{err}");
        assert!(!format!("{:?}", login("x")).contains("old"), "Debug never shows the password");
    }

    #[test]
    fn key_pairs_are_fresh_pkcs8() {
        for kind in [GeneratorKind::Ed25519, GeneratorKind::P256] {
            let spec = RotatorSpec::Generator { kind, length: 0, classes: vec![] };
            let value = create(&spec, &Inputs { current: None, admin: None }).expect("a pair");
            let json: serde_json::Value = serde_json::from_slice(&value).expect("JSON");
            let pkcs8 = base64::engine::general_purpose::STANDARD
                .decode(json["private_key_pkcs8"].as_str().expect("a key"))
                .expect("base64");
            match kind {
                GeneratorKind::Ed25519 => assert!(ring::signature::Ed25519KeyPair::from_pkcs8(&pkcs8).is_ok()),
                _ => assert!(ring::signature::EcdsaKeyPair::from_pkcs8(
                    &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                    &pkcs8,
                    &SystemRandom::new()
                )
                .is_ok()),
            }
        }
    }
}
