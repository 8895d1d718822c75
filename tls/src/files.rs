//! Reading and writing certificate and key files.

use std::io::Write as _;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

fn read_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Read { path: path.to_owned(), source }
}

/// The certificates in a PEM file, leaf first.
///
/// # Errors
/// [`Error::Read`], or [`Error::NoCertificate`] when the file holds none.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = std::fs::read(path).map_err(read_error(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(Error::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// The private key in a PEM file, which only its owner may read.
///
/// # Errors
/// [`Error::KeyExposed`] when group or others may read it; [`Error::Read`]; [`Error::NoKey`].
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    check_private(path)?;
    let bytes = std::fs::read(path).map_err(read_error(path))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| Error::NoKey { path: path.to_owned() })
}

/// The PEM text of a file, for APIs that take PEM.
pub(crate) fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(read_error(path))
}

/// Refuses a key file that group or others may read.
pub(crate) fn check_private(path: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(read_error(path))?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::KeyExposed { path: path.to_owned(), mode });
        }
    }
    Ok(())
}

/// Writes a new file, never replacing one: `0600` for keys, `0644` for certificates.
pub(crate) fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), Error> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Exists { path: path.to_owned() }
        } else {
            Error::Write { path: path.to_owned(), source }
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(|source| Error::Write { path: path.to_owned(), source })
}
