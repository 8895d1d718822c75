//! Connecting the CLI to a server, and printing gRPC errors for people.
//!
//! TLS unless the address says `http://`: `COFFER_CACERT` names the CA certificate the server's
//! certificate must chain to, `COFFER_CLIENT_CERT` and `COFFER_CLIENT_KEY` the CLI's own
//! certificate for servers that ask for one. Plaintext to an address that is not loopback is
//! refused unless `--insecure` says so: a secret would cross the network in the clear.
//!
//! Every call carries the token from `COFFER_TOKEN`, else from the token file (`COFFER_TOKEN_FILE`,
//! default `~/.coffer-token`, written 0600 by `coffer login`), as `authorization: Bearer …`.
//! Never from a command-line argument: other users can read those in `ps`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A connection that adds the caller's token to every call.
pub type Conn = InterceptedService<Channel, Credentials>;

/// The token a connection sends, if any.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("token", &self.bearer.as_ref().map(|_| "[redacted]")).finish()
    }
}

impl Credentials {
    /// Credentials that send `token`.
    ///
    /// # Errors
    /// The token holds characters a header cannot.
    pub fn token(token: &str) -> anyhow::Result<Credentials> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("the token holds characters that cannot travel in a header"))?;
        value.set_sensitive(true);
        Ok(Credentials { bearer: Some(value) })
    }

    /// The token from `COFFER_TOKEN` or the token file, if either has one.
    ///
    /// # Errors
    /// An unreadable token file, or a token that cannot travel in a header.
    pub fn from_env() -> anyhow::Result<Credentials> {
        if let Ok(token) = std::env::var("COFFER_TOKEN") {
            if !token.trim().is_empty() {
                return Credentials::token(&token);
            }
        }
        let Some(path) = token_file() else { return Ok(Credentials::default()) };
        match std::fs::read_to_string(&path) {
            Ok(token) if !token.trim().is_empty() => Credentials::token(&token),
            Ok(_) => Ok(Credentials::default()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Credentials::default()),
            Err(e) => Err(anyhow::anyhow!("cannot read the token file {}: {e}", path.display())),
        }
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.bearer {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        Ok(request)
    }
}

/// Where `coffer login` keeps the token: `COFFER_TOKEN_FILE`, else `~/.coffer-token`.
pub fn token_file() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("COFFER_TOKEN_FILE") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".coffer-token"))
}

/// The default server address when COFFER_ADDR is not set.
pub const DEFAULT_ADDR: &str = "https://127.0.0.1:8200";

/// Where the CLI connects, and how.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The server address (`https://host:port`; a bare `host:port` means https).
    #[arg(long, env = "COFFER_ADDR", default_value = DEFAULT_ADDR, global = true)]
    pub addr: String,
    /// The CA certificate that the server's certificate must chain to.
    #[arg(long, env = "COFFER_CACERT", global = true)]
    pub cacert: Option<PathBuf>,
    /// This client's certificate, for servers that ask for one.
    #[arg(long, env = "COFFER_CLIENT_CERT", global = true, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// This client's private key.
    #[arg(long, env = "COFFER_CLIENT_KEY", global = true, requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Allow plaintext (`http://`) to an address that is not loopback.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Send no token (the certificate alone speaks): set by commands that must not pick up a
    /// token from the environment.
    #[arg(skip)]
    pub no_token: bool,
}

impl ConnectArgs {
    /// The arguments for `addr` with nothing else set (TLS files from the environment).
    pub fn for_addr(addr: &str) -> ConnectArgs {
        let path = |var: &str| std::env::var_os(var).map(PathBuf::from);
        ConnectArgs {
            addr: addr.to_owned(),
            cacert: path("COFFER_CACERT"),
            client_cert: path("COFFER_CLIENT_CERT"),
            client_key: path("COFFER_CLIENT_KEY"),
            insecure: false,
            no_token: false,
        }
    }
}

/// Plaintext goes only to loopback, unless `--insecure`.
fn plaintext_allowed(host: &str, insecure: bool) -> bool {
    insecure || is_loopback(host)
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// How long one CLI call may take, unless `COFFER_TIMEOUT` (such as `5s`) says otherwise. Long
/// enough for a join that waits for the new node to catch up.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Connects as `args` say. Every call on the channel is bounded by `COFFER_TIMEOUT` (default
/// 60 s): a node that accepts connections but does not answer (one waiting for its HSM at start)
/// does not hang the CLI.
///
/// # Errors
/// A malformed address or `COFFER_TIMEOUT`, plaintext to a remote address without `--insecure`,
/// unreadable TLS files, or a server that does not answer.
pub async fn connect(args: &ConnectArgs) -> anyhow::Result<Conn> {
    let credentials = if args.no_token { Credentials::default() } else { Credentials::from_env()? };
    Ok(InterceptedService::new(connect_channel(args).await?, credentials))
}

/// The channel [`connect`] sends on, without credentials.
///
/// # Errors
/// As [`connect`].
pub async fn connect_channel(args: &ConnectArgs) -> anyhow::Result<Channel> {
    let addr = &args.addr;
    let url = if addr.contains("://") { addr.to_owned() } else { format!("https://{addr}") };
    let timeout = match std::env::var("COFFER_TIMEOUT") {
        Ok(text) => humantime::parse_duration(&text)
            .map_err(|e| anyhow::anyhow!("COFFER_TIMEOUT {text:?} is not a duration such as 5s: {e}"))?,
        Err(_) => DEFAULT_TIMEOUT,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("COFFER_ADDR {addr:?} is not an address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout);
    let host = endpoint.uri().host().unwrap_or_default().to_owned();
    if url.starts_with("https://") {
        let Some(ca) = args.cacert.clone() else {
            anyhow::bail!(
                "{url} is TLS: set COFFER_CACERT (or --cacert) to the cluster's CA certificate (coffer dev prints it)"
            );
        };
        let identity = args.client_cert.clone().zip(args.client_key.clone());
        endpoint = endpoint.tls_config(coffer_tls::client_config(&coffer_tls::ClientFiles { ca, identity })?)?;
    } else if !plaintext_allowed(&host, args.insecure) {
        anyhow::bail!(
            "refusing plaintext to {url}: secrets would cross the network unencrypted; use https:// (with COFFER_CACERT), or --insecure if you mean it"
        );
    }
    endpoint.connect().await.map_err(|e| {
        let cause = std::iter::successors(std::error::Error::source(&e), |e| e.source())
            .last()
            .map_or_else(|| e.to_string(), ToString::to_string);
        anyhow::anyhow!("cannot reach a Coffer server at {url} ({cause}); is it running, and is COFFER_ADDR right?")
    })
}

/// A gRPC error as one line: the status code and the server's message.
pub fn describe_status(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plaintext_to_a_remote_address_is_refused_unless_insecure() {
        let mut args = ConnectArgs::for_addr("http://10.1.2.3:8200");
        let err = connect(&args).await.expect_err("refused");
        assert!(err.to_string().contains("refusing plaintext"), "{err}");
        // --insecure lets it through (checked without dialling: tests reach only loopback).
        args.insecure = true;
        assert!(plaintext_allowed("10.1.2.3", args.insecure));
        assert!(!plaintext_allowed("10.1.2.3", false) && plaintext_allowed("127.0.0.1", false));
        assert!(is_loopback("127.0.0.1") && is_loopback("[::1]") && is_loopback("localhost"));
        let mut tls = ConnectArgs::for_addr("https://127.0.0.1:1");
        tls.cacert = None;
        assert!(connect(&tls).await.expect_err("no CA").to_string().contains("COFFER_CACERT"));
    }
}
