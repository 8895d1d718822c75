//! Secrets: versioned values sealed by a data key each, under a path.

pub mod cli;
pub mod describe;
pub mod get;
pub mod list;
pub mod put;
pub mod service;
pub mod set_state;

pub use service::SecretsService;
