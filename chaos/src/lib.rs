//! Failover drills for Coffer.
//!
//! A drill starts a fresh local cluster of real `coffer` processes, runs a recorded workload of
//! secret writes and reads and Keys encrypts and decrypts against every node, injects a real fault
//! (signals to processes, cut node-to-node links, a failing HSM), heals it, and then checks: the history is linearizable per secret,
//! bounded-staleness reads respect their bound, every acknowledged write reads back on every node,
//! every acknowledged ciphertext decrypts on every node, and no write was applied twice. The report
//! gives the unavailability window, errors by status and latency around the fault. The local
//! clusters come from `coffer-testkit`'s launcher, the one the node tests use.

pub mod checker;
pub mod fault;
pub mod history;
pub mod links;
pub mod report;
pub mod revoke;
pub mod scenario;
pub mod wgl;
pub mod workload;
