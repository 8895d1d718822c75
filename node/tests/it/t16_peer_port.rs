//! Issue #11: the node-to-node port, attacked from outside. It speaks mutual TLS only, takes only
//! node certificates of the cluster's CA, and checks every Raft message against the node its
//! certificate names. Each refusal is checked to change nothing: the term, the leader, the data.

use std::time::{Duration, SystemTime};

use coffer_proto::raft::v1::raft_client::RaftClient;
use coffer_proto::raft::v1::{Envelope, HandoffRequest, JoinRequest};
use coffer_proto::v1::operator_client::OperatorClient;
use coffer_proto::v1::StatusRequest;
use coffer_tls::{client_config, Ca, ClientFiles, Subject};
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;

use crate::{get, put, InProcessNode};

const YEAR: Duration = Duration::from_secs(365 * 86_400);

// openraft's vote request as postcard encodes it, written out here so that the node tests do not
// depend on openraft: `Vote { leader_id: LeaderId { term, node_id }, committed }`.
#[derive(Serialize)]
struct LeaderId {
    term: u64,
    node_id: u64,
}
#[derive(Serialize)]
struct Vote {
    leader_id: LeaderId,
    committed: bool,
}
#[derive(Serialize)]
struct VoteRequest {
    vote: Vote,
    last_log_id: Option<(u64, u64, u64)>,
}

fn vote_from(node_id: u64, term: u64) -> anyhow::Result<Envelope> {
    let request =
        VoteRequest { vote: Vote { leader_id: LeaderId { term, node_id }, committed: false }, last_log_id: None };
    Ok(Envelope { payload: postcard::to_allocvec(&request)?, quorum_ack_age_ms: None })
}

/// A certificate issued by the node's own CA (`subject`, valid a year), as client TLS.
fn issued(node: &InProcessNode, subject: Subject, name: &str) -> anyhow::Result<ClientTlsConfig> {
    let ca_dir = node.path().join("ca");
    let ca = Ca::load(&ca_dir)?;
    let out = node.path().join("forged");
    let files = ca.issue(&subject, &["127.0.0.1".into()], SystemTime::now() + YEAR, &out, name)?;
    Ok(client_config(&ClientFiles { ca: ca_dir.join(coffer_tls::CA_CERT), identity: Some((files.cert, files.key)) })?)
}

/// The node's term and leader, and a secret's value: what no refused call may change.
async fn state(node: &InProcessNode) -> anyhow::Result<(u64, Option<u64>, Vec<u8>)> {
    let status = OperatorClient::new(node.channel().await?).status(StatusRequest {}).await?.into_inner();
    let value = node.client().await?.get(get("peer/canary", None)).await?.into_inner().value;
    Ok((status.term, status.leader_id, value))
}

/// Every kind of message the peer service takes, on `channel`; the codes they were refused with.
async fn every_message(channel: Channel, claim: u64) -> anyhow::Result<Vec<(&'static str, Code)>> {
    let mut raft = RaftClient::new(channel);
    let junk = || Envelope { payload: vec![0; 16], quorum_ack_age_ms: None };
    let mut codes = Vec::new();
    let mut record = |what, result: Result<(), tonic::Status>| match result {
        Ok(()) => panic!("{what} was accepted"),
        Err(status) => codes.push((what, status.code())),
    };
    record("AppendEntries", raft.append_entries(junk()).await.map(drop));
    record("Vote", raft.vote(vote_from(claim, 1_000)?).await.map(drop));
    record("InstallSnapshot", raft.install_snapshot(junk()).await.map(drop));
    record("ClientWrite", raft.client_write(junk()).await.map(drop));
    record("Handoff", raft.handoff(HandoffRequest { node_id: claim }).await.map(drop));
    record(
        "Join",
        raft.join(JoinRequest { node_id: claim, addr: "127.0.0.1:1".into(), kcv: String::new(), token: String::new() })
            .await
            .map(drop),
    );
    Ok(codes)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_peer_port_refuses_anything_but_a_node_certificate() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    node.client().await?.put(put("peer/canary", b"alive", None)).await?;
    let before = state(&node).await?;

    // Plaintext: no TLS handshake, no call.
    let plain = match node.peer_channel(None).await {
        Ok(ch) => RaftClient::new(ch).vote(vote_from(1, 1_000)?).await.is_err(),
        Err(_) => true,
    };
    assert!(plain, "a plaintext call reached the peer service");

    // TLS without a client certificate: mutual TLS is required.
    let ca = node.path().join("ca").join(coffer_tls::CA_CERT);
    let anonymous = client_config(&ClientFiles { ca: ca.clone(), identity: None })?;
    let refused = match node.peer_channel(Some(anonymous)).await {
        Ok(ch) => RaftClient::new(ch).vote(vote_from(1, 1_000)?).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a call without a client certificate reached the peer service");

    // A node certificate from another CA.
    let other = tempfile::tempdir()?;
    let other_ca = Ca::create(&other.path().join("ca"), YEAR)?;
    let stray = other_ca.issue(&Subject::Node(1), &[], SystemTime::now() + YEAR, other.path(), "node-1")?;
    let foreign = client_config(&ClientFiles { ca, identity: Some((stray.cert, stray.key)) })?;
    let refused = match node.peer_channel(Some(foreign)).await {
        Ok(ch) => RaftClient::new(ch).vote(vote_from(1, 1_000)?).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a certificate from another CA reached the peer service");

    // A client certificate of the cluster's own CA: a client is not a node. Every message kind.
    let client = issued(&node, Subject::Client("mallory".into()), "mallory")?;
    for (what, code) in every_message(node.peer_channel(Some(client)).await?, 1).await? {
        assert_eq!(code, Code::Unauthenticated, "{what} with a client certificate");
    }

    // A certificate of node 2 (issued by the CA, not a member) claiming to be node 1, the leader:
    // refused whatever it says it is. Claiming to be itself, it may not write or take leadership.
    let node2 = issued(&node, Subject::Node(2), "node-2")?;
    let mut raft = RaftClient::new(node.peer_channel(Some(node2.clone())).await?);
    let err = raft.vote(vote_from(1, 1_000)?).await.expect_err("a vote as another node");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("node 2") && err.message().contains("node 1"), "{}", err.message());
    // As itself, a node the cluster never admitted cannot make this node follow it: the largest
    // term, which would end every later election, is refused before openraft sees it.
    let err = raft.vote(vote_from(2, u64::MAX)?).await.expect_err("a non-member's vote");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("not a member"), "{}", err.message());
    let err = raft.handoff(HandoffRequest { node_id: 1 }).await.expect_err("a hand-off to another node");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = raft.client_write(Envelope { payload: vec![0; 16], quorum_ack_age_ms: None }).await.expect_err("write");
    assert_eq!(err.code(), Code::PermissionDenied, "a non-member's forwarded write: {err}");
    assert!(err.message().contains("not a member"), "{}", err.message());

    assert_eq!(state(&node).await?, before, "a refused call changed the node");
    Ok(())
}

/// The client port no longer serves the node-to-node service at all.
#[tokio::test(flavor = "multi_thread")]
async fn the_client_port_has_no_node_to_node_service() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let mut raft = RaftClient::new(node.channel().await?);
    let err = raft.vote(vote_from(1, 1_000)?).await.expect_err("no Raft service on the client port");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    Ok(())
}
