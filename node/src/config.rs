//! The server's configuration: one TOML file (kebab-case keys, unknown keys rejected), with
//! environment overrides, validated into typed values at load.
//!
//! ```toml
//! node-id = 1
//! listen = "127.0.0.1:8200"
//! # advertise-addr = "10.0.0.5:8200"     # what clients dial; default: the bound address
//! # peer-listen = "10.0.0.5:8201"        # node-to-node, mutual TLS; default: listen's port + 1
//! # advertise-peer-addr = "10.0.0.5:8201" # what other nodes dial; default: advertise-addr's host
//! # write-timeout = "5s"                 # a write not committed by then is UNAVAILABLE
//! data-dir = "/var/lib/coffer"
//! max-value-bytes = 65536
//! default-max-versions = 10
//! crypto-staleness = "1s"               # Keys calls stop on a node cut off from the leader this long
//! key-cache-entries = 10000             # named keys kept unwrapped in memory
//! max-batch-items = 1000                # items in one Keys Batch call
//!
//! [hsm]
//! token-label = "coffer"
//! pin-file = "/etc/coffer/hsm-pin"     # or: pin-env = "COFFER_HSM_PIN"
//! root-key-label = "coffer-root"
//! # module = "/usr/lib/softhsm/libsofthsm2.so"   # default: searched
//! # fault-file = "hsm-fault"          # drills only: while this file exists, HSM calls fail
//!
//! [tls]                               # or, to serve plaintext: tls = "off" (at the top)
//! cert = "/etc/coffer/node-1.crt"       # this node's certificate (coffer operator tls issue node)
//! key = "/etc/coffer/node-1.key"        # its key; only its owner may read it
//! ca = "/etc/coffer/ca.crt"             # the cluster's CA: peers' and clients' certificates chain to it
//! client-certs = "optional"             # "off" | "optional" | "required"
//!
//! [auth]
//! # checks = "off"                      # benchmarks only: every call allowed (a loud warning)
//! token-rate = 20000                    # calls per second per token, per node (0: no limit)
//! token-burst = 40000                   # calls a token may make at once before the rate applies
//!
//! [limits]
//! max-concurrent-streams = 256          # HTTP/2 streams (calls in flight) per client connection
//! max-message-bytes = 4194304           # a Keys, Auth or Operator request; Secrets: max-value-bytes + 64 KiB
//! stream-idle = "5m"                    # a Keys stream with no message this long is closed
//! stream-max-items = 10000000           # a Keys stream is closed after this many items
//! min-auto-rotate-period = "1h"         # a key's auto_rotate_period is 0 (off) or at least this
//! max-key-versions = 1000               # a key with this many versions cannot rotate again
//!
//! [audit]
//! enabled = true                        # one record per call, hash-chained, before the answer leaves
//! spool = "<data-dir>/audit.log"        # the node's audit file (relative: to this file's directory)
//! checkpoint-every = "10s"              # an HSM-signed checkpoint this often, even when idle ...
//! checkpoint-records = 10000            # ... and after this many records
//! rotate-bytes = 268435456              # past this size the file is renamed audit.log.<first seq> (0: never)
//! sync = "always"                       # each record fsync'd before its answer; or "10ms": written before
//!                                       # its answer, fsync'd within 10 ms (a power loss may lose that much)
//! # [[audit.sink]]                      # a collector the spool is copied to, asynchronously (any number)
//! # name = "siem"
//! # address = "127.0.0.1:6514"          # TCP, JSON lines (the chain lines themselves)
//! # timeout = "5s"                      # per connect and per write; then retry with backoff
//!
//! [rotation]
//! step-pause = "0s"                     # drills and tests only: wait this long before each rotation
//!                                       # step's work, so a kill or an outage can land inside a step
//!
//! [raft]
//! heartbeat-interval = "50ms"
//! election-timeout-min = "150ms"
//! election-timeout-max = "300ms"
//! # dial-via = { "127.0.0.1:8201" = "127.0.0.1:9201" }   # reach a peer through another address
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use coffer_hsm::{HsmConfig, PinSource, DEFAULT_ROOT_KEY_LABEL};
use coffer_raft::NodeId;
use serde::Deserialize;

