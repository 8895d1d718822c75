//! Issue #11: TLS on the client port, tested as an attacker and a user would: from separate
//! processes (the CLI) and with raw gRPC clients holding the wrong things. Every refusal is
//! checked to have changed nothing.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use coffer_proto::v1::operator_client::OperatorClient;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{GetRequest, InitRequest, PutRequest, StatusRequest};
use coffer_testkit::{process_softhsm, InProcess, SoftHsm, TOKEN_LABEL};
use coffer_tls::{client_config, Ca, ClientFiles, Subject};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::coffer_bin;

const YEAR: Duration = Duration::from_secs(365 * 86_400);

/// A CA (made with the CLI, as an operator would), a node certificate and a client certificate.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn must_new() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = dir.path().join("ca");
        cli_ok(&["operator", "tls", "ca", "create", "--dir", path(&ca)?])?;
        let out = dir.path().to_owned();
        cli_ok(&[
            "operator",
            "tls",
            "issue",
            "node",
            "--id",
            "1",
            "--host",
            "127.0.0.1",
            "--ca-dir",
            path(&ca)?,
            "--out",
            path(&out)?,
        ])?;
        cli_ok(&[
            "operator",
            "tls",
            "issue",
            "operator",
            "--name",
            "ops",
            "--ca-dir",
            path(&ca)?,
            "--out",
            path(&out)?,
        ])?;
        Ok(Pki { dir })
    }
    fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca").join(coffer_tls::CA_CERT)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn client(&self) -> anyhow::Result<ClientTlsConfig> {
        Ok(client_config(&ClientFiles {
            ca: self.ca_cert(),
            identity: Some((self.file("ops.crt"), self.file("ops.key"))),
        })?)
    }
}

fn path(p: &Path) -> anyhow::Result<&str> {
    p.to_str().ok_or_else(|| anyhow::anyhow!("a non-UTF-8 temp path"))
}

/// Runs `coffer server --config CONFIG`, which must fail; returns what it said.
fn refused_start(config: &Path) -> anyhow::Result<String> {
    let out = std::process::Command::new(coffer_bin()).args(["server", "--config"]).arg(config).output()?;
    anyhow::ensure!(!out.status.success(), "the node started with {}", config.display());
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

fn cli_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new(coffer_bin()).args(args).output()?;
    anyhow::ensure!(out.status.success(), "coffer {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A node config in `dir` that serves TLS with `pki`'s node certificate, on the process token.
fn tls_config(dir: &Path, pki: &Pki, client_certs: &str) -> anyhow::Result<coffer_node::Config> {
    let tokens = process_softhsm(|dir| SoftHsm::create_with_coffer(dir, coffer_bin()))?;
    let config_path = dir.join("node.toml");
    std::fs::write(
        &config_path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"data\"\n[hsm]\ntoken-label = \"{TOKEN_LABEL}\"\npin-file = \"{}\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nclient-certs = \"{client_certs}\"\n",
            tokens.pin_file().display(),
            pki.file("node-1.crt").display(),
            pki.file("node-1.key").display(),
            pki.ca_cert().display(),
        ),
    )?;
    Ok(coffer_node::Config::load(&config_path)?)
}

/// A node in this process serving TLS with `pki`'s node certificate, initialised.
async fn tls_node(pki: &Pki, client_certs: &str) -> anyhow::Result<(InProcess, String)> {
    let dir = tempfile::tempdir()?;
    let config = tls_config(dir.path(), pki, client_certs)?;
    let server = InProcess::start_with(dir, Some(pki.client()?), |l, s| coffer_node::run(config, l, s)).await?;
    let init = OperatorClient::new(channel(server.url(), Some(pki.client()?)).await?).init(InitRequest {}).await?;
    let root = init.into_inner().root_token;
    crate::grant_root(channel(server.url(), Some(pki.client()?)).await?, &root, "spiffe://coffer/operator/ops").await?;
    Ok((server, root))
}

async fn channel(url: &str, tls: Option<ClientTlsConfig>) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?.timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(endpoint.connect().await?)
}

