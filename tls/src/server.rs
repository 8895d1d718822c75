// Hot path: every new client and peer connection (its handshake).
//! A server TLS configuration that follows its files: certificates and keys are reloaded when
//! they change on disk (checked every [`POLL`]) or on SIGHUP, without a restart and without
//! dropping established connections. Rotating TLS certificates is a rotation too.
//!
//! Handshakes run here, one task per connection with a deadline, not inside tonic: tonic's own
//! TLS cannot change its configuration once serving, and an error from its accept stream would
//! stop the server. Failed handshakes are logged with the peer's address and never reach tonic;
//! tonic sees finished `TlsStream`s and gives handlers the peer's certificates
//! (`Request::peer_certs`).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::files::{read_certs, read_key};
use crate::Error;

/// How often the files are checked for changes.
pub(crate) const POLL: Duration = Duration::from_secs(2);
/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes under way at once; more connections wait in the listen backlog, so a flood of
/// half-open connections costs bounded memory and file descriptors.
const MAX_HANDSHAKES: usize = 256;

/// Whether a server asks clients for certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// It does not ask.
    Off,
    /// It asks; a client may connect without one, and one it sends must verify against the CA.
    Optional,
    /// A client must present a certificate that verifies against the CA.
    Required,
}

/// The files a server's TLS is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// The server's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM; only its owner may read it.
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to (needed unless client certificates
    /// are [`ClientCerts::Off`]).
    pub ca: Option<PathBuf>,
    /// Whether clients are asked for certificates.
    pub client_certs: ClientCerts,
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

/// A server configuration that reloads when its files change.
#[derive(Debug)]
pub struct ReloadingServer {
    files: ServerFiles,
    current: RwLock<Arc<ServerConfig>>,
    stamp: Mutex<Stamp>,
}

impl ReloadingServer {
    /// Builds the configuration from `files`.
    ///
    /// # Errors
    /// A missing, unreadable or exposed file; a key that does not match the certificate.
    pub fn load(files: ServerFiles) -> Result<Arc<ReloadingServer>, Error> {
        let stamp = stamp(&files);
        let config = build(&files)?;
        Ok(Arc::new(ReloadingServer { files, current: RwLock::new(Arc::new(config)), stamp: Mutex::new(stamp) }))
    }

    /// The configuration new connections get.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Rebuilds the configuration if a file changed since the last load (or always, when
    /// `force`); `Ok(true)` if it was replaced. On error the old configuration stays.
    ///
    /// # Errors
    /// As [`ReloadingServer::load`].
    pub fn reload(&self, force: bool) -> Result<bool, Error> {
        let now = stamp(&self.files);
        {
            let seen = self.stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !force && *seen == now {
                return Ok(false);
            }
        }
        let config = build(&self.files)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        *self.stamp.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = now;
        Ok(true)
    }

    /// Reloads on file changes and on SIGHUP until the returned task is aborted.
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.watch_then(|| {})
    }

    /// [`ReloadingServer::watch`], calling `reloaded` after each successful reload (a node
    /// renews the certificate it dials its peers with).
    pub fn watch_then(self: &Arc<Self>, reloaded: impl Fn() + Send + 'static) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            #[cfg(unix)]
            let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                #[cfg(unix)]
                let force = match hangup.as_mut() {
                    Some(h) => tokio::select! { _ = tick.tick() => false, _ = h.recv() => true },
                    None => {
                        tick.tick().await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let force = {
                    tick.tick().await;
                    false
                };
                match this.reload(force) {
                    Ok(true) => {
                        tracing::info!(cert = %this.files.cert.display(), "TLS certificate and key reloaded");
                        reloaded();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS files changed but cannot be loaded; serving with the previous ones")
                    }
                }
            }
        })
    }

    /// TLS connections accepted on `listener`, with Nagle's algorithm off. Each handshake runs in
    /// its own task; failures are logged and dropped. The stream ends when `listener` fails
    /// for good or the receiver is dropped.
    pub fn incoming(self: &Arc<Self>, listener: TcpListener) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let this = self.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let permit = tokio::select! {
                    permit = handshakes.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                    () = tx.closed() => return,
                };
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::warn!(error = %e, "cannot turn off Nagle's algorithm on a connection");
                }
                let acceptor = TlsAcceptor::from(this.current());
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => log_refused(peer, &e),
                        Err(_) => tracing::warn!(%peer, "TLS handshake did not finish in time; connection closed"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Logs a refused handshake: at `warn` with the peer, naming an expired certificate as such.
fn log_refused(peer: SocketAddr, e: &io::Error) {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => {
            tracing::warn!(%peer, error = %e, "refused a client certificate: it has expired");
        }
        Some(rustls::Error::InvalidMessage(_)) | None if e.kind() == io::ErrorKind::InvalidData => {
            tracing::warn!(%peer, error = %e, "refused a connection that is not TLS (plaintext on a TLS port?)");
        }
        Some(other) => tracing::warn!(%peer, error = %other, "refused a TLS connection"),
        None => tracing::debug!(%peer, error = %e, "a connection closed during its TLS handshake"),
    }
}

fn stamp(files: &ServerFiles) -> Stamp {
    [Some(&files.cert), Some(&files.key), files.ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
        .collect()
}

fn build(files: &ServerFiles) -> Result<ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let builder = match (files.client_certs, &files.ca) {
        (ClientCerts::Off, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(Error::Invalid { rule: "verifying client certificates needs the CA certificate file".into() })
        }
        (mode, Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if mode == ClientCerts::Optional { verifier.allow_unauthenticated() } else { verifier };
            builder.with_client_cert_verifier(verifier.build()?)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