/// Environment variables that override config keys: (variable, dotted key).
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("COFFER_NODE_ID", "node-id"),
    ("COFFER_LISTEN", "listen"),
    ("COFFER_ADVERTISE_ADDR", "advertise-addr"),
    ("COFFER_DATA_DIR", "data-dir"),
    ("COFFER_MAX_VALUE_BYTES", "max-value-bytes"),
    ("COFFER_HSM_MODULE", "hsm.module"),
    ("COFFER_HSM_TOKEN_LABEL", "hsm.token-label"),
    ("COFFER_HSM_PIN_FILE", "hsm.pin-file"),
    ("COFFER_HSM_PIN_ENV", "hsm.pin-env"),
    ("COFFER_HSM_ROOT_KEY_LABEL", "hsm.root-key-label"),
    ("COFFER_TLS_CERT", "tls.cert"),
    ("COFFER_TLS_KEY", "tls.key"),
    ("COFFER_TLS_CA", "tls.ca"),
];

/// The largest value a server may be configured to accept: values travel in one Raft entry.
pub const MAX_VALUE_BYTES_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_node_id")]
    node_id: u64,
    #[serde(default = "default_listen")]
    listen: String,
    advertise_addr: Option<String>,
    peer_listen: Option<String>,
    advertise_peer_addr: Option<String>,
    #[serde(with = "humantime_serde", default = "default_write_timeout")]
    write_timeout: Duration,
    data_dir: PathBuf,
    #[serde(default = "default_max_value_bytes")]
    max_value_bytes: usize,
    #[serde(default = "default_max_versions")]
    default_max_versions: u32,
    #[serde(with = "humantime_serde", default = "default_crypto_staleness")]
    crypto_staleness: Duration,
    #[serde(default = "default_key_cache_entries")]
    key_cache_entries: usize,
    #[serde(default = "default_max_batch_items")]
    max_batch_items: usize,
    hsm: RawHsm,
    #[serde(default)]
    raft: RawRaft,
    #[serde(default)]
    auth: RawAuth,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    rotation: RawRotation,
    /// `"off"`, or a table of [`RawTls`]: checked by hand for a message that names the rule.
    tls: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    #[serde(default = "default_client_certs")]
    client_certs: String,
}

