//! The workload run during a drill: clients writing unique values to a few secrets, reading them
//! (linearizable and bounded-staleness), and encrypting and decrypting through the Keys service,
//! spread over every node. Bounded in operations per client and by the stop flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coffer_proto::v1::keys_client::KeysClient;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{DecryptRequest, EncryptRequest, GetRequest, PutRequest};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::history::{Call, Op, Outcome};

/// The Keys key every drill encrypts with.
pub const KEY_NAME: &str = "drill";
/// The staleness bound of the workload's bounded-staleness reads.
pub const STALE_MS: u64 = 500;
const OP_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_OPS_PER_CLIENT: usize = 200_000;

/// The shared clock and record of a drill.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Recorder { start: Instant::now(), ops: Arc::default() }
    }

    /// Microseconds since the drill started.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn push(&self, op: Op) {
        self.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(op);
    }

    /// Everything recorded so far.
    pub fn history(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// The nodes a drill talks to, and the TLS its clients use (`None`: plaintext).
#[derive(Debug, Clone)]
pub struct Targets {
    /// The nodes' URLs.
    pub urls: Vec<String>,
    /// The clients' TLS: the cluster's CA and a client certificate.
    pub tls: Option<ClientTlsConfig>,
}

impl Targets {
    /// An endpoint for node `i`, with TLS when the targets use it.
    ///
    /// # Errors
    /// A malformed URL or TLS configuration.
    pub fn endpoint(&self, i: usize) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(self.urls[i].clone())?;
        Ok(match &self.tls {
            Some(tls) => endpoint.tls_config(tls.clone())?,
            None => endpoint,
        })
    }
}

/// Starts `clients` clients against `targets`; they run until `stop` is set.
pub fn start(
    targets: &Targets,
    clients: usize,
    keys: usize,
    recorder: &Recorder,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut handles = Vec::new();
    for client in 0..clients {
        let channels = (0..targets.urls.len())
            .map(|i| {
                Ok(targets.endpoint(i)?.timeout(OP_TIMEOUT).connect_timeout(Duration::from_millis(500)).connect_lazy())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let recorder = recorder.clone();
        let stop = stop.clone();
        handles.push(tokio::spawn(async move { run_client(client, channels, keys, recorder, stop).await }));
    }
    Ok(handles)
}

async fn run_client(client: usize, channels: Vec<Channel>, keys: usize, rec: Recorder, stop: Arc<AtomicBool>) {
    let n = channels.len();
    let mut last_ciphertext: Option<(String, String)> = None;
    for i in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let node = (client + i) % n;
        let key = format!("drill/k{}", (client * 7 + i) % keys);
        let invoke_us = rec.now_us();
        let (call, outcome) = match i % 6 {
            0 | 1 => {
                let value = format!("c{client}-{i}");
                let req = PutRequest {
                    path: key.clone(),
                    value: value.clone().into_bytes(),
                    cas: None,
                    max_versions: Some(1000),
                    request_id: value.clone(),
                };
                let outcome = match SecretsClient::new(channels[node].clone()).put(req).await {
                    Ok(r) => Outcome::Written { version: r.into_inner().version },
                    Err(s) => Outcome::Failed { code: format!("{:?}", s.code()) },
                };
                (Call::Write { key, value }, outcome)
            }
            2 | 3 => {
                let stale = (i % 6 == 3).then_some(STALE_MS);
                let req = GetRequest {
                    path: key.clone(),
                    version: None,
                    max_staleness: stale.map(|ms| prost_types::Duration { seconds: 0, nanos: (ms * 1_000_000) as i32 }),
                    stage: String::new(),
                };
                let outcome = match SecretsClient::new(channels[node].clone()).get(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        Outcome::Value { version: r.version, value: String::from_utf8_lossy(&r.value).into_owned() }
                    }
                    Err(s) if s.code() == tonic::Code::NotFound => Outcome::Missing,
                    Err(s) => Outcome::Failed { code: format!("{:?}", s.code()) },
                };
                (Call::Read { key, max_staleness_ms: stale }, outcome)
            }
            4 => {
                let plaintext = format!("p{client}-{i}");
                let req = EncryptRequest {
                    name: KEY_NAME.into(),
                    plaintext: plaintext.clone().into_bytes(),
                    associated_data: vec![],
                };
                let outcome = match KeysClient::new(channels[node].clone()).encrypt(req).await {
                    Ok(r) => {
                        let ciphertext = r.into_inner().ciphertext;
                        last_ciphertext = Some((ciphertext.clone(), plaintext.clone()));
                        Outcome::Encrypted { ciphertext }
                    }
                    Err(s) => Outcome::Failed { code: format!("{:?}", s.code()) },
                };
                (Call::Encrypt { plaintext }, outcome)
            }
            _ => {
                let Some((ciphertext, expect)) = last_ciphertext.clone() else { continue };
                let req =
                    DecryptRequest { name: KEY_NAME.into(), ciphertext: ciphertext.clone(), associated_data: vec![] };
                let outcome = match KeysClient::new(channels[node].clone()).decrypt(req).await {
                    Ok(r) => Outcome::Decrypted {
                        plaintext: String::from_utf8_lossy(&r.into_inner().plaintext).into_owned(),
                    },
                    Err(s) => Outcome::Failed { code: format!("{:?}", s.code()) },
                };
                (Call::Decrypt { ciphertext, expect }, outcome)
            }
        };
        let failed = matches!(outcome, Outcome::Failed { .. });
        rec.push(Op { client, node, call, invoke_us, complete_us: rec.now_us(), outcome });
        if failed {
            // Back off a little, as a client library would, instead of spinning on a dead node.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
