//! Audit (issue #13), first part: the spool and its chain. Not yet wired into the request path.
//!
//! | module | what |
//! |---|---|
//! | [`chain`] | the file format: JSON lines hash-chained to the line before; `verify` |
//! | [`spool`] | the node's spool: one writer thread, grouped appends, one fsync per group, fail closed |
//! | [`cli`] | `coffer audit verify FILE…` |
//!
//! Still to come (see the issue): a record per call from every service, HSM-signed checkpoints
//! (what makes a file cut short after a checkpoint detectable), keyed HMACs of values, sinks that
//! drain the spool asynchronously, `coffer audit tail` and `hash`, and the cost in `scripts/bench`.

pub mod chain;
pub mod cli;
pub mod spool;
