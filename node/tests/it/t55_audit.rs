//! Audit (issue #13): the records real nodes write, and `coffer audit verify` against each way
//! of tampering with a file.

use crate::coffer_bin;

fn verify(file: &std::path::Path, key: Option<&std::path::Path>) -> anyhow::Result<(bool, String)> {
    let mut command = std::process::Command::new(coffer_bin());
    command.args(["audit", "verify"]).arg(file);
    if let Some(key) = key {
        command.arg("--key").arg(key);
    }
    let out = command.output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// A real node's audit file, written for a few seconds with checkpoints every second, stopped
/// cleanly: `audit verify` passes it with the node's key pinned, and names each tampering: a
/// flipped byte, a removed record, two records swapped, the file cut after a checkpoint. A
/// restart after kill -9 is noted, not called a break.
#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_passes_a_real_file_and_names_each_tampering() -> anyhow::Result<()> {
    use coffer_proto::v1::secrets_client::SecretsClient;
    let mut cluster = crate::must_start_cluster(1, "[audit]\ncheckpoint-every = \"1s\"\ncheckpoint-records = 40\n")?;
    let mut s = SecretsClient::new(cluster.channel(0)?);
    let started = std::time::Instant::now();
    for i in 0..100 {
        s.put(crate::put(&format!("app/{i}"), b"v", None)).await?;
        if started.elapsed() < std::time::Duration::from_secs(6) {
            tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        }
    }
    cluster.stop(0)?;
    let file = cluster.data_dir(0).join("audit.log");
    let key = cluster.data_dir(0).join("audit.log.pub");
    let (ok, said) = verify(&file, Some(&key))?;
    assert!(ok && said.contains("chain intact") && said.contains("(pinned), ends with a clean stop"), "{said}");
    let lines: Vec<String> = std::fs::read_to_string(&file)?.lines().map(|l| format!("{l}\n")).collect();
    let is_checkpoint = |l: &String| l.contains("\"record\":{\"checkpoint\"");
    let checkpoints: Vec<usize> = (0..lines.len()).filter(|i| is_checkpoint(&lines[*i])).collect();
    assert!(checkpoints.len() >= 5, "open, one a second or per 40 records, close: {checkpoints:?}");
    let records: Vec<usize> = (0..lines.len()).filter(|i| !is_checkpoint(&lines[*i])).collect();
    let dir = tempfile::tempdir()?;
    let tampered = |name: &str, lines: &[String]| -> anyhow::Result<(bool, String)> {
        let copy = dir.path().join(name);
        std::fs::write(&copy, lines.concat())?;
        verify(&copy, Some(&key))
    };
    let mut edited = lines.clone();
    let at = records[10];
    edited[at] = edited[at].replacen("\"status\":\"OK\"", "\"status\":\"NOT_FOUND\"", 1);
    assert_ne!(edited[at], lines[at]);
    let (ok, said) = tampered("edited", &edited)?;
    assert!(!ok && said.contains(&format!("line {}", at + 1)) && said.contains("does not match its hash"), "{said}");
    let mut removed = lines.clone();
    removed.remove(records[20]);
    let (ok, said) = tampered("removed", &removed)?;
    assert!(!ok && said.contains(&format!("line {}", records[20] + 1)) && said.contains("does not follow"), "{said}");
    let mut reordered = lines.clone();
    reordered.swap(records[30], records[30] + 1);
    let (ok, said) = tampered("reordered", &reordered)?;
    assert!(!ok && said.contains("does not follow"), "{said}");
    // Cut after a checkpoint followed by two records (under load a count checkpoint can follow a
    // timed one at once), once every checkpoint is older than three intervals and a second.
    let cut = checkpoints
        .iter()
        .copied()
        .skip(1)
        .find(|c| c + 2 < lines.len() && !is_checkpoint(&lines[c + 1]) && !is_checkpoint(&lines[c + 2]))
        .expect("a checkpoint followed by two records");
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let (ok, said) = tampered("cut", &lines[..=cut])?;
    assert!(!ok && said.contains(&format!("line {}", cut + 1)) && said.contains("cut short"), "{said}");
    let (ok, said) = tampered("cut-later", &lines[..cut + 3])?;
    assert!(!ok && said.contains("cut short") && said.contains("2 record(s) after it"), "{said}");

    // kill -9, restart: the node notes the unclean stop in its `open` checkpoint.
    cluster.start_node(0)?;
    put_retrying_on(&cluster, 0, "app/x").await?;
    cluster.kill(0)?;
    cluster.start_node(0)?;
    put_retrying_on(&cluster, 0, "app/y").await?;
    cluster.stop(0)?;
    let (ok, said) = verify(&file, Some(&key))?;
    assert!(ok && said.contains("note: line") && said.contains("unclean stop"), "{said}");
    Ok(())
}

