//! Issue #11: a join proves who is joining. A node needs a single-use, short-lived join token
//! (the cluster keeps only its hash) and a node certificate of the cluster's CA, and the leader
//! dials the address a join gives only once the join is authorised. Cluster changes need an
//! operator certificate. Each refusal is checked to change nothing.

use std::time::{Duration, SystemTime};

use coffer_proto::raft::v1::raft_client::RaftClient;
use coffer_proto::raft::v1::JoinRequest;
use coffer_proto::v1::auth_client::AuthClient;
use coffer_proto::v1::operator_client::OperatorClient;
use coffer_proto::v1::{
    CreateJoinTokenRequest, RemoveRequest, TransferLeaderRequest, WritePolicyRequest, WriteRoleRequest,
};
use coffer_testkit::with_token;
use coffer_tls::{client_config, Ca, ClientFiles, Subject};
use tonic::Code;

use crate::{must_start_cluster, InProcessNode};

fn members(cluster: &coffer_testkit::Cluster) -> anyhow::Result<usize> {
    let status: serde_json::Value = serde_json::from_str(&cluster.cli_ok(0, &["operator", "status", "-o", "json"])?)?;
    Ok(status["members"].as_array().map_or(0, Vec::len))
}

#[test]
fn a_join_needs_a_fresh_unused_token() -> anyhow::Result<()> {
    let mut cluster = must_start_cluster(1, "")?;
    let joiner = cluster.add_node()?;
    cluster.start_node(joiner)?;
    let peer = cluster.nodes[0].peer_addr();
    let join = |token: &str| cluster.cli(joiner, &["operator", "join", "--peer", &peer, "--token", token]);
    let refused = |out: std::process::Output, what: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "a join {what} was let in");
        stderr
    };

    let stderr = refused(join("")?, "without a token");
    assert!(stderr.contains("join token") && stderr.contains("join-token create"), "{stderr}");
    let stderr = refused(join("cfr_join_00")?, "with a made-up token");
    assert!(stderr.contains("not one this cluster issued"), "{stderr}");

    let expired = cluster.cli_ok(0, &["operator", "join-token", "create", "--ttl", "1s"])?;
    std::thread::sleep(Duration::from_millis(1500));
    let stderr = refused(join(expired.trim())?, "with an expired token");
    assert!(stderr.contains("expired"), "{stderr}");
    assert_eq!(members(&cluster)?, 1, "no refused join changed the membership");

    let token = cluster.join_token(0)?;
    let out = join(&token)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(members(&cluster)?, 2);

    // The token is spent: a third node cannot use it.
    let third = cluster.add_node()?;
    cluster.start_node(third)?;
    let out = cluster.cli(third, &["operator", "join", "--peer", &peer, "--token", &token])?;
    let stderr = refused(out, "with a used token");
    assert!(stderr.contains("already used") && stderr.contains("node 2"), "{stderr}");
    assert_eq!(members(&cluster)?, 2);
    Ok(())
}

/// A join refused for want of a token never makes the leader dial the address it names.
#[tokio::test(flavor = "multi_thread")]
async fn the_leader_dials_a_joining_address_only_once_the_join_is_authorised() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let bait = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = bait.local_addr()?.to_string();
    // A node certificate of the cluster's CA for node 2, as a stolen or stray one would be.
    let ca_dir = node.path().join("ca");
    let issued = Ca::load(&ca_dir)?.issue(
        &Subject::Node(2),
        &["127.0.0.1".into()],
        SystemTime::now() + Duration::from_secs(3600),
        &node.path().join("stray"),
        "node-2",
    )?;
    let tls = client_config(&ClientFiles {
        ca: ca_dir.join(coffer_tls::CA_CERT),
        identity: Some((issued.cert, issued.key)),
    })?;
    let mut raft = RaftClient::new(node.peer_channel(Some(tls)).await?);
    let kcv = node.cli(&["operator", "status", "-o", "json"], None)?;
    let kcv = serde_json::from_slice::<serde_json::Value>(&kcv.stdout)?["kcv"].as_str().unwrap_or_default().to_owned();
    let join = JoinRequest { node_id: 2, addr: addr.clone(), kcv, token: String::new() };
    let err = raft.join(join).await.expect_err("a join without a token");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("join token"), "{}", err.message());
    let dialled = tokio::time::timeout(Duration::from_millis(700), bait.accept()).await;
    assert!(dialled.is_err(), "the leader dialled {addr} for a join it refused");
    Ok(())
}

/// Cluster changes need `operator` on `sys/operator/…`, which an operator certificate always has:
/// a client certificate of the same CA that no role admits is unauthenticated, and one whose
/// role gives only secret rights is denied; nothing changes either way.
#[tokio::test(flavor = "multi_thread")]
async fn cluster_changes_need_an_operator_certificate() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let ca_dir = node.path().join("ca");
    let client = Ca::load(&ca_dir)?.issue(
        &Subject::Client("app".into()),
        &[],
        SystemTime::now() + Duration::from_secs(3600),
        &node.path().join("app"),
        "app",
    )?;
    let tls = client_config(&ClientFiles {
        ca: ca_dir.join(coffer_tls::CA_CERT),
        identity: Some((client.cert, client.key)),
    })?;
    let channel = tonic::transport::Endpoint::from_shared(node.addr.clone())?.tls_config(tls)?.connect().await?;
    let mut ops = OperatorClient::new(channel);
    let err = ops.create_join_token(CreateJoinTokenRequest { ttl: None }).await.expect_err("no role admits it");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    assert!(err.message().contains("matches no login role"), "{}", err.message());
    // A role gives the certificate secret rights, and nothing of the operator's.
    let mut auth = AuthClient::new(node.channel().await?);
    let policy = WritePolicyRequest {
        name: "app".into(),
        document: "[[rule]]\npath = \"secret/**\"\nallow = [\"read\"]\n".into(),
    };
    auth.write_policy(with_token(policy, &node.root_token)?).await?;
    let role = WriteRoleRequest {
        name: "app".into(),
        identities: vec!["spiffe://coffer/client/app".into()],
        policies: vec!["app".into()],
        token_ttl: None,
    };
    auth.write_role(with_token(role, &node.root_token)?).await?;
    let denied = |r: Result<(), tonic::Status>, what: &str| match r {
        Err(s) => {
            assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s}");
            assert!(s.message().contains("operator on sys/operator/"), "{what}: {}", s.message());
        }
        Ok(()) => panic!("{what} without the operator capability was allowed"),
    };
    denied(ops.create_join_token(CreateJoinTokenRequest { ttl: None }).await.map(drop), "a join token");
    denied(ops.remove(RemoveRequest { node_id: 1 }).await.map(drop), "remove");
    denied(ops.transfer_leader(TransferLeaderRequest { node_id: 0 }).await.map(drop), "transfer-leader");
    // The operator (the test kit's client certificate) may.
    let mut operator = OperatorClient::new(node.channel().await?);
    let token = operator.create_join_token(CreateJoinTokenRequest { ttl: None }).await?.into_inner().token;
    assert!(token.starts_with("cfr_join_") && token.len() > 60, "{token}");
    Ok(())
}
