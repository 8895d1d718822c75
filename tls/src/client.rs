//! The client side: what the CLI, the nodes (dialling each other), tests, drills and benchmarks
//! present and trust.

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::files::{check_private, read_text};
use crate::Error;

/// The files a client's TLS is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// CA certificates the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client's own certificate and key, for servers that ask for one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A tonic client TLS configuration from `files`. The server's certificate must name the host
/// the client dials (a DNS name or an IP address SAN).
///
/// # Errors
/// A missing or unreadable file; an identity key others can read.
pub fn client_config(files: &ClientFiles) -> Result<ClientTlsConfig, Error> {
    crate::install_provider();
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_text(&files.ca)?));
    if let Some((cert, key)) = &files.identity {
        check_private(key)?;
        config = config.identity(Identity::from_pem(read_text(cert)?, read_text(key)?));
    }
    Ok(config)
}
