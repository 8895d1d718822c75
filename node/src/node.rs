//! A running Coffer node: the HSM, the store, Raft and the keyring, and how they start.
//!
//! Start-up order, each step refusing to go on when it fails:
//! 1. open the HSM (log in, find and check the root key, compute its KCV);
//! 2. open the store, and if it records a cluster, compare its root KCV with the token's;
//! 3. start Raft; a node whose store is empty bootstraps a single-voter cluster;
//! 4. once leader and caught up, initialise the cluster if needed (a random cluster id, the KCV
//!    and a first keyring key wrapped by the root key), then check the KCV again;
//! 5. unwrap every keyring key through the HSM into memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_hsm::{Hsm, Key256};
use coffer_raft::{
    ClusterRecord, Command, KeyringRecord, LogStore, Raft, Rejection, Response, SingleNodeNetwork, StateMachine,
    StateReader, Store,
};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::Config;
use crate::envelope::Keyring;
use crate::error::Error;

/// How long start-up waits for this node to lead its single-node cluster.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// A started node: what every request handler needs.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) raft: Raft,
    pub(crate) reader: StateReader,
    pub(crate) keyring: Keyring,
    pub(crate) hsm: Hsm,
    pub(crate) cluster: ClusterRecord,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.config.node_id)
            .field("cluster", &self.cluster.cluster_id)
            .finish()
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
    pub async fn start(config: Config) -> Result<Arc<Node>, Error> {
        // Blocking PKCS#11 login, once at start-up; needs the multi-threaded runtime.
        let hsm = tokio::task::block_in_place(|| Hsm::open(&config.hsm))?;
        tracing::info!(kcv = %hsm.kcv(), "HSM root key found");

        let store = Store::open(&config.data_dir)?;
        let reader = StateReader::new(store.clone());
        if let Some(cluster) = reader.cluster()? {
            check_kcv(&cluster, &hsm)?;
        }

        let raft_config = openraft::Config {
            cluster_name: "coffer".into(),
            heartbeat_interval: duration_ms(config.raft.heartbeat_interval),
            election_timeout_min: duration_ms(config.raft.election_timeout_min),
            election_timeout_max: duration_ms(config.raft.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.raft.snapshot_after_logs),
            max_in_snapshot_log_to_keep: 1000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Raft(Box::new(e)))?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            SingleNodeNetwork,
            LogStore::new(store.clone()),
            StateMachine::new(store),
        )
        .await
        .map_err(|e| Error::Raft(Box::new(e)))?;

        if !raft.is_initialized().await.map_err(|e| Error::Raft(Box::new(e)))? {
            let members = BTreeMap::from([(config.node_id, BasicNode { addr: config.listen.to_string() })]);
            raft.initialize(members).await.map_err(|e| Error::Raft(Box::new(e)))?;
            tracing::info!(node_id = config.node_id, "bootstrapped a single-node cluster");
        }
        raft.wait(Some(LEADER_WAIT))
            .current_leader(config.node_id, "start-up")
            .await
            .map_err(|e| Error::Unavailable { reason: format!("this node did not become leader: {e}") })?;
        linearizable(&raft).await?;

        let cluster = match reader.cluster()? {
            Some(cluster) => cluster,
            None => init_cluster(&raft, &hsm).await?,
        };
        check_kcv(&cluster, &hsm)?;

        let mut keys = Vec::new();
        for record in reader.keyrings()? {
            keys.push((record.version, hsm.unwrap(&record.wrapped).await?));
        }
        let keyring = Keyring::new(keys)?;
        tracing::info!(cluster_id = %cluster.cluster_id, keyring_versions = ?keyring, "node ready");
        Ok(Arc::new(Node { config, raft, reader, keyring, hsm, cluster }))
    }

    /// Proposes a command through Raft and returns what applying it produced.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when there is no leader to take it (retryable).
    pub(crate) async fn propose(&self, command: Command) -> Result<Response, Error> {
        match self.raft.client_write(command).await {
            Ok(written) => Ok(written.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(Error::Unavailable {
                reason: format!("this node is not the leader (leader: {:?}); retry", f.leader_node.map(|n| n.addr)),
            }),
            Err(RaftError::APIError(e @ ClientWriteError::ChangeMembershipError(_))) => Err(Error::Raft(Box::new(e))),
            Err(RaftError::Fatal(f)) => Err(Error::Unavailable { reason: format!("raft has stopped: {f}") }),
        }
    }

    /// Waits until this node may serve a linearizable read of its local state.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when leadership cannot be confirmed.
    pub(crate) async fn linearizable(&self) -> Result<(), Error> {
        linearizable(&self.raft).await
    }

    /// Stops Raft. Requests still in flight fail with `UNAVAILABLE`.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
    }

    /// The cluster this node belongs to.
    pub fn cluster(&self) -> &ClusterRecord {
        &self.cluster
    }

    /// The node's read handle on the state (tests and operator commands).
    pub fn reader(&self) -> &StateReader {
        &self.reader
    }

    /// The HSM handle.
    pub fn hsm(&self) -> &Hsm {
        &self.hsm
    }
}

async fn linearizable(raft: &Raft) -> Result<(), Error> {
    match raft.ensure_linearizable().await {
        Ok(_) => Ok(()),
        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(Error::Unavailable {
            reason: format!("this node is not the leader (leader: {:?}); retry", f.leader_node.map(|n| n.addr)),
        }),
        Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
            Err(Error::Unavailable { reason: format!("no quorum confirms the leader: {q}") })
        }
        Err(RaftError::Fatal(f)) => Err(Error::Unavailable { reason: format!("raft has stopped: {f}") }),
    }
}

async fn init_cluster(raft: &Raft, hsm: &Hsm) -> Result<ClusterRecord, Error> {
    let rng = SystemRandom::new();
    let mut id = [0u8; 16];
    rng.fill(&mut id).map_err(|_| crate::envelope::EnvelopeError::Random)?;
    let key = Key256::random(&rng).map_err(|_| crate::envelope::EnvelopeError::Random)?;
    let at_ms = now_ms();
    let cluster = ClusterRecord { cluster_id: hex::encode(id), root_kcv: hsm.kcv().to_string(), created_at_ms: at_ms };
    let keyring = KeyringRecord { version: 1, wrapped: hsm.wrap(&key).await?, created_at_ms: at_ms };
    let command = Command::InitCluster { cluster: cluster.clone(), keyring };
    match raft.client_write(command).await.map_err(|e| Error::Raft(Box::new(e)))?.data {
        Response::Applied => {
            tracing::info!(cluster_id = %cluster.cluster_id, kcv = %cluster.root_kcv, "cluster initialised");
            Ok(cluster)
        }
        Response::Rejected(Rejection::AlreadyInitialized) => Err(Error::AlreadyInitialized),
        other => Err(Error::Raft(format!("unexpected response to InitCluster: {other:?}").into())),
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