fn default_client_certs() -> String {
    "optional".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawRotation {
    #[serde(with = "humantime_serde", default)]
    step_pause: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawAudit {
    #[serde(default = "default_true")]
    enabled: bool,
    spool: Option<PathBuf>,
    #[serde(with = "humantime_serde", default = "default_checkpoint_every")]
    checkpoint_every: Duration,
    #[serde(default = "default_checkpoint_records")]
    checkpoint_records: u64,
    #[serde(default = "default_rotate_bytes")]
    rotate_bytes: u64,
    #[serde(default = "default_audit_sync")]
    sync: String,
    #[serde(default)]
    sink: Vec<RawSink>,
}

fn default_audit_sync() -> String {
    "always".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawSink {
    name: String,
    address: String,
    #[serde(with = "humantime_serde", default = "default_sink_timeout")]
    timeout: Duration,
}

fn default_rotate_bytes() -> u64 {
    256 << 20
}

fn default_sink_timeout() -> Duration {
    Duration::from_secs(5)
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            enabled: true,
            spool: None,
            checkpoint_every: default_checkpoint_every(),
            checkpoint_records: default_checkpoint_records(),
            rotate_bytes: default_rotate_bytes(),
            sync: default_audit_sync(),
            sink: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_checkpoint_every() -> Duration {
    Duration::from_secs(10)
}

fn default_checkpoint_records() -> u64 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_streams")]
    max_concurrent_streams: u32,
    #[serde(default = "default_message_bytes")]
    max_message_bytes: usize,
    #[serde(with = "humantime_serde", default = "default_stream_idle")]
    stream_idle: Duration,
    #[serde(default = "default_stream_items")]
    stream_max_items: u64,
    #[serde(with = "humantime_serde", default = "default_min_rotate")]
    min_auto_rotate_period: Duration,
    #[serde(default = "default_key_versions")]
    max_key_versions: usize,
}

fn default_min_rotate() -> Duration {
    Duration::from_secs(3600)
}

fn default_key_versions() -> usize {
    1000
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_concurrent_streams: default_streams(),
            max_message_bytes: default_message_bytes(),
            stream_idle: default_stream_idle(),
            stream_max_items: default_stream_items(),
            min_auto_rotate_period: default_min_rotate(),
            max_key_versions: default_key_versions(),
        }
    }
}

fn default_streams() -> u32 {
    256
}

fn default_message_bytes() -> usize {
    4 * 1024 * 1024
}

fn default_stream_idle() -> Duration {
    Duration::from_secs(300)
}

fn default_stream_items() -> u64 {
    10_000_000
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawAuth {
    #[serde(default = "default_checks")]
    checks: String,
    #[serde(default = "default_token_rate")]
    token_rate: u32,
    #[serde(default)]
    token_burst: Option<u32>,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth { checks: default_checks(), token_rate: default_token_rate(), token_burst: None }
    }
}

fn default_checks() -> String {
    "on".into()
}

fn default_token_rate() -> u32 {
    20_000
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawHsm {
    module: Option<PathBuf>,
    token_label: String,
    pin_file: Option<PathBuf>,
    pin_env: Option<String>,
    #[serde(default = "default_root_key_label")]
    root_key_label: String,
    #[serde(default = "default_sessions")]
    sessions: usize,
    fault_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawRaft {
    #[serde(with = "humantime_serde", default = "default_heartbeat")]
    heartbeat_interval: Duration,
    #[serde(with = "humantime_serde", default = "default_election_min")]
    election_timeout_min: Duration,
    #[serde(with = "humantime_serde", default = "default_election_max")]
    election_timeout_max: Duration,
    #[serde(default = "default_snapshot_logs")]
    snapshot_after_logs: u64,
    #[serde(default)]
    dial_via: BTreeMap<String, String>,
}

impl Default for RawRaft {
    fn default() -> Self {
        RawRaft {
            heartbeat_interval: default_heartbeat(),
            election_timeout_min: default_election_min(),
            election_timeout_max: default_election_max(),
            snapshot_after_logs: default_snapshot_logs(),
            dial_via: BTreeMap::new(),
        }
    }
}

fn default_node_id() -> u64 {
    1
}
fn default_listen() -> String {
    "127.0.0.1:8200".into()
}
fn default_crypto_staleness() -> Duration {
    Duration::from_secs(1)
}
fn default_key_cache_entries() -> usize {
    10_000
}
fn default_max_batch_items() -> usize {
    1000
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_value_bytes() -> usize {
    64 * 1024
}
fn default_max_versions() -> u32 {
    10
}
fn default_root_key_label() -> String {
    DEFAULT_ROOT_KEY_LABEL.into()
}
fn default_sessions() -> usize {
    2
}
// Failover takes about two election timeouts: a follower waits out the old leader's lease
// (election-timeout-max) before it grants a vote. Measured with these defaults on loopback, kill -9
// of the leader to the first acknowledged write: see README "Run a cluster".
fn default_heartbeat() -> Duration {
    Duration::from_millis(50)
}
fn default_election_min() -> Duration {
    Duration::from_millis(150)
}
fn default_election_max() -> Duration {
    Duration::from_millis(300)
}
fn default_snapshot_logs() -> u64 {
    10_000
}

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's Raft id.
    pub node_id: NodeId,
    /// The address the gRPC server binds.
    pub listen: SocketAddr,
    /// The address clients reach this one at; `None`: the bound address.
    pub advertise_addr: Option<String>,
    /// The address the node-to-node listener binds (TLS on only); `None`: `listen` with the
    /// next port up (port 0 stays 0).
    pub peer_listen: Option<SocketAddr>,
    /// The address other nodes dial; `None`: `advertise-addr`'s host with the peer port, or the
    /// bound peer address.
    pub advertise_peer_addr: Option<String>,
    /// How long a write may wait to be committed before it is reported `UNAVAILABLE`.
    pub write_timeout: Duration,
    /// Where RocksDB and snapshots live.
    pub data_dir: PathBuf,
    /// The largest secret value accepted, in bytes.
    pub max_value_bytes: usize,
    /// `max_versions` of a new secret.
    pub default_max_versions: u32,
    /// Drills and tests: a pause before each rotation step's work (`[rotation] step-pause`).
    pub rotation_step_pause: Duration,
    /// A node answers Keys crypto calls only while it has heard from the leader within this.
    pub crypto_staleness: Duration,
    /// At most this many named keys are kept unwrapped in memory.
    pub key_cache_entries: usize,
    /// The most items a Keys `Batch` call may carry.
    pub max_batch_items: usize,
    /// How to reach the HSM.
    pub hsm: HsmConfig,
    /// Raft timing.
    pub raft: RaftTiming,
    /// TLS on the port, or plaintext when the config says `tls = "off"`.
    pub tls: Tls,
    /// Authorisation settings.
    pub auth: AuthConfig,
    /// Server limits.
    pub limits: Limits,
    /// Audit: the spool and its checkpoints; `None` when `[audit] enabled = false`.
    pub audit: Option<AuditConfig>,
}

/// Where a node writes its audit records and how often it signs a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The spool file.
    pub spool: PathBuf,
    /// A checkpoint at least this often.
    pub checkpoint_every: Duration,
    /// And after this many records.
    pub checkpoint_records: u64,
    /// Past this size the spool is rotated (0: never).
    pub rotate_bytes: u64,
    /// When records reach the disk.
    pub sync: crate::audit::spool::Sync,
    /// Collectors the spool is copied to.
    pub sinks: Vec<SinkConfig>,
}

/// A collector an audit spool is copied to (`[[audit.sink]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Its name (status, the cursor file).
    pub name: String,
    /// `host:port`, TCP.
    pub address: String,
    /// Per connect and per write.
    pub timeout: Duration,
}

/// What one client may hold of a node at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// HTTP/2 streams (calls in flight) per connection.
    pub max_concurrent_streams: u32,
    /// The largest Keys, Auth or Operator request, in bytes.
    pub max_message_bytes: usize,
    /// A Keys stream with no message for this long is closed.
    pub stream_idle: Duration,
    /// A Keys stream is closed after this many items.
    pub stream_max_items: u64,
    /// A key's `auto_rotate_period` is 0 (off) or at least this.
    pub min_auto_rotate_period: Duration,
    /// A key with this many versions cannot be rotated again.
    pub max_key_versions: usize,
}

