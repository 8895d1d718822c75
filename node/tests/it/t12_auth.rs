//! Identity and policy (issue #12), tested as an attacker would try it: raw gRPC from outside the
//! server, each refusal checked to change nothing.
//!
//! - a policy matrix: every capability allowed on a matching path and denied on another, a broad
//!   deny beating a narrower allow, default deny, a batch with one item denied;
//! - tokens: no credential, a malformed or forged token, a child revoked with its parent, an
//!   orphan that survives, expiry on every call and by the leader's sweep;
//! - tokens never at rest in plain: data directories, snapshots and logs scanned for them.

use std::time::{Duration, Instant};

use coffer_proto::v1::auth_client::AuthClient;
use coffer_proto::v1::crypto_request::Call;
use coffer_proto::v1::crypto_result::Result as ItemResult;
use coffer_proto::v1::keys_client::KeysClient;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{
    BatchRequest, CreateKeyRequest, CreateTokenRequest, CryptoRequest, DecryptRequest, DeleteRequest, DescribeRequest,
    DestroyRequest, EncryptRequest, ExplainRequest, GenerateDataKeyRequest, GetKeyRequest, HmacRequest, KeyType,
    ListAccessorsRequest, ListRequest, LookupTokenRequest, RevokeTokenRequest, RewrapRequest, SignRequest,
    UndeleteRequest, VerifyRequest, WritePolicyRequest,
};
use coffer_testkit::with_token;
use tonic::transport::Channel;
use tonic::Code;

use crate::{get, must_start_cluster, put, InProcessNode};

/// A channel that presents no client certificate: only a token can speak on it.
async fn bare_channel(node: &InProcessNode) -> anyhow::Result<Channel> {
    let tls = coffer_tls::client_config(&coffer_tls::ClientFiles { ca: node.pki.ca_cert(), identity: None })?;
    Ok(tonic::transport::Endpoint::from_shared(node.addr.clone())?.tls_config(tls)?.connect().await?)
}

async fn write_policy(node: &InProcessNode, name: &str, document: &str) -> anyhow::Result<()> {
    let req = WritePolicyRequest { name: name.into(), document: document.into() };
    AuthClient::new(node.channel().await?).write_policy(with_token(req, &node.root_token)?).await?;
    Ok(())
}

async fn token_with(node: &InProcessNode, policies: &[&str]) -> anyhow::Result<String> {
    let req = CreateTokenRequest {
        policies: policies.iter().map(|p| (*p).to_owned()).collect(),
        display_name: "matrix".into(),
        ..CreateTokenRequest::default()
    };
    let made = AuthClient::new(node.channel().await?).create_token(with_token(req, &node.root_token)?).await?;
    Ok(made.into_inner().token)
}

