//! Where the HSM is and how to log in to it.

use std::path::{Path, PathBuf};

use crate::error::HsmError;
use crate::secret::Pin;

/// Paths where PKCS#11 modules for SoftHSM2 are installed by common distributions, in search order.
pub const SOFTHSM_MODULE_PATHS: &[&str] = &[
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/// The default label of the root key inside the token.
pub const DEFAULT_ROOT_KEY_LABEL: &str = "coffer-root";

/// How to reach the HSM and which key in it is the root key.
#[derive(Debug, Clone)]
pub struct HsmConfig {
    /// The PKCS#11 module; `None` searches [`SOFTHSM_MODULE_PATHS`].
    pub module: Option<PathBuf>,
    /// The label of the token that holds the root key.
    pub token_label: String,
    /// Where the user PIN comes from.
    pub pin: PinSource,
    /// The label of the root key inside the token.
    pub root_key_label: String,
    /// How many logged-in sessions (each owned by a thread) to keep. SoftHSM serialises calls, so
    /// one or two are enough for it.
    pub sessions: usize,
    /// Fault injection for failover drills: while this file exists, every call to the HSM fails
    /// with [`HsmError::Unavailable`] as if the token had been taken away. `None` in production.
    pub fault_file: Option<PathBuf>,
}

/// Where the HSM user PIN is read from. Never a command-line argument: those are visible to every
/// user of the machine through `ps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file whose content (without a trailing newline) is the PIN.
    File(PathBuf),
    /// An environment variable that holds the PIN.
    Env(String),
}

impl PinSource {
    /// Reads the PIN.
    ///
    /// # Errors
    /// [`HsmError::PinUnavailable`] when the file cannot be read, the variable is unset, or the PIN
    /// is empty.
    pub fn read(&self) -> Result<Pin, HsmError> {
        let raw = match self {
            PinSource::File(path) => std::fs::read_to_string(path).map_err(|e| HsmError::PinUnavailable {
                reason: format!("cannot read PIN file {}: {e}", path.display()),
            })?,
            PinSource::Env(var) => std::env::var(var)
                .map_err(|_| HsmError::PinUnavailable { reason: format!("environment variable {var} is not set") })?,
        };
        let pin = raw.trim_end_matches(['\r', '\n']).to_owned();
        drop(zeroize::Zeroizing::new(raw));
        if pin.is_empty() {
            return Err(HsmError::PinUnavailable { reason: format!("the PIN from {self} is empty") });
        }
        Ok(Pin::new(pin))
    }
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(path) => write!(f, "file {}", path.display()),
            PinSource::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// Finds the PKCS#11 module: the configured path, or the first SoftHSM2 install found.
///
/// # Errors
/// [`HsmError::ModuleNotFound`] listing every path tried.
pub fn resolve_module(configured: Option<&Path>) -> Result<PathBuf, HsmError> {
    let candidates: Vec<PathBuf> = match configured {
        Some(path) => vec![path.to_owned()],
        None => SOFTHSM_MODULE_PATHS.iter().map(PathBuf::from).collect(),
    };
    candidates.iter().find(|p| p.is_file()).cloned().ok_or(HsmError::ModuleNotFound { searched: candidates })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_module_that_is_missing_is_named() {
        let err = resolve_module(Some(Path::new("/nonexistent/libpkcs11.so"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/libpkcs11.so"), "{err}");
    }

    #[test]
    fn pin_file_trailing_newline_is_dropped_and_empty_pin_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\n")?;
        let pin = PinSource::File(path.clone()).read()?;
        assert_eq!(format!("{pin:?}"), "Pin([redacted])");
        std::fs::write(&path, "\n")?;
        let err = PinSource::File(path).read().unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        Ok(())
    }

    #[test]
    fn missing_pin_variable_is_named() {
        let err = PinSource::Env("COFFER_TEST_PIN_THAT_IS_NOT_SET".into()).read().unwrap_err();
        assert!(err.to_string().contains("COFFER_TEST_PIN_THAT_IS_NOT_SET"), "{err}");
    }
}
