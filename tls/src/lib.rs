//! TLS for Coffer: certificate and key files, a small certificate authority for teams without a
//! PKI, a server configuration that reloads when its files change, and the client configuration
//! the CLI, the nodes, the tests, drills and benchmarks use.
//!
//! # Correctness
//! - rustls with the ring provider only (the provider Coffer's crypto already uses); no crate
//!   here turns on aws-lc-rs. TLS 1.3 is preferred, 1.2 allowed.
//! - A private key file readable by anyone but its owner is refused, naming the file.
//! - Reloading never serves a half-written pair: the new files are parsed and the key checked
//!   against the certificate before they replace the old ones; on any error the old ones stay.
//!   Established connections keep the configuration they were accepted with.
//! - Identities: a node's certificate carries the URI SAN `spiffe://coffer/node/<id>`, a client's
//!   `spiffe://coffer/client/<name>` ([`identity`] reads them back). The CA is the cluster's trust
//!   root, so the cluster is implied by who signed the certificate.

mod client;
mod files;
mod pki;
mod server;

use std::path::PathBuf;

pub use client::{client_config, ClientFiles};
pub use files::{read_certs, read_key};
pub use pki::{common_name, identity, login_name, Ca, Identity, Issued, Subject, CA_CERT, CA_KEY};
pub use server::{ClientCerts, ReloadingServer, ServerFiles};

/// Everything that can go wrong with certificates and TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file that must not be replaced exists.
    #[error("{path} exists already; remove it first or write to another directory")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error("{path} holds no PEM private key")]
    NoKey {
        /// The file.
        path: PathBuf,
    },
    /// A private key file that others can read.
    #[error("private key file {path} is readable by others (mode {mode:03o}); run: chmod 600 {path}")]
    KeyExposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// rustls refused the configuration (a key that does not match its certificate, …).
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificates could not verify client certificates.
    #[error("cannot verify client certificates with the CA file: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// An argument breaks a rule.
    #[error("{rule}")]
    Invalid {
        /// The rule, in words.
        rule: String,
    },
}

/// Makes ring the process's rustls provider, for code (tonic's client) that asks for the default.
/// Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
