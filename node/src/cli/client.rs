//! Connecting the CLI to a server, and printing gRPC errors for people.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// The default server address when COFFER_ADDR is not set.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:8200";

/// How long one CLI call may take, unless `COFFER_TIMEOUT` (such as `5s`) says otherwise. Long
/// enough for a join that waits for the new node to catch up.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects to `addr` (`host:port` or `http://host:port`). Every call on the channel is bounded
/// by `COFFER_TIMEOUT` (default 60 s): a node that accepts connections but does not answer (one
/// waiting for its HSM at start) does not hang the CLI.
///
/// # Errors
/// A malformed address or `COFFER_TIMEOUT`, or a server that does not answer.
pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let url = if addr.contains("://") { addr.to_owned() } else { format!("http://{addr}") };
    let timeout = match std::env::var("COFFER_TIMEOUT") {
        Ok(text) => humantime::parse_duration(&text)
            .map_err(|e| anyhow::anyhow!("COFFER_TIMEOUT {text:?} is not a duration such as 5s: {e}"))?,
        Err(_) => DEFAULT_TIMEOUT,
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("COFFER_ADDR {addr:?} is not an address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!("cannot reach a Coffer server at {url} ({e}); is it running, and is COFFER_ADDR right?")
    })
}

/// A gRPC error as one line: the status code and the server's message.
pub fn describe_status(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}
