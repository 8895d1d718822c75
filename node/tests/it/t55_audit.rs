//! Audit files (issue #13, first part): the spool's chain as `coffer audit verify` checks it,
//! against each way of tampering with a file that the chain alone can show.

use coffer_node::audit::spool::Spool;

use crate::coffer_bin;

fn verify(file: &std::path::Path) -> anyhow::Result<(bool, String)> {
    let out = std::process::Command::new(coffer_bin()).args(["audit", "verify"]).arg(file).output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_verify_passes_a_real_spool_and_names_each_tampering() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("audit.log");
    let spool = Spool::open(&path)?;
    for i in 0..50 {
        spool.append(format!("{{\"method\":\"coffer.v1.Secrets/Get\",\"path\":\"app/{i}\"}}")).await?;
    }
    drop(spool);
    let (ok, said) = verify(&path)?;
    assert!(ok && said.contains("50 records, seq 1..50, chain intact"), "{said}");
    let lines: Vec<String> = std::fs::read_to_string(&path)?.lines().map(|l| format!("{l}\n")).collect();
    let tampered = |name: &str, lines: Vec<String>| -> anyhow::Result<(bool, String)> {
        let file = dir.path().join(name);
        std::fs::write(&file, lines.concat())?;
        verify(&file)
    };
    let mut edited = lines.clone();
    edited[9] = edited[9].replace("app/9", "app/X");
    let (ok, said) = tampered("edited", edited)?;
    assert!(!ok && said.contains("line 10 (seq 10): its content does not match its hash"), "{said}");
    let mut removed = lines.clone();
    removed.remove(20);
    let (ok, said) = tampered("removed", removed)?;
    assert!(!ok && said.contains("line 21 (seq 22): does not follow seq 20"), "{said}");
    let mut reordered = lines;
    reordered.swap(30, 31);
    let (ok, said) = tampered("reordered", reordered)?;
    assert!(!ok && said.contains("does not follow"), "{said}");
    Ok(())
}

/// With `[audit] spool` set, every public call leaves one record (allowed, denied and
/// unauthenticated alike) before its answer, the chain verifies, and no value appears in it.
#[tokio::test(flavor = "multi_thread")]
async fn every_call_leaves_one_record_and_no_value() -> anyhow::Result<()> {
    use coffer_proto::v1::keys_client::KeysClient;
    use coffer_proto::v1::secrets_client::SecretsClient;
    use coffer_proto::v1::{CreateKeyRequest, EncryptRequest, KeyType};
    let mut cluster = crate::must_start_cluster(1, "[audit]\nspool = \"audit.log\"\n")?;
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

    let file = cluster.node_dir(0).join("audit.log");
    let (ok, said) = verify(&file)?;
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
