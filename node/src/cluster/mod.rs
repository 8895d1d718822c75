//! The cluster: initialise, join, remove, transfer leadership, status.

pub mod cli;
pub mod ops;
pub mod service;

pub use service::OperatorService;
