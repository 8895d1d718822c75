//! The Coffer server and the `coffer` command-line client.
//!
//! `node` starts the pieces in order (HSM, store, Raft, keyring); `op/` holds one use case per
//! file; `service/` holds the thin tonic services; `error` maps every failure to a gRPC status in
//! one place; `cli/` is the `coffer` binary's commands.

pub mod cli;
pub mod config;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod node;
pub mod op;
pub mod server;
pub mod service;
pub mod validate;

pub use config::Config;
pub use error::Error;
pub use node::Node;
pub use server::run;