/// Every public call leaves one record (allowed, denied and
/// unauthenticated alike) before its answer, the chain verifies, and no value appears in it.
#[tokio::test(flavor = "multi_thread")]
async fn every_call_leaves_one_record_and_no_value() -> anyhow::Result<()> {
    use coffer_proto::v1::keys_client::KeysClient;
    use coffer_proto::v1::secrets_client::SecretsClient;
    use coffer_proto::v1::{CreateKeyRequest, EncryptRequest, KeyType};
    let mut cluster = crate::must_start_cluster(1, "")?;
    let marker = b"MARKER-7f3a-never-in-audit";
    let mut s = SecretsClient::new(cluster.channel(0)?);
    s.put(crate::put("app/db", marker, None)).await?;
    // A request id and a trace id from the client: recorded, and the id comes back.
    let mut get = tonic::Request::new(crate::get("app/db", None));
    get.metadata_mut().insert("x-request-id", "client-chose-this".parse()?);
    get.metadata_mut().insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?);
    let got = s.get(get).await?;
    assert_eq!(got.metadata().get("x-request-id").and_then(|v| v.to_str().ok()), Some("client-chose-this"));
    let mut k = KeysClient::new(cluster.channel(0)?);
    k.create_key(CreateKeyRequest { name: "k".into(), r#type: KeyType::Aes256Gcm as i32, ..Default::default() })
        .await?;
    k.encrypt(EncryptRequest { name: "k".into(), plaintext: marker.to_vec(), associated_data: vec![] }).await?;
    let item = |name: &str| coffer_proto::v1::CryptoRequest {
        call: Some(coffer_proto::v1::crypto_request::Call::Encrypt(EncryptRequest {
            name: name.into(),
            plaintext: marker.to_vec(),
            associated_data: vec![],
        })),
    };
    k.batch(coffer_proto::v1::BatchRequest { items: vec![item("k"), item("k"), item("missing")] }).await?;
    // The value's keyed HMAC, as `coffer audit hash` computes it for someone allowed to.
    let value_file = tempfile::NamedTempFile::new()?;
    std::fs::write(value_file.path(), marker)?;
    let marker_hmac =
        cluster.cli_ok(0, &["audit", "hash", "--file", &value_file.path().display().to_string()])?.trim().to_owned();
    assert_eq!(marker_hmac.len(), 64, "{marker_hmac}");
    // Unauthenticated: no certificate, no token.
    let pki = cluster.pki().ok_or_else(|| anyhow::anyhow!("a TLS cluster"))?.clone();
    let tls = coffer_tls::client_config(&coffer_tls::ClientFiles { ca: pki.ca_cert(), identity: None })?;
    let bare = tonic::transport::Endpoint::from_shared(cluster.nodes[0].url())?.tls_config(tls)?.connect().await?;
    assert!(SecretsClient::new(bare).get(crate::get("app/db", None)).await.is_err());
    cluster.stop(0)?;

    let file = cluster.data_dir(0).join("audit.log");
    let (ok, said) = verify(&file, None)?;
    assert!(ok, "{said}");
    let text = std::fs::read_to_string(&file)?;
    assert!(!text.contains("MARKER-7f3a"), "a value is in the audit file");
    let records: Vec<serde_json::Value> =
        text.lines().map(serde_json::from_str::<serde_json::Value>).collect::<Result<_, _>>()?;
    let calls: Vec<(String, String, String)> = records
        .iter()
        .map(|r| {
            let r = &r["record"];
            let field = |f: &str| r[f].as_str().unwrap_or_default().to_owned();
            (field("method"), field("decision"), field("status"))
        })
        .filter(|(m, _, _)| m.starts_with("/coffer.v1.Secrets/") || m.starts_with("/coffer.v1.Keys/"))
        .collect();
    let expect = |m: &str, d: &str, s: &str| (m.to_owned(), d.to_owned(), s.to_owned());
    assert_eq!(
        calls,
        vec![
            expect("/coffer.v1.Secrets/Put", "allowed", "OK"),
            expect("/coffer.v1.Secrets/Get", "allowed", "OK"),
            expect("/coffer.v1.Keys/CreateKey", "allowed", "OK"),
            expect("/coffer.v1.Keys/Encrypt", "allowed", "OK"),
            expect("/coffer.v1.Keys/Batch", "allowed", "OK"),
            expect("/coffer.v1.Secrets/Get", "unauthenticated", "UNAUTHENTICATED"),
        ],
        "one record per call, in order"
    );
    let put = &records
        .iter()
        .find(|r| r["record"]["method"] == "/coffer.v1.Secrets/Put")
        .ok_or_else(|| anyhow::anyhow!("no Put"))?["record"];
    assert_eq!((put["path"].as_str(), put["capability"].as_str()), (Some("secret/app/db"), Some("create")));
    let get = &records
        .iter()
        .find(|r| r["record"]["method"] == "/coffer.v1.Secrets/Get")
        .ok_or_else(|| anyhow::anyhow!("no Get"))?["record"];
    assert_eq!(get["path"], "secret/app/db");
    assert_eq!(get["capability"], "read");
    assert_eq!(
        (get["request_id"].as_str(), get["trace_id"].as_str()),
        (Some("client-chose-this"), Some("4bf92f3577b34da6a3ce929d0e0e4736"))
    );
    assert_eq!((get["version"].as_u64(), put["version"].as_u64()), (Some(1), Some(1)));
    assert_eq!((get["value_hmac"].as_str(), put["value_hmac"].as_str()), (Some(&*marker_hmac), Some(&*marker_hmac)));
    assert_eq!((put["rule"].as_str(), get["rule"].as_str()), (Some("root"), Some("root")));
    let encrypt = &records
        .iter()
        .find(|r| r["record"]["method"] == "/coffer.v1.Keys/Encrypt")
        .ok_or_else(|| anyhow::anyhow!("no Encrypt"))?["record"];
    assert_eq!((encrypt["path"].as_str(), encrypt["version"].as_u64()), (Some("key/k"), Some(1)), "{encrypt}");
    let batch = &records
        .iter()
        .find(|r| r["record"]["method"] == "/coffer.v1.Keys/Batch")
        .ok_or_else(|| anyhow::anyhow!("no Batch"))?["record"];
    assert_eq!(
        batch["counts"],
        serde_json::json!({"key/k": {"encrypt": {"OK": 2}}, "key/missing": {"encrypt": {"NOT_FOUND": 1}}}),
        "{batch}"
    );
    assert!(get["principal"].as_str().is_some_and(|p| p.contains("operator")), "{get}");
    // tail, filtered by decision and by method.
    let tail = |args: &[&str]| -> anyhow::Result<Vec<String>> {
        let out = std::process::Command::new(coffer_bin()).args(["audit", "tail"]).arg(&file).args(args).output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect())
    };
    let refused = tail(&["--decision", "unauthenticated"])?;
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("/coffer.v1.Secrets/Get") && refused[0].contains("UNAUTHENTICATED"));
    assert_eq!(tail(&["--method", "Keys/Encrypt", "-n", "5"])?.len(), 1);
    assert_eq!(tail(&["--path", "secret/app/"])?.len(), 2, "the put and the allowed get");
    Ok(())
}

