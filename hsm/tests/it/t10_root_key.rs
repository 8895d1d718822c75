use coffer_hsm::{init_root_key, Hsm, HsmError, Key256};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use cryptoki::session::UserType;

use crate::{must_config, PIN};

#[tokio::test]
async fn wrap_unwrap_round_trip_and_tamper_detection() -> anyhow::Result<()> {
    let config = must_config("t-roundtrip");
    let created_kcv = init_root_key(&config)?;
    let hsm = Hsm::open(&config)?;
    assert_eq!(hsm.kcv(), &created_kcv, "the KCV is a function of the key alone");
    assert_eq!(hsm.probe().await?, created_kcv);

    let key = Key256::random(&ring::rand::SystemRandom::new()).map_err(|_| anyhow::anyhow!("rng"))?;
    let wrapped = hsm.wrap(&key).await?;
    assert_eq!(wrapped.len(), 40, "RFC 5649 adds 8 bytes to a 32-byte key");
    assert!(!wrapped.windows(32).any(|w| w == key.expose_secret()), "wrapped form must not contain the key");
    let back = hsm.unwrap(&wrapped).await?;
    assert_eq!(back.expose_secret(), key.expose_secret());

    for i in [0, 17, wrapped.len() - 1] {
        let mut bad = wrapped.clone();
        bad[i] ^= 0x01;
        assert!(matches!(hsm.unwrap(&bad).await, Err(HsmError::Integrity)), "flipped byte {i} must fail");
    }
    assert!(matches!(hsm.unwrap(&wrapped[..39]).await, Err(HsmError::Integrity)));

    // Many concurrent callers share the pool.
    let jobs: Vec<_> = (0..32)
        .map(|_| {
            let hsm = hsm.clone();
            let wrapped = wrapped.clone();
            tokio::spawn(async move { hsm.unwrap(&wrapped).await.map(|k| *k.expose_secret()) })
        })
        .collect();
    for job in jobs {
        assert_eq!(&job.await??, key.expose_secret());
    }
    Ok(())
}

#[test]
fn init_refuses_to_replace_an_existing_root_key() -> anyhow::Result<()> {
    let config = must_config("t-init");
    let kcv = init_root_key(&config)?;
    let err = init_root_key(&config).unwrap_err();
    assert!(matches!(err, HsmError::RootKeyExists { .. }), "{err}");
    assert!(err.to_string().contains("refusing to replace"), "{err}");
    assert_eq!(Hsm::open(&config)?.kcv(), &kcv, "the first key is still the root key");
    Ok(())
}

/// Through plain PKCS#11, as any other program on the machine could try: the root key's value cannot
/// be read, and the key cannot be wrapped out of the token.
#[test]
fn root_key_value_cannot_be_read_out() -> anyhow::Result<()> {
    let config = must_config("t-unreadable");
    init_root_key(&config)?;
    let _hsm = Hsm::open(&config)?; // initialises the process's PKCS#11 context
    let ctx = cryptoki::context::Pkcs11::new(coffer_hsm::resolve_module(None)?)?;
    // The library is already initialised in this process; this handle shares its state.
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_initialized_token()?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).map(|i| i.label().trim_end() == "t-unreadable").unwrap_or(false))
        .ok_or_else(|| anyhow::anyhow!("token t-unreadable"))?;
    let session = ctx.open_rw_session(slot)?;
    match session.login(UserType::User, Some(&PIN.to_owned().into())) {
        Ok(()) | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => return Err(e.into()),
    }
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(config.root_key_label.as_bytes().to_vec()),
    ])?;
    assert_eq!(found.len(), 1);
    let root = found[0];

    let info = session.get_attribute_info(root, &[AttributeType::Value])?;
    assert!(matches!(info.as_slice(), [AttributeInfo::Sensitive]), "CKA_VALUE must be sensitive: {info:?}");
    let values = session.get_attributes(root, &[AttributeType::Value])?;
    assert!(!values.iter().any(|a| matches!(a, Attribute::Value(_))), "CKA_VALUE was returned");

    let flags = session.get_attributes(
        root,
        &[AttributeType::AlwaysSensitive, AttributeType::NeverExtractable, AttributeType::Extractable],
    )?;
    assert!(flags.contains(&Attribute::AlwaysSensitive(true)), "{flags:?}");
    assert!(flags.contains(&Attribute::NeverExtractable(true)), "{flags:?}");
    assert!(flags.contains(&Attribute::Extractable(false)), "{flags:?}");

    // Wrapping the root key out (with itself as the wrapping key) is refused.
    assert!(session.wrap_key(&cryptoki::mechanism::Mechanism::AesKeyWrapPad, root, root).is_err());
    // Nor can it be made extractable after the fact.
    assert!(session.update_attributes(root, &[Attribute::Extractable(true)]).is_err());
    assert!(session.update_attributes(root, &[Attribute::Sensitive(false)]).is_err());
    Ok(())
}

/// The audit signing key: created once in the token, found again on the next ask, its signatures
/// verify with the public half alone (as `coffer audit verify` checks them), a changed message
/// fails, and the private half's value cannot be read.
#[tokio::test]
async fn signing_key_signs_verifiably_and_stays_in_the_token() -> anyhow::Result<()> {
    let config = must_config("t-sign");
    init_root_key(&config)?;
    let hsm = Hsm::open(&config)?;
    let key = hsm.signing_key("coffer-audit-test").await?;
    assert_eq!(key.public.len(), 65);
    assert_eq!(hsm.signing_key("coffer-audit-test").await?.public, key.public, "the same pair, found again");
    let signature = hsm.sign(&key, b"checkpoint 42").await?;
    let public = ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, &key.public);
    assert!(public.verify(b"checkpoint 42", &signature).is_ok());
    assert!(public.verify(b"checkpoint 43", &signature).is_err(), "another message must not verify");
    let other = hsm.signing_key("coffer-audit-other").await?;
    assert_ne!(other.public, key.public, "another label is another key");

    let ctx = cryptoki::context::Pkcs11::new(coffer_hsm::resolve_module(None)?)?;
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK));
    let slot = ctx
        .get_slots_with_initialized_token()?
        .into_iter()
        .find(|s| ctx.get_token_info(*s).map(|i| i.label().trim_end() == "t-sign").unwrap_or(false))
        .ok_or_else(|| anyhow::anyhow!("token t-sign"))?;
    let session = ctx.open_rw_session(slot)?;
    let _ = session.login(UserType::User, Some(&PIN.to_owned().into()));
    let private = session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY), Attribute::Label(b"coffer-audit-test".to_vec())])?;
    assert_eq!(private.len(), 1);
    let info = session.get_attribute_info(private[0], &[AttributeType::Value])?;
    assert!(matches!(info[0], AttributeInfo::Sensitive), "the private value must be unreadable: {info:?}");
    Ok(())
}
