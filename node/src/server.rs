//! Serving: start a node and answer gRPC on a listener until shutdown.

use coffer_proto::raft::v1::node_stats_server::NodeStatsServer;
use coffer_proto::v1::auth_server::AuthServer;
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
use coffer_raft::{NodeAddrs, NodeId, PeerIdentity};
use coffer_tls::{ClientCerts, ReloadingServer, ServerFiles};
use tonic::service::interceptor::InterceptedService;

/// Starts a node from `config` and serves until `shutdown` completes. Tests call this with a
/// listener bound to `127.0.0.1:0`.
///
/// With TLS on (the default), `listener` serves the public API (Secrets, Keys, Operator, gRPC
/// health, server reflection) over TLS, and a second listener, bound here to `peer-listen`,
/// serves the node-to-node services (`coffer.raft.v1`: Raft, NodeStats) over mutual TLS: a
/// caller must present a node certificate of the cluster's CA, and every message is checked
/// against the node it names. With `tls = "off"` everything shares `listener`, in plaintext.
///
/// # Errors
/// Start-up failures (TLS files, HSM, store, KCV mismatch), or a failing transport.
pub async fn run(config: Config, listener: TcpListener, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let serve_err = |e: std::io::Error| Error::Serve(Box::new(e));
    let bound = listener.local_addr().map_err(serve_err)?;
    // The files are checked before anything starts: a node with a bad key never joins half-way.
    let tls = match &config.tls {
        Tls::On(files) => {
            // Peers check every message against the id in this certificate: a node whose config
            // says another id would start, and then have every message refused.
            let named = coffer_tls::read_certs(&files.cert)?.first().and_then(coffer_tls::identity);
            if named != Some(coffer_tls::Identity::Node(config.node_id.0)) {
                return Err(Error::Tls(coffer_tls::Error::Invalid {
                    rule: format!(
                        "{} names {}, but this node's node-id is {}: issue it a certificate for its id \
                         (coffer operator tls issue node --id {})",
                        files.cert.display(),
                        named.map_or_else(|| "no coffer node".to_owned(), |i| format!("{i:?}")),
                        config.node_id,
                        config.node_id
                    ),
                }));
            }
            let public = ReloadingServer::load(files.clone())?;
            let peer_files = ServerFiles { client_certs: ClientCerts::Required, ..files.clone() };
            let peers = ReloadingServer::load(peer_files)?;
            let peer_bind = config.peer_listen.unwrap_or(bound);
            let peer_listener = TcpListener::bind(peer_bind).await.map_err(|e| {
                Error::Serve(format!("cannot bind the peer listener (peer-listen = {peer_bind}): {e}").into())
            })?;
            Some((public, peers, peer_listener))
        }
        Tls::Off => None,
    };
    let client_addr = config.advertise_addr.clone().unwrap_or_else(|| bound.to_string());
    let advertise = match &tls {
        Some((_, _, peer_listener)) => {
            let peer_bound = peer_listener.local_addr().map_err(serve_err)?;
            let peer = config.advertise_peer_addr.clone().unwrap_or_else(|| match &config.advertise_addr {
                // The advertised host with the peer port.
                Some(addr) => match addr.rsplit_once(':') {
                    Some((host, _)) => format!("{host}:{}", peer_bound.port()),
                    None => peer_bound.to_string(),
                },
                None => peer_bound.to_string(),
            });
            NodeAddrs { client: client_addr, peer }
        }
        None => NodeAddrs::single(&client_addr),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    // A member may wait for its HSM at start: a signal meanwhile still stops it.
    let node = tokio::select! {
        node = Node::start(config, advertise.clone()) => node?,
        () = &mut shutdown => return Ok(()),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SecretsServer<SecretsService>>().await;
    let (reflection, reflection_v1alpha) = reflection()?;
    let rotator = tokio::spawn(crate::keys::auto_rotate::run(node.clone()));
    let sweeper = tokio::spawn(crate::auth::sweep::run(node.clone()));
    let rotations = tokio::spawn(crate::rotation::worker::run(node.clone()));
    if node.config.auth.checks == crate::config::Checks::Off {
        tracing::warn!("auth.checks = \"off\": every call is allowed without a credential; for measuring the checks' cost only, never for serving");
    }
    // Each service takes messages up to what it needs: a secret value and its envelope; a Keys
    // batch; a policy document.
    let limits = &node.config.limits;
    let secret_bytes = node.config.max_value_bytes + 64 * 1024;
    // One audit record per public call, unless audit is off; checkpoints on their own task.
    let audit = node.audit.clone().map(crate::audit::layer::AuditLayer::new);
    let checkpoints = node.audit.clone().map(|audit| tokio::spawn(audit.run()));
    let audit_watch = node.audit.clone().map(|audit| tokio::spawn(audit.watch(node.clone(), health.clone())));
    let sinks = node.audit.as_ref().map(|audit| audit.start_sinks()).unwrap_or_default();
    let public = server_builder()
        .layer(tower::util::option_layer(audit))
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(SecretsServer::new(SecretsService::new(node.clone())).max_decoding_message_size(secret_bytes))
        .add_service(
            OperatorServer::new(OperatorService::new(node.clone())).max_decoding_message_size(limits.max_message_bytes),
        )
        .add_service(
            KeysServer::new(KeysService::new(node.clone())).max_decoding_message_size(limits.max_message_bytes),
        )
        .add_service(
            AuthServer::new(crate::auth::service::AuthService::new(node.clone()))
                .max_decoding_message_size(limits.max_message_bytes),
        );
    let served = match tls {
        Some((public_tls, peer_tls, peer_listener)) => {
            tracing::info!(
                client = %bound, peer = %advertise.peer,
                "serving coffer.v1 over TLS, and coffer.raft.v1 to nodes of this cluster over mutual TLS"
            );
            let peers = server_builder()
                .add_service(InterceptedService::new(node.replica.peer_service(), node_identity))
                .add_service(InterceptedService::new(
                    NodeStatsServer::new(StatsService::new(node.clone())),
                    node_identity,
                ));
            // The peer side's files are this node's identity: a renewal also reaches how it dials.
            let replica = node.replica.clone();
            let peer_files = node.config.clone();
            let watchers = [
                public_tls.watch(),
                peer_tls.watch_then(move || match crate::node::peer_tls(&peer_files) {
                    Ok(Some(tls)) => replica.set_peer_tls(tls),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "the renewed certificate cannot be used to dial peers"),
                }),
            ];
            // Either server stopping stops the other: a node half-served would look alive.
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            let client_side = async {
                let r = public
                    .serve_with_incoming_shutdown(public_tls.incoming(listener), until_stopped(stopped.clone()))
                    .await;
                let _ = stop.send(true);
                r
            };
            let peer_side = async {
                let r = peers
                    .serve_with_incoming_shutdown(peer_tls.incoming(peer_listener), until_stopped(stopped.clone()))
                    .await;
                let _ = stop.send(true);
                r
            };
            let signal = async {
                tokio::select! {
                    () = &mut shutdown => {}
                    () = until_stopped(stopped.clone()) => {}
                }
                let _ = stop.send(true);
            };
            let (client_result, peer_result, ()) = tokio::join!(client_side, peer_side, signal);
            for watcher in watchers {
                watcher.abort();
            }
            client_result.and(peer_result)
        }
        None => {
            tracing::warn!(addr = %bound, "serving PLAINTEXT (tls = \"off\"): anyone on the network can read and change what crosses it, and the node-to-node service shares this port");
            public
                .add_service(NodeStatsServer::new(StatsService::new(node.clone())))
                .add_service(node.replica.peer_service())
                .serve_with_incoming_shutdown(no_delay(listener), shutdown)
                .await
        }
    };
    rotator.abort();
    sweeper.abort();
    rotations.abort();
    let _ = rotations.await;
    for task in checkpoints.into_iter().chain(audit_watch).chain(sinks) {
        task.abort();
        let _ = task.await;
    }
    let _ = rotator.await;
    let _ = sweeper.await;
    node.shutdown().await;
    served.map_err(|e| Error::Serve(Box::new(e)))
}

/// How a listener serves connections: HTTP/2 keepalives close connections whose peer is gone
/// (or never answers), so none is held open for ever.
fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
}

/// The peer listener's gate: the caller's certificate (verified by mutual TLS against the
/// cluster's CA) must name a node (`spiffe://coffer/node/<id>`); a client certificate of the same
/// CA is refused. The node id goes into the request for the service's per-message checks.
fn node_identity(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let identity = request.peer_certs().and_then(|certs| certs.first().and_then(coffer_tls::identity));
    match identity {
        Some(coffer_tls::Identity::Node(id)) => {
            request.extensions_mut().insert(PeerIdentity(NodeId(id)));
            Ok(request)
        }
        other => {
            tracing::warn!(
                remote = ?request.remote_addr(), identity = ?other,
                "refused a node-to-node call: its certificate names no node"
            );
            Err(Error::Replica(coffer_raft::Error::PeerUnauthenticated).into())
        }
    }
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
