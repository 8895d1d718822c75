//! Issue #11: rotating TLS certificates is a rotation too. A whole cluster moves to a new CA
//! without a restart: trust both, renew every node's certificate, trust only the new one. Each
//! node picks up its files from disk (served and dialled with), and a node restarted afterwards
//! is dialled by the others with their renewed certificates.

use std::path::Path;
use std::time::{Duration, SystemTime};

use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_tls::{client_config, Ca, ClientFiles, Subject};

use crate::{get, must_start_cluster, put};

/// Writes `contents` beside `path` and renames it over, as a deploy tool would.
fn replace(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Long enough for every node to notice a changed file (they look every 2 s).
const NOTICED: Duration = Duration::from_millis(3500);

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_moves_to_a_new_ca_without_a_restart() -> anyhow::Result<()> {
    let mut cluster = must_start_cluster(3, "")?;
    let pki = cluster.pki().ok_or_else(|| anyhow::anyhow!("the cluster runs TLS"))?.clone();
    let old_ca = std::fs::read(pki.ca_cert())?;
    let next = tempfile::tempdir()?;
    let new_ca = Ca::create(&next.path().join("ca"), Duration::from_secs(86_400))?;
    let year = SystemTime::now() + Duration::from_secs(86_400);

    // 1. Every node trusts both CAs.
    let both = [old_ca.as_slice(), new_ca.cert_pem().as_bytes()].concat();
    replace(&pki.ca_cert(), &both)?;
    tokio::time::sleep(NOTICED).await;

    // 2. Every node gets a certificate of the new CA.
    for (i, node) in cluster.nodes.iter().enumerate() {
        let out = next.path().join(format!("node{i}"));
        let issued = new_ca.issue(&Subject::Node(node.id), &["127.0.0.1".into()], year, &out, "node")?;
        replace(&node.dir.join("tls/node.key"), &std::fs::read(issued.key)?)?;
        replace(&node.dir.join("tls/node.crt"), &std::fs::read(issued.cert)?)?;
    }
    tokio::time::sleep(NOTICED).await;

    // 3. Only the new CA is trusted, by the nodes and by the tests' client.
    let operator = new_ca.issue(&Subject::Operator("test".into()), &[], year, next.path(), "operator")?;
    replace(&pki.dir().join("client.key"), &std::fs::read(&operator.key)?)?;
    replace(&pki.dir().join("client.crt"), &std::fs::read(&operator.cert)?)?;
    replace(&pki.ca_cert(), new_ca.cert_pem().as_bytes())?;
    tokio::time::sleep(NOTICED).await;

    // A client of the old CA is no longer trusted; one of the new CA is served by every node.
    std::fs::write(next.path().join("old-ca.crt"), &old_ca)?;
    let stale = client_config(&ClientFiles { ca: next.path().join("old-ca.crt"), identity: None })?;
    let refused = tonic::transport::Endpoint::from_shared(cluster.nodes[0].url())?.tls_config(stale)?.connect().await;
    assert!(refused.is_err(), "a node still serves a certificate of the old CA");

    // A follower restarted now is dialled by the leader with its renewed certificate: it only
    // trusts the new CA, so it catches up only if the leader's outgoing side was renewed too.
    let leader = cluster.leader()?;
    let follower = (0..3).find(|i| *i != leader).unwrap_or(0);
    cluster.kill(follower)?;
    let mut c = SecretsClient::new(cluster.channel(leader)?);
    c.put(put("rotation/after", b"new-ca", None)).await?;
    cluster.start_node(follower)?;
    cluster.wait_member(follower)?;
    let mut on_follower = SecretsClient::new(cluster.channel(follower)?);
    // Until it has caught up with the leader it cannot vouch for credentials (UNAVAILABLE, which
    // clients retry): it answers only once the leader reached it with its renewed certificate.
    let started = std::time::Instant::now();
    let value = loop {
        match on_follower.get(get("rotation/after", None)).await {
            Ok(reply) => break reply.into_inner().value,
            Err(s)
                if s.code() == tonic::Code::Unavailable && started.elapsed() < std::time::Duration::from_secs(15) =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(s) => anyhow::bail!("the restarted follower never answered: {s}"),
        }
    };
    assert_eq!(value, b"new-ca");
    let log = std::fs::read_to_string(cluster.nodes[leader].dir.join("server.log"))?;
    assert!(log.contains("TLS certificate and key reloaded"), "the leader never reloaded");
    Ok(())
}
