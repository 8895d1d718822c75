// Hot path: secret put (seal) and get (open).
//! Envelope encryption of secret values under the keyring.
//!
//! ```text
//! HSM root key ──(RFC 5649 wrap, in the HSM, at start-up)──▶ keyring key (memory only, zeroized)
//! keyring key  ──(AES-256-GCM, ring, per write)────────────▶ data key (one per secret version)
//! data key     ──(AES-256-GCM, ring, exactly one message)──▶ the secret value
//! ```
//!
//! Associated data binds both ciphertexts to the secret's path and version, so a sealed value
//! copied to another path or version fails to open.
//!
//! # Nonces
//! - A data key seals exactly one message (the value of the one version it was made for), so its
//!   nonce is fixed at zero: (key, nonce) never repeats because the key never repeats.
//! - A keyring key seals many data keys. Each in-memory copy of a keyring key (one per node
//!   process) draws a random 96-bit starting point once and then counts up by one per seal: one
//!   atomic add instead of a ~250 ns `SystemRandom` call per seal. Two processes collide only if
//!   their counter ranges overlap; with p processes each sealing at most n times, the chance is at
//!   most p²·n / 2⁹⁶ (for p = 2²⁰ restarts and n = 2³² seals: 2⁻²⁴). A keyring key should be
//!   rotated before it has sealed 2³² data keys in all; the counter refuses to wrap past 2⁶⁴ in
//!   one process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use coffer_hsm::Key256;
use coffer_raft::{KeyringVersion, SealedValue, SecretVersion};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

const TAG_LEN: usize = 16;
/// Sealed data key: nonce, 32-byte key, tag.
const WRAPPED_DATA_KEY_LEN: usize = NONCE_LEN + Key256::LEN + TAG_LEN;
const AAD_DOMAIN: &[u8] = b"coffer/secret/v1\0";

/// Why sealing or opening failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// The ciphertext failed authentication: altered, moved to another path or version, or sealed
    /// under another key.
    #[error("the stored ciphertext failed authentication (altered, or moved from another path or version)")]
    Integrity,
    /// The keyring key version that sealed the value is not loaded.
    #[error("keyring key version {0} is not loaded")]
    UnknownKeyringVersion(KeyringVersion),
    /// The system random source failed.
    #[error("the system random source failed")]
    Random,
    /// This process has used up its nonce space for a key version.
    #[error("{key} has sealed 2^64 messages in this process; rotate it")]
    NonceSpaceExhausted {
        /// The key version, in words.
        key: String,
    },
}

/// One keyring key in memory with its nonce counter.
struct KeyringKey {
    key: LessSafeKey,
    nonces: NonceCounter,
}

/// AES-GCM nonces for one key in one process: a random 96-bit start, then +1 per seal (see the
/// module header for the collision bound).
pub struct NonceCounter {
    start: u128,
    used: AtomicU64,
}

impl NonceCounter {
    /// A counter from a fresh random start.
    ///
    /// # Errors
    /// [`EnvelopeError::Random`] when the system random source fails.
    pub fn random(rng: &dyn SecureRandom) -> Result<Self, EnvelopeError> {
        let mut start = [0u8; 16];
        rng.fill(&mut start[4..]).map_err(|_| EnvelopeError::Random)?;
        Ok(NonceCounter { start: u128::from_be_bytes(start), used: AtomicU64::new(0) })
    }

    /// The next nonce.
    ///
    /// # Errors
    /// [`EnvelopeError::NonceSpaceExhausted`] after 2^64 - 1 nonces in this process.
    /// [`EnvelopeError::NonceSpaceExhausted`] names the key as `key()` says.
    pub fn next(&self, key: impl FnOnce() -> String) -> Result<[u8; NONCE_LEN], EnvelopeError> {
        let n = self.used.fetch_add(1, Ordering::Relaxed);
        if n == u64::MAX {
            return Err(EnvelopeError::NonceSpaceExhausted { key: key() });
        }
        let value = self.start.wrapping_add(u128::from(n)) & ((1u128 << 96) - 1);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&value.to_be_bytes()[4..]);
        Ok(nonce)
    }
}

/// The keyring: every loaded keyring key version, and which one seals new data keys.
pub struct Keyring {
    keys: BTreeMap<KeyringVersion, KeyringKey>,
    primary: KeyringVersion,
    rng: SystemRandom,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("primary", &self.primary)
            .finish()
    }
}

fn aad(path: &str, version: SecretVersion) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + path.len() + 9);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(path.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&version.0.to_be_bytes());
    aad
}

pub(crate) fn aes_key(key: &Key256) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.expose_secret()).expect("a Key256 is exactly an AES-256 key"))
}

