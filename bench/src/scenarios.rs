//! What the benchmark runs: Coffer calls, and the baselines measured beside them in the same run.

use std::sync::Arc;
use std::time::Duration;

use coffer_proto::v1::keys_client::KeysClient;
use coffer_proto::v1::secrets_client::SecretsClient;
use coffer_proto::v1::{
    crypto_request, BatchRequest, CreateKeyRequest, CryptoRequest, DecryptRequest, EncryptRequest,
    GenerateDataKeyRequest, GetRequest, KeyType, PutRequest, RotateKeyRequest, SignRequest, StreamRequest,
};
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::etcd::kv_client::KvClient;
use crate::etcd::{PutRequest as EtcdPut, RangeRequest};
use crate::load::OpFn;

/// The AES key the crypto scenarios use.
pub(crate) const AES_KEY: &str = "bench-aes";
/// The Ed25519 key the sign scenario uses.
pub(crate) const ED_KEY: &str = "bench-ed25519";
/// Secrets the read scenarios read.
pub(crate) const SEEDED: usize = 100;
/// Secret values, bytes (the etcd comparison uses the same size).
pub(crate) const VALUE_BYTES: usize = 256;
/// Items in one batch or stream round.
pub(crate) const BATCH: usize = 100;

/// The Coffer scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scenario {
    /// Secret get, linearizable (the default read).
    GetLinear,
    /// Secret get with max_staleness 1 s.
    GetStale,
    /// Secret put, 256 B values.
    Put,
    /// Encrypt 64 B, unary.
    Encrypt64,
    /// Encrypt 1 KiB, unary.
    Encrypt1k,
    /// Encrypt 64 B, batches of 100.
    Encrypt64Batch,
    /// Encrypt 64 B on a stream, 100 in flight per client.
    Encrypt64Stream,
    /// Encrypt 1 KiB, batches of 100.
    Encrypt1kBatch,
    /// Encrypt 1 KiB on a stream, 100 in flight per client.
    Encrypt1kStream,
    /// Decrypt 64 B, unary.
    Decrypt64,
    /// Decrypt 1 KiB, unary.
    Decrypt1k,
    /// A 256-bit data key, wrapped and plaintext.
    DataKey,
    /// Ed25519 sign of 64 B.
    SignEd25519,
    /// 90 % reads and crypto, 10 % writes and rotations.
    Mix,
    /// gRPC health check against a node: the transport limit (no work behind it).
    EmptyRpc,
}

/// Adds the benchmark's token to every call (none: the client certificate speaks).
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel that carries the benchmark's token.
pub(crate) type Conn = InterceptedService<Channel, Bearer>;

/// The policy of the benchmark's least-privilege token: what the scenarios do, and no more.
pub(crate) const BENCH_POLICY: &str = r#"
[[rule]]
path = "secret/bench/**"
allow = ["read", "create", "update"]

[[rule]]
path = "key/bench-aes"
allow = ["encrypt", "decrypt", "datakey", "key-admin"]

[[rule]]
path = "key/bench-ed25519"
allow = ["sign", "key-admin"]
"#;

/// Writes [`BENCH_POLICY`] with the root token and returns a new token holding only it: the
/// benchmark measures what a service sees, not the root token's shortcut.
///
/// # Errors
/// The node refuses or does not answer.
pub(crate) async fn least_privilege_token(
    url: &str,
    tls: Option<&ClientTlsConfig>,
    root_token: &str,
) -> anyhow::Result<String> {
    use coffer_proto::v1::auth_client::AuthClient;
    use coffer_proto::v1::{CreateTokenRequest, WritePolicyRequest};
    let conn = connect(&[url.to_owned()], tls, Some(root_token))?.remove(0);
    let mut auth = AuthClient::new(conn);
    auth.write_policy(WritePolicyRequest { name: "bench".into(), document: BENCH_POLICY.into() }).await?;
    let req = CreateTokenRequest {
        policies: vec!["bench".into()],
        ttl: Some(prost_types::Duration { seconds: 24 * 3600, nanos: 0 }),
        display_name: "coffer-bench".into(),
        ..Default::default()
    };
    Ok(auth.create_token(req).await?.into_inner().token)
}

/// Channels to the nodes under test; client `c` uses node `c % n`.
#[derive(Clone)]
pub(crate) struct Target {
    channels: Arc<Vec<Conn>>,
    /// Ciphertexts of 64 B and 1 KiB for the decrypt scenarios.
    ciphertexts: Arc<[String; 2]>,
}

