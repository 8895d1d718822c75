// Hot path: every secret and key request parses its path or name.
//! The domain's values, parsed once at the edge and carried by commands: a [`SecretPath`], a
//! [`KeyName`], a [`RequestId`], a [`UnixMillis`] time, and the numbers that must not be mixed
//! up ([`SecretVersion`], [`KeyVersion`], [`KeyringVersion`], [`NodeId`]). Holding one is the proof that its rules
//! hold; nothing downstream checks again.
//!
//! # Correctness
//! - The store keys a secret's versions by `path 0x00 version`, so a path never contains `0x00`:
//!   [`SecretPath`] allows only `[A-Za-z0-9._-]` segments.
//! - Decoding checks the same rules (`serde(try_from)`): a command forged on the peer port cannot
//!   carry a path or name the API would refuse. The encoding is the plain string, as in format 1.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The longest secret path, in bytes.
pub const MAX_PATH_BYTES: usize = 512;
/// The longest key name, in bytes.
pub const MAX_KEY_NAME_BYTES: usize = 128;
/// The longest request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

fn invalid(rule: String) -> Error {
    Error::InvalidInput { rule }
}

/// A secret's path: `/`-separated segments of `[A-Za-z0-9._-]`, no empty, `.` or `..` segment,
/// at most [`MAX_PATH_BYTES`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretPath(String);

