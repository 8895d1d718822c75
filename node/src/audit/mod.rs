//! Audit (issue #13), first part: the spool and its chain, and a record per public call when
//! the config names a spool (`[audit] spool = "audit.log"`); off by default until the rest of
//! the issue (checkpoints, value HMACs, sinks, its cost measured) is done.
//!
//! | module | what |
//! |---|---|
//! | [`chain`] | the file format: JSON lines hash-chained to the line before; `verify` |
//! | [`spool`] | the node's spool: one writer thread, grouped appends, one fsync per group, fail closed |
//! | [`layer`] | one record per public call, written before the answer leaves (opt-in: `[audit] spool`) |
//! | [`cli`] | `coffer audit verify FILE…`, `coffer audit tail FILE` with filters |
//!
//! Still to come (see the issue): HSM-signed checkpoints
//! (what makes a file cut short after a checkpoint detectable), keyed HMACs of values, sinks that
//! drain the spool asynchronously, `coffer audit tail` and `hash`, and the cost in `scripts/bench`.

pub mod chain;
pub mod cli;
pub mod layer;
pub mod spool;