/// The `record` of every line of an audit file.
fn records_of(file: &std::path::Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(file)?;
    let records = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).map(|v| v["record"].clone()));
    Ok(records.collect::<Result<_, _>>()?)
}

/// One raw call with an empty message (every field at its default), as a stranger would send
/// it: `token` in metadata if any, `id` as the request id. Returns the status the client saw.
async fn raw_call(
    channel: tonic::transport::Channel,
    path: &str,
    streaming: bool,
    token: Option<&str>,
    id: &str,
) -> anyhow::Result<tonic::Code> {
    use tonic_prost::ProstCodec;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::try_from(path.to_owned())?;
    let dress = |request: &mut tonic::metadata::MetadataMap| -> anyhow::Result<()> {
        request.insert("x-request-id", id.parse()?);
        if let Some(token) = token {
            request.insert("authorization", format!("Bearer {token}").parse()?);
        }
        Ok(())
    };
    if streaming {
        let mut request = tonic::Request::new(tokio_stream::once(()));
        dress(request.metadata_mut())?;
        let mut stream = match grpc.streaming(request, path, ProstCodec::<(), ()>::default()).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Ok(status.code()),
        };
        // A stream that does not end by itself (Watch) is cancelled, as a client would.
        let read = async {
            loop {
                match stream.message().await {
                    Ok(Some(())) => {}
                    Ok(None) => return tonic::Code::Ok,
                    Err(status) => return status.code(),
                }
            }
        };
        return Ok(tokio::time::timeout(std::time::Duration::from_secs(2), read)
            .await
            .unwrap_or(tonic::Code::Cancelled));
    }
    let mut request = tonic::Request::new(());
    dress(request.metadata_mut())?;
    Ok(match grpc.unary(request, path, ProstCodec::<(), ()>::default()).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    })
}

