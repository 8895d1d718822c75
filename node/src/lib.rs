//! The Coffer server and the `coffer` command-line client, organised by domain.
//!
//! | module | what |
//! |---|---|
//! | [`secrets`] | the Secrets service, its use cases (put, get, describe, list, delete/undelete/destroy), `coffer secret` |
//! | [`rotation`] | secret rotation: rotators (generator, PostgreSQL), the leader's worker, schedules, Watch, `coffer secret rotation` |
//! | [`keys`] | the Keys service, key management and crypto, key material in memory, automatic rotation, usage stats, `coffer key` |
//! | [`cluster`] | the Operator service, membership and leadership, `coffer operator` |
//! | [`audit`] | a record per public call: the spool, its hash chain, HSM-signed checkpoints, `coffer audit` |
//! | [`auth`] | tokens, certificate login, policies, the per-call check, `coffer token/login/policy` |
//! | [`node`] | a running node: HSM, store, replica and keyring, started in order |
//! | [`envelope`] | the keyring and envelope encryption of secret values |
//! | [`error`] | the one error type and its one mapping to a gRPC status |
//! | [`cli`] | the `coffer` binary's dispatch, dev cluster and HSM set-up |
//!
//! In each domain, `service.rs` is a thin tonic adapter (parse the wire request, call one use
//! case, build the reply), the use cases are the other files, and `cli.rs` is its commands.

pub mod audit;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod envelope;
pub mod error;
pub mod keys;
pub mod node;
pub mod rotation;
pub mod secrets;
pub mod server;
pub mod validate;
mod wire;

pub use config::Config;
pub use error::Error;
pub use node::Node;
pub use server::run;