impl Target {
    /// Connects to every node (`http://host:port`) and prepares keys, secrets and a ciphertext.
    ///
    /// # Errors
    /// A node that does not answer, or set-up calls that fail.
    pub(crate) async fn prepare(
        urls: &[String],
        tls: Option<&ClientTlsConfig>,
        token: Option<&str>,
    ) -> anyhow::Result<Target> {
        let channels = connect(urls, tls, token)?;
        let mut keys = KeysClient::new(channels[0].clone());
        for (name, kind) in [(AES_KEY, KeyType::Aes256Gcm), (ED_KEY, KeyType::Ed25519)] {
            let create =
                CreateKeyRequest { name: name.into(), r#type: kind as i32, exportable: false, ..Default::default() };
            match keys.create_key(create).await {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) => anyhow::bail!("cannot create key {name}: {}", s.message()),
            }
        }
        let mut secrets = SecretsClient::new(channels[0].clone());
        for i in 0..SEEDED {
            secrets.put(put(&format!("bench/read/{i}"), 0)).await?;
        }
        let small = keys.encrypt(encrypt(64)).await?.into_inner().ciphertext;
        let large = keys.encrypt(encrypt(1024)).await?.into_inner().ciphertext;
        Ok(Target { channels: Arc::new(channels), ciphertexts: Arc::new([small, large]) })
    }

    /// Writes a new secret per call (`bench/mem/N`, 256 B): the memory figure's fill.
    pub(crate) fn fill(&self) -> OpFn {
        let t = self.clone();
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        Arc::new(move |client, _| {
            let (t, n) = (t.clone(), next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            Box::pin(async move {
                SecretsClient::new(t.channel(client))
                    .put(put(&format!("bench/mem/{n}"), n))
                    .await
                    .map(|_| 1)
                    .map_err(|s| s.code())
            })
        })
    }

    fn channel(&self, client: usize) -> Conn {
        self.channels[client % self.channels.len()].clone()
    }

    /// The operation of a scenario.
    pub(crate) fn op(&self, scenario: Scenario) -> OpFn {
        let t = self.clone();
        Arc::new(move |client, seq| {
            let t = t.clone();
            Box::pin(async move { t.call(scenario, client, seq).await.map_err(|s| s.code()) })
        })
    }

    async fn call(&self, scenario: Scenario, client: usize, seq: u64) -> Result<u64, tonic::Status> {
        let ch = self.channel(client);
        let read = |stale: bool| GetRequest {
            path: format!("bench/read/{}", seq % SEEDED as u64),
            version: None,
            max_staleness: stale.then_some(prost_types::Duration { seconds: 1, nanos: 0 }),
            stage: String::new(),
        };
        match scenario {
            Scenario::GetLinear => SecretsClient::new(ch).get(read(false)).await.map(|_| 1),
            Scenario::GetStale => SecretsClient::new(ch).get(read(true)).await.map(|_| 1),
            Scenario::Put => {
                SecretsClient::new(ch).put(put(&format!("bench/put/{client}/{}", seq % 1000), seq)).await.map(|_| 1)
            }
            Scenario::Encrypt64 => KeysClient::new(ch).encrypt(encrypt(64)).await.map(|_| 1),
            Scenario::Encrypt1k => KeysClient::new(ch).encrypt(encrypt(1024)).await.map(|_| 1),
            Scenario::Encrypt64Batch | Scenario::Encrypt1kBatch => {
                let bytes = if scenario == Scenario::Encrypt64Batch { 64 } else { 1024 };
                let items = (0..BATCH).map(|_| encrypt_item(bytes)).collect();
                let reply = KeysClient::new(ch).batch(BatchRequest { items }).await?.into_inner();
                Ok(reply.results.len() as u64)
            }
            Scenario::Encrypt64Stream | Scenario::Encrypt1kStream => {
                let bytes = if scenario == Scenario::Encrypt64Stream { 64 } else { 1024 };
                let requests =
                    (0..BATCH as u64).map(move |id| StreamRequest { id, request: Some(encrypt_item(bytes)) });
                let mut replies = KeysClient::new(ch).stream(tokio_stream::iter(requests)).await?.into_inner();
                let mut n = 0;
                while let Some(reply) = replies.next().await {
                    reply?;
                    n += 1;
                }
                Ok(n)
            }
            Scenario::Decrypt64 | Scenario::Decrypt1k => {
                let req = DecryptRequest {
                    name: AES_KEY.into(),
                    ciphertext: self.ciphertexts[usize::from(scenario == Scenario::Decrypt1k)].clone(),
                    associated_data: vec![],
                };
                KeysClient::new(ch).decrypt(req).await.map(|_| 1)
            }
            Scenario::DataKey => {
                let req = GenerateDataKeyRequest { name: AES_KEY.into(), bits: 256, with_plaintext: true };
                KeysClient::new(ch).generate_data_key(req).await.map(|_| 1)
            }
            Scenario::SignEd25519 => {
                let req = SignRequest { name: ED_KEY.into(), message: vec![7; 64] };
                KeysClient::new(ch).sign(req).await.map(|_| 1)
            }
            Scenario::Mix => match seq % 100 {
                // 1 % rotations, 9 % writes, 45 % reads, 45 % crypto.
                0 => KeysClient::new(ch)
                    .rotate_key(RotateKeyRequest { name: AES_KEY.into(), ..Default::default() })
                    .await
                    .map(|_| 1),
                1..=9 => SecretsClient::new(ch).put(put(&format!("bench/mix/{client}"), seq)).await.map(|_| 1),
                10..=54 => SecretsClient::new(ch).get(read(false)).await.map(|_| 1),
                _ => KeysClient::new(ch).encrypt(encrypt(64)).await.map(|_| 1),
            },
            Scenario::EmptyRpc => {
                let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
                tonic_health::pb::health_client::HealthClient::new(ch).check(req).await.map(|_| 1)
            }
        }
    }
}

/// One lazily connected channel per address (over TLS when `tls` is given, with `token` on
/// every call when given), Nagle off, calls bounded to 10 s.
fn connect(urls: &[String], tls: Option<&ClientTlsConfig>, token: Option<&str>) -> anyhow::Result<Vec<Conn>> {
    let bearer = match token {
        Some(t) => {
            let mut value: MetadataValue<Ascii> = format!("Bearer {t}").parse()?;
            value.set_sensitive(true);
            Bearer(Some(value))
        }
        None => Bearer(None),
    };
    Ok(connect_plain(urls, tls)?.into_iter().map(|c| InterceptedService::new(c, bearer.clone())).collect())
}

fn connect_plain(urls: &[String], tls: Option<&ClientTlsConfig>) -> anyhow::Result<Vec<Channel>> {
    urls.iter()
        .map(|u| {
            let mut endpoint = Endpoint::from_shared(u.clone())?.tcp_nodelay(true).timeout(Duration::from_secs(10));
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls.clone())?;
            }
            Ok(endpoint.connect_lazy())
        })
        .collect()
}

