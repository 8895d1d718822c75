//! Keys (encryption as a service): named keys with versions, their management through the log,
//! crypto calls served from memory on every node, automatic rotation and usage statistics.

pub mod auto_rotate;
pub mod cli;
pub mod crypto;
pub mod manage;
pub mod material;
pub mod service;
pub mod stats;

pub use material::{generate, new_version, unwrap_version, KeyCache, LoadedKey, Usage, VersionUsage, Versioned};
pub use service::KeysService;
pub use stats::StatsService;
