//! Serving: start a node and answer gRPC on a listener until shutdown.

use std::future::Future;

use coffer_proto::v1::secrets_server::SecretsServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::config::Config;
use crate::error::Error;
use crate::node::Node;
use crate::service::secrets::SecretsService;

/// Starts a node from `config` and serves the public API (Secrets, gRPC health, server
/// reflection) on `listener` until `shutdown` completes. Tests call this with a listener bound to
/// `127.0.0.1:0`.
///
/// # Errors
/// Start-up failures (HSM, store, KCV mismatch), or a failing transport.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let node = Node::start(config).await?;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SecretsServer<SecretsService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(coffer_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Raft(Box::new(e)))?;
    let addr = listener.local_addr().map_err(|e| Error::Unavailable { reason: format!("listener: {e}") })?;
    tracing::info!(%addr, "serving coffer.v1.Secrets");
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(SecretsServer::new(SecretsService::new(node.clone())))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    node.shutdown().await;
    served.map_err(|e| Error::Unavailable { reason: format!("gRPC server failed: {e}") })
}
