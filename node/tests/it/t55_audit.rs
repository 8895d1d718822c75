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

/// A put on node 0 of a node that has just started: retried while it answers `UNAVAILABLE`
/// (not yet caught up), for up to 15 s.
async fn put_once_serving(cluster: &coffer_testkit::Cluster, path: &str) -> anyhow::Result<()> {
    use coffer_proto::v1::secrets_client::SecretsClient;
    let started = std::time::Instant::now();
    loop {
        match SecretsClient::new(cluster.channel(0)?).put(crate::put(path, b"v", None)).await {
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
    // Cut after the second checkpoint, which is older than three intervals by now.
    let cut = checkpoints[1];
    let (ok, said) = tampered("cut", &lines[..=cut])?;
    assert!(!ok && said.contains(&format!("line {}", cut + 1)) && said.contains("cut short"), "{said}");
    let (ok, said) = tampered("cut-later", &lines[..cut + 3])?;
    assert!(!ok && said.contains("cut short") && said.contains("2 record(s) after it"), "{said}");

    // kill -9, restart: the node notes the unclean stop in its `open` checkpoint.
    cluster.start_node(0)?;
    put_once_serving(&cluster, "app/x").await?;
    cluster.kill(0)?;
    cluster.start_node(0)?;
    put_once_serving(&cluster, "app/y").await?;
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
    s.get(crate::get("app/db", None)).await?;
    let mut k = KeysClient::new(cluster.channel(0)?);
    k.create_key(CreateKeyRequest { name: "k".into(), r#type: KeyType::Aes256Gcm as i32, ..Default::default() })
        .await?;
    k.encrypt(EncryptRequest { name: "k".into(), plaintext: marker.to_vec(), associated_data: vec![] }).await?;
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
