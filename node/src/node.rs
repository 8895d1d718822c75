// Hot path: every write (propose) and read (read_barrier).
//! A running Coffer node: the HSM, the store, Raft and the keyring, and how they start.
//!
//! Start-up order, each step refusing to go on when it fails:
//! 1. open the store;
//! 2. open the HSM (log in, find and check the root key, compute its KCV), and if the store
//!    records a cluster, compare its root KCV with the token's;
//! 3. start the replica (`coffer_raft::Replica`: Raft, the peer transport, batching).
//!
//! A member whose HSM is unreachable at start (token gone, device down) waits for it, retrying
//! every second, instead of exiting: a supervisor restarting it in a loop gains nothing, and the
//! node joins in as soon as the HSM is back. A new node, or a configuration error (wrong PIN, no
//! root key), still fails at once. Once running, a node needs the HSM only to unwrap its keyring
//! when it first becomes ready and to wrap a new keyring key, so an HSM outage does not stop it.
//!
//! A new node is empty until an operator runs `coffer operator init` on it (a single-voter cluster
//! with a random cluster id, the KCV and a first keyring key wrapped by the root key) or
//! `coffer operator join --peer ADDR` (the leader checks its KCV, adds it as a learner and
//! promotes it). The node becomes *ready* the first time it sees the cluster record in its applied
//! state: it checks the KCV again and unwraps every keyring key through the HSM into memory.
//! Until then, secret requests are `UNAVAILABLE`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_hsm::{Hsm, HsmError, Key256};
use coffer_raft::{
    ClusterRecord, Consistency, InitCluster, InitClusterWithIdentity, KeyringRecord, KeyringVersion, Op, Outcome,
    Rejection, Replica, ReplicaConfig, StateReader, Store, UnixMillis, Write,
};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::OnceCell;

use crate::config::Config;
use crate::envelope::Keyring;
use crate::error::Error;
use crate::keys::KeyCache;

/// A started node: what every request handler needs.
pub struct Node {
    pub(crate) config: Config,
    /// Replication: the only way to change the state or learn about the cluster.
    pub(crate) replica: Replica,
    pub(crate) hsm: Hsm,
    /// Named keys (Keys service), unwrapped on first use.
    pub(crate) keys: KeyCache,
    /// The token-hashing key and the cache of resolved principals.
    pub(crate) auth: crate::auth::Auth,
    /// The audit spool and checkpoint key; `None` when `[audit] enabled = false`.
    pub(crate) audit: Option<Arc<crate::audit::Audit>>,
    ready: OnceCell<Ready>,
}

/// What a node knows once it has seen its cluster's record.
pub(crate) struct Ready {
    pub(crate) keyring: Keyring,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("node_id", &self.config.node_id).finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, as stamped into commands by the proposer.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn check_kcv(cluster: &ClusterRecord, hsm: &Hsm) -> Result<(), Error> {
    let token = hsm.kcv().to_string();
    if cluster.root_kcv != token {
        return Err(Error::KcvMismatch { recorded: cluster.root_kcv.clone(), token });
    }
    Ok(())
}

impl Node {
    /// Starts a node: see the module documentation for the order of steps.
    ///
    /// # Errors
    /// Any failing step: HSM, store, Raft, or a root key that is not the cluster's.
    pub async fn start(config: Config, advertise: coffer_raft::NodeAddrs) -> Result<Arc<Node>, Error> {
        create_private_dir(&config.data_dir)?;
        let store = Store::open(&config.data_dir)?;
        let member = StateReader::new(store.clone()).cluster()?;
        let hsm = open_hsm(&config, if member.is_some() { HsmDown::Wait } else { HsmDown::Fail }).await?;
        tracing::info!(kcv = %hsm.kcv(), "HSM root key found");
        if let Some(cluster) = member {
            check_kcv(&cluster, &hsm)?;
        }
        let replica = Replica::start(
            ReplicaConfig {
                node_id: config.node_id,
                advertise,
                heartbeat_interval: config.raft.heartbeat_interval,
                election_timeout_min: config.raft.election_timeout_min,
                election_timeout_max: config.raft.election_timeout_max,
                snapshot_after_logs: config.raft.snapshot_after_logs,
                dial_via: config.raft.dial_via.clone(),
                write_timeout: config.write_timeout,
                peer_tls: peer_tls(&config)?,
                authenticate_peers: matches!(config.tls, crate::config::Tls::On(_)),
            },
            store,
        )
        .await?;
        let keys = KeyCache::new(config.key_cache_entries);
        let auth = crate::auth::Auth::new(&config.auth);
        let audit = match &config.audit {
            Some(audit) => Some(crate::audit::Audit::open(audit, &hsm, config.node_id.0).await?),
            None => None,
        };
        let node = Arc::new(Node { config, replica, hsm, keys, auth, audit, ready: OnceCell::new() });
        if node.reader().cluster()?.is_some() {
            node.ready().await?;
        } else {
            tracing::info!(
                "this node is not part of a cluster yet: run `coffer operator init` or `coffer operator join`"
            );
        }
        Ok(node)
    }

