//! The audit file's format: JSON lines, each chained to the one before by a hash.
//!
//! ```text
//! {"seq":7,"prev":"<hex SHA-256 of line 6>","record":{…}} + ,"hash":"<hex SHA-256>"}
//! ```
//!
//! A line is `{"seq":N,"prev":"…","record":…,"hash":"…"}`. Its hash is SHA-256 over the line's
//! bytes up to (not including) `,"hash":"`: the sequence number, the previous line's hash and the
//! record exactly as written, so verifying needs no canonical re-encoding. The first line of a
//! chain has `prev` of 64 zeros; a file that continues a chain starts where the one before ended,
//! and is checked from its first line (give [`verify`] the files in order to check across them).
//!
//! # Correctness
//! [`check_line`] finds a flipped byte (the hash no longer matches, or the line no longer parses),
//! a removed line (a gap in `seq`, and `prev` not the hash before), and lines reordered (the
//! same). Someone who rewrites the whole tail and recomputes its hashes, or cuts the file short,
//! is found by the signed checkpoints ([`super::checkpoint`], [`super::verify`]).

use ring::digest::{digest, SHA256};
use serde::Deserialize;

/// The `prev` of a chain's first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_FIELD: &str = ",\"hash\":\"";

/// The hash of a line's body (everything before `,"hash":"`), as hex.
fn body_hash(body: &str) -> String {
    hex::encode(digest(&SHA256, body.as_bytes()))
}

/// The line for `record` (already JSON) after the line whose hash is `prev`; returns the line
/// (with its newline) and its hash.
pub fn line(seq: u64, prev: &str, record_json: &str) -> (String, String) {
    let body = format!("{{\"seq\":{seq},\"prev\":\"{prev}\",\"record\":{record_json}");
    let hash = body_hash(&body);
    (format!("{body}{HASH_FIELD}{hash}\"}}\n"), hash)
}

/// Where a chain stands: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The last sequence number (0: none yet).
    pub seq: u64,
    /// The last line's hash ([`GENESIS`] before the first).
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Head { seq: 0, hash: GENESIS.to_owned() }
    }
}

/// What a line says about its place in the chain. A key given twice (a second `record`
/// appended to fool a reader that keeps the last) is refused.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Place {
    seq: u64,
    prev: String,
    /// Present once; its content is checked by the hash and read by `verify`.
    #[serde(rename = "record")]
    _record: serde::de::IgnoredAny,
    hash: String,
}

/// Why a file's chain is broken, at which line (from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// The line is not a chain line (a flipped byte can do this too).
    #[error("line {line}: not an audit line ({why})")]
    Unreadable {
        /// The line number.
        line: u64,
        /// What is wrong.
        why: String,
    },
    /// The line's content does not hash to the hash it carries: it was edited.
    #[error("line {line} (seq {seq}): its content does not match its hash (edited)")]
    Edited {
        /// The line number.
        line: u64,
        /// Its sequence number.
        seq: u64,
    },
    /// The line does not follow the one before: lines removed, inserted or reordered.
    #[error("line {line} (seq {seq}): does not follow seq {after} (records removed, inserted or reordered)")]
    OutOfChain {
        /// The line number.
        line: u64,
        /// Its sequence number.
        seq: u64,
        /// The sequence number of the line before.
        after: u64,
    },
    /// A checkpoint whose signature does not verify: forged, or edited after signing.
    #[error("line {line} (seq {seq}): checkpoint signature does not verify (forged or edited)")]
    BadSignature {
        /// The line number.
        line: u64,
        /// Its sequence number.
        seq: u64,
    },
    /// A checkpoint signed by another key than the pinned one (or than the file's first).
    #[error("line {line} (seq {seq}): checkpoint signed by key {key}, not {expected}")]
    ForeignKey {
        /// The line number.
        line: u64,
        /// Its sequence number.
        seq: u64,
        /// The key it names (hex).
        key: String,
        /// The key expected (hex).
        expected: String,
    },
    /// A checkpoint vouches for a line whose hash is not the one in the file: the lines it
    /// covers were rewritten.
    #[error(
        "line {line} (seq {seq}): checkpoint vouches for seq {covers} with another hash (records before it rewritten)"
    )]
    WrongCover {
        /// The line number.
        line: u64,
        /// Its sequence number.
        seq: u64,
        /// The sequence number it vouches for.
        covers: u64,
    },
    /// A line after a `rotate` checkpoint, which is its file's last line.
    #[error("line {line}: follows the rotate checkpoint of line {rotate_line}, which ends its file (lines appended)")]
    AfterRotate {
        /// The line number.
        line: u64,
        /// The rotate checkpoint's line.
        rotate_line: u64,
    },
    /// No checkpoint vouches for the file at all.
    #[error("no checkpoint in {lines} lines: nothing vouches for these records")]
    NoCheckpoint {
        /// Lines read.
        lines: u64,
    },
    /// The file ends long after its last checkpoint, which is not a clean stop's: cut short.
    #[error("the file ends {age_s} s after its last checkpoint (line {line}, seq {seq}), which is not a `close`, and its node writes one every {every_s} s: the file was cut short after that checkpoint (or its node was killed, and has not restarted since){tail}")]
    CutShort {
        /// The last checkpoint's line number.
        line: u64,
        /// Its sequence number.
        seq: u64,
        /// Seconds since it.
        age_s: u64,
        /// The node's checkpoint interval.
        every_s: u64,
        /// What follows it, said.
        tail: String,
    },
}