/// Whether calls are checked, and how fast one token may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// On unless the config says `checks = "off"` (benchmarks: the cost of the checks).
    pub checks: Checks,
    /// Calls per second one token may make on this node; `None`: no limit.
    pub token_rate: Option<std::num::NonZeroU32>,
    /// Calls a token may make at once before the rate applies.
    pub token_burst: std::num::NonZeroU32,
}

/// Whether calls are authenticated and authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checks {
    /// Every call needs a credential and a policy that allows it.
    On,
    /// Every call is allowed: for measuring what the checks cost, never for serving.
    Off,
}

/// Whether a node speaks TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Plaintext, because the config says `tls = "off"`: logged as a warning at start and shown
    /// by `operator status`.
    Off,
    /// TLS with these files; `ca` also verifies the peers this node dials.
    On(coffer_tls::ServerFiles),
}

const NO_TLS: &str = "no TLS configured: add a [tls] table with cert, key and ca (coffer operator tls ca create and \
                      coffer operator tls issue node make them), or set tls = \"off\" to serve plaintext";

/// Raft timing settings.
#[derive(Debug, Clone)]
pub struct RaftTiming {
    /// How often the leader sends heartbeats.
    pub heartbeat_interval: Duration,
    /// The shortest election timeout.
    pub election_timeout_min: Duration,
    /// The longest election timeout.
    pub election_timeout_max: Duration,
    /// Build a snapshot (and purge the log behind it) after this many new entries.
    pub snapshot_after_logs: u64,
    /// Peer address (as in the membership) → the address this node dials instead. Drills route
    /// every node-to-node link through its own TCP proxy this way, to cut links one by one.
    pub dial_via: BTreeMap<String, String>,
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (it names the key and line).
        #[source]
        source: toml::de::Error,
    },
    /// A value breaks a rule.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads, overrides from the environment, and validates a config file.
    ///
    /// # Errors
    /// An unreadable file, bad TOML, an unknown key, or a value that breaks a rule (named).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path, |var| std::env::var(var).ok())
    }

    /// Parses config text; `env` looks up override variables.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        for (var, key) in ENV_OVERRIDES {
            if let Some(value) = env(var) {
                set_dotted(&mut table, key, &value);
            }
        }
        let raw: RawConfig = table.try_into().map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        raw.validate(path)
    }
}

