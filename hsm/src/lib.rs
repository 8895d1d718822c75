//! Key custody for Coffer: the HSM root key reached through PKCS#11, and the types that hold key
//! material in memory.
//!
//! The root key never leaves the HSM. Coffer asks it for two things only: wrap a keyring key and
//! unwrap one (CKM_AES_KEY_WRAP_PAD, RFC 5649), at start-up and on rotation, never per request.
//! This crate knows nothing of tonic, openraft or RocksDB.

mod config;
mod error;
mod pkcs11;
mod secret;

pub use config::{resolve_module, HsmConfig, PinSource, DEFAULT_ROOT_KEY_LABEL, SOFTHSM_MODULE_PATHS};
pub use error::HsmError;
pub use pkcs11::{init_root_key, init_token, Hsm, SigningKey};
pub use secret::{Key256, Pin};

/// A root key's key check value: identifies the key without revealing it.
///
/// Computed as the first 8 bytes of SHA-256 over the RFC 5649 wrap of a fixed public probe key, so
/// two HSM tokens holding the same root key give the same KCV. Printed as 16 hex digits.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Kcv([u8; 8]);

impl Kcv {
    fn from_wrapped_probe(wrapped: &[u8]) -> Kcv {
        let digest = ring::digest::digest(&ring::digest::SHA256, wrapped);
        let mut kcv = [0u8; 8];
        kcv.copy_from_slice(&digest.as_ref()[..8]);
        Kcv(kcv)
    }

    /// Parses 16 hex digits.
    ///
    /// # Errors
    /// `None` when the text is not 16 hex digits.
    pub fn from_hex(text: &str) -> Option<Kcv> {
        let bytes = hex::decode(text).ok()?;
        Some(Kcv(bytes.try_into().ok()?))
    }
}

impl std::fmt::Display for Kcv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for Kcv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kcv({self})")
    }
}
