//! Storage tests: openraft's conformance suite against the RocksDB log store and state machine, and
//! Coffer's own command semantics.

#![allow(missing_docs)] // test helpers are documented where it helps, not by rule

mod t10_openraft_suite;
mod t20_commands;
mod t30_format;

/// A path the test knows is valid.
pub(crate) fn must_path(path: &str) -> coffer_raft::SecretPath {
    coffer_raft::SecretPath::parse(path).expect("a valid test path")
}

/// A key name the test knows is valid.
pub(crate) fn must_name(name: &str) -> coffer_raft::KeyName {
    coffer_raft::KeyName::parse(name).expect("a valid test key name")
}
