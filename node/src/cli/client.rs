//! Connecting the CLI to a server, and printing gRPC errors for people.

use tonic::transport::{Channel, Endpoint};

/// The default server address when COFFER_ADDR is not set.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:8200";

/// Connects to `addr` (`host:port` or `http://host:port`).
///
/// # Errors
/// A malformed address, or a server that does not answer.
pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("COFFER_ADDR {addr:?} is not an address: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5));
    endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!("cannot reach a Coffer server at {url} ({e}); is it running, and is COFFER_ADDR right?")
    })
}

/// A gRPC error as one line: the status code and the server's message.
pub fn describe_status(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