impl Keyring {
    /// A keyring of the given unwrapped versions; the highest version is primary.
    ///
    /// # Errors
    /// [`EnvelopeError::Random`] when no nonce start can be drawn; `keys` must not be empty.
    pub fn new(keys: Vec<(KeyringVersion, Key256)>) -> Result<Keyring, EnvelopeError> {
        let rng = SystemRandom::new();
        let mut map = BTreeMap::new();
        for (version, key) in keys {
            map.insert(version, KeyringKey { key: aes_key(&key), nonces: NonceCounter::random(&rng)? });
        }
        let primary = *map.keys().next_back().ok_or(EnvelopeError::UnknownKeyringVersion(KeyringVersion(0)))?;
        Ok(Keyring { keys: map, primary, rng })
    }

    /// Seals a value for one version of one secret: a fresh data key seals the value, and the
    /// primary keyring key seals the data key.
    ///
    /// # Errors
    /// A failing random source, or an exhausted nonce counter.
    pub fn seal(&self, path: &str, version: SecretVersion, value: &[u8]) -> Result<SealedValue, EnvelopeError> {
        let aad = aad(path, version);
        let data_key = Key256::random(&self.rng).map_err(|_| EnvelopeError::Random)?;

        let mut ciphertext = Vec::with_capacity(value.len() + TAG_LEN);
        ciphertext.extend_from_slice(value);
        aes_key(&data_key)
            .seal_in_place_append_tag(Nonce::assume_unique_for_key([0u8; NONCE_LEN]), Aad::from(&aad), &mut ciphertext)
            .map_err(|_| EnvelopeError::Integrity)?;
        let (keyring_version, wrapped_data_key) = self.wrap(&aad, data_key.expose_secret())?;
        Ok(SealedValue { keyring_version, wrapped_data_key, ciphertext })
    }

    /// Opens a value sealed by [`Keyring::seal`] for the same path and version.
    ///
    /// # Errors
    /// [`EnvelopeError::Integrity`] when anything was altered or moved;
    /// [`EnvelopeError::UnknownKeyringVersion`] when the keyring key is not loaded.
    pub fn open(
        &self,
        path: &str,
        version: SecretVersion,
        sealed: &SealedValue,
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        if sealed.wrapped_data_key.len() != WRAPPED_DATA_KEY_LEN {
            return Err(EnvelopeError::Integrity);
        }
        let aad = aad(path, version);
        let data_key = self.unwrap(sealed.keyring_version, &aad, &sealed.wrapped_data_key)?;
        let data_key = Key256::from_slice(&data_key).ok_or(EnvelopeError::Integrity)?;
        let mut value = Zeroizing::new(sealed.ciphertext.clone());
        let len = aes_key(&data_key)
            .open_in_place(Nonce::assume_unique_for_key([0u8; NONCE_LEN]), Aad::from(&aad), &mut value)
            .map_err(|_| EnvelopeError::Integrity)?
            .len();
        value.truncate(len);
        Ok(value)
    }

    /// Seals key material with the primary keyring key: returns the keyring version and
    /// `nonce ‖ ciphertext ‖ tag`. `aad` must say where the material belongs.
    ///
    /// # Errors
    /// An exhausted nonce counter.
    pub fn wrap(&self, aad: &[u8], plaintext: &[u8]) -> Result<(KeyringVersion, Vec<u8>), EnvelopeError> {
        let keyring = self.keys.get(&self.primary).ok_or(EnvelopeError::UnknownKeyringVersion(self.primary))?;
        let nonce = keyring.nonces.next(|| format!("keyring key version {}", self.primary))?;
        let mut wrapped = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(plaintext);
        let (_, body) = wrapped.split_at_mut(NONCE_LEN);
        let tag = keyring
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .map_err(|_| EnvelopeError::Integrity)?;
        wrapped.extend_from_slice(tag.as_ref());
        Ok((self.primary, wrapped))
    }