/// Sets `a.b` in the table to the value, typed as TOML if it parses as a number, else a string.
fn set_dotted(table: &mut toml::Table, key: &str, value: &str) {
    let typed =
        value.parse::<i64>().map(toml::Value::Integer).unwrap_or_else(|_| toml::Value::String(value.to_owned()));
    match key.split_once('.') {
        Some((section, rest)) => {
            let entry = table.entry(section.to_owned()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(inner) = entry {
                set_dotted(inner, rest, value);
            }
        }
        None => {
            table.insert(key.to_owned(), typed);
        }
    }
}

impl RawConfig {
    fn validate(self, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let listen: SocketAddr = match self.listen.parse() {
            Ok(addr) => addr,
            Err(_) => return invalid(format!("listen = {:?} is not an IP:port address", self.listen)),
        };
        if listen.ip().is_unspecified() && self.advertise_addr.is_none() {
            return invalid(format!(
                "listen = {listen} binds every interface: set advertise-addr to the host:port other nodes reach this one at"
            ));
        }
        if self.write_timeout.is_zero() {
            return invalid("write-timeout must be more than zero".into());
        }
        if self.node_id == 0 {
            return invalid("node-id must be at least 1".into());
        }
        if self.max_value_bytes == 0 || self.max_value_bytes > MAX_VALUE_BYTES_LIMIT {
            return invalid(format!("max-value-bytes must be between 1 and {MAX_VALUE_BYTES_LIMIT}"));
        }
        if self.default_max_versions == 0 {
            return invalid("default-max-versions must be at least 1".into());
        }
        let pin = match (self.hsm.pin_file, self.hsm.pin_env) {
            (Some(file), None) => PinSource::File(resolve(path, file)),
            (None, Some(var)) => PinSource::Env(var),
            (None, None) => {
                return invalid("hsm needs pin-file or pin-env (the PIN is never taken from the command line)".into())
            }
            (Some(_), Some(_)) => return invalid("hsm takes pin-file or pin-env, not both".into()),
        };
        if self.hsm.sessions == 0 || self.hsm.sessions > 16 {
            return invalid("hsm.sessions must be between 1 and 16".into());
        }
        let raft = self.raft;
        if raft.election_timeout_min <= raft.heartbeat_interval
            || raft.election_timeout_max <= raft.election_timeout_min
        {
            return invalid(
                "raft timing must satisfy heartbeat-interval < election-timeout-min < election-timeout-max".into(),
            );
        }
        let host_port = |a: &str| a.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if let Some((from, to)) = raft.dial_via.iter().find(|(from, to)| !host_port(from) || !host_port(to)) {
            return invalid(format!("raft.dial-via {from:?} = {to:?}: both sides must be host:port addresses"));
        }
        if raft.election_timeout_min < raft.heartbeat_interval * 3 {
            tracing::warn!(
                "raft.election-timeout-min is less than three heartbeat intervals: a slow heartbeat may trigger needless elections"
            );
        }
        let peer_listen = match &self.peer_listen {
            Some(text) => match text.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => return invalid(format!("peer-listen = {text:?} is not an IP:port address")),
            },
            None => {
                let mut addr = listen;
                addr.set_port(if listen.port() == 0 { 0 } else { listen.port().saturating_add(1) });
                Some(addr)
            }
        };
        if peer_listen.is_some_and(|p| p.ip().is_unspecified())
            && self.advertise_peer_addr.is_none()
            && self.advertise_addr.is_none()
        {
            return invalid(
                "peer-listen binds every interface: set advertise-peer-addr (or advertise-addr) to what other nodes dial".into(),
            );
        }
        let tls = match self.tls {
            None => return invalid(NO_TLS.into()),
            Some(toml::Value::String(word)) if word == "off" => Tls::Off,
            Some(toml::Value::String(word)) => {
                return invalid(format!("tls = {word:?}: the only word tls takes is \"off\"; otherwise a [tls] table"))
            }
            Some(table @ toml::Value::Table(_)) => {
                let raw: RawTls =
                    table.try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(format!("[tls]: {e}")))?;
                let client_certs = match raw.client_certs.as_str() {
                    "off" => coffer_tls::ClientCerts::Off,
                    "optional" => coffer_tls::ClientCerts::Optional,
                    "required" => coffer_tls::ClientCerts::Required,
                    other => {
                        return invalid(format!(
                            "tls.client-certs = {other:?}: one of \"off\", \"optional\", \"required\""
                        ))
                    }
                };
                Tls::On(coffer_tls::ServerFiles {
                    cert: resolve(path, raw.cert),
                    key: resolve(path, raw.key),
                    ca: Some(resolve(path, raw.ca)),
                    client_certs,
                })
            }
            Some(other) => return invalid(format!("tls = {other}: \"off\" or a [tls] table")),
        };
        if matches!(tls, Tls::Off) && (self.peer_listen.is_some() || self.advertise_peer_addr.is_some()) {
            return invalid(
                "peer-listen needs TLS: with tls = \"off\" the node-to-node service shares the client port".into(),
            );
        }
        let peer_listen = if tls_on(&tls) { peer_listen } else { None };
        let checks = match self.auth.checks.as_str() {
            "on" => Checks::On,
            "off" => Checks::Off,
            other => return invalid(format!("auth.checks = {other:?}: \"on\" or \"off\"")),
        };
        let token_rate = std::num::NonZeroU32::new(self.auth.token_rate);
        let burst = self.auth.token_burst.unwrap_or(self.auth.token_rate.saturating_mul(2));
        let token_burst = std::num::NonZeroU32::new(burst).unwrap_or(std::num::NonZeroU32::MIN);
        if token_rate.is_some() && self.auth.token_burst == Some(0) {
            return invalid("auth.token-burst is at least 1 when auth.token-rate is set".into());
        }
        let limits = self.limits;
        if limits.max_concurrent_streams == 0 || limits.max_message_bytes < 1024 || limits.stream_max_items == 0 {
            return invalid(
                "limits: max-concurrent-streams and stream-max-items are at least 1, max-message-bytes at least 1024"
                    .into(),
            );
        }
        if limits.stream_idle.is_zero() {
            return invalid("limits.stream-idle is more than 0".into());
        }
        let audit = &self.audit;
        if audit.checkpoint_every < Duration::from_millis(100) || audit.checkpoint_records == 0 {
            return invalid("audit: checkpoint-every is at least 100ms and checkpoint-records at least 1".into());
        }
        let mut sink_names = std::collections::BTreeSet::new();
        for sink in &audit.sink {
            let name_ok = !sink.name.is_empty()
                && sink.name.len() <= 32
                && sink.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !name_ok || !sink_names.insert(sink.name.clone()) {
                return invalid(format!("audit.sink name {:?}: 1 to 32 of a-z, 0-9 and -, and unique", sink.name));
            }
            if sink.address.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                return invalid(format!("audit.sink {:?}: address {:?} is not host:port", sink.name, sink.address));
            }
            if sink.timeout.is_zero() {
                return invalid(format!("audit.sink {:?}: timeout is more than 0", sink.name));
            }
        }
        let sync = match audit.sync.as_str() {
            "always" => crate::audit::spool::Sync::Always,
            other => match humantime::parse_duration(other) {
                Ok(bound) if !bound.is_zero() && bound <= Duration::from_secs(1) => {
                    crate::audit::spool::Sync::Within(bound)
                }
                _ => {
                    return invalid(format!(
                        "audit.sync = {other:?}: \"always\" (each record on disk before its answer) or a bound up to 1s (\"10ms\")"
                    ))
                }
            },
        };
        if audit.rotate_bytes != 0 && audit.rotate_bytes < 4096 {
            return invalid("audit.rotate-bytes is 0 (never) or at least 4096".into());
        }
        let data_dir = resolve(path, self.data_dir.clone());
        Ok(Config {
            audit: self.audit.enabled.then(|| AuditConfig {
                spool: self.audit.spool.clone().map_or_else(|| data_dir.join("audit.log"), |p| resolve(path, p)),
                checkpoint_every: self.audit.checkpoint_every,
                checkpoint_records: self.audit.checkpoint_records,
                rotate_bytes: self.audit.rotate_bytes,
                sync,
                sinks: self
                    .audit
                    .sink
                    .iter()
                    .map(|s| SinkConfig { name: s.name.clone(), address: s.address.clone(), timeout: s.timeout })
                    .collect(),
            }),
            limits: Limits {
                max_concurrent_streams: limits.max_concurrent_streams,
                max_message_bytes: limits.max_message_bytes,
                stream_idle: limits.stream_idle,
                stream_max_items: limits.stream_max_items,
                min_auto_rotate_period: limits.min_auto_rotate_period,
                max_key_versions: limits.max_key_versions.max(1),
            },
            auth: AuthConfig { checks, token_rate, token_burst },
            tls,
            peer_listen,
            advertise_peer_addr: self.advertise_peer_addr,
            node_id: NodeId(self.node_id),
            listen,
            advertise_addr: self.advertise_addr,
            write_timeout: self.write_timeout,
            data_dir: resolve(path, self.data_dir),
            max_value_bytes: self.max_value_bytes,
            default_max_versions: self.default_max_versions,
            rotation_step_pause: self.rotation.step_pause,
            crypto_staleness: self.crypto_staleness,
            key_cache_entries: self.key_cache_entries.max(1),
            max_batch_items: self.max_batch_items.max(1),
            hsm: HsmConfig {
                module: self.hsm.module.map(|m| resolve(path, m)),
                token_label: self.hsm.token_label,
                pin,
                root_key_label: self.hsm.root_key_label,
                sessions: self.hsm.sessions,
                fault_file: self.hsm.fault_file.map(|f| resolve(path, f)),
            },
            raft: RaftTiming {
                heartbeat_interval: raft.heartbeat_interval,
                election_timeout_min: raft.election_timeout_min,
                election_timeout_max: raft.election_timeout_max,
                snapshot_after_logs: raft.snapshot_after_logs.max(1),
                dial_via: raft.dial_via,
            },
        })
    }
}

