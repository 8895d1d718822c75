use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use crate::InProcessNode;

/// gRPC health and server reflection answer, so grpcurl and friends work without .proto files.
#[tokio::test(flavor = "multi_thread")]
async fn health_and_reflection() -> anyhow::Result<()> {
    let node = InProcessNode::must_start().await?;
    let channel = node.channel().await?;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let reply = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?.into_inner();
    assert_eq!(reply.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter(vec![request])).await?.into_inner();
    let reply = replies.message().await?.ok_or_else(|| anyhow::anyhow!("no reflection reply"))?;
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        anyhow::bail!("unexpected reflection reply");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"coffer.v1.Secrets".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
    // The node-to-node services are not the public API: not listed, and not found by symbol.
    assert!(!names.iter().any(|n| n.starts_with("coffer.raft")), "{names:?}");
    let lookup = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("coffer.raft.v1.Raft".into())),
    };
    let mut replies = reflection.server_reflection_info(tokio_stream::iter(vec![lookup])).await?.into_inner();
    match replies.message().await {
        Err(status) => assert_eq!(status.code(), tonic::Code::NotFound, "{status}"),
        Ok(reply) => assert!(
            matches!(reply.as_ref().and_then(|r| r.message_response.as_ref()), Some(MessageResponse::ErrorResponse(_))),
            "the peer service was described: {reply:?}"
        ),
    }

    // v1alpha answers too: older grpcurl and Python's grpcio-reflection speak only that.
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    let mut alpha = AlphaClient::new(channel);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let mut replies = alpha.server_reflection_info(tokio_stream::iter(vec![request])).await?.into_inner();
    let reply = replies.message().await?.ok_or_else(|| anyhow::anyhow!("no v1alpha reply"))?;
    let Some(AlphaResponse::ListServicesResponse(list)) = reply.message_response else {
        anyhow::bail!("unexpected v1alpha reply");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"coffer.v1.Keys".to_owned()) && !names.iter().any(|n| n.starts_with("coffer.raft")),
        "{names:?}"
    );
    Ok(())
}