    /// Opens what [`Keyring::wrap`] sealed, with the same `aad`.
    ///
    /// # Errors
    /// [`EnvelopeError::Integrity`] when anything was altered or moved;
    /// [`EnvelopeError::UnknownKeyringVersion`] when the keyring key is not loaded.
    pub fn unwrap(
        &self,
        version: KeyringVersion,
        aad: &[u8],
        wrapped: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let keyring = self.keys.get(&version).ok_or(EnvelopeError::UnknownKeyringVersion(version))?;
        if wrapped.len() < NONCE_LEN + TAG_LEN {
            return Err(EnvelopeError::Integrity);
        }
        let (nonce, body) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::Integrity)?;
        let mut plain = Zeroizing::new(body.to_vec());
        let len =
            keyring.key.open_in_place(nonce, Aad::from(aad), &mut plain).map_err(|_| EnvelopeError::Integrity)?.len();
        plain.truncate(len);
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        Keyring::new(vec![(KeyringVersion(1), Key256::random(&SystemRandom::new()).unwrap())]).unwrap()
    }

    #[test]
    fn round_trip() {
        let k = keyring();
        let sealed = k.seal("db/password", SecretVersion(3), b"hunter2").unwrap();
        assert_eq!(k.open("db/password", SecretVersion(3), &sealed).unwrap().as_slice(), b"hunter2");
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"hunter2"));
        let empty = k.seal("e", SecretVersion(1), b"").unwrap();
        assert_eq!(k.open("e", SecretVersion(1), &empty).unwrap().as_slice(), b"");
    }

    #[test]
    fn any_flipped_byte_fails() {
        let k = keyring();
        let sealed = k.seal("a/b", SecretVersion(1), b"some secret value").unwrap();
        for i in 0..sealed.wrapped_data_key.len() {
            let mut bad = sealed.clone();
            bad.wrapped_data_key[i] ^= 0x80;
            assert!(
                matches!(k.open("a/b", SecretVersion(1), &bad), Err(EnvelopeError::Integrity)),
                "wrapped key byte {i}"
            );
        }
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 0x01;
            assert!(
                matches!(k.open("a/b", SecretVersion(1), &bad), Err(EnvelopeError::Integrity)),
                "ciphertext byte {i}"
            );
        }
        let mut short = sealed.clone();
        short.ciphertext.pop();
        assert!(k.open("a/b", SecretVersion(1), &short).is_err());
    }

    #[test]
    fn moved_to_another_path_or_version_fails() {
        let k = keyring();
        let sealed = k.seal("a/b", SecretVersion(2), b"v").unwrap();
        assert!(matches!(k.open("a/c", SecretVersion(2), &sealed), Err(EnvelopeError::Integrity)));
        assert!(matches!(k.open("a/b", SecretVersion(1), &sealed), Err(EnvelopeError::Integrity)));
        assert!(matches!(k.open("a/b", SecretVersion(3), &sealed), Err(EnvelopeError::Integrity)));
        // The separator keeps "a" + version bytes from aliasing a longer path.
        assert!(matches!(k.open("a/b\u{0}", SecretVersion(2), &sealed), Err(EnvelopeError::Integrity)));
    }

    #[test]
    fn another_keyring_key_fails() {
        let a = keyring();
        let b = keyring();
        let sealed = a.seal("p", SecretVersion(1), b"v").unwrap();
        assert!(matches!(b.open("p", SecretVersion(1), &sealed), Err(EnvelopeError::Integrity)));
        let mut unknown = sealed;
        unknown.keyring_version = KeyringVersion(9);
        assert!(matches!(
            a.open("p", SecretVersion(1), &unknown),
            Err(EnvelopeError::UnknownKeyringVersion(KeyringVersion(9)))
        ));
    }

    #[test]
    fn nonces_count_up_from_a_random_start_and_never_repeat_in_a_process() {
        let k = keyring();
        let key = &k.keys[&KeyringVersion(1)];
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            assert!(seen.insert(key.nonces.next(String::new).unwrap()));
        }
        // Wrap-around at 2^96 stays within 96 bits.
        let edge = NonceCounter { start: (1u128 << 96) - 1, used: AtomicU64::new(0) };
        assert_eq!(edge.next(String::new).unwrap(), [0xff; 12]);
        assert_eq!(edge.next(String::new).unwrap(), [0; 12]);
        let spent = NonceCounter { start: 0, used: AtomicU64::new(u64::MAX) };
        assert!(
            matches!(spent.next(|| "key k".into()), Err(EnvelopeError::NonceSpaceExhausted { key }) if key == "key k")
        );
    }

    #[test]
    fn two_keyrings_from_the_same_key_start_at_different_nonces() {
        let a = Keyring::new(vec![(KeyringVersion(1), Key256::from_array(&mut [5; 32]))]).unwrap();
        let b = Keyring::new(vec![(KeyringVersion(1), Key256::from_array(&mut [5; 32]))]).unwrap();
        assert_ne!(a.keys[&KeyringVersion(1)].nonces.start, b.keys[&KeyringVersion(1)].nonces.start);
        let sealed = a.seal("p", SecretVersion(1), b"v").unwrap();
        assert_eq!(b.open("p", SecretVersion(1), &sealed).unwrap().as_slice(), b"v", "same key, other process: opens");
    }
}