/// Every RPC of every public service (read from the API's own descriptor, so a new RPC is in
/// the table without anyone adding it), called by nobody (no credential), by a stranger (a
/// token whose policy grants nothing there) and by root: each call leaves exactly one record,
/// found by its request id, with its method and the status the client saw; a refusal names the
/// decision, and the stranger's accessor; an allowed call names the rule that allowed it.
#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_of_every_service_leaves_exactly_one_record() -> anyhow::Result<()> {
    use coffer_proto::v1::auth_client::AuthClient;
    use coffer_proto::v1::{CreateTokenRequest, WritePolicyRequest};
    use prost::Message;
    let mut cluster = crate::must_start_cluster(1, "")?;
    let root = cluster.root_token().ok_or_else(|| anyhow::anyhow!("a root token"))?.to_owned();
    let mut auth = AuthClient::new(cluster.channel(0)?);
    let policy = "[[rule]]\npath = \"secret/elsewhere/*\"\nallow = [\"read\"]\n";
    auth.write_policy(coffer_testkit::with_token(
        WritePolicyRequest { name: "elsewhere".into(), document: policy.into() },
        &root,
    )?)
    .await?;
    let made = auth
        .create_token(coffer_testkit::with_token(
            CreateTokenRequest { policies: vec!["elsewhere".into()], ..Default::default() },
            &root,
        )?)
        .await?
        .into_inner();
    let accessor = made.info.as_ref().map(|i| i.accessor.clone()).unwrap_or_default();
    let root_accessor = auth
        .lookup_token(coffer_testkit::with_token(coffer_proto::v1::LookupTokenRequest::default(), &root)?)
        .await?
        .into_inner()
        .accessor;
    let pki = cluster.pki().ok_or_else(|| anyhow::anyhow!("a TLS cluster"))?.clone();
    let tls = coffer_tls::client_config(&coffer_tls::ClientFiles { ca: pki.ca_cert(), identity: None })?;
    let bare = tonic::transport::Endpoint::from_shared(cluster.nodes[0].url())?.tls_config(tls)?.connect().await?;

    let set = prost_types::FileDescriptorSet::decode(coffer_proto::FILE_DESCRIPTOR_SET)?;
    let mut calls = Vec::new();
    for file in set.file.iter().filter(|f| f.package() == "coffer.v1") {
        for service in &file.service {
            for method in &service.method {
                let path = format!("/coffer.v1.{}/{}", service.name(), method.name());
                let streaming = method.client_streaming() || method.server_streaming();
                for (who, token) in [("nobody", None), ("stranger", Some(made.token.as_str())), ("root", Some(&*root))]
                {
                    let id = format!("table-{}", calls.len());
                    let code = raw_call(bare.clone(), &path, streaming, token, &id).await?;
                    calls.push((id, path.clone(), who, code));
                }
            }
        }
    }
    assert!(calls.len() >= 3 * 45, "the table covers every RPC: {}", calls.len());
    cluster.stop(0)?;

    let records = records_of(&cluster.data_dir(0).join("audit.log"))?;
    for (id, path, who, code) in &calls {
        let found: Vec<&serde_json::Value> = records.iter().filter(|r| r["request_id"] == id.as_str()).collect();
        assert_eq!(found.len(), 1, "{who} calling {path} ({id}) left {} records", found.len());
        let r = found[0];
        let status = coffer_node::audit::layer::code_name(*code);
        assert_eq!((r["method"].as_str(), r["status"].as_str()), (Some(path.as_str()), Some(status)), "{who}: {r}");
        match (*who, code) {
            (_, tonic::Code::Unauthenticated) => assert_eq!(r["decision"], "unauthenticated", "{who} {path}: {r}"),
            // Init and join ask for an operator certificate, whatever else the caller has.
            (_, tonic::Code::PermissionDenied) if path.ends_with("/Init") || path.ends_with("/Join") => {
                assert_eq!(
                    (r["decision"].as_str(), r["rule"].as_str()),
                    (Some("denied"), Some("operator-certificate"))
                );
            }
            ("nobody", _) => panic!("{path} answered {code:?} to a caller with no credential"),
            // Everything else authenticates first: the record names the caller, whatever the
            // request's shape (an empty message is mostly INVALID_ARGUMENT).
            ("stranger", code) => {
                assert_eq!(r["accessor"], accessor.as_str(), "{path}: {r}");
                if *code == tonic::Code::PermissionDenied {
                    assert_eq!((r["decision"].as_str(), r["rule"].as_str()), (Some("denied"), Some("default-deny")));
                }
            }
            (_, code) => {
                assert_eq!(r["accessor"], root_accessor.as_str(), "{path}: {r}");
                if r["path"].is_string() {
                    assert_eq!((r["decision"].as_str(), r["rule"].as_str()), (Some("allowed"), Some("root")), "{r}");
                }
                assert_ne!(*code, tonic::Code::PermissionDenied, "root refused {path}");
            }
        }
    }
    Ok(())
}