    /// The cluster record and keyring, loaded once the cluster record has been applied here.
    ///
    /// # Errors
    /// `NotInitialized` while the node has not seen its cluster's record; `KcvMismatch`; HSM failures.
    pub(crate) async fn ready(&self) -> Result<&Ready, Error> {
        self.ready
            .get_or_try_init(|| async {
                let Some(cluster) = self.reader().cluster()? else {
                    return Err(coffer_raft::Error::NotInitialized.into());
                };
                check_kcv(&cluster, &self.hsm)?;
                let mut keys = Vec::new();
                for record in self.reader().keyrings()? {
                    keys.push((record.version, self.hsm.unwrap(&record.wrapped).await?));
                }
                let keyring = Keyring::new(keys)?;
                tracing::info!(cluster_id = %cluster.cluster_id, keyring = ?keyring, "node ready");
                Ok(Ready { keyring })
            })
            .await
    }

    /// Makes this empty node the first voter of a new cluster and records, in one entry, the
    /// cluster, its first keyring key and its identity (the token-hashing key and the root
    /// token). Returns the root token: the only time it is ever shown.
    ///
    /// # Errors
    /// `AlreadyInitialized` when the node is part of a cluster; Raft or HSM failures.
    pub async fn init_cluster(&self) -> Result<(ClusterRecord, zeroize::Zeroizing<String>), Error> {
        if self.reader().cluster()?.is_some() {
            return Err(coffer_raft::Error::AlreadyInitialized.into());
        }
        // Everything that can fail on its own (randomness, the HSM, the keyring) before Raft is
        // initialised: a failure then leaves the node as it was.
        let rng = SystemRandom::new();
        let mut id = [0u8; 16];
        rng.fill(&mut id).map_err(|_| crate::envelope::EnvelopeError::Random)?;
        let key = Key256::random(&rng).map_err(|_| crate::envelope::EnvelopeError::Random)?;
        let at_ms = UnixMillis::now();
        let cluster =
            ClusterRecord { cluster_id: hex::encode(id), root_kcv: self.hsm.kcv().to_string(), created_at_ms: at_ms };
        let keyring =
            KeyringRecord { version: KeyringVersion(1), wrapped: self.hsm.wrap(&key).await?, created_at_ms: at_ms };
        let first = Keyring::new(vec![(KeyringVersion(1), key)])?;
        let crate::auth::ops::NewIdentity { identity, root_token: root, token_key } =
            crate::auth::ops::new_identity(self, &first)?;
        let init = InitClusterWithIdentity { cluster: InitCluster { cluster: cluster.clone(), keyring }, identity };
        // A node whose Raft was initialised by an init that failed after (a timeout, a full
        // queue) has no cluster record yet: proposing again finishes it.
        match self.replica.initialize().await {
            Ok(()) | Err(coffer_raft::Error::AlreadyInitialized) => {}
            Err(e) => return Err(e.into()),
        }
        match self.propose(Write::new(Op::InitClusterWithIdentity(init))).await? {
            Outcome::Applied => {
                self.auth.set_hash_key(&token_key);
                tracing::info!(cluster_id = %cluster.cluster_id, kcv = %cluster.root_kcv, "cluster initialised; root token issued to the caller of init");
            }
            Outcome::Rejected(Rejection::AlreadyInitialized) => {
                return Err(coffer_raft::Error::AlreadyInitialized.into())
            }
            other => return Err(Error::Unexpected { what: "InitCluster", outcome: Box::new(other) }),
        }
        self.ready().await?;
        Ok((cluster, root))
    }

