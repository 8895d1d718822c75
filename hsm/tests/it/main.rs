//! HSM integration tests against real SoftHSM2 through PKCS#11.
//!
//! A PKCS#11 library has one state per process, and SoftHSM reads its config (SOFTHSM2_CONF) when
//! that state is created. So the fixture creates, once per test binary and before any PKCS#11 call,
//! a private token directory holding one freshly initialised token per test; each test uses only its
//! own token.

#![allow(missing_docs)] // test helpers are documented where it helps, not by rule

mod t10_root_key;
mod t20_errors;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use coffer_hsm::{HsmConfig, PinSource, DEFAULT_ROOT_KEY_LABEL};

pub const PIN: &str = "123456";

/// Every token a test in this binary uses.
const TOKENS: &[&str] =
    &["t-roundtrip", "t-init", "t-unreadable", "t-missing", "t-wrongpin", "t-extractable", "t-insensitive"];

struct Fixture {
    _dir: tempfile::TempDir,
    pin_file: PathBuf,
}

fn must_fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temp dir for the tokens");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("the token directory");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
        )
        .expect("the softhsm2.conf");
        for label in TOKENS {
            let status = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args(["--init-token", "--free", "--label", label, "--so-pin", "87654321", "--pin", PIN])
                .stdout(std::process::Stdio::null())
                .status()
                .expect("softhsm2-util runs (apt-get install softhsm2)");
            assert!(status.success(), "softhsm2-util --init-token {label} failed");
        }
        // Set before the first PKCS#11 call of this process, while no other thread reads the
        // environment: the OnceLock runs this closure once, and every test enters through it.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        let pin_file = dir.path().join("pin");
        std::fs::write(&pin_file, format!("{PIN}\n")).expect("the PIN file");
        Fixture { _dir: dir, pin_file }
    })
}

/// A config for one of the fixture's tokens.
pub fn must_config(token: &str) -> HsmConfig {
    let fixture = must_fixture();
    assert!(TOKENS.contains(&token), "token {token} is not in the fixture");
    HsmConfig {
        fault_file: None,
        module: None,
        token_label: token.to_owned(),
        pin: PinSource::File(fixture.pin_file.clone()),
        root_key_label: DEFAULT_ROOT_KEY_LABEL.to_owned(),
        sessions: 2,
    }
}