fn tls_on(tls: &Tls) -> bool {
    matches!(tls, Tls::On(_))
}

/// Relative paths in a config file are relative to the file's directory.
fn resolve(config_path: &Path, path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        path
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "data-dir = \"data\"\ntls = \"off\"\n[hsm]\ntoken-label = \"coffer\"\npin-file = \"pin\"\n";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/coffer/node.toml"), |_| None)
    }

    #[test]
    fn minimal_config_gets_defaults_and_relative_paths() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listen, "127.0.0.1:8200".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("/etc/coffer/data"));
        assert_eq!(config.hsm.pin, PinSource::File("/etc/coffer/pin".into()));
        assert_eq!(config.max_value_bytes, 65536);
        assert_eq!(config.default_max_versions, 10);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let err = parse(&format!("colour = 1\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = parse(&MINIMAL.replace("[hsm]", "[hsm]\npin = \"1234\"")).unwrap_err();
        assert!(err.to_string().contains("pin"), "{err}");
    }

    #[test]
    fn environment_overrides_win() {
        let config = Config::parse(MINIMAL, Path::new("/c/n.toml"), |var| match var {
            "COFFER_LISTEN" => Some("127.0.0.1:9999".into()),
            "COFFER_HSM_TOKEN_LABEL" => Some("other".into()),
            "COFFER_NODE_ID" => Some("7".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.hsm.token_label, "other");
        assert_eq!(config.node_id, NodeId(7));
    }

    #[test]
    fn rules_are_named() {
        let err = parse(&MINIMAL.replace("pin-file = \"pin\"", "")).unwrap_err();
        assert!(err.to_string().contains("pin-file or pin-env"), "{err}");
        let err = parse(&format!("max-value-bytes = 0\n{MINIMAL}")).unwrap_err();
        assert!(err.to_string().contains("max-value-bytes"), "{err}");
        let err = parse(&format!("{MINIMAL}[raft]\nheartbeat-interval = \"1s\"\n")).unwrap_err();
        assert!(err.to_string().contains("heartbeat-interval <"), "{err}");
    }

    #[test]
    fn audit_is_on_by_default_and_its_settings_name_their_rules() {
        let audit = parse(MINIMAL).unwrap().audit.unwrap();
        assert_eq!(audit.spool, PathBuf::from("/etc/coffer/data/audit.log"));
        assert_eq!(audit.sync, crate::audit::spool::Sync::Always);
        let custom = format!(
            "{MINIMAL}[audit]\nsync = \"10ms\"\n[[audit.sink]]\nname = \"siem\"\naddress = \"siem.internal:6514\"\n"
        );
        let audit = parse(&custom).unwrap().audit.unwrap();
        assert_eq!(audit.sync, crate::audit::spool::Sync::Within(Duration::from_millis(10)));
        assert_eq!(audit.sinks[0].timeout, Duration::from_secs(5));
        assert!(parse(&format!("{MINIMAL}[audit]\nenabled = false\n")).unwrap().audit.is_none());
        for (bad, rule) in [
            ("sync = \"5s\"", "audit.sync"),
            ("rotate-bytes = 10", "rotate-bytes"),
            ("[[audit.sink]]\nname = \"Bad Name\"\naddress = \"a:1\"", "audit.sink name"),
            ("[[audit.sink]]\nname = \"s\"\naddress = \"nowhere\"", "not host:port"),
        ] {
            let err = parse(&format!("{MINIMAL}[audit]\n{bad}\n")).unwrap_err();
            assert!(err.to_string().contains(rule), "{bad}: {err}");
        }
    }

    #[test]
    fn tls_is_on_unless_the_config_says_off() {
        assert_eq!(parse(MINIMAL).unwrap().tls, Tls::Off);
        let err = parse(&MINIMAL.replace("tls = \"off\"\n", "")).unwrap_err();
        assert!(err.to_string().contains("no TLS configured"), "{err}");
        let err = parse(&MINIMAL.replace("tls = \"off\"", "tls = \"no\"")).unwrap_err();
        assert!(err.to_string().contains("only word tls takes"), "{err}");
        let files =
            MINIMAL.replace("tls = \"off\"\n", "") + "[tls]\ncert = \"n.crt\"\nkey = \"n.key\"\nca = \"ca.crt\"\n";
        let Tls::On(on) = parse(&files).unwrap().tls else { panic!("TLS is on") };
        assert_eq!((on.cert, on.ca), (PathBuf::from("/etc/coffer/n.crt"), Some(PathBuf::from("/etc/coffer/ca.crt"))));
        assert_eq!(on.client_certs, coffer_tls::ClientCerts::Optional);
        let err = parse(&(files.clone() + "client-certs = \"maybe\"\n")).unwrap_err();
        assert!(err.to_string().contains("client-certs"), "{err}");
        let err = parse(&files.replace("ca = \"ca.crt\"\n", "")).unwrap_err();
        assert!(err.to_string().contains("ca"), "{err}");
    }
}
