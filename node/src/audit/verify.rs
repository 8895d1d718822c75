//! `coffer audit verify`: the whole check of one audit file, chain and checkpoints.
//!
//! # Correctness
//! - Every line must chain to the one before ([`super::chain::check_line`]).
//! - Every checkpoint must be signed by one key (the pinned one when `--key` is given, else
//!   the file's first checkpoint's, which is then only as good as the file: pin it), and must
//!   vouch for a line that is in the file with the hash it names.
//! - The file must end with a `close` checkpoint, or its last checkpoint must be recent (the
//!   node is running; records after it are reported as not yet vouched). Anything else is a file
//!   cut short after a checkpoint, or a node killed and not restarted: both are reported.
//! - A node that restarts after a crash writes an `unclean` `open` checkpoint: the records
//!   between its last checkpoint and the crash are reported as a note, not as a break.

use std::collections::BTreeMap;
use std::io::BufRead;

use super::chain::{self, Broken, Head, GENESIS};
use super::checkpoint::{Checkpoint, Kind};

/// How a file ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// No lines.
    Empty,
    /// With a clean stop's `close` checkpoint.
    Closed,
    /// With a `rotate` checkpoint: the chain goes on in the next file.
    Rotated,
    /// With a recent checkpoint and `unvouched` records after it: a live file.
    Live {
        /// Records no checkpoint vouches for yet.
        unvouched: u64,
    },
}

/// What a verified file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Lines checked (checkpoints included).
    pub lines: u64,
    /// The first and last sequence numbers.
    pub span: Option<(u64, u64)>,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The key that signed them (hex).
    pub key: Option<String>,
    /// How the file ends.
    pub ending: Ending,
    /// Things an auditor should know that do not break the chain (restarts after a crash).
    pub notes: Vec<String>,
    /// The first line's `prev` and the last line's place: files in a row must join up.
    pub joins: Option<(String, Head)>,
}