fn put(path: &str, seq: u64) -> PutRequest {
    let mut value = vec![b'v'; VALUE_BYTES];
    value[..8].copy_from_slice(&seq.to_le_bytes());
    PutRequest { path: path.into(), value, cas: None, max_versions: Some(2), request_id: String::new() }
}

fn encrypt(bytes: usize) -> EncryptRequest {
    EncryptRequest { name: AES_KEY.into(), plaintext: vec![42; bytes], associated_data: vec![] }
}

fn encrypt_item(bytes: usize) -> CryptoRequest {
    CryptoRequest { call: Some(crypto_request::Call::Encrypt(encrypt(bytes))) }
}

/// Put and linearizable get against etcd, with the same value size and key spread as Coffer's.
#[derive(Clone)]
pub(crate) struct Etcd {
    channels: Arc<Vec<Channel>>,
}

/// The etcd scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EtcdScenario {
    /// Put, 256 B values.
    Put,
    /// Range of one key, linearizable.
    GetLinear,
}

impl Etcd {
    /// Connects to etcd members (`http://host:port`) and seeds the keys the reads read.
    ///
    /// # Errors
    /// etcd does not answer.
    pub(crate) async fn prepare(urls: &[String]) -> anyhow::Result<Etcd> {
        let channels = connect_plain(urls, None)?;
        let mut kv = KvClient::new(channels[0].clone());
        for i in 0..SEEDED {
            kv.put(EtcdPut {
                key: format!("bench/read/{i}").into_bytes(),
                value: vec![b'v'; VALUE_BYTES],
                ..Default::default()
            })
            .await?;
        }
        Ok(Etcd { channels: Arc::new(channels) })
    }

    /// The operation of an etcd scenario.
    pub(crate) fn op(&self, scenario: EtcdScenario) -> OpFn {
        let e = self.clone();
        Arc::new(move |client, seq| {
            let ch = e.channels[client % e.channels.len()].clone();
            Box::pin(async move {
                let mut kv = KvClient::new(ch);
                let result = match scenario {
                    EtcdScenario::Put => {
                        let mut value = vec![b'v'; VALUE_BYTES];
                        value[..8].copy_from_slice(&seq.to_le_bytes());
                        let key = format!("bench/put/{client}/{}", seq % 1000).into_bytes();
                        kv.put(EtcdPut { key, value, ..Default::default() }).await.map(|_| 1)
                    }
                    EtcdScenario::GetLinear => {
                        let key = format!("bench/read/{}", seq % SEEDED as u64).into_bytes();
                        kv.range(RangeRequest { key, ..Default::default() }).await.map(|_| 1)
                    }
                };
                result.map_err(|s| s.code())
            })
        })
    }
}