    /// Proposes a write through the replica and returns its outcome once applied here.
    ///
    /// # Errors
    /// The replica's: retryable ones when no leader can take it or the outcome is unknown.
    pub(crate) async fn propose(&self, write: Write) -> Result<Outcome, Error> {
        Ok(self.replica.write(write).await?)
    }

    /// Whether this node may serve a read from local state at most `max` stale.
    ///
    /// # Errors
    /// `Stale` or `NeverHeardFromLeader`, from the replica.
    pub(crate) fn fresh_within(&self, max: Duration) -> Result<(), Error> {
        Ok(self.replica.fresh_within(max)?)
    }

    /// The barrier before a read: linearizable by default, or bounded staleness when asked; then
    /// the keyring, which exists once the cluster record has been applied here.
    ///
    /// # Errors
    /// The replica's barrier errors (retryable); `NotInitialized`.
    pub(crate) async fn read_barrier(&self, max_staleness: Option<Duration>) -> Result<&Ready, Error> {
        let consistency = max_staleness.map_or(Consistency::Linearizable, Consistency::BoundedStaleness);
        self.replica.read_barrier(consistency).await?;
        self.ready().await
    }

    /// Stops replication. Requests still in flight fail with `UNAVAILABLE`.
    pub async fn shutdown(&self) {
        if let Some(audit) = &self.audit {
            audit.close().await;
        }
        self.replica.shutdown().await;
    }

    /// The node's read handle on the state (tests and operator commands).
    pub fn reader(&self) -> &StateReader {
        self.replica.reader()
    }

    /// The HSM handle.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }
}

/// Creates the data directory `0700` if it is missing (an existing one keeps its mode).
fn create_private_dir(dir: &std::path::Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| Error::Serve(Box::new(e)))
}

/// How this node dials its peers: with its own certificate, trusting the cluster's CA.
pub(crate) fn peer_tls(config: &Config) -> Result<Option<tonic::transport::ClientTlsConfig>, Error> {
    let crate::config::Tls::On(files) = &config.tls else { return Ok(None) };
    let Some(ca) = files.ca.clone() else { return Ok(None) };
    let identity = Some((files.cert.clone(), files.key.clone()));
    Ok(Some(coffer_tls::client_config(&coffer_tls::ClientFiles { ca, identity })?))
}

/// What [`open_hsm`] does while the HSM is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HsmDown {
    /// Retry every second (a cluster member: see the module documentation).
    Wait,
    /// Return the error (a node that is not a member yet).
    Fail,
}

/// Opens the HSM, waiting out an unreachable one when told to.
async fn open_hsm(config: &Config, when_down: HsmDown) -> Result<Hsm, Error> {
    let mut attempts = 0u64;
    loop {
        // Blocking PKCS#11 login; needs the multi-threaded runtime.
        match tokio::task::block_in_place(|| Hsm::open(&config.hsm)) {
            Ok(hsm) => return Ok(hsm),
            Err(e @ (HsmError::Unavailable { .. } | HsmError::Pkcs11(_) | HsmError::TokenNotFound { .. }))
                if when_down == HsmDown::Wait =>
            {
                if attempts.is_multiple_of(10) {
                    tracing::warn!(error = %e, attempts, "the HSM is unreachable; this member waits for it, retrying every second");
                }
                attempts += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
