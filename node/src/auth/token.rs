// Hot path: every call that carries a token (parse and hash).
//! Token text: `cfr_s_<43 base62 characters>_<6 base62 characters>`.
//!
//! - `cfr_s_` is a fixed prefix a secret scanner can match (GitHub's, gitleaks' custom rules).
//! - The body is 32 random bytes in base62 (fixed width, so every token has the same length).
//! - The tail is the CRC-32 of prefix and body, in base62: a scanner (or the server) tells a
//!   real token from a random string without a lookup, and a mistyped token is refused as
//!   malformed before any state is read.
//!
//! # Correctness
//! The token itself is never stored, logged or printed by the server: the replicated state keeps
//! HMAC-SHA-256(token-hashing key, token), the key being random per cluster and kept sealed by a
//! keyring key. A copy of the data directory without the HSM cannot check a guess offline.

use ring::hmac;
use zeroize::Zeroizing;

use coffer_raft::TokenHash;

/// Every service token starts with this.
pub const PREFIX: &str = "cfr_s_";

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 62^43 > 2^256: 43 characters hold 32 bytes.
const BODY_LEN: usize = 43;
/// 62^6 > 2^32.
const CHECK_LEN: usize = 6;
/// The length of every token.
pub const TOKEN_LEN: usize = PREFIX.len() + BODY_LEN + 1 + CHECK_LEN;

/// `bytes` (big-endian) in base62, left-padded with '0' to `width`.
fn base62(bytes: &[u8], width: usize) -> String {
    let mut digits = Vec::with_capacity(width);
    let mut number: Vec<u8> = bytes.to_vec();
    while number.iter().any(|b| *b != 0) {
        let mut remainder = 0u32;
        for byte in &mut number {
            let value = (remainder << 8) | u32::from(*byte);
            *byte = (value / 62) as u8;
            remainder = value % 62;
        }
        digits.push(ALPHABET[remainder as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

fn checksum(prefix_and_body: &str) -> String {
    base62(&crc32fast::hash(prefix_and_body.as_bytes()).to_be_bytes(), CHECK_LEN)
}

/// A new token from 32 random bytes.
pub fn format(random: &[u8; 32]) -> Zeroizing<String> {
    let mut token = Zeroizing::new(String::with_capacity(TOKEN_LEN));
    token.push_str(PREFIX);
    token.push_str(&base62(random, BODY_LEN));
    let check = checksum(&token);
    token.push('_');
    token.push_str(&check);
    token
}

/// Checks a presented token's shape and checksum: why it is not a token, or `Ok`.
///
/// # Errors
/// The rule it breaks, in words that never repeat the token.
pub fn check(token: &str) -> Result<(), &'static str> {
    if !token.starts_with(PREFIX) {
        return Err("the token does not start with cfr_s_ (Coffer tokens do)");
    }
    if token.len() != TOKEN_LEN {
        return Err("the token has the wrong length (was it cut when copied?)");
    }
    let (head, tail) = token.split_at(PREFIX.len() + BODY_LEN);
    let Some(check) = tail.strip_prefix('_') else { return Err("the token is malformed") };
    if !head[PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric()) || checksum(head) != check {
        return Err("the token's checksum does not match (a typo, or not a Coffer token)");
    }
    Ok(())
}

/// What the state keys a token by: HMAC-SHA-256 under the cluster's token-hashing key.
pub fn hash(key: &hmac::Key, token: &str) -> TokenHash {
    let tag = hmac::sign(key, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    TokenHash(out)
}

/// An accessor from 16 random bytes: `acc_` and 22 base62 characters.
pub fn accessor(random: &[u8; 16]) -> String {
    format!("acc_{}", base62(random, 22))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_has_a_fixed_shape_and_a_checksum_that_catches_typos() -> Result<(), &'static str> {
        let token = format(&[0xab; 32]);
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(token.starts_with("cfr_s_"));
        check(&token)?;
        assert_eq!(format(&[0; 32]).len(), TOKEN_LEN, "leading zeros keep the width");
        assert_eq!(format(&[0xff; 32]).len(), TOKEN_LEN, "the largest body fits");
        let mut typo = token.to_string().into_bytes();
        typo[10] = if typo[10] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(typo).map_err(|_| "ascii")?;
        assert!(check(&typo).unwrap_err().contains("checksum"));
        assert!(check("cfr_s_short").is_err());
        assert!(check("hvs.CAESIJ").is_err());
        Ok(())
    }

    #[test]
    fn base62_is_positional() {
        assert_eq!(base62(&[0, 61], 2), "0z");
        assert_eq!(base62(&[0, 62], 2), "10");
        assert_eq!(base62(&[1, 0], 3), "048", "256 = 4·62 + 8");
    }

    #[test]
    fn the_hash_depends_on_the_key() {
        let a = hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]);
        let b = hmac::Key::new(hmac::HMAC_SHA256, &[2; 32]);
        let token = format(&[7; 32]);
        assert_eq!(hash(&a, &token), hash(&a, &token));
        assert_ne!(hash(&a, &token), hash(&b, &token));
    }
}