/// Small tmpfs mounts, one per node (unmounted, lazily, when dropped).
struct Tmpfs(Vec<std::path::PathBuf>);

impl Tmpfs {
    fn mount(dirs: Vec<std::path::PathBuf>) -> anyhow::Result<Tmpfs> {
        let mut mounted = Tmpfs(Vec::new());
        for dir in dirs {
            std::fs::create_dir_all(&dir)?;
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
                .arg(&dir)
                .output()?;
            anyhow::ensure!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
            mounted.0.push(dir);
        }
        Ok(mounted)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::process::Command::new("umount").arg("-l").arg(dir).output();
        }
    }
}

/// Whether `coffer server` answers a put on node `i` with `UNAVAILABLE` naming the audit spool.
async fn refused_for_audit(cluster: &coffer_testkit::Cluster, i: usize, path: &str) -> anyhow::Result<bool> {
    use coffer_proto::v1::secrets_client::SecretsClient;
    Ok(match SecretsClient::new(cluster.channel(i)?).put(crate::put(path, b"v", None)).await {
        Err(s) => s.code() == tonic::Code::Unavailable && s.message().contains("audit spool"),
        Ok(_) => false,
    })
}

/// The leader's audit spool on a full disk (a 4 MiB tmpfs filled up): its calls fail closed
/// with UNAVAILABLE and change nothing, its health says NOT_SERVING, it hands leadership to
/// another node, the other nodes keep serving; when space returns it serves again by itself,
/// and its audit file verifies. Needs root to mount the tmpfs: as another user it says so and
/// checks nothing (CI runs as root).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_disk_fails_its_node_closed_moves_leadership_and_recovers() -> anyhow::Result<()> {
    use coffer_proto::v1::secrets_client::SecretsClient;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let uid = std::process::Command::new("id").arg("-u").output()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("SKIPPED: mounting a tmpfs for the audit spool needs root");
        return Ok(());
    }
    let options = coffer_testkit::Options::tests("[audit]\nspool = \"spool/audit.log\"\ncheckpoint-every = \"1s\"\n");
    let mut cluster = coffer_testkit::Cluster::prepare(crate::coffer_bin(), 3, options)?;
    let tmpfs = Tmpfs::mount((0..3).map(|i| cluster.node_dir(i).join("spool")).collect())?;
    for i in 0..3 {
        cluster.start_node(i)?;
    }
    cluster.form()?;
    let leader = cluster.leader()?;
    let other = (leader + 1) % 3;
    SecretsClient::new(cluster.channel(other)?).put(crate::put("app/before", b"v", None)).await?;

    // Fill the leader's spool disk.
    let filler = cluster.node_dir(leader).join("spool/filler");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&filler)?;
        // Down to the last byte: a record squeezed into the tail would flap.
        for size in [64 * 1024, 4096, 256, 1] {
            let chunk = vec![0u8; size];
            while file.write_all(&chunk).is_ok() {}
        }
    }
    let started = std::time::Instant::now();
    while !refused_for_audit(&cluster, leader, "app/refused").await? {
        anyhow::ensure!(started.elapsed() < std::time::Duration::from_secs(10), "the full spool never refused a call");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Known to fail, the node refuses before the call runs: this put changes nothing.
    assert!(refused_for_audit(&cluster, leader, "app/refused-2").await?);
    let health = |i: usize| {
        let channel = cluster.channel(i);
        async move {
            let reply = HealthClient::new(channel?).check(HealthCheckRequest { service: String::new() }).await;
            anyhow::Ok(reply.map(|r| r.into_inner().status))
        }
    };
    // Health itself is refused while nothing can be audited (UNAVAILABLE), or says NOT_SERVING
    // once the node has noticed (it looks twice a second).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let status = health(leader).await?;
    assert!(status.as_ref().map_or_else(|s| s.code() == tonic::Code::Unavailable, |s| *s == 2), "{status:?}");
    // Leadership moves away, and the others keep serving.
    let started = std::time::Instant::now();
    loop {
        let now = cluster.leader()?;
        if now != leader {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < std::time::Duration::from_secs(15),
            "leadership stayed on the failing node"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    put_retrying_on(&cluster, other, "app/during").await?;
    let mut s = SecretsClient::new(cluster.channel(other)?);
    let refused = s.get(crate::get("app/refused-2", None)).await;
    assert_eq!(refused.map_err(|e| e.code()).err(), Some(tonic::Code::NotFound), "a refused put wrote nothing");

    // Space returns: the node serves again by itself.
    std::fs::remove_file(&filler)?;
    let started = std::time::Instant::now();
    while refused_for_audit(&cluster, leader, "app/after").await? {
        anyhow::ensure!(started.elapsed() < std::time::Duration::from_secs(10), "the node did not recover");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let started = std::time::Instant::now();
    while health(leader).await?.ok() != Some(1) {
        anyhow::ensure!(started.elapsed() < std::time::Duration::from_secs(5), "health never said SERVING again");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    SecretsClient::new(cluster.channel(leader)?).get(crate::get("app/during", None)).await?;
    cluster.stop(leader)?;
    let (ok, said) = verify(&cluster.node_dir(leader).join("spool/audit.log"), None)?;
    assert!(ok, "{said}");
    for i in 0..3 {
        cluster.kill(i)?;
    }
    drop(tmpfs);
    Ok(())
}

/// A put on node `i`, retried for up to 15 s while it answers UNAVAILABLE (a leader change).
async fn put_retrying_on(cluster: &coffer_testkit::Cluster, i: usize, path: &str) -> anyhow::Result<()> {
    use coffer_proto::v1::secrets_client::SecretsClient;
    let started = std::time::Instant::now();
    loop {
        match SecretsClient::new(cluster.channel(i)?).put(crate::put(path, b"v", None)).await {
            Ok(_) => return Ok(()),
            Err(s)
                if s.code() == tonic::Code::Unavailable && started.elapsed() < std::time::Duration::from_secs(15) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(s) => return Err(s.into()),
        }
    }
}

/// The node's audit files, oldest first: the rotated ones (`audit.log.<first seq>`) by name,
/// then the live one.
fn audit_files(data_dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut rotated: Vec<std::path::PathBuf> = std::fs::read_dir(data_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix("audit.log.")
                    .is_some_and(|seq| seq.len() == 20 && seq.bytes().all(|b| b.is_ascii_digit()))
            })
        })
        .collect();
    rotated.sort();
    rotated.push(data_dir.join("audit.log"));
    Ok(rotated)
}

fn verify_all(files: &[std::path::PathBuf], key: &std::path::Path) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(coffer_bin())
        .args(["audit", "verify"])
        .args(files)
        .arg("--key")
        .arg(key)
        .output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Past `rotate-bytes` the spool is renamed `audit.log.<first seq>` and a new file continues
/// the chain: every record is in exactly one file, `verify` passes the files given in order,
/// and names a file missing from the middle.
#[tokio::test(flavor = "multi_thread")]
async fn the_spool_rotates_by_size_and_the_files_chain_in_order() -> anyhow::Result<()> {
    use coffer_proto::v1::secrets_client::SecretsClient;
    let mut cluster = crate::must_start_cluster(1, "[audit]\nrotate-bytes = 8192\ncheckpoint-every = \"1s\"\n")?;
    let mut s = SecretsClient::new(cluster.channel(0)?);
    for i in 0..150 {
        let mut put = tonic::Request::new(crate::put(&format!("app/{i}"), b"v", None));
        put.metadata_mut().insert("x-request-id", format!("rotation-{i}").parse()?);
        s.put(put).await?;
    }
    cluster.stop(0)?;
    let files = audit_files(&cluster.data_dir(0))?;
    assert!(files.len() >= 4, "8 KiB files for about 75 KiB of records: {files:?}");
    let key = cluster.data_dir(0).join("audit.log.pub");
    let (ok, said) = verify_all(&files, &key)?;
    assert!(ok, "{said}");
    assert_eq!(said.matches("ends with a rotation").count(), files.len() - 1, "{said}");
    let mut ids = Vec::new();
    for file in &files {
        for line in std::fs::read_to_string(file)?.lines() {
            let value: serde_json::Value = serde_json::from_str(line)?;
            if let Some(id) = value["record"]["request_id"].as_str().filter(|id| id.starts_with("rotation-")) {
                ids.push(id.to_owned());
            }
        }
    }
    assert_eq!(ids, (0..150).map(|i| format!("rotation-{i}")).collect::<Vec<_>>(), "each put once, in order");
    let mut gap = files.clone();
    gap.remove(1);
    let (ok, said) = verify_all(&gap, &key)?;
    assert!(!ok && said.contains("does not continue"), "{said}");
    Ok(())
}

/// A collector for the sink test: holds every connection, and reads none until told to.
struct Collector {
    port: u16,
    reading: std::sync::Arc<tokio::sync::Notify>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>>,
}

impl Collector {
    /// Listens with a small receive buffer, so a collector that does not read stalls the sink
    /// after a few KiB.
    fn start() -> anyhow::Result<Collector> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        socket.bind("127.0.0.1:0".parse()?)?;
        let listener = socket.listen(16)?;
        let port = listener.local_addr()?.port();
        let reading = std::sync::Arc::new(tokio::sync::Notify::new());
        let lines: std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>> = std::sync::Arc::default();
        let (wake, store) = (reading.clone(), lines.clone());
        tokio::spawn(async move {
            let mut held = Vec::new();
            let read = |stream: tokio::net::TcpStream, store: std::sync::Arc<std::sync::Mutex<Vec<Vec<u64>>>>| {
                tokio::spawn(async move {
                    use tokio::io::AsyncBufReadExt;
                    let index = {
                        let mut all = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        all.push(Vec::new());
                        all.len() - 1
                    };
                    let mut reader = tokio::io::BufReader::new(stream).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        // 0: a line that does not parse, which only the torn end of a connection
                        // the sink dropped mid-write may be.
                        let seq = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["seq"].as_u64());
                        store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[index].push(seq.unwrap_or(0));
                    }
                })
            };
            // Hung: accept, hold, read nothing.
            loop {
                tokio::select! {
                    accepted = listener.accept() => if let Ok((stream, _)) = accepted { held.push(stream) },
                    () = wake.notified() => break,
                }
            }
            for stream in held {
                read(stream, store.clone());
            }
            while let Ok((stream, _)) = listener.accept().await {
                read(stream, store.clone());
            }
        });
        Ok(Collector { port, reading, lines })
    }
}

