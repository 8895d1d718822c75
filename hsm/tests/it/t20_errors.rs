use std::path::PathBuf;

use coffer_hsm::{init_root_key, Hsm, HsmError, PinSource};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;

use crate::{must_config, PIN};

#[test]
fn module_not_found_names_the_path() {
    let mut config = must_config("t-missing");
    config.module = Some(PathBuf::from("/nonexistent/libsofthsm2.so"));
    let err = Hsm::open(&config).unwrap_err();
    assert!(matches!(err, HsmError::ModuleNotFound { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/libsofthsm2.so"), "{err}");
}

#[test]
fn token_not_found_lists_the_tokens_present() {
    let mut config = must_config("t-missing");
    config.token_label = "no-such-token".into();
    let err = Hsm::open(&config).unwrap_err();
    assert!(matches!(err, HsmError::TokenNotFound { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("no-such-token") && text.contains("t-missing"), "{text}");
}

#[test]
fn wrong_pin_is_reported_as_such() -> anyhow::Result<()> {
    let mut config = must_config("t-wrongpin");
    let dir = tempfile::tempdir()?;
    let pin = dir.path().join("pin");
    std::fs::write(&pin, "000000")?;
    config.pin = PinSource::File(pin);
    let err = Hsm::open(&config).unwrap_err();
    assert!(matches!(err, HsmError::WrongPin { .. }), "{err}");
    assert!(err.to_string().contains("wrong PIN"), "{err}");
    Ok(())
}

#[test]
fn missing_root_key_names_the_command_that_creates_it() {
    let err = Hsm::open(&must_config("t-missing")).unwrap_err();
    assert!(matches!(err, HsmError::RootKeyMissing { .. }), "{err}");
    assert!(err.to_string().contains("coffer hsm init-root-key"), "{err}");
}

/// Plants a key under the root-key label with the given template, bypassing `init_root_key`.
fn must_plant_key(token: &str, extractable: bool, sensitive: bool) -> anyhow::Result<()> {
    let config = must_config(token);
    // Opening fails (no root key yet) but initialises the process's PKCS#11 context first.
    let _ = Hsm::open(&config);
    let ctx = cryptoki::context::Pkcs11::new(coffer_hsm::resolve_module(None)?)?;
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_initialized_token()?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).map(|i| i.label().trim_end() == token).unwrap_or(false))
        .ok_or_else(|| anyhow::anyhow!("token {token}"))?;
    let session = ctx.open_rw_session(slot)?;
    match session.login(UserType::User, Some(&PIN.to_owned().into())) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(e.into()),
    }
    session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(32.into()),
            Attribute::Label(config.root_key_label.as_bytes().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(sensitive),
            Attribute::Extractable(extractable),
            Attribute::Wrap(true),
            Attribute::Unwrap(true),
        ],
    )?;
    Ok(())
}

#[test]
fn extractable_root_key_is_refused() -> anyhow::Result<()> {
    must_plant_key("t-extractable", true, true)?;
    let err = Hsm::open(&must_config("t-extractable")).unwrap_err();
    assert!(matches!(err, HsmError::RootKeyUnsafe { .. }), "{err}");
    assert!(err.to_string().contains("extractable"), "{err}");
    // And init-root-key will not paper over it.
    assert!(matches!(init_root_key(&must_config("t-extractable")), Err(HsmError::RootKeyExists { .. })));
    Ok(())
}

#[test]
fn insensitive_root_key_is_refused() -> anyhow::Result<()> {
    must_plant_key("t-insensitive", false, false)?;
    let err = Hsm::open(&must_config("t-insensitive")).unwrap_err();
    assert!(matches!(err, HsmError::RootKeyUnsafe { .. }), "{err}");
    assert!(err.to_string().contains("not sensitive"), "{err}");
    Ok(())
}
