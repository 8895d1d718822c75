// Hot path: every Keys crypto call.
//! Named keys in memory: generating material, wrapping it for the replicated state, and the
//! node-local cache of unwrapped versions that crypto calls are answered from.
//!
//! # Correctness
//! - Material leaves this module only wrapped by a keyring key, with associated data naming the key
//!   and version, so wrapped material moved to another key or version fails to unwrap.
//! - The cache is keyed by name and checked against the record's `generation`: a rotation, a config
//!   change or a deletion applied on this node is seen by the next call. The record is read from
//!   the local state on every call (a RocksDB point read), not from Raft.
//! - AES-GCM nonces per key version: [`NonceCounter`] (random start, +1 per seal).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use base64::Engine;
use coffer_raft::{KeyVersion, KeyVersionRecord, NamedKeyRecord, NamedKeyType, UnixMillis};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
    ED25519,
};
use ring::{hmac, rand};
use zeroize::Zeroizing;

use crate::envelope::{EnvelopeError, Keyring, NonceCounter};
use crate::error::Error;

const WRAP_DOMAIN: &[u8] = b"coffer/named-key/v1\0";
const ENCRYPT_DOMAIN: &[u8] = b"coffer/encrypt/v1\0";
/// The first byte inside a ciphertext's base64: the ciphertext format.
const CIPHERTEXT_FORMAT: u8 = 1;
const TAG_LEN: usize = 16;

/// Unwrapped material of one key version. Sizes differ (an AES key schedule is ~500 bytes), but
/// there is one per cached key version, so boxing would only add an indirection to the hot path.
#[allow(clippy::large_enum_variant)]
enum Material {
    Aes { key: LessSafeKey, nonces: NonceCounter },
    Hmac(hmac::Key),
    Ed25519(Ed25519KeyPair),
    Ecdsa(EcdsaKeyPair),
}

/// Usage of one key version: on one node, or summed over the cluster.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Encrypts, signatures and HMACs.
    pub encrypts: u64,
    /// Decrypts, verifications and HMAC checks.
    pub decrypts: u64,
    /// Latest use, milliseconds since the Unix epoch; 0: never.
    pub last_used_ms: u64,
}

/// How much one key version has been used on this node since it started.
#[derive(Debug, Default)]
pub struct VersionUsage {
    /// Encrypts, signatures and HMACs made.
    pub encrypts: AtomicU64,
    /// Decrypts, verifications and HMAC checks made.
    pub decrypts: AtomicU64,
    /// Last use, milliseconds since the Unix epoch; 0: never.
    pub last_used_ms: AtomicU64,
}

impl VersionUsage {
    fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms.fetch_max(crate::node::now_ms(), Ordering::Relaxed);
    }
}

/// A named key with every version this node may use, unwrapped.
pub struct LoadedKey {
    /// The record the versions were unwrapped from.
    pub record: NamedKeyRecord,
    versions: BTreeMap<KeyVersion, Material>,
    /// Per-version usage; carried over when the key is reloaded after a change.
    usage: BTreeMap<KeyVersion, Arc<VersionUsage>>,
}

/// The node's cache of unwrapped named keys.
pub struct KeyCache {
    /// A std `RwLock`: held only to look up or insert an `Arc`, never across an `.await`.
    entries: RwLock<HashMap<String, Arc<LoadedKey>>>,
    max_entries: usize,
    rng: SystemRandom,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache").field("max_entries", &self.max_entries).finish_non_exhaustive()
    }
}

/// What an operation with a named key produced, and the key version that produced it.
pub struct Versioned<T> {
    /// The output (a ciphertext, signature or tag as text, or a plaintext).
    pub value: T,
    /// The key version used.
    pub key_version: KeyVersion,
}

/// Which usage counter an operation counts in.
#[derive(Debug, Clone, Copy)]
enum Use {
    /// Encrypt, sign, compute an HMAC: the primary version.
    Produce,
    /// Decrypt, verify: any version from `min_decryption_version` on.
    Check,
}

