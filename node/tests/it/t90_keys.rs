use std::time::{Duration, Instant};

use coffer_proto::v1::keys_client::KeysClient;
use coffer_proto::v1::{
    CreateKeyRequest, DecryptRequest, DeleteKeyRequest, EncryptRequest, GenerateDataKeyRequest, GetKeyRequest,
    HmacRequest, KeyType, ListKeysRequest, RewrapRequest, RotateKeyRequest, SignRequest, UpdateKeyConfigRequest,
    VerifyHmacRequest, VerifyRequest,
};
use tonic::transport::Channel;
use tonic::Code;

use crate::{must_start_cluster, InProcessNode, TestNode};

fn keys(channel: Channel) -> anyhow::Result<KeysClient<Channel>> {
    Ok(KeysClient::new(channel))
}

fn create(name: &str, t: KeyType) -> CreateKeyRequest {
    CreateKeyRequest { name: name.into(), r#type: t as i32, exportable: false, ..Default::default() }
}

fn enc(name: &str, plaintext: &[u8], ad: &[u8]) -> EncryptRequest {
    EncryptRequest { name: name.into(), plaintext: plaintext.to_vec(), associated_data: ad.to_vec() }
}

fn dec(name: &str, ciphertext: &str, ad: &[u8]) -> DecryptRequest {
    DecryptRequest { name: name.into(), ciphertext: ciphertext.into(), associated_data: ad.to_vec() }
}

/// Flips one bit inside the base64 body of a `coffer:v<N>:<base64>` text.
fn tamper(text: &str) -> String {
    use base64::Engine;
    let (head, body) = text.rsplit_once(':').expect("coffer text");
    let mut bytes = base64::engine::general_purpose::STANDARD.decode(body).expect("base64");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    format!("{head}:{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_type_round_trips_and_rejects_tampering() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut k = keys(node.channel().await?)?;
    for (name, t) in [
        ("aes", KeyType::Aes256Gcm),
        ("ed", KeyType::Ed25519),
        ("ec", KeyType::EcdsaP256),
        ("mac", KeyType::HmacSha256),
    ] {
        let key = k.create_key(create(name, t)).await?.into_inner();
        assert_eq!((key.primary_version, key.versions.len()), (1, 1));
    }
    let err = k.create_key(create("aes", KeyType::Aes256Gcm)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = k.create_key(create("bad name", KeyType::Aes256Gcm)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = k.create_key(create("untyped", KeyType::Unspecified)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // AES-256-GCM.
    let ct = k.encrypt(enc("aes", b"attack at dawn", b"ctx")).await?.into_inner();
    assert!(ct.ciphertext.starts_with("coffer:v1:"), "{}", ct.ciphertext);
    let pt = k.decrypt(dec("aes", &ct.ciphertext, b"ctx")).await?.into_inner();
    assert_eq!((pt.plaintext.as_slice(), pt.key_version), (&b"attack at dawn"[..], 1));
    assert_eq!(k.decrypt(dec("aes", &ct.ciphertext, b"other")).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(k.decrypt(dec("aes", &tamper(&ct.ciphertext), b"ctx")).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(k.decrypt(dec("aes", "not-a-ciphertext", b"")).await.unwrap_err().code(), Code::InvalidArgument);
    let again = k.encrypt(enc("aes", b"attack at dawn", b"ctx")).await?.into_inner();
    assert_ne!(again.ciphertext, ct.ciphertext, "nonces differ");

    // Data keys.
    let dk = k
        .generate_data_key(GenerateDataKeyRequest { name: "aes".into(), bits: 256, with_plaintext: true })
        .await?
        .into_inner();
    assert_eq!(dk.plaintext.len(), 32);
    assert_eq!(k.decrypt(dec("aes", &dk.ciphertext, b"")).await?.into_inner().plaintext, dk.plaintext);
    let dk =
        k.generate_data_key(GenerateDataKeyRequest { name: "aes".into(), bits: 128, with_plaintext: false }).await?;
    assert!(dk.into_inner().plaintext.is_empty());

    // Signatures.
    for name in ["ed", "ec"] {
        let sig = k.sign(SignRequest { name: name.into(), message: b"msg".to_vec() }).await?.into_inner();
        let ok = |m: &[u8], s: &str| VerifyRequest { name: name.into(), message: m.to_vec(), signature: s.into() };
        assert!(k.verify(ok(b"msg", &sig.signature)).await?.into_inner().valid, "{name}");
        assert!(!k.verify(ok(b"msh", &sig.signature)).await?.into_inner().valid, "{name}");
        assert!(!k.verify(ok(b"msg", &tamper(&sig.signature))).await?.into_inner().valid, "{name}");
        let key = k.get_key(GetKeyRequest { name: name.into() }).await?.into_inner();
        assert!(!key.versions[0].public_key.is_empty(), "{name} publishes its public key");
    }

    // HMAC.
    let tag = k.hmac(HmacRequest { name: "mac".into(), message: b"m".to_vec() }).await?.into_inner();
    let check = |m: &[u8], t: &str| VerifyHmacRequest { name: "mac".into(), message: m.to_vec(), hmac: t.into() };
    assert!(k.verify_hmac(check(b"m", &tag.hmac)).await?.into_inner().valid);
    assert!(!k.verify_hmac(check(b"n", &tag.hmac)).await?.into_inner().valid);

    // The wrong key type for the call.
    assert_eq!(k.encrypt(enc("ed", b"x", b"")).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(
        k.sign(SignRequest { name: "aes".into(), message: vec![] }).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(k.encrypt(enc("nope", b"x", b"")).await.unwrap_err().code(), Code::NotFound);

    let names = k.list_keys(ListKeysRequest { page_size: 3, page_token: String::new() }).await?.into_inner();
    assert_eq!(names.names, vec!["aes", "ec", "ed"]);
    let rest = k.list_keys(ListKeysRequest { page_size: 3, page_token: names.next_page_token }).await?.into_inner();
    assert_eq!(rest.names, vec!["mac"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_min_decryption_version_rewrap_and_deletion() -> anyhow::Result<()> {
    let mut node = TestNode::must_start()?;
    let mut k = keys(node.channel().await?)?;
    k.create_key(create("app", KeyType::Aes256Gcm)).await?;
    let old = k.encrypt(enc("app", b"v1 data", b"")).await?.into_inner();
    let key = k.rotate_key(RotateKeyRequest { name: "app".into(), ..Default::default() }).await?.into_inner();
    assert_eq!(key.primary_version, 2);
    let new = k.encrypt(enc("app", b"v2 data", b"")).await?.into_inner();
    assert!(new.ciphertext.starts_with("coffer:v2:"));
    assert_eq!(k.decrypt(dec("app", &old.ciphertext, b"")).await?.into_inner().plaintext, b"v1 data");

    let moved = k
        .rewrap(RewrapRequest { name: "app".into(), ciphertext: old.ciphertext.clone(), associated_data: vec![] })
        .await?
        .into_inner();
    assert_eq!(moved.key_version, 2);

    let update = |min: u32| UpdateKeyConfigRequest {
        name: "app".into(),
        min_decryption_version: Some(min),
        request_id: String::new(),
        deletion_allowed: None,
        auto_rotate_period: None,
    };
    assert_eq!(k.update_key_config(update(3)).await.unwrap_err().code(), Code::FailedPrecondition);
    k.update_key_config(update(2)).await?;
    let err = k.decrypt(dec("app", &old.ciphertext, b"")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("version 1") && err.message().contains("min_decryption_version"),
        "{}",
        err.message()
    );
    assert_eq!(k.decrypt(dec("app", &moved.ciphertext, b"")).await?.into_inner().plaintext, b"v1 data");

    // A restarted node unwraps its keys through the HSM again and answers.
    node.must_stop()?;
    node.must_restart()?;
    let mut k = keys(node.channel().await?)?;
    assert_eq!(k.decrypt(dec("app", &new.ciphertext, b"")).await?.into_inner().plaintext, b"v2 data");

    // Deletion only when allowed.
    let err = k.delete_key(DeleteKeyRequest { name: "app".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    k.update_key_config(UpdateKeyConfigRequest { deletion_allowed: Some(true), ..update(2) }).await?;
    k.delete_key(DeleteKeyRequest { name: "app".into(), ..Default::default() }).await?;
    assert_eq!(k.decrypt(dec("app", &new.ciphertext, b"")).await.unwrap_err().code(), Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_node_answers_and_a_cut_off_follower_stops_within_the_bound() -> anyhow::Result<()> {
    let mut cluster = must_start_cluster(3, "")?;
    let leader = cluster.leader()?;
    let mut on_leader = keys(cluster.channel(leader)?)?;
    on_leader.create_key(create("shared", KeyType::Aes256Gcm)).await?;
    let ct = on_leader.encrypt(enc("shared", b"hello", b"")).await?.into_inner();
    on_leader.rotate_key(RotateKeyRequest { name: "shared".into(), ..Default::default() }).await?;
    let ct2 = on_leader.encrypt(enc("shared", b"hello2", b"")).await?.into_inner();
    for i in 0..3 {
        let mut k = keys(cluster.channel(i)?)?;
        // A follower may apply the key a moment after the leader acknowledged it.
        let started = Instant::now();
        let plain = loop {
            match k.decrypt(dec("shared", &ct.ciphertext, b"")).await {
                Ok(reply) => break reply.into_inner().plaintext,
                Err(s) if s.code() == Code::NotFound && started.elapsed() < Duration::from_secs(2) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(s) => anyhow::bail!("node {}: {s}", i + 1),
            }
        };
        assert_eq!(plain, b"hello");
        let own = k.encrypt(enc("shared", b"from follower", b"")).await?.into_inner();
        assert_eq!(
            on_leader.decrypt(dec("shared", &own.ciphertext, b"")).await?.into_inner().plaintext,
            b"from follower"
        );
    }

    // Retire version 1 on the leader: every node refuses it within the staleness bound.
    on_leader
        .update_key_config(UpdateKeyConfigRequest {
            name: "shared".into(),
            min_decryption_version: Some(2),
            request_id: String::new(),
            deletion_allowed: None,
            auto_rotate_period: None,
        })
        .await?;
    for i in 0..3 {
        let mut k = keys(cluster.channel(i)?)?;
        let started = Instant::now();
        loop {
            match k.decrypt(dec("shared", &ct.ciphertext, b"")).await {
                Err(s) if s.code() == Code::FailedPrecondition => break,
                _ if started.elapsed() < Duration::from_secs(2) => tokio::time::sleep(Duration::from_millis(20)).await,
                other => anyhow::bail!("node {} still decrypts a retired version: {other:?}", i + 1),
            }
        }
    }

    // Cut a follower off (both other nodes killed: its connections break): after the bound it stops.
    let follower = (leader + 1) % 3;
    let others: Vec<usize> = (0..3).filter(|i| *i != follower).collect();
    for i in &others {
        cluster.kill(*i)?;
    }
    let mut k = keys(cluster.channel(follower)?)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = k.decrypt(dec("shared", &ct2.ciphertext, b"")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("heard from the leader"), "{}", err.message());
    for i in &others {
        cluster.start_node(*i)?;
    }
    let started = Instant::now();
    loop {
        match k.decrypt(dec("shared", &ct2.ciphertext, b"")).await {
            Ok(reply) => {
                assert_eq!(reply.into_inner().plaintext, b"hello2");
                break;
            }
            Err(s) if s.code() == Code::Unavailable && started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => anyhow::bail!("the follower did not answer again after the link came back: {s}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn batch_and_stream_give_per_item_results() -> anyhow::Result<()> {
    use coffer_proto::v1::crypto_request::Call;
    use coffer_proto::v1::crypto_result::Result as Outcome;
    use coffer_proto::v1::{BatchRequest, CryptoRequest, StreamRequest};

    let node = InProcessNode::must_start().await?;
    let mut k = keys(node.channel().await?)?;
    k.create_key(create("b", KeyType::Aes256Gcm)).await?;
    k.create_key(create("s", KeyType::Ed25519)).await?;
    let item = |call: Call| CryptoRequest { call: Some(call) };

    let good = k.encrypt(enc("b", b"one", b"")).await?.into_inner().ciphertext;
    let batch = BatchRequest {
        items: vec![
            item(Call::Encrypt(enc("b", b"two", b"ad"))),
            item(Call::Decrypt(dec("b", &good, b""))),
            item(Call::Decrypt(dec("b", &tamper(&good), b""))),
            item(Call::Encrypt(enc("missing", b"x", b""))),
            CryptoRequest { call: None },
            item(Call::Sign(SignRequest { name: "s".into(), message: b"m".to_vec() })),
        ],
    };
    let results = k.batch(batch).await?.into_inner().results;
    let outcomes: Vec<Outcome> = results.into_iter().map(|r| r.result.expect("a result per item")).collect();
    assert_eq!(outcomes.len(), 6);
    let Outcome::Encrypt(two) = &outcomes[0] else { panic!("{:?}", outcomes[0]) };
    assert!(matches!(&outcomes[1], Outcome::Decrypt(d) if d.plaintext == b"one"));
    assert!(matches!(&outcomes[2], Outcome::Error(e) if e.code == Code::InvalidArgument as i32));
    assert!(matches!(&outcomes[3], Outcome::Error(e) if e.code == Code::NotFound as i32));
    assert!(matches!(&outcomes[4], Outcome::Error(e) if e.code == Code::InvalidArgument as i32));
    assert!(matches!(&outcomes[5], Outcome::Sign(_)));
    assert_eq!(k.decrypt(dec("b", &two.ciphertext, b"ad")).await?.into_inner().plaintext, b"two");

    // Every kind of call in one batch, each checked against its own result.
    k.create_key(create("bm", KeyType::HmacSha256)).await?;
    let sig = k.sign(SignRequest { name: "s".into(), message: b"m".to_vec() }).await?.into_inner().signature;
    let tag = k.hmac(HmacRequest { name: "bm".into(), message: b"m".to_vec() }).await?.into_inner().hmac;
    let every = BatchRequest {
        items: vec![
            item(Call::Rewrap(RewrapRequest { name: "b".into(), ciphertext: good.clone(), associated_data: vec![] })),
            item(Call::GenerateDataKey(GenerateDataKeyRequest { name: "b".into(), bits: 128, with_plaintext: true })),
            item(Call::Verify(VerifyRequest { name: "s".into(), message: b"m".to_vec(), signature: sig.clone() })),
            item(Call::Verify(VerifyRequest { name: "s".into(), message: b"x".to_vec(), signature: sig })),
            item(Call::Hmac(HmacRequest { name: "bm".into(), message: b"m".to_vec() })),
            item(Call::VerifyHmac(VerifyHmacRequest { name: "bm".into(), message: b"m".to_vec(), hmac: tag })),
        ],
    };
    let outcomes: Vec<Outcome> =
        k.batch(every).await?.into_inner().results.into_iter().map(|r| r.result.expect("a result per item")).collect();
    let Outcome::Rewrap(rewrapped) = &outcomes[0] else { panic!("{:?}", outcomes[0]) };
    assert_eq!(k.decrypt(dec("b", &rewrapped.ciphertext, b"")).await?.into_inner().plaintext, b"one");
    let Outcome::GenerateDataKey(dk) = &outcomes[1] else { panic!("{:?}", outcomes[1]) };
    assert_eq!(k.decrypt(dec("b", &dk.ciphertext, b"")).await?.into_inner().plaintext, dk.plaintext);
    assert!(matches!(&outcomes[2], Outcome::Verify(v) if v.valid));
    assert!(matches!(&outcomes[3], Outcome::Verify(v) if !v.valid));
    let Outcome::Hmac(h) = &outcomes[4] else { panic!("{:?}", outcomes[4]) };
    assert!(h.hmac.starts_with("coffer:v1:"));
    assert!(matches!(&outcomes[5], Outcome::VerifyHmac(v) if v.valid));

    let too_many = BatchRequest { items: vec![item(Call::Encrypt(enc("b", b"x", b""))); 1001] };
    assert_eq!(k.batch(too_many).await.unwrap_err().code(), Code::InvalidArgument);

    // Stream: 200 encrypts, then their decrypts; ids come back in order.
    let requests: Vec<StreamRequest> = (0..200u64)
        .map(|id| StreamRequest { id, request: Some(item(Call::Encrypt(enc("b", format!("m{id}").as_bytes(), b"")))) })
        .collect();
    let mut replies = k.stream(tokio_stream::iter(requests)).await?.into_inner();
    let mut ciphertexts = Vec::new();
    while let Some(reply) = replies.message().await? {
        assert_eq!(reply.id, ciphertexts.len() as u64);
        let Some(Outcome::Encrypt(e)) = reply.result.and_then(|r| r.result) else { panic!("encrypt result") };
        ciphertexts.push(e.ciphertext);
    }
    assert_eq!(ciphertexts.len(), 200);
    let requests: Vec<StreamRequest> = ciphertexts
        .iter()
        .enumerate()
        .map(|(i, c)| StreamRequest { id: i as u64, request: Some(item(Call::Decrypt(dec("b", c, b"")))) })
        .collect();
    let mut replies = k.stream(tokio_stream::iter(requests)).await?.into_inner();
    let mut n = 0u64;
    while let Some(reply) = replies.message().await? {
        let Some(Outcome::Decrypt(d)) = reply.result.and_then(|r| r.result) else { panic!("decrypt result") };
        assert_eq!(d.plaintext, format!("m{}", reply.id).into_bytes());
        n += 1;
    }
    assert_eq!(n, 200);
    Ok(())
}

/// Rotations while several clients encrypt and decrypt through every node: no decrypt fails, and
/// ciphertexts from before each rotation still decrypt.
#[tokio::test(flavor = "multi_thread")]
async fn rotating_under_load_fails_no_decrypt() -> anyhow::Result<()> {
    let cluster = must_start_cluster(3, "")?;
    let leader = cluster.leader()?;
    keys(cluster.channel(leader)?)?.create_key(create("hot", KeyType::Aes256Gcm)).await?;
    // Let every node see the key.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let urls: Vec<Channel> = (0..cluster.nodes.len()).map(|i| cluster.channel(i)).collect::<anyhow::Result<_>>()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4usize {
        let urls = urls.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut clients = Vec::new();
            for u in &urls {
                clients.push(keys(u.clone())?);
            }
            let mut made: Vec<(String, Vec<u8>)> = Vec::new();
            let mut decrypts = 0usize;
            for i in 0..5000usize {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let plain = format!("w{w}-{i}").into_bytes();
                let c = &mut clients[(w + i) % 3];
                let ct = c.encrypt(enc("hot", &plain, b"")).await?.into_inner().ciphertext;
                made.push((ct, plain));
                // Decrypt an older ciphertext on another node.
                let (old_ct, old_plain) = &made[i / 2];
                let other = &mut clients[(w + i + 1) % 3];
                let got = other.decrypt(dec("hot", old_ct, b"")).await?.into_inner().plaintext;
                anyhow::ensure!(&got == old_plain, "wrong plaintext");
                decrypts += 1;
            }
            anyhow::Ok((made, decrypts))
        }));
    }
    let mut on_leader = keys(urls[leader].clone())?;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        on_leader.rotate_key(RotateKeyRequest { name: "hot".into(), ..Default::default() }).await?;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    let mut decrypts = 0;
    for w in workers {
        let (made, d) = w.await??;
        all.extend(made);
        decrypts += d;
    }
    assert!(decrypts > 100, "too few decrypts to mean anything: {decrypts}");
    let versions: std::collections::BTreeSet<&str> = all.iter().filter_map(|(c, _)| c.split(':').nth(1)).collect();
    assert!(versions.len() >= 3, "ciphertexts span several versions: {versions:?}");
    // Every ciphertext made during the run still decrypts, on every node.
    for (i, url) in urls.iter().enumerate() {
        let mut k = keys(url.clone())?;
        for (ct, plain) in all.iter().step_by(7) {
            assert_eq!(&k.decrypt(dec("hot", ct, b"")).await?.into_inner().plaintext, plain, "node {}", i + 1);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn key_cli_round_trips() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let ok = |args: &[&str], stdin: Option<&[u8]>| -> anyhow::Result<String> {
        let out = node.cli(args, stdin)?;
        anyhow::ensure!(out.status.success(), "coffer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?)
    };
    ok(&["key", "create", "cli-aes"], None)?;
    ok(&["key", "create", "cli-ed", "--type", "ed25519"], None)?;
    ok(&["key", "create", "cli-mac", "--type", "hmac-sha256"], None)?;
    let ct = ok(&["key", "encrypt", "cli-aes", "--associated-data", "ctx"], Some(b"secret text"))?;
    let ct = ct.trim();
    assert!(ct.starts_with("coffer:v1:"), "{ct}");
    assert_eq!(ok(&["key", "decrypt", "cli-aes", ct, "--associated-data", "ctx"], None)?, "secret text");
    let out = node.cli(&["key", "decrypt", "cli-aes", ct], None)?;
    assert_eq!(out.status.code(), Some(1), "wrong associated data fails");
    assert!(ok(&["key", "rotate", "cli-aes"], None)?.contains("version 2 is primary"));
    let moved = ok(&["key", "rewrap", "cli-aes", ct, "--associated-data", "ctx"], None)?;
    assert!(moved.starts_with("coffer:v2:"), "{moved}");
    let dk: serde_json::Value =
        serde_json::from_str(&ok(&["key", "datakey", "cli-aes", "--with-plaintext", "-o", "json"], None)?)?;
    assert!(dk["plaintext_base64"].is_string() && dk["ciphertext"].is_string(), "{dk}");

    let sig = ok(&["key", "sign", "cli-ed", "hello"], None)?;
    assert_eq!(node.cli(&["key", "verify", "cli-ed", sig.trim(), "hello"], None)?.status.code(), Some(0));
    assert_eq!(node.cli(&["key", "verify", "cli-ed", sig.trim(), "hellO"], None)?.status.code(), Some(1));
    assert!(ok(&["key", "hmac", "cli-mac", "m"], None)?.starts_with("coffer:v1:"));

    assert_eq!(ok(&["key", "list"], None)?.trim(), "cli-aes\ncli-ed\ncli-mac");
    let key: serde_json::Value = serde_json::from_str(&ok(&["key", "get", "cli-ed", "-o", "json"], None)?)?;
    assert!(key["versions"][0]["public_key_base64"].is_string(), "{key}");
    ok(&["key", "config", "cli-aes", "--min-decryption-version", "2", "--deletion-allowed", "true"], None)?;
    assert_eq!(node.cli(&["key", "decrypt", "cli-aes", ct, "--associated-data", "ctx"], None)?.status.code(), Some(1));
    ok(&["key", "delete", "cli-aes"], None)?;
    assert_eq!(ok(&["key", "list"], None)?.trim(), "cli-ed\ncli-mac");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_rotates_keys_on_their_period() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut k = keys(node.channel().await?)?;
    k.create_key(create("auto", KeyType::HmacSha256)).await?;
    k.create_key(create("manual", KeyType::HmacSha256)).await?;
    k.update_key_config(UpdateKeyConfigRequest {
        name: "auto".into(),
        min_decryption_version: None,
        request_id: String::new(),
        deletion_allowed: None,
        auto_rotate_period: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
    })
    .await?;
    let started = Instant::now();
    let mut primary = 1;
    while primary < 3 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        primary = k.get_key(GetKeyRequest { name: "auto".into() }).await?.into_inner().primary_version;
    }
    assert!(primary >= 3, "two rotations within 10 s of a 1 s period; primary is {primary}");
    assert_eq!(k.get_key(GetKeyRequest { name: "manual".into() }).await?.into_inner().primary_version, 1);
    Ok(())
}

/// Usage per version is summed over every node, so an operator sees when a version is unused.
#[tokio::test(flavor = "multi_thread")]
async fn usage_per_version_is_aggregated_from_all_nodes() -> anyhow::Result<()> {
    let cluster = must_start_cluster(3, "")?;
    let leader = cluster.leader()?;
    keys(cluster.channel(leader)?)?.create_key(create("used", KeyType::Aes256Gcm)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut a = keys(cluster.channel(0)?)?;
    let mut b = keys(cluster.channel(1)?)?;
    let mut cts = Vec::new();
    for i in 0..3 {
        cts.push(a.encrypt(enc("used", format!("{i}").as_bytes(), b"")).await?.into_inner().ciphertext);
    }
    for ct in &cts[..2] {
        b.decrypt(dec("used", ct, b"")).await?;
    }
    b.encrypt(enc("used", b"x", b"")).await?;
    let key = keys(cluster.channel(2)?)?.get_key(GetKeyRequest { name: "used".into() }).await?.into_inner();
    assert_eq!((key.usage_nodes_answered, key.usage_nodes_total), (3, 3));
    let v1 = &key.versions[0];
    assert_eq!((v1.encrypts, v1.decrypts), (4, 2));
    assert!(v1.last_used.is_some());
    Ok(())
}

/// Named-key material never reaches a node's data directory in plaintext: the stored versions are
/// unwrapped (through the real HSM, in a child process that owns the PKCS#11 state) and no
/// 16-byte window of any of them appears in any file, after a flush and compaction.
#[tokio::test(flavor = "multi_thread")]
async fn key_material_never_at_rest_in_plaintext() -> anyhow::Result<()> {
    let mut node = TestNode::must_start()?;
    let mut k = keys(node.channel().await?)?;
    for (name, t) in [
        ("m-aes", KeyType::Aes256Gcm),
        ("m-ed", KeyType::Ed25519),
        ("m-ec", KeyType::EcdsaP256),
        ("m-mac", KeyType::HmacSha256),
    ] {
        k.create_key(create(name, t)).await?;
        k.rotate_key(RotateKeyRequest { name: name.into(), ..Default::default() }).await?;
    }
    drop(k);
    node.must_stop()?;
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "t90_keys::helper_scan_data_dir_for_key_material",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("COFFER_TEST_NODE_DIR", node.path())
        .env("SOFTHSM2_CONF", node.path().join("softhsm2.conf"))
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "scan failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("scanned 8 key versions"), "{stdout}");
    Ok(())
}

/// The child half of `key_material_never_at_rest_in_plaintext`; does nothing unless that test
/// starts it with COFFER_TEST_NODE_DIR set.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "run as a child process by key_material_never_at_rest_in_plaintext"]
async fn helper_scan_data_dir_for_key_material() -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("COFFER_TEST_NODE_DIR").map(std::path::PathBuf::from) else { return Ok(()) };
    let config = coffer_node::Config::load(&dir.join("node.toml"))?;
    let hsm = coffer_hsm::Hsm::open(&config.hsm)?;
    let store = coffer_raft::Store::open(&config.data_dir)?;
    let reader = coffer_raft::StateReader::new(store.clone());
    reader.flush_and_compact()?;
    let mut keyring_keys = Vec::new();
    for record in reader.keyrings()? {
        keyring_keys.push((record.version, hsm.unwrap(&record.wrapped).await?));
    }
    let keyring = coffer_node::envelope::Keyring::new(keyring_keys)?;
    let mut materials = Vec::new();
    for name in reader.named_keys(None, 100)? {
        let record = reader.named_key(&name)?.expect("listed key exists");
        for (version, v) in &record.versions {
            materials
                .push((coffer_node::keys::unwrap_version(&keyring, name.as_str(), *version, v)?, v.public_key.clone()));
        }
    }
    drop(reader);
    drop(store);
    let mut files = Vec::new();
    let mut stack = vec![config.data_dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                stack.push(entry.path());
            } else {
                files.push((entry.path(), std::fs::read(entry.path())?));
            }
        }
    }
    for (material, public_key) in &materials {
        // A signing key's PKCS#8 document embeds its public key, which is public and stored as such.
        for window in material.windows(16).filter(|w| !public_key.windows(16).any(|p| p == *w)) {
            for (path, bytes) in &files {
                assert!(!bytes.windows(16).any(|w| w == window), "key material found in {}", path.display());
            }
        }
    }
    // The parent reads this line from the child's stdout.
    #[allow(clippy::print_stdout)]
    {
        println!("scanned {} key versions in {} files", materials.len(), files.len());
    }
    Ok(())
}
