//! Types for key material: zeroized on drop, never printed, read only through `expose_secret()`.

use std::fmt;

use secrecy::{ExposeSecret, SecretBox};

/// A 256-bit symmetric key in memory (a keyring key, a data key).
///
/// It zeroizes on drop, prints as `[redacted]` and has no `Clone`, `Display` or `Serialize`.
pub struct Key256(SecretBox<[u8; 32]>);

impl Key256 {
    /// Length of the key in bytes.
    pub const LEN: usize = 32;

    /// Takes ownership of key bytes, zeroizing the source array.
    pub fn from_array(bytes: &mut [u8; 32]) -> Self {
        let key = Key256(SecretBox::new(Box::new(*bytes)));
        zeroize::Zeroize::zeroize(bytes);
        key
    }

    /// Copies key bytes from a slice of exactly 32 bytes.
    ///
    /// # Errors
    /// `None` when the slice is not 32 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut array: [u8; 32] = bytes.try_into().ok()?;
        Some(Self::from_array(&mut array))
    }

    /// A fresh random key from the operating system's CSPRNG.
    ///
    /// # Errors
    /// When the system random source fails.
    pub fn random(rng: &dyn ring::rand::SecureRandom) -> Result<Self, ring::error::Unspecified> {
        let mut bytes = [0u8; 32];
        rng.fill(&mut bytes)?;
        Ok(Self::from_array(&mut bytes))
    }

    /// The key bytes. Callers must not copy them anywhere that outlives the call.
    pub fn expose_secret(&self) -> &[u8; 32] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Key256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key256([redacted])")
    }
}

/// The HSM user PIN. Read from a file or an environment variable, never from the command line.
pub struct Pin(secrecy::SecretString);

impl Pin {
    /// Wraps a PIN string.
    pub fn new(pin: String) -> Self {
        Pin(secrecy::SecretString::from(pin))
    }

    pub(crate) fn auth_pin(&self) -> cryptoki::types::AuthPin {
        cryptoki::types::AuthPin::from(self.0.expose_secret().to_owned())
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_debug_is_redacted() {
        let key = Key256::from_array(&mut [7u8; 32]);
        assert_eq!(format!("{key:?}"), "Key256([redacted])");
        assert_eq!(key.expose_secret(), &[7u8; 32]);
    }

    #[test]
    fn from_array_zeroizes_source() {
        let mut bytes = [9u8; 32];
        let _key = Key256::from_array(&mut bytes);
        assert_eq!(bytes, [0u8; 32]);
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(Key256::from_slice(&[1u8; 31]).is_none());
        assert!(Key256::from_slice(&[1u8; 32]).is_some());
    }
}