fn wrap_aad(name: &str, version: KeyVersion) -> Vec<u8> {
    let mut aad = WRAP_DOMAIN.to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.0.to_be_bytes());
    aad
}

fn encrypt_aad(name: &str, version: KeyVersion, associated_data: &[u8]) -> Vec<u8> {
    let mut aad = ENCRYPT_DOMAIN.to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.0.to_be_bytes());
    aad.extend_from_slice(associated_data);
    aad
}

fn random_error(_: ring::error::Unspecified) -> Error {
    Error::Envelope(EnvelopeError::Random)
}

/// New key material for a version: the secret bytes to wrap, and the public key of a signing key.
///
/// # Errors
/// A failing random source.
pub fn generate(key_type: NamedKeyType, rng: &dyn SecureRandom) -> Result<(Zeroizing<Vec<u8>>, Vec<u8>), Error> {
    match key_type {
        NamedKeyType::Aes256Gcm | NamedKeyType::HmacSha256 => {
            let mut bytes = Zeroizing::new(vec![0u8; 32]);
            rng.fill(&mut bytes).map_err(random_error)?;
            Ok((bytes, Vec::new()))
        }
        NamedKeyType::Ed25519 => {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(rng).map_err(random_error)?;
            let pair =
                Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| Error::Envelope(EnvelopeError::Integrity))?;
            Ok((Zeroizing::new(pkcs8.as_ref().to_vec()), pair.public_key().as_ref().to_vec()))
        }
        NamedKeyType::EcdsaP256 => {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng).map_err(random_error)?;
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng)
                .map_err(|_| Error::Envelope(EnvelopeError::Integrity))?;
            Ok((Zeroizing::new(pkcs8.as_ref().to_vec()), pair.public_key().as_ref().to_vec()))
        }
    }
}

/// Generates and wraps a new version of a named key.
///
/// # Errors
/// A failing random source or keyring.
pub fn new_version(
    keyring: &Keyring,
    name: &str,
    version: KeyVersion,
    key_type: NamedKeyType,
    at_ms: UnixMillis,
) -> Result<KeyVersionRecord, Error> {
    let (secret, public_key) = generate(key_type, &SystemRandom::new())?;
    let (keyring_version, wrapped) = keyring.wrap(&wrap_aad(name, version), &secret)?;
    Ok(KeyVersionRecord { created_at_ms: at_ms, keyring_version, wrapped, public_key })
}

/// Unwraps one stored version's material (operators' tools and tests; requests use [`KeyCache`]).
///
/// # Errors
/// The wrapped material fails to open (altered, moved, or another keyring).
pub fn unwrap_version(
    keyring: &Keyring,
    name: &str,
    version: KeyVersion,
    record: &KeyVersionRecord,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    Ok(keyring.unwrap(record.keyring_version, &wrap_aad(name, version), &record.wrapped)?)
}

fn load_material(key_type: NamedKeyType, bytes: &[u8], rng: &SystemRandom) -> Result<Material, Error> {
    let bad = || Error::Envelope(EnvelopeError::Integrity);
    Ok(match key_type {
        NamedKeyType::Aes256Gcm => Material::Aes {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| bad())?),
            nonces: NonceCounter::random(rng)?,
        },
        NamedKeyType::HmacSha256 => Material::Hmac(hmac::Key::new(hmac::HMAC_SHA256, bytes)),
        NamedKeyType::Ed25519 => Material::Ed25519(Ed25519KeyPair::from_pkcs8(bytes).map_err(|_| bad())?),
        NamedKeyType::EcdsaP256 => {
            Material::Ecdsa(EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, bytes, rng).map_err(|_| bad())?)
        }
    })
}

