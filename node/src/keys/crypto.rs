// Hot path: Keys crypto calls.
//! Keys crypto calls, answered from the node's in-memory keys: no Raft round trip and no HSM call.
//! A node answers only while it has heard from the leader (as leader: from a quorum) within
//! `crypto-staleness`, so a retired version or a deleted key stops working everywhere within that
//! bound.

use std::sync::Arc;

use coffer_raft::KeyVersion;
use ring::rand::SystemRandom;
use zeroize::Zeroizing;

use crate::error::Error;
use crate::keys::{LoadedKey, Versioned};
use crate::node::Node;

async fn loaded(node: &Node, name: &str) -> Result<Arc<LoadedKey>, Error> {
    let name = &coffer_raft::KeyName::parse(name)?;
    let ready = node.ready().await?;
    node.fresh_within(node.config.crypto_staleness)?;
    let record = node.reader().named_key(name)?.ok_or_else(|| Error::KeyNotFound { name: name.to_string() })?;
    node.keys.load(&ready.keyring, name.as_str(), record)
}

/// Runs `f` on the loaded key. A ciphertext or signature from a version newer than this node has
/// applied (made on another node just after a rotation) is not an error: the node catches up to
/// the leader's read index and tries once more, so no decrypt fails during a rotation.
async fn with_key<T>(node: &Node, name: &str, f: impl Fn(&LoadedKey) -> Result<T, Error>) -> Result<T, Error> {
    let key = loaded(node, name).await?;
    match f(&key) {
        Err(Error::KeyVersionNotFound { version, .. }) if version > key.record.primary() => {
            node.read_barrier(None).await?;
            f(&*loaded(node, name).await?)
        }
        other => other,
    }
}

/// Encrypts under the key's primary version.
///
/// # Errors
/// `InvalidArgument` (name, size, key type), `KeyNotFound`, `Unavailable` (stale node).
pub async fn encrypt(
    node: &Node,
    name: &str,
    plaintext: &[u8],
    associated_data: &[u8],
) -> Result<Versioned<String>, Error> {
    crate::validate::value(plaintext, node.config.max_value_bytes)?;
    loaded(node, name).await?.encrypt(name, plaintext, associated_data)
}

/// Decrypts.
///
/// # Errors
/// `InvalidArgument` (malformed or not authentic), `KeyVersionRetired`, `KeyNotFound`, `Unavailable`.
pub async fn decrypt(
    node: &Node,
    name: &str,
    ciphertext: &str,
    associated_data: &[u8],
) -> Result<Versioned<Zeroizing<Vec<u8>>>, Error> {
    with_key(node, name, |key| key.decrypt(name, ciphertext, associated_data)).await
}

/// Decrypts and re-encrypts under the primary version; the plaintext never leaves the node.
///
/// # Errors
/// As [`decrypt`] and [`encrypt`].
pub async fn rewrap(
    node: &Node,
    name: &str,
    ciphertext: &str,
    associated_data: &[u8],
) -> Result<Versioned<String>, Error> {
    with_key(node, name, |key| {
        let plain = key.decrypt(name, ciphertext, associated_data)?.value;
        key.encrypt(name, &plain, associated_data)
    })
    .await
}

/// Whether [`generate_data_key`] returns the plaintext data key beside the encrypted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKeyPlaintext {
    /// Encrypted only (the caller decrypts it later, where it is used).
    Withhold,
    /// Both.
    Return,
}

/// A fresh data key: encrypted under the named key, and in plaintext when asked for.
pub struct DataKey {
    /// The data key, encrypted (`coffer:v<N>:…`).
    pub ciphertext: String,
    /// The data key itself, with [`DataKeyPlaintext::Return`].
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
    /// The key version that encrypted it.
    pub key_version: KeyVersion,
}

/// A fresh data key, encrypted under the named key (and returned in plaintext when asked).
///
/// # Errors
/// `InvalidArgument` for bits other than 128 or 256; as [`encrypt`].
pub async fn generate_data_key(
    node: &Node,
    name: &str,
    bits: u32,
    plaintext: DataKeyPlaintext,
) -> Result<DataKey, Error> {
    let bytes = match bits {
        0 | 256 => 32,
        128 => 16,
        other => return Err(Error::InvalidArgument { rule: format!("bits must be 128 or 256, not {other}") }),
    };
    let key = loaded(node, name).await?;
    let data_key = node.keys.random_bytes(bytes)?;
    let encrypted = key.encrypt(name, &data_key, &[])?;
    Ok(DataKey {
        ciphertext: encrypted.value,
        plaintext: (plaintext == DataKeyPlaintext::Return).then_some(data_key),
        key_version: encrypted.key_version,
    })
}

/// Signs with the primary version.
///
/// # Errors
/// `InvalidArgument` (not a signing key), `KeyNotFound`, `Unavailable`.
pub async fn sign(node: &Node, name: &str, message: &[u8]) -> Result<Versioned<String>, Error> {
    crate::validate::value(message, node.config.max_value_bytes)?;
    loaded(node, name).await?.sign(name, message, &SystemRandom::new())
}

/// Verifies a signature.
///
/// # Errors
/// `InvalidArgument` (malformed, not a signing key), `KeyVersionRetired`, `KeyNotFound`, `Unavailable`.
pub async fn verify(node: &Node, name: &str, message: &[u8], signature: &str) -> Result<bool, Error> {
    with_key(node, name, |key| key.verify(name, message, signature)).await
}

/// HMAC-SHA-256 with the primary version.
///
/// # Errors
/// `InvalidArgument` (not an HMAC key), `KeyNotFound`, `Unavailable`.
pub async fn hmac(node: &Node, name: &str, message: &[u8]) -> Result<Versioned<String>, Error> {
    crate::validate::value(message, node.config.max_value_bytes)?;
    loaded(node, name).await?.hmac(name, message)
}

/// Checks an HMAC tag.
///
/// # Errors
/// `InvalidArgument` (malformed, not an HMAC key), `KeyVersionRetired`, `KeyNotFound`, `Unavailable`.
pub async fn verify_hmac(node: &Node, name: &str, message: &[u8], tag: &str) -> Result<bool, Error> {
    with_key(node, name, |key| key.verify_hmac(name, message, tag)).await
}