/// Checks one line against the chain's head and returns the new head.
///
/// # Errors
/// The way the line breaks the chain.
pub fn check_line(number: u64, text: &str, head: &Head) -> Result<Head, Broken> {
    let unreadable = |why: &str| Broken::Unreadable { line: number, why: why.to_owned() };
    let place: Place = serde_json::from_str(text).map_err(|e| unreadable(&e.to_string()))?;
    let body = text.rfind(HASH_FIELD).map(|at| &text[..at]).ok_or_else(|| unreadable("no hash field"))?;
    // Nothing may follow the hash: bytes there would be read by tools but covered by no hash.
    if text.len() != body.len() + HASH_FIELD.len() + place.hash.len() + 2 || !text.ends_with("\"}") {
        return Err(Broken::Edited { line: number, seq: place.seq });
    }
    if body_hash(body) != place.hash {
        return Err(Broken::Edited { line: number, seq: place.seq });
    }
    // The first line checked may start anywhere (a rotated file continues the chain of the one
    // before it); every later one must follow.
    let first = head.seq == 0 && head.hash == GENESIS;
    let follows = first || (place.prev == head.hash && head.seq.checked_add(1) == Some(place.seq));
    if !follows {
        return Err(Broken::OutOfChain { line: number, seq: place.seq, after: head.seq });
    }
    Ok(Head { seq: place.seq, hash: place.hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<String> {
        let mut head = Head::default();
        (1..=n)
            .map(|seq| {
                let (text, hash) = line(seq, &head.hash, &format!("{{\"method\":\"Get\",\"n\":{seq}}}"));
                head = Head { seq, hash };
                text
            })
            .collect()
    }

    fn check(lines: &[String]) -> Result<Head, Broken> {
        let mut head = Head::default();
        for (i, text) in lines.iter().enumerate() {
            head = check_line(i as u64 + 1, text.trim_end(), &head)?;
        }
        Ok(head)
    }

    #[test]
    fn an_intact_chain_verifies() -> Result<(), Broken> {
        assert_eq!(check(&chain(5))?.seq, 5);
        assert_eq!(check(&[])?, Head::default());
        Ok(())
    }

    #[test]
    fn a_flipped_byte_a_removed_line_and_a_reorder_are_each_found() {
        let lines = chain(5);
        let mut flipped = lines.clone();
        flipped[2] = flipped[2].replace("\"n\":3", "\"n\":4");
        assert_eq!(check(&flipped), Err(Broken::Edited { line: 3, seq: 3 }));
        let mut removed = lines.clone();
        removed.remove(1);
        assert_eq!(check(&removed), Err(Broken::OutOfChain { line: 2, seq: 3, after: 1 }));
        let mut reordered = lines.clone();
        reordered.swap(3, 4);
        assert_eq!(check(&reordered), Err(Broken::OutOfChain { line: 4, seq: 5, after: 3 }));
        // A second `record` after the hash, or before it: refused.
        let mut appended = lines.clone();
        appended[1] = appended[1].replace("\"}\n", "\",\"record\":{\"forged\":1}}\n");
        assert!(
            matches!(check(&appended), Err(Broken::Unreadable { line: 2, .. } | Broken::Edited { line: 2, .. })),
            "{:?}",
            check(&appended)
        );
        let mut doubled = lines.clone();
        doubled[1] = doubled[1].replacen(",\"record\":", ",\"record\":{},\"record\":", 1);
        assert!(matches!(check(&doubled), Err(Broken::Unreadable { line: 2, .. } | Broken::Edited { line: 2, .. })));
        let mut garbled = lines;
        garbled[0] = garbled[0].replacen('{', "[", 1);
        assert!(matches!(check(&garbled), Err(Broken::Unreadable { line: 1, .. })));
    }
}