/// Checks one file. `pinned` is the public key the checkpoints must be signed by; `now_ms` is
/// what "recent" is measured against.
///
/// # Errors
/// The first broken link.
pub fn verify(reader: impl BufRead, pinned: Option<&[u8]>, now_ms: u64) -> Result<Report, Broken> {
    let mut head = Head::default();
    let mut report = Report {
        lines: 0,
        span: None,
        checkpoints: 0,
        key: pinned.map(hex::encode),
        ending: Ending::Empty,
        notes: vec![],
        joins: None,
    };
    let mut first_prev = None;
    // The line of a `rotate` checkpoint: nothing may follow it in its file.
    let mut rotated_at: Option<u64> = None;
    // Hashes of lines not yet vouched for, by seq; and the records among them.
    let mut recent: BTreeMap<u64, String> = BTreeMap::new();
    let mut unvouched: Vec<u64> = Vec::new();
    let mut last: Option<(u64, u64, Checkpoint)> = None;
    for (i, text) in reader.lines().enumerate() {
        let number = i as u64 + 1;
        let text = text.map_err(|e| Broken::Unreadable { line: number, why: e.to_string() })?;
        if let Some(rotated) = rotated_at {
            return Err(Broken::AfterRotate { line: number, rotate_line: rotated });
        }
        head = chain::check_line(number, &text, &head)?;
        if first_prev.is_none() {
            first_prev = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["prev"].as_str().map(str::to_owned));
        }
        report.span = Some((report.span.map_or(head.seq, |(first, _)| first), head.seq));
        report.lines += 1;
        recent.insert(head.seq, head.hash.clone());
        let checkpoint = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["record"].get("checkpoint").cloned())
            .map(serde_json::from_value::<Checkpoint>);
        let cp = match checkpoint {
            None => {
                unvouched.push(head.seq);
                continue;
            }
            Some(Err(e)) => return Err(Broken::Unreadable { line: number, why: format!("checkpoint: {e}") }),
            Some(Ok(cp)) => cp,
        };
        let key = match &report.key {
            Some(expected) if *expected != cp.key => {
                return Err(Broken::ForeignKey { line: number, seq: head.seq, key: cp.key, expected: expected.clone() })
            }
            Some(expected) => expected.clone(),
            None => cp.key.clone(),
        };
        let key_bytes = hex::decode(&key).unwrap_or_default();
        if !cp.signature_holds(&key_bytes) {
            return Err(Broken::BadSignature { line: number, seq: head.seq });
        }
        report.key = Some(key);
        let first_seq = report.span.map_or(0, |(first, _)| first);
        let covered = match recent.get(&cp.seq) {
            Some(hash) => *hash == cp.hash,
            // A chain's start, or (a file that continues another) a line before this file.
            None => (cp.seq == 0 && cp.hash == GENESIS) || (cp.seq < first_seq && cp.kind == Kind::Open),
        };
        if !covered || cp.seq >= head.seq {
            return Err(Broken::WrongCover { line: number, seq: head.seq, covers: cp.seq });
        }
        let before = unvouched.iter().filter(|s| **s <= cp.seq).count();
        if cp.kind == Kind::Open && cp.unclean && before > 0 {
            report.notes.push(format!(
                "line {number}: the node restarted after an unclean stop; {before} record(s) before it (seq {}..{}) were written after the last checkpoint and are vouched for only by this restart",
                unvouched[0],
                unvouched[before - 1]
            ));
        }
        unvouched.retain(|s| *s > cp.seq);
        // Kept from the seq it vouched for on: a checkpoint queued just before a stop may be
        // followed by a `close` that vouches for the same line.
        recent = recent.split_off(&cp.seq);
        report.checkpoints += 1;
        if cp.kind == Kind::Rotate {
            rotated_at = Some(number);
        }
        last = Some((number, head.seq, cp));
    }
    if report.lines == 0 {
        return Ok(report);
    }
    report.joins = first_prev.map(|prev| (prev, head.clone()));
    let Some((line, seq, cp)) = last else { return Err(Broken::NoCheckpoint { lines: report.lines }) };
    if cp.kind == Kind::Close && unvouched.is_empty() {
        report.ending = Ending::Closed;
        return Ok(report);
    }
    if cp.kind == Kind::Rotate {
        if !unvouched.is_empty() {
            report.notes.push(format!(
                "{} record(s) after the rotate checkpoint are vouched for by the next file's first checkpoint",
                unvouched.len()
            ));
        }
        report.ending = Ending::Rotated;
        return Ok(report);
    }
    let age_ms = now_ms.saturating_sub(cp.time_ms);
    // Three intervals and a second: a checkpoint may wait on a busy HSM or a busy node.
    if age_ms > 3 * cp.every_ms + 1_000 {
        let tail = match unvouched.len() {
            0 => String::new(),
            n => format!("; {n} record(s) after it are not vouched for"),
        };
        return Err(Broken::CutShort { line, seq, age_s: age_ms / 1000, every_s: cp.every_ms / 1000, tail });
    }
    report.ending = Ending::Live { unvouched: unvouched.len() as u64 };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    use super::*;
    use crate::audit::chain::line;

    /// A file being written: records and checkpoints signed by a software key (the node signs
    /// with the HSM's).
    struct Writer {
        key: EcdsaKeyPair,
        head: Head,
        lines: Vec<String>,
    }

    impl Writer {
        fn new() -> Writer {
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("keygen");
            let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("key");
            Writer { key, head: Head::default(), lines: vec![] }
        }
        fn append(&mut self, record: &str) {
            let (text, hash) = line(self.head.seq + 1, &self.head.hash, record);
            self.head = Head { seq: self.head.seq + 1, hash };
            self.lines.push(text);
        }
        fn record(&mut self, n: u64) {
            self.append(&format!("{{\"method\":\"/coffer.v1.Secrets/Get\",\"n\":{n}}}"));
        }
        fn checkpoint(&mut self, kind: Kind, time_ms: u64, unclean: bool) {
            let mut cp = Checkpoint {
                kind,
                node: 1,
                time_ms,
                seq: self.head.seq,
                hash: self.head.hash.clone(),
                every_ms: 10_000,
                unclean,
                key: hex::encode(self.key.public_key().as_ref()),
                sig: String::new(),
            };
            let rng = ring::rand::SystemRandom::new();
            cp.sig = hex::encode(self.key.sign(&rng, cp.message().as_bytes()).expect("sign").as_ref());
            self.append(&cp.record_json());
        }
        fn public(&self) -> Vec<u8> {
            self.key.public_key().as_ref().to_vec()
        }
    }

    const NOW: u64 = 1_000_000_000;

    fn check(lines: &[String], pinned: Option<&[u8]>) -> Result<Report, Broken> {
        verify(lines.concat().as_bytes(), pinned, NOW)
    }

    /// open, 5 records, interval, 5 records, close.
    fn closed_file() -> Writer {
        let mut w = Writer::new();
        w.checkpoint(Kind::Open, NOW - 60_000, false);
        (1..=5).for_each(|n| w.record(n));
        w.checkpoint(Kind::Interval, NOW - 50_000, false);
        (6..=10).for_each(|n| w.record(n));
        w.checkpoint(Kind::Close, NOW - 45_000, false);
        w
    }

    #[test]
    fn a_closed_file_verifies_with_its_key_pinned() -> Result<(), Broken> {
        let w = closed_file();
        let report = check(&w.lines, Some(&w.public()))?;
        assert_eq!((report.lines, report.checkpoints, report.ending), (13, 3, Ending::Closed));
        assert_eq!(check(&[], None)?.ending, Ending::Empty);
        Ok(())
    }

    #[test]
    fn a_live_file_reports_what_is_not_yet_vouched() -> Result<(), Broken> {
        let mut w = Writer::new();
        w.checkpoint(Kind::Open, NOW - 1_000, false);
        w.record(1);
        w.record(2);
        assert_eq!(check(&w.lines, None)?.ending, Ending::Live { unvouched: 2 });
        Ok(())
    }

    #[test]
    fn a_rewritten_tail_a_forged_checkpoint_and_a_foreign_key_are_found() {
        let w = closed_file();
        // Rewrite record 7 and recompute every hash after it: the chain holds, the close
        // checkpoint's signature does not (its content changed with the hashes).
        let mut rewritten = Writer { key: Writer::new().key, head: Head::default(), lines: vec![] };
        for text in &w.lines[..8] {
            let place: serde_json::Value = serde_json::from_str(text).expect("json");
            rewritten.head =
                Head { seq: place["seq"].as_u64().unwrap_or(0), hash: place["hash"].as_str().unwrap_or("").into() };
            rewritten.lines.push(text.clone());
        }
        let mut tail = w.lines[8..].to_vec();
        tail[0] = tail[0].replace("\"n\":7", "\"n\":70");
        for text in tail {
            let value: serde_json::Value = serde_json::from_str(&text).expect("json");
            let record = value["record"].to_string();
            rewritten.append(&record);
        }
        let err = check(&rewritten.lines, Some(&w.public())).unwrap_err();
        assert!(matches!(err, Broken::BadSignature { line: 13, .. } | Broken::WrongCover { line: 13, .. }), "{err}");
        // The same rewrite, with the attacker re-signing under their own key: the pinned key
        // refuses it.
        let mut forged = Writer::new();
        forged.lines = rewritten.lines[..12].to_vec();
        forged.head = rewritten.head.clone();
        let place: serde_json::Value = serde_json::from_str(&rewritten.lines[11]).expect("json");
        forged.head = Head { seq: 12, hash: place["hash"].as_str().unwrap_or("").into() };
        forged.checkpoint(Kind::Close, NOW - 45_000, false);
        let err = check(&forged.lines, Some(&w.public())).unwrap_err();
        assert!(matches!(err, Broken::ForeignKey { line: 13, .. }), "{err}");
        // Unpinned, a key change inside a file is refused too.
        let err = check(&forged.lines, None).unwrap_err();
        assert!(matches!(err, Broken::ForeignKey { line: 13, .. }), "{err}");
    }

    #[test]
    fn a_file_cut_after_a_checkpoint_is_found() {
        let w = closed_file();
        // Cut after the interval checkpoint (line 7), and after two records past it.
        let err = check(&w.lines[..7], None).unwrap_err();
        assert!(matches!(err, Broken::CutShort { line: 7, seq: 7, .. }), "{err}");
        let err = check(&w.lines[..9], None).unwrap_err();
        assert!(err.to_string().contains("2 record(s) after it are not vouched for"), "{err}");
        let mut bare = Writer::new();
        bare.record(1);
        assert_eq!(check(&bare.lines, None).unwrap_err(), Broken::NoCheckpoint { lines: 1 });
    }

    #[test]
    fn a_close_may_vouch_for_the_line_a_checkpoint_just_did_and_nothing_follows_a_rotate() -> Result<(), Broken> {
        let mut w = Writer::new();
        w.checkpoint(Kind::Open, NOW - 60_000, false);
        w.record(1);
        // An interval checkpoint and a close signed at the same moment vouch for the same line.
        let place = w.head.clone();
        w.checkpoint(Kind::Interval, NOW - 50_000, false);
        let after_interval = w.head.clone();
        w.head = place;
        w.checkpoint(Kind::Close, NOW - 50_000, false);
        let close = w.lines.pop().expect("close");
        let close: serde_json::Value = serde_json::from_str(&close).expect("json");
        w.head = after_interval;
        w.append(&close["record"].to_string());
        assert_eq!(check(&w.lines, None)?.ending, Ending::Closed);

        let mut r = Writer::new();
        r.checkpoint(Kind::Open, NOW - 60_000, false);
        r.record(1);
        r.checkpoint(Kind::Rotate, NOW - 50_000, false);
        assert_eq!(check(&r.lines, None)?.ending, Ending::Rotated);
        r.record(2);
        assert_eq!(check(&r.lines, None).unwrap_err(), Broken::AfterRotate { line: 4, rotate_line: 3 });
        Ok(())
    }

    #[test]
    fn a_restart_after_a_crash_is_a_note_not_a_break() -> Result<(), Broken> {
        let mut w = Writer::new();
        w.checkpoint(Kind::Open, NOW - 60_000, false);
        w.record(1);
        w.record(2);
        // Crash: no close; the next start says so.
        w.checkpoint(Kind::Open, NOW - 30_000, true);
        w.record(3);
        w.checkpoint(Kind::Close, NOW - 29_000, false);
        let report = check(&w.lines, None)?;
        assert_eq!(report.ending, Ending::Closed);
        assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
        assert!(report.notes[0].contains("seq 2..3"), "{:?}", report.notes);
        Ok(())
    }
}
