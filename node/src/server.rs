//! Serving: start a node and answer gRPC on a listener until shutdown.

use coffer_proto::raft::v1::node_stats_server::NodeStatsServer;
use coffer_proto::v1::keys_server::KeysServer;
use coffer_proto::v1::operator_server::OperatorServer;
use coffer_proto::v1::secrets_server::SecretsServer;
use std::future::Future;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};

use crate::cluster::OperatorService;
use crate::config::{Config, Tls};
use crate::error::Error;
use crate::keys::KeysService;
use crate::keys::StatsService;
use crate::node::Node;
use crate::secrets::SecretsService;
use coffer_tls::ReloadingServer;

/// Starts a node from `config` and serves the public API (Secrets, Keys, Operator, gRPC health, server
/// reflection) and the node-to-node Raft service on `listener` until `shutdown` completes. Tests call this with a listener bound to
/// `127.0.0.1:0`.
///
/// # Errors
/// Start-up failures (HSM, store, KCV mismatch), or a failing transport.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let bound = listener.local_addr().map_err(|e| Error::Serve(Box::new(e)))?;
    // The files are checked before anything starts: a node with a bad key never joins half-way.
    let tls = match &config.tls {
        Tls::On(files) => Some(ReloadingServer::load(files.clone())?),
        Tls::Off => None,
    };
    let advertise = config.advertise_addr.clone().unwrap_or_else(|| bound.to_string());
    let mut shutdown = std::pin::pin!(shutdown);
    // A member may wait for its HSM at start: a signal meanwhile still stops it.
    let node = tokio::select! {
        node = Node::start(config, advertise) => node?,
        () = &mut shutdown => return Ok(()),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SecretsServer<SecretsService>>().await;
    let (reflection, reflection_v1alpha) = reflection()?;
    let rotator = tokio::spawn(crate::keys::auto_rotate::run(node.clone()));
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(SecretsServer::new(SecretsService::new(node.clone())))
        .add_service(OperatorServer::new(OperatorService::new(node.clone())))
        .add_service(KeysServer::new(KeysService::new(node.clone())))
        .add_service(NodeStatsServer::new(StatsService::new(node.clone())))
        .add_service(node.replica.peer_service());
    let served = match tls {
        Some(tls) => {
            tracing::info!(addr = %bound, "serving coffer.v1 (Secrets, Keys, Operator) and coffer.raft.v1 (Raft, NodeStats) over TLS");
            let watcher = tls.watch();
            let served = router.serve_with_incoming_shutdown(tls.incoming(listener), shutdown).await;
            watcher.abort();
            served
        }
        None => {
            tracing::warn!(addr = %bound, "serving PLAINTEXT (tls = \"off\"): anyone on the network can read and change what crosses it");
            router.serve_with_incoming_shutdown(no_delay(listener), shutdown).await
        }
    };
    rotator.abort();
    let _ = rotator.await;
    node.shutdown().await;
    served.map_err(|e| Error::Serve(Box::new(e)))
}

/// Server reflection for the public API only: the node-to-node package (`coffer.raft.v1`) is
/// removed from the descriptors, so neither its services nor its messages can be looked up.
/// Both versions answer: `grpc.reflection.v1`, and `v1alpha`, which older grpcurl and Python's
/// grpcio-reflection speak.
#[allow(clippy::type_complexity)]
fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    Error,
> {
    use prost::Message as _;
    let serve = |e: tonic_reflection::server::Error| Error::Serve(Box::new(e));
    let mut public = prost_types::FileDescriptorSet::decode(coffer_proto::FILE_DESCRIPTOR_SET)
        .map_err(|e| Error::Serve(Box::new(e)))?;
    public.file.retain(|f| f.package() != "coffer.raft.v1");
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(public.clone())
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok((builder().build_v1().map_err(serve)?, builder().build_v1alpha().map_err(serve)?))
}

/// Accepted connections with Nagle's algorithm off. tonic configures only sockets it binds
/// itself; on ours, a reply that did not fill a segment (a 256-byte secret, a Raft AppendEntries
/// response) waited for the peer's delayed ACK: found by the benchmark as a 44 ms median on reads.
fn no_delay(listener: TcpListener) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot turn off Nagle's algorithm on a connection");
            }
        }
        accepted
    })
}
