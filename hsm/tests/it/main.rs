//! HSM integration tests against real SoftHSM2 through PKCS#11.
//!
//! A PKCS#11 library has one state per process, and SoftHSM reads its config (SOFTHSM2_CONF) when
//! that state is created. So the fixture is the test kit's token set of this process, made once
//! per test binary and before any PKCS#11 call: one freshly initialised token per test, no key in
//! any; each test uses only its own token.

#![allow(missing_docs)] // test helpers are documented where it helps, not by rule

mod t10_root_key;
mod t20_errors;

use coffer_hsm::{HsmConfig, PinSource, DEFAULT_ROOT_KEY_LABEL};
use coffer_testkit::{process_softhsm, SoftHsm};

pub use coffer_testkit::PIN;

/// Every token a test in this binary uses.
const TOKENS: &[&str] =
    &["t-roundtrip", "t-init", "t-unreadable", "t-missing", "t-wrongpin", "t-extractable", "t-insensitive", "t-sign"];

/// A config for one of the fixture's tokens; panics if the fixture cannot be made.
pub fn must_config(token: &str) -> HsmConfig {
    let tokens = process_softhsm(|dir| {
        let tokens = SoftHsm::write(dir)?;
        for label in TOKENS {
            tokens.init_token(label)?;
        }
        Ok(tokens)
    })
    .expect("the SoftHSM fixture (apt-get install softhsm2)");
    assert!(TOKENS.contains(&token), "token {token} is not in the fixture");
    HsmConfig {
        fault_file: None,
        module: None,
        token_label: token.to_owned(),
        pin: PinSource::File(tokens.pin_file()),
        root_key_label: DEFAULT_ROOT_KEY_LABEL.to_owned(),
        sessions: 2,
    }
}