fn put(path: &str, value: &[u8]) -> PutRequest {
    PutRequest { path: path.into(), value: value.to_vec(), cas: None, max_versions: None, request_id: String::new() }
}

fn get(path: &str) -> GetRequest {
    GetRequest { path: path.into(), version: None, max_staleness: None, stage: String::new() }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_port_speaks_tls_and_refuses_what_does_not() -> anyhow::Result<()> {
    let pki = Pki::must_new()?;
    let (node, _) = tls_node(&pki, "optional").await?;
    let url = node.url().to_owned();

    // The CLI, a separate process, with the CA and a client certificate, as `coffer dev` prints.
    let env = |cmd: &mut std::process::Command| {
        cmd.env("COFFER_ADDR", &url)
            .env("COFFER_CACERT", pki.ca_cert())
            .env("COFFER_CLIENT_CERT", pki.file("ops.crt"))
            .env("COFFER_CLIENT_KEY", pki.file("ops.key"));
    };
    let mut put_cmd = std::process::Command::new(coffer_bin());
    env(&mut put_cmd);
    let out = put_cmd.args(["secret", "put", "db/password", "hunter2"]).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut status = std::process::Command::new(coffer_bin());
    env(&mut status);
    let out = status.args(["operator", "status"]).output()?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("transport tls"), "{}", String::from_utf8_lossy(&out.stdout));

    // Plaintext to the TLS port: the handshake never happens and no call gets through.
    let plain = url.replace("https://", "http://");
    let refused = match channel(&plain, None).await {
        Ok(ch) => SecretsClient::new(ch).put(put("db/password", b"plain")).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plaintext client was served");

    // A client that trusts another CA does not trust the node.
    let other = tempfile::tempdir()?;
    let other_ca = Ca::create(&other.path().join("ca"), YEAR)?;
    other_ca.issue(&Subject::Client("mallory".into()), &[], SystemTime::now() + YEAR, other.path(), "mallory")?;
    let wrong_trust =
        client_config(&ClientFiles { ca: other.path().join("ca").join(coffer_tls::CA_CERT), identity: None })?;
    assert!(channel(&url, Some(wrong_trust)).await.is_err(), "a server certificate from an unknown CA was trusted");

    // A client certificate from another CA is refused by the node, even where certificates are
    // optional: one that is sent must verify.
    let mallory = client_config(&ClientFiles {
        ca: pki.ca_cert(),
        identity: Some((other.path().join("mallory.crt"), other.path().join("mallory.key"))),
    })?;
    let forged = match channel(&url, Some(mallory)).await {
        Ok(ch) => SecretsClient::new(ch).put(put("db/password", b"mallory")).await.is_err(),
        Err(_) => true,
    };
    assert!(forged, "a client certificate from another CA was accepted");

    // Nothing any of them sent changed the secret.
    let mut good = SecretsClient::new(channel(&url, Some(pki.client()?)).await?);
    let secret = good.get(get("db/password")).await?.into_inner();
    assert_eq!((secret.value.as_slice(), secret.version), (&b"hunter2"[..], 1));
    let mut ops = OperatorClient::new(channel(&url, Some(pki.client()?)).await?);
    assert_eq!(ops.status(StatusRequest {}).await?.into_inner().transport, "tls");
    node.stop().await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_server_certificate_is_refused_with_a_message_that_says_so() -> anyhow::Result<()> {
    let pki = Pki::must_new()?;
    let ca = Ca::load(&pki.dir.path().join("ca"))?;
    let stale = tempfile::tempdir()?;
    ca.issue(
        &Subject::Node(1),
        &["127.0.0.1".into()],
        SystemTime::now() - Duration::from_secs(86_400),
        stale.path(),
        "node-1",
    )?;
    for f in ["node-1.crt", "node-1.key"] {
        std::fs::remove_file(pki.file(f))?;
        std::fs::copy(stale.path().join(f), pki.file(f))?;
    }
    // The node serves (its clients are the ones to judge); the CLI refuses it and says why.
    let dir = tempfile::tempdir()?;
    let config = tls_config(dir.path(), &pki, "optional")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(coffer_node::run(config, listener, async move {
        let _ = stopped.await;
    }));
    let mut last = String::new();
    for _ in 0..100 {
        let out = std::process::Command::new(coffer_bin())
            .args(["secret", "get", "x"])
            .env("COFFER_ADDR", &url)
            .env("COFFER_CACERT", pki.ca_cert())
            .output()?;
        assert!(!out.status.success(), "a server with an expired certificate was trusted");
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        if last.contains("expired") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.contains("expired"), "the CLI does not say the certificate expired: {last}");
    let _ = stop.send(());
    served.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_rotated_on_disk_is_picked_up_while_a_client_keeps_calling() -> anyhow::Result<()> {
    let pki = Pki::must_new()?;
    let (node, root) = tls_node(&pki, "optional").await?;
    let url = node.url().to_owned();
    let mut steady = SecretsClient::new(channel(&url, Some(pki.client()?)).await?);
    steady.put(put("app/key", b"v1")).await?;

    // The new certificate comes from a second CA: only a node that reloaded can satisfy a client
    // that trusts nothing else.
    let next = tempfile::tempdir()?;
    let next_ca = Ca::create(&next.path().join("ca"), YEAR)?;
    next_ca.issue(&Subject::Node(1), &["127.0.0.1".into()], SystemTime::now() + YEAR, next.path(), "node-1")?;
    let calling = tokio::spawn(async move {
        let mut failures = Vec::new();
        for _ in 0..60 {
            if let Err(e) = steady.get(get("app/key")).await {
                failures.push(e.to_string());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        failures
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Replaced as a deploy tool would: write beside, then rename over.
    for f in ["node-1.key", "node-1.crt"] {
        let tmp = pki.file(&format!("{f}.new"));
        std::fs::copy(next.path().join(f), &tmp)?;
        std::fs::rename(&tmp, pki.file(f))?;
    }
    let trusts_next =
        client_config(&ClientFiles { ca: next.path().join("ca").join(coffer_tls::CA_CERT), identity: None })?;
    let mut reloaded = None;
    for _ in 0..50 {
        if let Ok(ch) = channel(&url, Some(trusts_next.clone())).await {
            // No client certificate here: the root token speaks.
            let read = coffer_testkit::with_token(get("app/key"), &root)?;
            reloaded = Some(SecretsClient::new(ch).get(read).await?.into_inner().value);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(reloaded.as_deref(), Some(&b"v1"[..]), "the node never served the new certificate");
    let failures = calling.await?;
    assert!(failures.is_empty(), "calls failed during the rotation: {failures:?}");
    node.stop().await
}

#[test]
fn a_private_key_others_can_read_stops_the_node_naming_the_file() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::must_new()?;
    let key = pki.file("node-1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("node.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = \"data\"\n[hsm]\ntoken-label = \"t\"\npin-file = \"pin\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            pki.file("node-1.crt").display(),
            key.display(),
            pki.ca_cert().display(),
        ),
    )?;
    let stderr = refused_start(&dir.path().join("node.toml"))?;
    assert!(stderr.contains(&key.display().to_string()) && stderr.contains("chmod 600"), "{stderr}");
    assert!(!dir.path().join("data").exists(), "nothing was created");

    // A certificate for another node id: refused at start, naming both.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let config = std::fs::read_to_string(dir.path().join("node.toml"))?;
    std::fs::write(dir.path().join("node.toml"), format!("node-id = 2\n{config}"))?;
    let stderr = refused_start(&dir.path().join("node.toml"))?;
    assert!(stderr.contains("Node(1)") && stderr.contains("node-id is 2"), "{stderr}");
    Ok(())
}