fn must_deny<T: std::fmt::Debug>(result: Result<T, tonic::Status>, path: &str, capability: &str) {
    match result {
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{capability} on {path}: {s}");
            assert!(
                s.message().contains(path) && s.message().contains(capability),
                "the refusal names neither the path nor the capability: {}",
                s.message()
            );
        }
        Ok(r) => panic!("{capability} on {path} was allowed: {r:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_secret_capability_is_allowed_on_its_path_only_and_a_refusal_changes_nothing() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut root = node.client().await?;
    for p in ["ok/a", "no/a"] {
        root.put(put(p, b"v1", None)).await?;
        root.put(put(p, b"v2", None)).await?;
    }
    let mut s = SecretsClient::new(bare_channel(&node).await?);
    for cap in ["read", "list", "create", "update", "delete", "undelete", "destroy"] {
        write_policy(&node, cap, &format!("[[rule]]\npath = \"secret/ok/**\"\nallow = [\"{cap}\"]\n")).await?;
        let t = token_with(&node, &[cap]).await?;
        let denied_path = "secret/no/a";
        let versions = || vec![1];
        match cap {
            "read" => {
                s.get(with_token(get("ok/a", None), &t)?).await?;
                s.describe(with_token(DescribeRequest { path: "ok/a".into() }, &t)?).await?;
                must_deny(s.get(with_token(get("no/a", None), &t)?).await, denied_path, cap);
                must_deny(s.describe(with_token(DescribeRequest { path: "no/a".into() }, &t)?).await, denied_path, cap);
            }
            "list" => {
                let under =
                    |prefix: &str| ListRequest { prefix: prefix.into(), page_size: 1, page_token: String::new() };
                let paths = s.list(with_token(under("ok/"), &t)?).await?.into_inner().paths;
                assert_eq!(paths, vec!["ok/a".to_owned()]);
                // Listing is by folder: everything under a prefix the policy grants, nothing
                // from above it (whose page token would name paths one by one).
                must_deny(s.list(with_token(under(""), &t)?).await, "secret", cap);
                must_deny(s.list(with_token(under("no/"), &t)?).await, "secret/no", cap);
            }
            "create" => {
                s.put(with_token(put("ok/new", b"x", None), &t)?).await?;
                // create alone cannot reach a version over an existing secret, even naming it.
                must_deny(s.put(with_token(put("ok/new", b"y", Some(1)), &t)?).await, "secret/ok/new", "update");
                must_deny(s.put(with_token(put("no/new", b"x", None), &t)?).await, "secret/no/new", cap);
                // create is not update: a second version of an existing secret is refused.
                must_deny(s.put(with_token(put("ok/a", b"x", None), &t)?).await, "secret/ok/a", "update");
            }
            "update" => {
                s.put(with_token(put("ok/a", b"v3", None), &t)?).await?;
                // Neither right on no/a: the same refusal whether or not it exists.
                must_deny(s.put(with_token(put("no/a", b"x", None), &t)?).await, denied_path, "create");
                must_deny(s.put(with_token(put("ok/other", b"x", None), &t)?).await, "secret/ok/other", "create");
            }
            "delete" => {
                let req = |p: &str| DeleteRequest { path: p.into(), versions: versions(), request_id: String::new() };
                s.delete(with_token(req("ok/a"), &t)?).await?;
                must_deny(s.delete(with_token(req("no/a"), &t)?).await, denied_path, cap);
            }
            "undelete" => {
                let req = |p: &str| UndeleteRequest { path: p.into(), versions: versions(), request_id: String::new() };
                s.undelete(with_token(req("ok/a"), &t)?).await?;
                must_deny(s.undelete(with_token(req("no/a"), &t)?).await, denied_path, cap);
            }
            "destroy" => {
                let req = |p: &str| DestroyRequest { path: p.into(), versions: versions(), request_id: String::new() };
                s.destroy(with_token(req("ok/a"), &t)?).await?;
                must_deny(s.destroy(with_token(req("no/a"), &t)?).await, denied_path, cap);
            }
            _ => unreachable!("every capability has a case"),
        }
    }
    // Nothing any refusal touched changed: no/a still has both versions, v1 neither deleted nor
    // destroyed, and no/new was never written.
    let meta = root.describe(DescribeRequest { path: "no/a".into() }).await?.into_inner();
    assert_eq!(meta.current_version, 2);
    assert!(meta.versions.iter().all(|v| v.deleted_at.is_none() && !v.destroyed), "{meta:?}");
    assert_eq!(root.get(get("no/a", Some(1))).await?.into_inner().value, b"v1");
    assert_eq!(root.get(get("no/new", None)).await.unwrap_err().code(), Code::NotFound);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_key_capability_is_its_own_and_a_batch_item_is_denied_alone() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut admin = KeysClient::new(node.channel().await?);
    for (name, t) in [("ok", KeyType::Aes256Gcm), ("no", KeyType::Aes256Gcm), ("oksig", KeyType::Ed25519)] {
        admin.create_key(CreateKeyRequest { name: name.into(), r#type: t as i32, ..Default::default() }).await?;
    }
    for (name, t) in [("okmac", KeyType::HmacSha256), ("nomac", KeyType::HmacSha256), ("nosig", KeyType::Ed25519)] {
        admin.create_key(CreateKeyRequest { name: name.into(), r#type: t as i32, ..Default::default() }).await?;
    }
    let enc = |name: &str| EncryptRequest { name: name.into(), plaintext: b"p".to_vec(), associated_data: vec![] };
    let ct = |name: &str| {
        let mut admin = admin.clone();
        let req = enc(name);
        async move { anyhow::Ok(admin.encrypt(req).await?.into_inner().ciphertext) }
    };
    let (ok_ct, no_ct) = (ct("ok").await?, ct("no").await?);
    let sig = |name: &str| {
        let mut admin = admin.clone();
        let req = SignRequest { name: name.into(), message: b"m".to_vec() };
        async move { anyhow::Ok(admin.sign(req).await?.into_inner().signature) }
    };
    let (ok_sig, no_sig) = (sig("oksig").await?, sig("nosig").await?);

    let mut k = KeysClient::new(bare_channel(&node).await?);
    for cap in ["encrypt", "decrypt", "rewrap", "datakey", "sign", "verify", "hmac", "key-admin"] {
        write_policy(&node, cap, &format!("[[rule]]\npath = \"key/ok\"\nallow = [\"{cap}\"]\n")).await?;
        write_policy(
            &node,
            &format!("{cap}-more"),
            &format!("[[rule]]\npath = \"key/oksig\"\nallow = [\"{cap}\"]\n[[rule]]\npath = \"key/okmac\"\nallow = [\"{cap}\"]\n"),
        )
        .await?;
        let t = token_with(&node, &[cap, &format!("{cap}-more")]).await?;
        match cap {
            "encrypt" => {
                k.encrypt(with_token(enc("ok"), &t)?).await?;
                must_deny(k.encrypt(with_token(enc("no"), &t)?).await, "key/no", cap);
                // encrypt does not grant decrypt: a service can seal without reading.
                let dec = DecryptRequest { name: "ok".into(), ciphertext: ok_ct.clone(), associated_data: vec![] };
                must_deny(k.decrypt(with_token(dec, &t)?).await, "key/ok", "decrypt");
            }
            "decrypt" => {
                let dec =
                    |n: &str, c: &str| DecryptRequest { name: n.into(), ciphertext: c.into(), associated_data: vec![] };
                k.decrypt(with_token(dec("ok", &ok_ct), &t)?).await?;
                must_deny(k.decrypt(with_token(dec("no", &no_ct), &t)?).await, "key/no", cap);
                must_deny(k.encrypt(with_token(enc("ok"), &t)?).await, "key/ok", "encrypt");
            }
            "rewrap" => {
                let rw =
                    |n: &str, c: &str| RewrapRequest { name: n.into(), ciphertext: c.into(), associated_data: vec![] };
                k.rewrap(with_token(rw("ok", &ok_ct), &t)?).await?;
                must_deny(k.rewrap(with_token(rw("no", &no_ct), &t)?).await, "key/no", cap);
            }
            "datakey" => {
                let dk = |n: &str| GenerateDataKeyRequest { name: n.into(), bits: 256, with_plaintext: true };
                k.generate_data_key(with_token(dk("ok"), &t)?).await?;
                must_deny(k.generate_data_key(with_token(dk("no"), &t)?).await, "key/no", cap);
            }
            "sign" => {
                k.sign(with_token(SignRequest { name: "oksig".into(), message: b"m".to_vec() }, &t)?).await?;
                must_deny(
                    k.sign(with_token(SignRequest { name: "nosig".into(), message: b"m".to_vec() }, &t)?).await,
                    "key/nosig",
                    cap,
                );
            }
            "verify" => {
                let v =
                    |n: &str, s: &str| VerifyRequest { name: n.into(), message: b"m".to_vec(), signature: s.into() };
                assert!(k.verify(with_token(v("oksig", &ok_sig), &t)?).await?.into_inner().valid);
                must_deny(k.verify(with_token(v("nosig", &no_sig), &t)?).await, "key/nosig", cap);
            }
            "hmac" => {
                k.hmac(with_token(HmacRequest { name: "okmac".into(), message: b"m".to_vec() }, &t)?).await?;
                must_deny(
                    k.hmac(with_token(HmacRequest { name: "nomac".into(), message: b"m".to_vec() }, &t)?).await,
                    "key/nomac",
                    cap,
                );
            }
            "key-admin" => {
                k.get_key(with_token(GetKeyRequest { name: "ok".into() }, &t)?).await?;
                must_deny(k.get_key(with_token(GetKeyRequest { name: "no".into() }, &t)?).await, "key/no", cap);
                let create =
                    CreateKeyRequest { name: "no2".into(), r#type: KeyType::Aes256Gcm as i32, ..Default::default() };
                must_deny(k.create_key(with_token(create, &t)?).await, "key/no2", cap);
            }
            _ => unreachable!("every capability has a case"),
        }
    }
    assert_eq!(
        admin.get_key(GetKeyRequest { name: "no2".into() }).await.unwrap_err().code(),
        Code::NotFound,
        "a refused create made nothing"
    );

    // A batch: the denied item gets PERMISSION_DENIED, the others are served.
    let t = token_with(&node, &["encrypt"]).await?;
    let item = |name: &str| CryptoRequest { call: Some(Call::Encrypt(enc(name))) };
    let batch = BatchRequest { items: vec![item("ok"), item("no"), item("ok")] };
    let results = k.batch(with_token(batch, &t)?).await?.into_inner().results;
    let codes: Vec<Option<i32>> = results
        .iter()
        .map(|r| match &r.result {
            Some(ItemResult::Error(e)) => Some(e.code),
            _ => None,
        })
        .collect();
    assert_eq!(codes, vec![None, Some(Code::PermissionDenied as i32), None], "{results:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broad_deny_beats_a_narrower_allow_and_nothing_matching_is_a_deny() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    node.client().await?.put(put("app/db/password", b"s3cret", None)).await?;
    write_policy(&node, "no-secrets", "[[rule]]\npath = \"secret/**\"\ndeny = [\"read\"]\n").await?;
    write_policy(&node, "db", "[[rule]]\npath = \"secret/app/db/password\"\nallow = [\"read\"]\n").await?;
    write_policy(&node, "elsewhere", "[[rule]]\npath = \"secret/other/*\"\nallow = [\"read\"]\n").await?;
    let mut s = SecretsClient::new(bare_channel(&node).await?);
    let both = token_with(&node, &["no-secrets", "db"]).await?;
    must_deny(s.get(with_token(get("app/db/password", None), &both)?).await, "secret/app/db/password", "read");
    let only_db = token_with(&node, &["db"]).await?;
    assert_eq!(s.get(with_token(get("app/db/password", None), &only_db)?).await?.into_inner().value, b"s3cret");
    let unrelated = token_with(&node, &["elsewhere"]).await?;
    must_deny(s.get(with_token(get("app/db/password", None), &unrelated)?).await, "secret/app/db/password", "read");

    // explain names the rules that decided.
    let mut auth = AuthClient::new(bare_channel(&node).await?);
    let ask =
        ExplainRequest { accessor: String::new(), path: "secret/app/db/password".into(), capability: "read".into() };
    let explained = auth.explain(with_token(ask.clone(), &both)?).await?.into_inner();
    assert!(!explained.allowed);
    for want in ["DENIED", "no-secrets", "db", "deny wins"] {
        assert!(explained.explanation.contains(want), "{want:?} missing from:\n{}", explained.explanation);
    }
    let explained = auth.explain(with_token(ask, &unrelated)?).await?.into_inner();
    assert!(explained.explanation.contains("default deny"), "{}", explained.explanation);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn no_credential_a_forged_token_and_a_revoked_parent_are_refused() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    node.client().await?.put(put("p", b"v", None)).await?;
    let mut s = SecretsClient::new(bare_channel(&node).await?);
    let err = s.get(get("p", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // A token of the right shape that was never issued; one with a broken checksum; another
    // scheme.
    let forged = coffer_node::auth::token::format(&[7; 32]);
    let err = s.get(with_token(get("p", None), &forged)?).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let mut typo = node.root_token.clone().into_bytes();
    typo[12] = if typo[12] == b'A' { b'B' } else { b'A' };
    let err = s.get(with_token(get("p", None), &String::from_utf8(typo)?)?).await.unwrap_err();
    assert!(err.message().contains("checksum"), "{err}");

    // A parent, a child under it, an orphan made by the parent with the right to.
    write_policy(&node, "maker", "[[rule]]\npath = \"sys/token/*\"\nallow = [\"token-admin\"]\n[[rule]]\npath = \"secret/*\"\nallow = [\"read\"]\n").await?;
    let parent = token_with(&node, &["maker"]).await?;
    let mut auth = AuthClient::new(bare_channel(&node).await?);
    let child_req = CreateTokenRequest { display_name: "child".into(), ..Default::default() };
    let child = auth.create_token(with_token(child_req, &parent)?).await?.into_inner();
    assert_eq!(
        child.info.as_ref().map(|i| i.policies.clone()),
        Some(vec!["maker".to_owned()]),
        "the parent's own policies"
    );
    let orphan_req = CreateTokenRequest { orphan: true, display_name: "orphan".into(), ..Default::default() };
    let orphan = auth.create_token(with_token(orphan_req, &parent)?).await?.into_inner().token;
    // A token cannot grant a policy it does not hold.
    let greedy = CreateTokenRequest { policies: vec!["root".into()], ..Default::default() };
    assert_eq!(auth.create_token(with_token(greedy, &parent)?).await.unwrap_err().code(), Code::PermissionDenied);
    // A child asked to outlive its parent is cut to the parent's expiry.
    let long = CreateTokenRequest {
        ttl: Some(prost_types::Duration { seconds: 30 * 86_400, nanos: 0 }),
        max_ttl: Some(prost_types::Duration { seconds: 31 * 86_400, nanos: 0 }),
        ..Default::default()
    };
    let long = auth.create_token(with_token(long, &parent)?).await?.into_inner().info.unwrap_or_default();
    let own = auth.lookup_token(with_token(LookupTokenRequest::default(), &parent)?).await?.into_inner();
    let secs = |t: Option<prost_types::Timestamp>| t.map_or(i64::MAX, |t| t.seconds);
    assert!(secs(long.expires_at) <= secs(own.expires_at), "a child expires after its parent: {long:?} {own:?}");
    assert!(secs(long.max_expires_at) <= secs(own.max_expires_at));

    auth.revoke_token(with_token(RevokeTokenRequest { accessor: String::new() }, &parent)?).await?;
    for (who, token) in [("parent", &parent), ("child", &child.token)] {
        let err = s.get(with_token(get("p", None), token)?).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "the revoked {who}: {err}");
    }
    assert_eq!(s.get(with_token(get("p", None), &orphan)?).await?.into_inner().value, b"v", "the orphan lives on");
    // The root token looks the child up by accessor: gone.
    let accessor = child.info.map(|i| i.accessor).unwrap_or_default();
    let err = auth.lookup_token(with_token(LookupTokenRequest { accessor }, &node.root_token)?).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_refused_at_once_and_swept_by_the_leader() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    node.client().await?.put(put("p", b"v", None)).await?;
    write_policy(&node, "reader", "[[rule]]\npath = \"secret/*\"\nallow = [\"read\"]\n").await?;
    let mut auth = AuthClient::new(node.channel().await?);
    let req = CreateTokenRequest {
        policies: vec!["reader".into()],
        ttl: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
        ..Default::default()
    };
    let made = auth.create_token(with_token(req, &node.root_token)?).await?.into_inner();
    let accessor = made.info.map(|i| i.accessor).unwrap_or_default();
    let mut s = SecretsClient::new(bare_channel(&node).await?);
    assert_eq!(s.get(with_token(get("p", None), &made.token)?).await?.into_inner().value, b"v");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let err = s.get(with_token(get("p", None), &made.token)?).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // The sweep (every second on the leader) removes it from the state: its accessor goes.
    let listed = |auth: &mut AuthClient<Channel>| {
        let req = with_token(ListAccessorsRequest { page_size: 100, page_token: String::new() }, &node.root_token);
        let mut auth = auth.clone();
        async move { anyhow::Ok(auth.list_accessors(req?).await?.into_inner().accessors) }
    };
    let started = Instant::now();
    while listed(&mut auth).await?.contains(&accessor) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "the expired token was never swept");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Waits until every node of `cluster` accepts `token`: a follower may apply a new token a moment
/// after the node that made it answered.
async fn must_accept_everywhere(cluster: &coffer_testkit::Cluster, token: &str) -> anyhow::Result<()> {
    for n in 0..cluster.nodes.len() {
        let mut auth = AuthClient::new(cluster.channel(n)?);
        let started = Instant::now();
        while let Err(s) = auth.lookup_token(with_token(LookupTokenRequest::default(), token)?).await {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(5), "node {} never accepted the token: {s}", n + 1);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Every file under `dir`, read whole (RocksDB files, snapshots, logs).
fn files_under(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            files_under(&entry.path(), out)?;
        } else if entry.file_type()?.is_file() {
            out.push((entry.path(), std::fs::read(entry.path())?));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_never_at_rest_in_plain_not_in_data_snapshots_or_logs() -> anyhow::Result<()> {
    // Snapshots every 10 entries, and debug logs: the most chances to leak.
    let mut cluster = must_start_cluster(3, "[raft]\nsnapshot-after-logs = 10\n")?;
    let root = cluster.root_token().unwrap_or_default().to_owned();
    let mut tokens = vec![root.clone()];
    let policy = "[[rule]]\npath = \"secret/**\"\nallow = [\"read\", \"create\", \"update\"]\n";
    let mut auth = AuthClient::new(cluster.channel(0)?);
    auth.write_policy(with_token(WritePolicyRequest { name: "rw".into(), document: policy.into() }, &root)?).await?;
    for i in 0..5 {
        let req = CreateTokenRequest { policies: vec!["rw".into()], renewable: true, ..Default::default() };
        let token = auth.create_token(with_token(req, &root)?).await?.into_inner().token;
        must_accept_everywhere(&cluster, &token).await?;
        // Each token is used: a put and a read on every node.
        for n in 0..3 {
            let mut s = SecretsClient::new(cluster.channel(n)?);
            s.put(with_token(put(&format!("t{i}/n{n}"), b"v", None), &token)?).await?;
            s.get(with_token(get(&format!("t{i}/n{n}"), None), &token)?).await?;
        }
        tokens.push(token);
    }
    // One revoked, and an unknown one tried (its text must not be logged either).
    let forged = coffer_node::auth::token::format(&[9; 32]).to_string();
    let _ = SecretsClient::new(cluster.channel(1)?).get(with_token(get("t0/n0", None), &forged)?).await;
    tokens.push(forged);
    // Stopped cleanly, so the WAL and the logs are complete on disk.
    for i in 0..3 {
        cluster.stop(i)?;
    }
    let mut files = Vec::new();
    for i in 0..3 {
        files_under(cluster.node_dir(i), &mut files)?;
    }
    assert!(files.iter().any(|(p, _)| p.to_string_lossy().contains("snapshots")), "no snapshot was written");
    for token in &tokens {
        // The whole token, and its random body alone (as a log might cut it).
        let body = &token[6..49];
        for (path, bytes) in &files {
            for needle in [token.as_bytes(), body.as_bytes()] {
                assert!(!bytes.windows(needle.len()).any(|w| w == needle), "a token is in plain in {}", path.display());
            }
        }
    }
    Ok(())
}

/// How long after a revoke is acknowledged each node refuses the token, while a client streams
/// encrypts to every node: the bound Coffer states is `crypto-staleness` (1 s by default) after
/// the commit, and commit comes before the acknowledgement.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_mid_stream_is_refused_on_every_node_within_the_bound() -> anyhow::Result<()> {
    use coffer_proto::v1::StreamRequest;
    let cluster = must_start_cluster(3, "")?;
    let root = cluster.root_token().unwrap_or_default().to_owned();
    let mut auth = AuthClient::new(cluster.channel(0)?);
    let doc = "[[rule]]\npath = \"key/k\"\nallow = [\"encrypt\"]\n";
    auth.write_policy(with_token(WritePolicyRequest { name: "enc".into(), document: doc.into() }, &root)?).await?;
    KeysClient::new(cluster.channel(0)?)
        .create_key(CreateKeyRequest { name: "k".into(), r#type: KeyType::Aes256Gcm as i32, ..Default::default() })
        .await?;
    let req = CreateTokenRequest { policies: vec!["enc".into()], ..Default::default() };
    let made = auth.create_token(with_token(req, &root)?).await?.into_inner();
    let accessor = made.info.map(|i| i.accessor).unwrap_or_default();
    must_accept_everywhere(&cluster, &made.token).await?;

    // One stream per node; each records when its first refusal came back.
    let revoked_at = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut streams = Vec::new();
    for n in 0..3 {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let inbound = with_token(tokio_stream::wrappers::ReceiverStream::new(rx), &made.token)?;
        let mut responses = KeysClient::new(cluster.channel(n)?).stream(inbound).await?.into_inner();
        let revoked_at = revoked_at.clone();
        streams.push(tokio::spawn(async move {
            let started = Instant::now();
            let (mut served_after, mut refused) = (0u32, None);
            // Bounded: 20 s or 4000 items.
            for id in 0..4000u64 {
                let item = CryptoRequest {
                    call: Some(Call::Encrypt(EncryptRequest {
                        name: "k".into(),
                        plaintext: b"x".to_vec(),
                        associated_data: vec![],
                    })),
                };
                tx.send(StreamRequest { id, request: Some(item) }).await?;
                let Some(reply) = responses.message().await? else { anyhow::bail!("node {n}'s stream ended") };
                let at = Instant::now();
                match reply.result.and_then(|r| r.result) {
                    Some(ItemResult::Error(e)) => {
                        anyhow::ensure!(
                            revoked_at.get().is_some(),
                            "node {n} refused before the revoke: {}",
                            e.message
                        );
                        anyhow::ensure!(e.code == Code::Unauthenticated as i32, "node {n}: {} {}", e.code, e.message);
                        refused = refused.or(Some(at));
                    }
                    Some(_) if refused.is_some() => anyhow::bail!("node {n} served the token again after refusing it"),
                    Some(_) => {
                        if revoked_at.get().is_some() {
                            served_after += 1;
                        }
                    }
                    None => anyhow::bail!("node {n}: an empty reply"),
                }
                if refused.is_some_and(|r| at.duration_since(r) > Duration::from_millis(200))
                    || started.elapsed() > Duration::from_secs(20)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            anyhow::Ok((refused, served_after))
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Marked when the revoke is sent: a node may apply it before its acknowledgement arrives.
    let _ = revoked_at.set(Instant::now());
    auth.revoke_token(with_token(RevokeTokenRequest { accessor }, &root)?).await?;
    let acked = Instant::now();
    for (n, stream) in streams.into_iter().enumerate() {
        let (refused, served_after) = stream.await??;
        let refused = refused.ok_or_else(|| anyhow::anyhow!("node {n} never refused the revoked token"))?;
        let after = refused.saturating_duration_since(acked);
        eprintln!(
            "node {}: first refusal {after:?} after the revoke was acknowledged ({served_after} served meanwhile)",
            n + 1
        );
        // The stated bound (crypto-staleness, 1 s) with room for a loaded CI machine.
        assert!(after < Duration::from_secs(5), "node {} refused only {after:?} after the revoke", n + 1);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_over_its_rate_is_refused_while_another_goes_through() -> anyhow::Result<()> {
    let cluster = must_start_cluster(1, "[auth]\ntoken-rate = 20\ntoken-burst = 20\n")?;
    let root = cluster.root_token().unwrap_or_default().to_owned();
    let mut auth = AuthClient::new(cluster.channel(0)?);
    let doc = "[[rule]]\npath = \"secret/*\"\nallow = [\"read\", \"create\"]\n";
    auth.write_policy(with_token(WritePolicyRequest { name: "r".into(), document: doc.into() }, &root)?).await?;
    let token = || {
        let req = CreateTokenRequest { policies: vec!["r".into()], ..Default::default() };
        let mut auth = auth.clone();
        let root = root.clone();
        async move { anyhow::Ok(auth.create_token(with_token(req, &root)?).await?.into_inner().token) }
    };
    let (greedy, polite) = (token().await?, token().await?);
    let mut s = SecretsClient::new(cluster.channel(0)?);
    s.put(with_token(put("p", b"v", None), &polite)?).await?;
    let mut limited = None;
    for _ in 0..200 {
        if let Err(status) = s.get(with_token(get("p", None), &greedy)?).await {
            limited = Some(status);
            break;
        }
    }
    let status = limited.ok_or_else(|| anyhow::anyhow!("200 calls at once never hit a rate of 20/s"))?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    let retry: u64 =
        status.metadata().get("retry-after-ms").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(retry > 0, "no retry-after-ms in {:?}", status.metadata());
    // The other token is not held up.
    assert_eq!(s.get(with_token(get("p", None), &polite)?).await?.into_inner().value, b"v");
    // And the greedy one is served again once it waits.
    tokio::time::sleep(Duration::from_millis(retry + 100)).await;
    assert_eq!(s.get(with_token(get("p", None), &greedy)?).await?.into_inner().value, b"v");
    Ok(())
}

/// The README's path, through the CLI as a user runs it: the root token writes a policy and
/// makes a least-privilege token; the service logs in with it (a 0600 file) and can do what the
/// policy says and nothing else; `policy explain` says why.
#[test]
fn from_root_token_to_a_least_privilege_service_through_the_cli() -> anyhow::Result<()> {
    let mut cluster = must_start_cluster(1, "")?;
    let root = cluster.root_token().unwrap_or_default().to_owned();
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("payments.toml");
    std::fs::write(&policy, "[[rule]]\npath = \"secret/payments/**\"\nallow = [\"read\", \"create\", \"update\"]\n")?;
    let as_root = |args: &[&str]| -> anyhow::Result<String> {
        let out = cluster.cli_as(0, Some(&root), args)?;
        anyhow::ensure!(out.status.success(), "coffer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let policy_arg = policy.to_str().ok_or_else(|| anyhow::anyhow!("temp path"))?;
    as_root(&["policy", "write", "payments", policy_arg])?;
    let made: serde_json::Value =
        serde_json::from_str(&as_root(&["token", "create", "--policy", "payments", "--ttl", "10m", "-o", "json"])?)?;
    let token = made["token"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(token.starts_with("cfr_s_"), "{made}");

    // The service saves its token with `coffer login` (stdin), then every command uses it. No
    // client certificate: the token alone speaks.
    let token_file = dir.path().join("token");
    let pki = cluster.pki().ok_or_else(|| anyhow::anyhow!("a TLS cluster"))?.clone();
    let service = |args: &[&str], input: Option<&str>| -> anyhow::Result<std::process::Output> {
        let mut cmd = std::process::Command::new(crate::coffer_bin());
        cmd.args(args)
            .env("COFFER_ADDR", cluster.nodes[0].url())
            .env("COFFER_CACERT", pki.ca_cert())
            .env("COFFER_TOKEN_FILE", &token_file)
            .env_remove("COFFER_TOKEN")
            .env_remove("COFFER_CLIENT_CERT")
            .env_remove("COFFER_CLIENT_KEY")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn()?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            std::io::Write::write_all(&mut stdin, text.as_bytes())?;
        }
        Ok(child.wait_with_output()?)
    };
    let out = service(&["login"], Some(&token))?;
    anyhow::ensure!(out.status.success(), "login: {}", String::from_utf8_lossy(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&token_file)?.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&token_file)?, token);

    let ok = service(&["secret", "put", "payments/db", "s3cret"], None)?;
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let read = service(&["secret", "get", "payments/db"], None)?;
    assert_eq!(String::from_utf8_lossy(&read.stdout), "s3cret");
    let denied = service(&["secret", "put", "billing/db", "x"], None)?;
    assert!(!denied.status.success());
    let said = String::from_utf8_lossy(&denied.stderr);
    assert!(said.contains("PermissionDenied") && said.contains("secret/billing/db"), "{said}");
    let explain = service(&["policy", "explain", "secret/billing/db", "create"], None)?;
    assert_eq!(explain.status.code(), Some(2), "explain exits 2 on a denial");
    assert!(String::from_utf8_lossy(&explain.stdout).contains("default deny"));
    // Root revokes it by accessor; the saved token stops working.
    let accessor = made["accessor"].as_str().unwrap_or_default();
    as_root(&["token", "revoke", "--accessor", accessor])?;
    let after = service(&["secret", "get", "payments/db"], None)?;
    assert!(
        String::from_utf8_lossy(&after.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    cluster.stop(0)?;
    Ok(())
}

/// A `policy-admin` that is not root cannot raise its own rights: it may not rewrite or delete
/// a policy it holds, nor attach one it does not hold to a login role.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_admin_cannot_raise_its_own_rights() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    write_policy(
        &node,
        "admin",
        "[[rule]]\npath = \"sys/**\"\nallow = [\"policy-admin\"]\n[[rule]]\npath = \"secret/**\"\ndeny = [\"read\"]\n",
    )
    .await?;
    let admin = token_with(&node, &["admin"]).await?;
    let mut auth = AuthClient::new(bare_channel(&node).await?);
    let everything = "[[rule]]\npath = \"secret/**\"\nallow = [\"read\"]\n";
    let rewrite = WritePolicyRequest { name: "admin".into(), document: everything.into() };
    let err = auth.write_policy(with_token(rewrite, &admin)?).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let delete = coffer_proto::v1::DeletePolicyRequest { name: "admin".into() };
    assert_eq!(auth.delete_policy(with_token(delete, &admin)?).await.unwrap_err().code(), Code::InvalidArgument);
    // It may write another policy, but not hand it to a certificate it might hold.
    auth.write_policy(with_token(WritePolicyRequest { name: "other".into(), document: everything.into() }, &admin)?)
        .await?;
    let role = coffer_proto::v1::WriteRoleRequest {
        name: "mine".into(),
        identities: vec!["spiffe://coffer/client/mine".into()],
        policies: vec!["other".into()],
        token_ttl: None,
    };
    assert_eq!(auth.write_role(with_token(role, &admin)?).await.unwrap_err().code(), Code::PermissionDenied);
    // Its deny still holds.
    node.client().await?.put(put("p", b"v", None)).await?;
    let mut s = SecretsClient::new(bare_channel(&node).await?);
    must_deny(s.get(with_token(get("p", None), &admin)?).await, "secret/p", "read");
    Ok(())
}

/// Server limits: a Keys stream is closed when idle or too long, a request over the size limit is
/// refused, a key cannot rotate past its version cap, and auto-rotation has a floor.
#[tokio::test(flavor = "multi_thread")]
async fn limits_bound_what_one_caller_can_hold() -> anyhow::Result<()> {
    use coffer_proto::v1::{RotateKeyRequest, StreamRequest, UpdateKeyConfigRequest};
    let limits = "[limits]\nstream-idle = \"300ms\"\nstream-max-items = 5\nmax-message-bytes = 2048\n\
                  min-auto-rotate-period = \"1h\"\nmax-key-versions = 3\n";
    let cluster = must_start_cluster(1, limits)?;
    let mut k = KeysClient::new(cluster.channel(0)?);
    k.create_key(CreateKeyRequest { name: "k".into(), r#type: KeyType::Aes256Gcm as i32, ..Default::default() })
        .await?;
    let item = |id| StreamRequest {
        id,
        request: Some(CryptoRequest {
            call: Some(Call::Encrypt(EncryptRequest {
                name: "k".into(),
                plaintext: b"x".to_vec(),
                associated_data: vec![],
            })),
        }),
    };
    // Six items on a stream of at most five: five answers, then RESOURCE_EXHAUSTED.
    let mut replies = k.stream(tokio_stream::iter((0..6).map(item))).await?.into_inner();
    let mut answered = 0;
    let ended = loop {
        match replies.message().await {
            Ok(Some(_)) => answered += 1,
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    assert_eq!(answered, 5);
    let status = ended.ok_or_else(|| anyhow::anyhow!("the stream ended without an error"))?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("stream-max-items"), "{}", status.message());
    // A stream that sends one item and then nothing is closed after stream-idle.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(item(0)).await?;
    let mut replies = k.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    replies.message().await?;
    let idle = tokio::time::timeout(Duration::from_secs(5), replies.message()).await?;
    let status = idle.err().ok_or_else(|| anyhow::anyhow!("an idle stream stayed open"))?;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(status.message().contains("stream-idle"), "{}", status.message());
    drop(tx);
    // A request over max-message-bytes is refused before it is decoded.
    let big = EncryptRequest { name: "k".into(), plaintext: vec![0; 4096], associated_data: vec![] };
    assert!(k.encrypt(big).await.is_err(), "a 4 KiB request passed a 2 KiB limit");
    // Versions: 1 made, 2 more allowed, then refused; a period under the floor is refused.
    let rotate = || RotateKeyRequest { name: "k".into(), request_id: String::new() };
    k.rotate_key(rotate()).await?;
    k.rotate_key(rotate()).await?;
    let status = k.rotate_key(rotate()).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert!(status.message().contains("max-key-versions"), "{}", status.message());
    assert_eq!(k.get_key(GetKeyRequest { name: "k".into() }).await?.into_inner().versions.len(), 3);
    let fast = UpdateKeyConfigRequest {
        name: "k".into(),
        auto_rotate_period: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        ..Default::default()
    };
    let status = k.update_key_config(fast).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(status.message().contains("min-auto-rotate-period"), "{}", status.message());
    Ok(())
}

/// A client certificate that Coffer's TLS verified logs in through a role: directly per call, or
/// traded for a token with the role's policies. One no role admits gets nothing, and a role
/// naming its CN does not change that while it has a URI SAN.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_logs_in_through_its_role() -> anyhow::Result<()> {
    use coffer_proto::v1::{LoginRequest, WriteRoleRequest};
    use coffer_tls::{Ca, ClientFiles, Subject};
    let node = InProcessNode::must_start().await?;
    node.client().await?.put(put("web/config", b"v", None)).await?;
    node.client().await?.put(put("db/password", b"p", None)).await?;
    write_policy(&node, "web", "[[rule]]\npath = \"secret/web/*\"\nallow = [\"read\"]\n").await?;
    let role = WriteRoleRequest {
        name: "web".into(),
        identities: vec!["spiffe://coffer/client/web-*".into()],
        policies: vec!["web".into()],
        token_ttl: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
    };
    AuthClient::new(node.channel().await?).write_role(with_token(role, &node.root_token)?).await?;
    let ca_dir = node.path().join("ca");
    let channel_as = |name: &str| {
        let issued = Ca::load(&ca_dir)?.issue(
            &Subject::Client(name.into()),
            &[],
            std::time::SystemTime::now() + Duration::from_secs(3600),
            &node.path().join(name),
            name,
        )?;
        let tls = coffer_tls::client_config(&ClientFiles {
            ca: ca_dir.join(coffer_tls::CA_CERT),
            identity: Some((issued.cert, issued.key)),
        })?;
        anyhow::Ok(tonic::transport::Endpoint::from_shared(node.addr.clone())?.tls_config(tls)?)
    };
    let web = channel_as("web-1")?.connect().await?;
    // Per call, with the certificate alone.
    let mut s = SecretsClient::new(web.clone());
    assert_eq!(s.get(get("web/config", None)).await?.into_inner().value, b"v");
    must_deny(s.get(get("db/password", None)).await, "secret/db/password", "read");
    // Traded for a token: the role's policies, the role's ttl, no parent.
    let made = AuthClient::new(web).login(LoginRequest { ttl: None }).await?.into_inner();
    let info = made.info.unwrap_or_default();
    assert_eq!(
        (info.policies, info.has_parent, info.display_name.as_str()),
        (vec!["web".to_owned()], false, "cert:spiffe://coffer/client/web-1")
    );
    let mut bare = SecretsClient::new(bare_channel(&node).await?);
    assert_eq!(bare.get(with_token(get("web/config", None), &made.token)?).await?.into_inner().value, b"v");
    // A certificate no role admits.
    let other = channel_as("batch")?.connect().await?;
    let err = SecretsClient::new(other.clone()).get(get("web/config", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    // A certificate has one name: with a URI SAN, a role naming its CN does not admit it (the CN
    // counts only for certificates without SANs, which this CA does not issue).
    let by_cn = WriteRoleRequest {
        name: "by-cn".into(),
        identities: vec!["cn:coffer client batch".into()],
        policies: vec!["web".into()],
        token_ttl: None,
    };
    AuthClient::new(node.channel().await?).write_role(with_token(by_cn, &node.root_token)?).await?;
    let err = SecretsClient::new(other).get(get("web/config", None)).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    Ok(())
}

/// A list is of a folder: `app` does not reach `apple/…`; names under a deny are left out; and
/// the page token, sealed by the cluster, names none of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_listing_shows_its_folder_minus_the_denied_names_and_its_page_token_names_nothing() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut root = node.client().await?;
    for p in ["app/a", "app/private/x", "app/private/y", "app/z", "apple/b"] {
        root.put(put(p, b"v", None)).await?;
    }
    write_policy(
        &node,
        "lister",
        "[[rule]]\npath = \"secret/app/**\"\nallow = [\"list\"]\n[[rule]]\npath = \"secret/app/private/**\"\ndeny = [\"list\"]\n",
    )
    .await?;
    let t = token_with(&node, &["lister"]).await?;
    let mut s = SecretsClient::new(bare_channel(&node).await?);
    let (mut seen, mut page_token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let req = ListRequest { prefix: "app".into(), page_size: 1, page_token: page_token.clone() };
        let page = s.list(with_token(req, &t)?).await?.into_inner();
        seen.extend(page.paths);
        assert!(
            !page.next_page_token.contains("private") && !page.next_page_token.contains("app/"),
            "{}",
            page.next_page_token
        );
        pages += 1;
        anyhow::ensure!(pages < 20, "the listing never ended");
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, vec!["app/a".to_owned(), "app/z".to_owned()]);
    // A token that no node made is refused.
    let forged = ListRequest { prefix: "app".into(), page_size: 1, page_token: "1.AAAA".into() };
    assert_eq!(s.list(with_token(forged, &t)?).await.unwrap_err().code(), Code::InvalidArgument);
    Ok(())
}

/// A stranger (no certificate, no token) or a forged token gets UNAUTHENTICATED from every Auth
/// call, and nothing changes.
#[tokio::test(flavor = "multi_thread")]
async fn the_auth_service_refuses_strangers_and_forged_tokens_on_every_call() -> anyhow::Result<()> {
    use coffer_proto::v1::{
        DeletePolicyRequest, DeleteRoleRequest, ListPoliciesRequest, ListRolesRequest, LoginRequest, ReadPolicyRequest,
        ReadRoleRequest, RenewTokenRequest, WriteRoleRequest,
    };
    let node = InProcessNode::must_start().await?;
    write_policy(&node, "kept", "[[rule]]\npath = \"secret/*\"\nallow = [\"read\"]\n").await?;
    let forged = coffer_node::auth::token::format(&[3; 32]).to_string();
    let mut auth = AuthClient::new(bare_channel(&node).await?);
    for token in [None, Some(forged.as_str())] {
        macro_rules! refused {
            ($call:ident, $msg:expr) => {{
                let mut request = tonic::Request::new($msg);
                if let Some(t) = token {
                    request = with_token($msg, t)?;
                }
                let err = auth
                    .$call(request)
                    .await
                    .err()
                    .ok_or_else(|| anyhow::anyhow!("{} served a stranger", stringify!($call)))?;
                assert_eq!(err.code(), Code::Unauthenticated, "{}: {err}", stringify!($call));
            }};
        }
        refused!(create_token, CreateTokenRequest { policies: vec!["root".into()], ..Default::default() });
        refused!(login, LoginRequest { ttl: None });
        refused!(lookup_token, LookupTokenRequest::default());
        refused!(renew_token, RenewTokenRequest::default());
        refused!(revoke_token, RevokeTokenRequest::default());
        refused!(list_accessors, ListAccessorsRequest { page_size: 10, page_token: String::new() });
        refused!(
            write_policy,
            WritePolicyRequest {
                name: "kept".into(),
                document: "[[rule]]\npath = \"**\"\nallow = [\"read\"]\n".into()
            }
        );
        refused!(read_policy, ReadPolicyRequest { name: "kept".into() });
        refused!(list_policies, ListPoliciesRequest {});
        refused!(delete_policy, DeletePolicyRequest { name: "kept".into() });
        refused!(
            explain,
            ExplainRequest { accessor: String::new(), path: "secret/a".into(), capability: "read".into() }
        );
        refused!(
            write_role,
            WriteRoleRequest {
                name: "r".into(),
                identities: vec!["dns:x".into()],
                policies: vec!["root".into()],
                token_ttl: None
            }
        );
        refused!(read_role, ReadRoleRequest { name: "r".into() });
        refused!(list_roles, ListRolesRequest {});
        refused!(delete_role, DeleteRoleRequest { name: "r".into() });
    }
    // Nothing changed: the policy is as written, no role exists.
    let mut admin = AuthClient::new(node.channel().await?);
    let kept = admin.read_policy(with_token(ReadPolicyRequest { name: "kept".into() }, &node.root_token)?).await?;
    assert_eq!(kept.into_inner().document, "[[rule]]\npath = \"secret/*\"\nallow = [\"read\"]\n");
    let roles = admin.list_roles(with_token(ListRolesRequest {}, &node.root_token)?).await?.into_inner().names;
    assert_eq!(roles, vec![coffer_testkit::TEST_ROLE.to_owned()]);
    Ok(())
}