/// `coffer:v<N>:<base64>`.
fn text(version: KeyVersion, bytes: &[u8]) -> String {
    format!("coffer:v{version}:{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Parses `coffer:v<N>:<base64>` into the version and the bytes.
fn parse_text(what: &str, value: &str) -> Result<(KeyVersion, Vec<u8>), Error> {
    let bad = || Error::InvalidArgument { rule: format!("the {what} is not of the form coffer:v<N>:<base64>") };
    let rest = value.strip_prefix("coffer:v").ok_or_else(bad)?;
    let (version, body) = rest.split_once(':').ok_or_else(bad)?;
    let version = KeyVersion(version.parse().map_err(|_| bad())?);
    let bytes = base64::engine::general_purpose::STANDARD.decode(body).map_err(|_| bad())?;
    Ok((version, bytes))
}

impl KeyCache {
    /// An empty cache holding at most `max_entries` keys.
    pub fn new(max_entries: usize) -> Self {
        KeyCache {
            entries: RwLock::new(HashMap::new()),
            max_entries: max_entries.max(1),
            rng: rand::SystemRandom::new(),
        }
    }

    /// The loaded form of `record`: from the cache when its generation matches, else unwrapped
    /// now (every version at or above `min_decryption_version`).
    ///
    /// # Errors
    /// A wrapped version that fails to unwrap.
    pub fn load(&self, keyring: &Keyring, name: &str, record: NamedKeyRecord) -> Result<Arc<LoadedKey>, Error> {
        let cached = self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned();
        let same_key = cached.filter(|c| c.record.created_at_ms == record.created_at_ms);
        if let Some(loaded) = &same_key {
            if loaded.record.generation == record.generation {
                return Ok(loaded.clone());
            }
        }
        let mut versions = BTreeMap::new();
        let mut usage = BTreeMap::new();
        for (version, v) in record.versions.range(record.min_decryption_version..) {
            let secret = keyring.unwrap(v.keyring_version, &wrap_aad(name, *version), &v.wrapped)?;
            versions.insert(*version, load_material(record.key_type, &secret, &self.rng)?);
            let counters = same_key.as_ref().and_then(|c| c.usage.get(version).cloned()).unwrap_or_default();
            usage.insert(*version, counters);
        }
        let loaded = Arc::new(LoadedKey { record, versions, usage });
        let mut entries = self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= self.max_entries && !entries.contains_key(name) {
            // Bounded: start over rather than track recency; reloading costs one unwrap per version.
            entries.clear();
        }
        entries.insert(name.to_owned(), loaded.clone());
        Ok(loaded)
    }

    /// This node's usage of a key's versions, by version.
    pub fn usage(&self, name: &str) -> Vec<(KeyVersion, Usage)> {
        let entries = self.entries.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(loaded) = entries.get(name) else { return Vec::new() };
        loaded
            .usage
            .iter()
            .map(|(v, u)| {
                let usage = Usage {
                    encrypts: u.encrypts.load(Ordering::Relaxed),
                    decrypts: u.decrypts.load(Ordering::Relaxed),
                    last_used_ms: u.last_used_ms.load(Ordering::Relaxed),
                };
                (*v, usage)
            })
            .collect()
    }

    /// Drops a key from the cache (it was deleted).
    pub fn forget(&self, name: &str) {
        self.entries.write().unwrap_or_else(std::sync::PoisonError::into_inner).remove(name);
    }

    /// A random data key of `bytes` bytes.
    ///
    /// # Errors
    /// A failing random source.
    pub fn random_bytes(&self, bytes: usize) -> Result<Zeroizing<Vec<u8>>, Error> {
        let mut out = Zeroizing::new(vec![0u8; bytes]);
        self.rng.fill(&mut out).map_err(random_error)?;
        Ok(out)
    }
}

impl LoadedKey {
    fn wrong_type(&self, name: &str, operation: &str) -> Error {
        Error::InvalidArgument { rule: format!("key {name} is {:?}; it cannot {operation}", self.record.key_type) }
    }

    fn used(&self, version: KeyVersion, usage: Use) {
        if let Some(u) = self.usage.get(&version) {
            u.count(match usage {
                Use::Produce => &u.encrypts,
                Use::Check => &u.decrypts,
            });
        }
    }

    fn version_for_use(&self, name: &str, version: KeyVersion) -> Result<&Material, Error> {
        if version < self.record.min_decryption_version {
            return Err(Error::KeyVersionRetired {
                name: name.to_owned(),
                version,
                min: self.record.min_decryption_version,
            });
        }
        self.versions.get(&version).ok_or_else(|| Error::KeyVersionNotFound { name: name.to_owned(), version })
    }

    /// Encrypts under the primary version.
    ///
    /// # Errors
    /// Not an AES key; an exhausted nonce counter.
    pub fn encrypt(&self, name: &str, plaintext: &[u8], associated_data: &[u8]) -> Result<Versioned<String>, Error> {
        let version = self.record.primary();
        let Some(Material::Aes { key, nonces }) = self.versions.get(&version) else {
            return Err(self.wrong_type(name, "encrypt"));
        };
        let nonce = nonces.next(|| format!("version {version} of key {name}"))?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
        out.push(CIPHERTEXT_FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let aad = encrypt_aad(name, version, associated_data);
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut out[1 + NONCE_LEN..])
            .map_err(|_| Error::Envelope(EnvelopeError::Integrity))?;
        out.extend_from_slice(tag.as_ref());
        self.used(version, Use::Produce);
        Ok(Versioned { value: text(version, &out), key_version: version })
    }

    /// Decrypts a ciphertext made by [`LoadedKey::encrypt`] with the same associated data.
    ///
    /// # Errors
    /// Malformed text (`InvalidArgument`), a retired version (`KeyVersionRetired`), or a failed
    /// authentication (`CiphertextInvalid`).
    pub fn decrypt(
        &self,
        name: &str,
        ciphertext: &str,
        associated_data: &[u8],
    ) -> Result<Versioned<Zeroizing<Vec<u8>>>, Error> {
        let (version, bytes) = parse_text("ciphertext", ciphertext)?;
        let Material::Aes { key, .. } = self.version_for_use(name, version)? else {
            return Err(self.wrong_type(name, "decrypt"));
        };
        let invalid = || Error::CiphertextInvalid { name: name.to_owned() };
        if bytes.len() < 1 + NONCE_LEN + TAG_LEN || bytes[0] != CIPHERTEXT_FORMAT {
            return Err(invalid());
        }
        let nonce = Nonce::try_assume_unique_for_key(&bytes[1..1 + NONCE_LEN]).map_err(|_| invalid())?;
        let mut plain = Zeroizing::new(bytes[1 + NONCE_LEN..].to_vec());
        let aad = encrypt_aad(name, version, associated_data);
        let len = key.open_in_place(nonce, Aad::from(&aad), &mut plain).map_err(|_| invalid())?.len();
        plain.truncate(len);
        self.used(version, Use::Check);
        Ok(Versioned { value: plain, key_version: version })
    }

    /// Signs with the primary version.
    ///
    /// # Errors
    /// Not a signing key.
    pub fn sign(&self, name: &str, message: &[u8], rng: &dyn SecureRandom) -> Result<Versioned<String>, Error> {
        let version = self.record.primary();
        let signature = match self.versions.get(&version) {
            Some(Material::Ed25519(pair)) => pair.sign(message).as_ref().to_vec(),
            Some(Material::Ecdsa(pair)) => pair.sign(rng, message).map_err(random_error)?.as_ref().to_vec(),
            _ => return Err(self.wrong_type(name, "sign")),
        };
        self.used(version, Use::Produce);
        Ok(Versioned { value: text(version, &signature), key_version: version })
    }

    /// Verifies a signature made by [`LoadedKey::sign`].
    ///
    /// # Errors
    /// Malformed text, a retired version, or not a signing key.
    pub fn verify(&self, name: &str, message: &[u8], signature: &str) -> Result<bool, Error> {
        let (version, bytes) = parse_text("signature", signature)?;
        self.version_for_use(name, version)?;
        let record = self
            .record
            .versions
            .get(&version)
            .ok_or_else(|| Error::KeyVersionNotFound { name: name.to_owned(), version })?;
        let ok = match self.record.key_type {
            NamedKeyType::Ed25519 => {
                UnparsedPublicKey::new(&ED25519, &record.public_key).verify(message, &bytes).is_ok()
            }
            NamedKeyType::EcdsaP256 => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &record.public_key).verify(message, &bytes).is_ok()
            }
            _ => return Err(self.wrong_type(name, "verify")),
        };
        self.used(version, Use::Check);
        Ok(ok)
    }

    /// HMAC-SHA-256 with the primary version.
    ///
    /// # Errors
    /// Not an HMAC key.
    pub fn hmac(&self, name: &str, message: &[u8]) -> Result<Versioned<String>, Error> {
        let version = self.record.primary();
        let Some(Material::Hmac(key)) = self.versions.get(&version) else {
            return Err(self.wrong_type(name, "compute an HMAC"));
        };
        self.used(version, Use::Produce);
        Ok(Versioned { value: text(version, hmac::sign(key, message).as_ref()), key_version: version })
    }

    /// Checks an HMAC tag in constant time.
    ///
    /// # Errors
    /// Malformed text, a retired version, or not an HMAC key.
    pub fn verify_hmac(&self, name: &str, message: &[u8], tag: &str) -> Result<bool, Error> {
        let (version, bytes) = parse_text("hmac", tag)?;
        let Material::Hmac(key) = self.version_for_use(name, version)? else {
            return Err(self.wrong_type(name, "verify an HMAC"));
        };
        self.used(version, Use::Check);
        Ok(hmac::verify(key, message, &bytes).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use coffer_hsm::Key256;

    use super::*;

    fn keyring() -> Keyring {
        Keyring::new(vec![(coffer_raft::KeyringVersion(1), Key256::random(&SystemRandom::new()).unwrap())]).unwrap()
    }

    #[test]
    fn wrapped_material_hides_the_key_and_is_bound_to_name_and_version() {
        let keyring = keyring();
        for key_type in
            [NamedKeyType::Aes256Gcm, NamedKeyType::HmacSha256, NamedKeyType::Ed25519, NamedKeyType::EcdsaP256]
        {
            let v = new_version(&keyring, "k", KeyVersion(3), key_type, UnixMillis(0)).unwrap();
            let secret = keyring.unwrap(v.keyring_version, &wrap_aad("k", KeyVersion(3)), &v.wrapped).unwrap();
            assert!(secret.len() >= 32);
            // No 16-byte window of the secret appears in what is replicated and stored.
            assert!(!secret.windows(16).any(|w| v.wrapped.windows(16).any(|x| x == w)), "{key_type:?}");
            assert!(keyring.unwrap(v.keyring_version, &wrap_aad("other", KeyVersion(3)), &v.wrapped).is_err());
            assert!(keyring.unwrap(v.keyring_version, &wrap_aad("k", KeyVersion(4)), &v.wrapped).is_err());
        }
    }

    #[test]
    fn ciphertext_text_form() {
        assert_eq!(text(KeyVersion(7), b"\x01\x02"), "coffer:v7:AQI=");
        assert_eq!(parse_text("ciphertext", "coffer:v7:AQI=").unwrap(), (KeyVersion(7), vec![1, 2]));
        for bad in ["coffer:v:AQI=", "coffer:vx:AQI=", "vault:v1:AQI=", "coffer:v1:!!", "coffer:v1"] {
            assert!(parse_text("ciphertext", bad).is_err(), "{bad}");
        }
    }
}