/// The audit status line of node `i` (`operator status`).
fn audit_status(cluster: &coffer_testkit::Cluster, i: usize) -> anyhow::Result<String> {
    let text = cluster.cli_ok(i, &["operator", "status", "-o", "json"])?;
    Ok(serde_json::from_str::<serde_json::Value>(&text)?["audit"].as_str().unwrap_or_default().to_owned())
}

fn sink_lag(status: &str) -> Option<u64> {
    let at = status.find("sink collector: lag ")? + "sink collector: lag ".len();
    status[at..].split_whitespace().next()?.parse().ok()
}

/// A sink whose collector hangs (accepts, never reads): every call still completes, the sink's
/// lag grows and `operator status` names its failure; once the collector reads, the lag drains
/// to 0 and it has every record, at least once, in order on each connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_sink_adds_lag_not_latency_and_then_delivers_everything_in_order() -> anyhow::Result<()> {
    use coffer_proto::v1::secrets_client::SecretsClient;
    let collector = Collector::start()?;
    let config = format!(
        "[audit]\ncheckpoint-every = \"1s\"\n[[audit.sink]]\nname = \"collector\"\naddress = \"127.0.0.1:{}\"\ntimeout = \"1s\"\n",
        collector.port
    );
    let cluster = crate::must_start_cluster(1, &config)?;
    let mut s = SecretsClient::new(cluster.channel(0)?);
    for i in 0..600 {
        let mut put = tonic::Request::new(crate::put(&format!("app/{i}"), b"v", None));
        // A call held behind the sink would miss this; none is.
        put.set_timeout(std::time::Duration::from_secs(5));
        s.put(put).await?;
    }
    let started = std::time::Instant::now();
    let stalled = loop {
        let status = audit_status(&cluster, 0)?;
        if sink_lag(&status).is_some_and(|lag| lag > 100) && status.contains("failing: writing") {
            break status;
        }
        anyhow::ensure!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "the sink never showed its stall: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(stalled.contains("timed out"), "{stalled}");

    collector.reading.notify_one();
    let started = std::time::Instant::now();
    let head = loop {
        let status = audit_status(&cluster, 0)?;
        let head: u64 = status
            .split(" at seq ")
            .nth(1)
            .and_then(|t| t.split(';').next())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0);
        if sink_lag(&status) == Some(0) && head > 0 {
            break head;
        }
        anyhow::ensure!(started.elapsed() < std::time::Duration::from_secs(60), "the sink never caught up: {status}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    // What was written is read: give the collector a moment to read its buffers.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let connections = collector.lines.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    assert!(connections.len() >= 2, "the stalled connection was dropped and another made: {}", connections.len());
    for seqs in &connections {
        let whole = match seqs.last() {
            Some(0) => &seqs[..seqs.len() - 1],
            _ => &seqs[..],
        };
        assert!(!whole.contains(&0), "a torn line only at a connection's end: {seqs:?}");
        assert!(whole.windows(2).all(|w| w[0] < w[1]), "in order on each connection: {seqs:?}");
    }
    let mut all: Vec<u64> = connections.concat();
    all.sort_unstable();
    all.dedup();
    // (The status calls themselves add records past `head`.)
    all.retain(|seq| (1..=head).contains(seq));
    assert_eq!(all, (1..=head).collect::<Vec<_>>(), "every record up to seq {head}, none missing");
    Ok(())
}

/// A client that gives up does not take the record with it: a Keys stream cancelled after three
/// items is recorded as CANCELLED with its three items counted, and puts whose deadline (1 ms)
/// passes before they finish are each recorded, with the status they really ended with.
#[tokio::test(flavor = "multi_thread")]
async fn a_call_the_client_gives_up_on_is_recorded_all_the_same() -> anyhow::Result<()> {
    use coffer_proto::v1::keys_client::KeysClient;
    use coffer_proto::v1::secrets_client::SecretsClient;
    use coffer_proto::v1::{
        crypto_request::Call, CreateKeyRequest, CryptoRequest, EncryptRequest, KeyType, StreamRequest,
    };
    let mut cluster = crate::must_start_cluster(1, "")?;
    let mut k = KeysClient::new(cluster.channel(0)?);
    k.create_key(CreateKeyRequest { name: "k".into(), r#type: KeyType::Aes256Gcm as i32, ..Default::default() })
        .await?;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert("x-request-id", "cancelled-stream".parse()?);
    let mut replies = k.stream(request).await?.into_inner();
    for id in 0..3 {
        let call =
            Call::Encrypt(EncryptRequest { name: "k".into(), plaintext: b"p".to_vec(), associated_data: vec![] });
        tx.send(StreamRequest { id, request: Some(CryptoRequest { call: Some(call) }) }).await?;
        replies.message().await?.ok_or_else(|| anyhow::anyhow!("a reply"))?;
    }
    drop(replies); // the client cancels (RST_STREAM) with the request side still open
    let mut s = SecretsClient::new(cluster.channel(0)?);
    for i in 0..20 {
        let mut put = tonic::Request::new(crate::put(&format!("hurried/{i}"), b"v", None));
        put.set_timeout(std::time::Duration::from_millis(1));
        put.metadata_mut().insert("x-request-id", format!("hurried-{i}").parse()?);
        let _ = s.put(put).await; // most give up before the write commits
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    drop(tx);
    cluster.stop(0)?;

    let records = records_of(&cluster.data_dir(0).join("audit.log"))?;
    let stream: Vec<&serde_json::Value> = records.iter().filter(|r| r["request_id"] == "cancelled-stream").collect();
    assert_eq!(stream.len(), 1, "{stream:?}");
    assert_eq!(stream[0]["status"], "CANCELLED", "{}", stream[0]);
    assert_eq!(stream[0]["counts"], serde_json::json!({"key/k": {"encrypt": {"OK": 3}}}));
    for i in 0..20 {
        let id = format!("hurried-{i}");
        let found: Vec<&serde_json::Value> = records.iter().filter(|r| r["request_id"] == id.as_str()).collect();
        assert_eq!(found.len(), 1, "{id}: {found:?}");
    }
    Ok(())
}
