//! Storage tests: openraft's conformance suite against the RocksDB log store and state machine, and
//! Coffer's own command semantics.

#![allow(missing_docs)] // test helpers are documented where it helps, not by rule

mod t10_openraft_suite;
mod t20_commands;
mod t30_format;