impl SecretPath {
    /// Parses a path.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the broken rule.
    pub fn parse(path: &str) -> Result<SecretPath, Error> {
        if path.is_empty() {
            return Err(invalid("the path is empty".into()));
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(invalid(format!(
                "the path is {} bytes long; at most {MAX_PATH_BYTES} are allowed",
                path.len()
            )));
        }
        for segment in path.split('/') {
            if segment.is_empty() {
                return Err(invalid("the path has an empty segment (a leading, trailing or doubled '/')".into()));
            }
            if segment == "." || segment == ".." {
                return Err(invalid(format!("the path has a '{segment}' segment; '.' and '..' are not allowed")));
            }
            if let Some(c) = segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
                return Err(invalid(format!("the path contains {c:?}; segments may only contain A-Z a-z 0-9 . _ -")));
            }
        }
        Ok(SecretPath(path.to_owned()))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A named key's name: 1 to [`MAX_KEY_NAME_BYTES`] characters of `[A-Za-z0-9._-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyName(String);

impl KeyName {
    /// Parses a key name.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the broken rule.
    pub fn parse(name: &str) -> Result<KeyName, Error> {
        if name.is_empty() || name.len() > MAX_KEY_NAME_BYTES {
            return Err(invalid(format!("a key name is 1 to {MAX_KEY_NAME_BYTES} characters long")));
        }
        if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            return Err(invalid(format!("the key name contains {c:?}; only A-Z a-z 0-9 . _ - are allowed")));
        }
        Ok(KeyName(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A client's idempotency key: 1 to [`MAX_REQUEST_ID_BYTES`] bytes of visible ASCII (a UUID, a
/// ULID, `job-42:retry`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RequestId(String);

impl RequestId {
    /// Parses a request's idempotency key; the empty string means none.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the broken rule.
    pub fn parse(id: &str) -> Result<Option<RequestId>, Error> {
        if id.is_empty() {
            return Ok(None);
        }
        if id.len() > MAX_REQUEST_ID_BYTES {
            return Err(invalid(format!(
                "request_id is {} bytes long; at most {MAX_REQUEST_ID_BYTES} are allowed",
                id.len()
            )));
        }
        if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(invalid(format!("request_id contains {c:?}; only visible ASCII characters are allowed")));
        }
        Ok(Some(RequestId(id.to_owned())))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype {
    ($name:ident, $parse:expr) => {
        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                ($parse)(&s)
            }
        }
        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(SecretPath, SecretPath::parse);
string_newtype!(KeyName, KeyName::parse);
string_newtype!(RequestId, |s: &str| RequestId::parse(s)?.ok_or_else(|| invalid("request_id is empty".into())));

macro_rules! number_newtype {
    ($(#[$doc:meta])* $name:ident($inner:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            /// The number after this one; `None` at the largest.
            pub fn next(self) -> Option<$name> {
                self.0.checked_add(1).map($name)
            }
        }

        impl From<$inner> for $name {
            fn from(value: $inner) -> $name {
                $name(value)
            }
        }

        impl From<$name> for $inner {
            fn from(value: $name) -> $inner {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

number_newtype!(
    /// A secret's version number. Versions start at 1 and are never reused; 0 stands for "no
    /// version yet" where a current version is asked for (a check-and-set on a new secret).
    SecretVersion(u64)
);
number_newtype!(
    /// A named key's version number, from 1; the newest is the primary.
    KeyVersion(u32)
);
number_newtype!(
    /// A keyring key's version number, from 1.
    KeyringVersion(u32)
);
number_newtype!(
    /// A node's id in the cluster, fixed in its config; 0 is never a member.
    NodeId(u64)
);

/// Where a node is reached: its client address (the public API) and its peer address
/// (`coffer.raft.v1`, mutual TLS). Membership keeps both in openraft's `BasicNode.addr` as
/// `client;peer=peer`; a plain `host:port` (a node with TLS off, or a member recorded before
/// the peer port existed) means both are on one port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub struct NodeAddrs {
    /// `host:port` of the public API.
    pub client: String,
    /// `host:port` other nodes dial.
    pub peer: String,
}

const PEER_MARK: &str = ";peer=";

impl NodeAddrs {
    /// Both on one port.
    pub fn single(addr: &str) -> NodeAddrs {
        NodeAddrs { client: addr.to_owned(), peer: addr.to_owned() }
    }
}

impl From<String> for NodeAddrs {
    fn from(text: String) -> NodeAddrs {
        match text.split_once(PEER_MARK) {
            Some((client, peer)) => NodeAddrs { client: client.to_owned(), peer: peer.to_owned() },
            None => NodeAddrs::single(&text),
        }
    }
}

impl From<NodeAddrs> for String {
    fn from(addrs: NodeAddrs) -> String {
        if addrs.client == addrs.peer {
            addrs.client
        } else {
            format!("{}{PEER_MARK}{}", addrs.client, addrs.peer)
        }
    }
}

impl fmt::Display for NodeAddrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.client == self.peer {
            f.write_str(&self.client)
        } else {
            write!(f, "{} (peers: {})", self.client, self.peer)
        }
    }
}

/// A wall-clock time, milliseconds since the Unix epoch, as the proposer stamped it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    /// Now, by this machine's clock (0 before 1970, the largest value past 584 million years).
    pub fn now() -> UnixMillis {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        UnixMillis(since.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
    }
}

impl fmt::Display for UnixMillis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<UnixMillis> for u64 {
    fn from(value: UnixMillis) -> u64 {
        value.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(p: &str) -> String {
        match SecretPath::parse(p) {
            Err(Error::InvalidInput { rule }) => rule,
            other => panic!("{p:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn good_paths() {
        for p in ["a", "db/password", "team-1/app_2/v1.2", "...x/y..", &"a".repeat(512)] {
            assert!(SecretPath::parse(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn bad_paths_name_the_rule() {
        assert!(rule("").contains("empty"));
        assert!(rule("/a").contains("empty segment"));
        assert!(rule("a/").contains("empty segment"));
        assert!(rule("a//b").contains("empty segment"));
        assert!(rule("a/./b").contains("'.'"));
        assert!(rule("a/../b").contains("'..'"));
        assert!(rule("a b").contains("' '"));
        assert!(rule("a/é").contains("'é'"));
        assert!(rule("a\u{0}b").contains("'\\0'"));
        assert!(rule(&"a".repeat(513)).contains("513 bytes"));
    }

    #[test]
    fn names_and_request_ids() -> Result<(), Error> {
        assert!(KeyName::parse("orders.v2_key-1").is_ok());
        assert!(KeyName::parse("").is_err() && KeyName::parse("a/b").is_err());
        assert!(KeyName::parse(&"k".repeat(129)).is_err());
        assert_eq!(RequestId::parse("")?, None);
        assert_eq!(RequestId::parse("job-42:retry")?.map(String::from), Some("job-42:retry".into()));
        assert!(RequestId::parse("a b").is_err() && RequestId::parse("a\u{1}").is_err());
        assert!(RequestId::parse(&"r".repeat(129)).is_err());
        Ok(())
    }

    /// The newtypes encode as the plain values of format 1, and decoding checks the rules: a
    /// forged path with a 0x00 (which would alias another secret's version keys) does not decode.
    #[test]
    fn encoding_is_the_plain_value_and_decoding_checks_the_rules() -> Result<(), postcard::Error> {
        let path = SecretPath::parse("a/b").map_err(|_| postcard::Error::SerdeDeCustom)?;
        assert_eq!(postcard::to_allocvec(&path)?, postcard::to_allocvec("a/b")?);
        assert_eq!(postcard::to_allocvec(&UnixMillis(7))?, postcard::to_allocvec(&7u64)?);
        assert_eq!(postcard::to_allocvec(&SecretVersion(300))?, postcard::to_allocvec(&300u64)?);
        assert_eq!(postcard::to_allocvec(&KeyVersion(300))?, postcard::to_allocvec(&300u32)?);
        assert_eq!(postcard::to_allocvec(&NodeId(3))?, postcard::to_allocvec(&3u64)?);
        assert!(postcard::from_bytes::<SecretPath>(&postcard::to_allocvec("a\0b")?).is_err());
        assert!(postcard::from_bytes::<KeyName>(&postcard::to_allocvec("a b")?).is_err());
        assert!(postcard::from_bytes::<RequestId>(&postcard::to_allocvec("")?).is_err());
        assert_eq!(postcard::from_bytes::<SecretPath>(&postcard::to_allocvec("a/b")?)?, path);
        Ok(())
    }

    #[test]
    fn node_addresses_round_trip_and_a_plain_one_means_one_port() {
        let both = NodeAddrs { client: "10.0.0.1:8200".into(), peer: "10.0.0.1:8201".into() };
        assert_eq!(String::from(both.clone()), "10.0.0.1:8200;peer=10.0.0.1:8201");
        assert_eq!(NodeAddrs::from(String::from(both.clone())), both);
        assert_eq!(NodeAddrs::from("10.0.0.1:8200".to_owned()), NodeAddrs::single("10.0.0.1:8200"));
        assert_eq!(String::from(NodeAddrs::single("h:1")), "h:1");
    }
}
