// Hot path: every write (propose, forwarding) and read (read_barrier).
//! A running Coffer node: the HSM, the store, Raft and the keyring, and how they start.
//!
//! Start-up order, each step refusing to go on when it fails:
//! 1. open the store;
//! 2. open the HSM (log in, find and check the root key, compute its KCV), and if the store
//!    records a cluster, compare its root KCV with the token's;
//! 3. start Raft with the gRPC transport.
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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use coffer_hsm::{Hsm, HsmError, Key256};
use coffer_proto::raft::v1::{Envelope, ReadIndexRequest};
use coffer_raft::{
    ClusterRecord, Coalescer, Command, GrpcNetwork, KeyringRecord, LeaderContact, LocalMetrics, LogStore, PeerChannels,
    Quiet, Raft, ReadRounds, Rejection, Response, StateMachine, StateReader, Store,
};
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::OnceCell;

use crate::batch::Batcher;
use crate::config::Config;
use crate::envelope::Keyring;
use crate::error::Error;
use crate::keys::KeyCache;

/// How long `init` waits for this node to lead its new single-node cluster.
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// How long a follower waits to apply up to a leader's read index.
const READ_INDEX_WAIT: Duration = Duration::from_secs(5);

/// A started node: what every request handler needs.
pub struct Node {
    pub(crate) config: Config,
    pub(crate) raft: Raft,
    pub(crate) reader: StateReader,
    pub(crate) hsm: Hsm,
    pub(crate) channels: PeerChannels,
    /// The address other nodes reach this one at.
    pub(crate) advertise: String,
    /// When a leader was last heard from (followers); bounds bounded-staleness reads.
    pub(crate) contact: Arc<LeaderContact>,
    /// Named keys (Keys service), unwrapped on first use.
    pub(crate) keys: KeyCache,
    /// Set while this node, as leader, hands leadership off: writes and reads wait it out.
    pub(crate) quiet: Arc<Quiet>,
    /// Read-index rounds shared by concurrent linearizable reads, as leader.
    pub(crate) reads: Arc<ReadRounds>,
    /// `ReadIndex` requests to the leader shared by concurrent linearizable reads, as follower.
    follower_reads: Coalescer<Result<u64, tonic::Status>>,
    /// Gathers concurrent writes into one Raft entry.
    batcher: Batcher,
    ready: OnceCell<Ready>,
}

/// What a node knows once it has seen its cluster's record.
pub(crate) struct Ready {
    pub(crate) keyring: Keyring,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("node_id", &self.config.node_id).field("advertise", &self.advertise).finish()
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
    pub async fn start(config: Config, advertise: String) -> Result<Arc<Node>, Error> {
        let store = Store::open(&config.data_dir)?;
        let reader = StateReader::new(store.clone());
        let member = reader.cluster()?;
        let hsm = open_hsm(&config, member.is_some()).await?;
        tracing::info!(kcv = %hsm.kcv(), "HSM root key found");
        if let Some(cluster) = member {
            check_kcv(&cluster, &hsm)?;
        }

        let raft_config = openraft::Config {
            cluster_name: "coffer".into(),
            heartbeat_interval: duration_ms(config.raft.heartbeat_interval),
            election_timeout_min: duration_ms(config.raft.election_timeout_min),
            election_timeout_max: duration_ms(config.raft.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.raft.snapshot_after_logs),
            max_in_snapshot_log_to_keep: config.raft.snapshot_after_logs.min(1000),
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Internal(Box::new(e)))?;
        let channels = PeerChannels::with_dial_via(config.raft.dial_via.clone());
        let metrics = LocalMetrics::default();
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            GrpcNetwork::new(channels.clone(), metrics.clone()),
            LogStore::new(store.clone()),
            StateMachine::new(store),
        )
        .await
        .map_err(|e| Error::Internal(Box::new(e)))?;
        let _ = metrics.set(raft.metrics());
        let contact = Arc::default();
        let keys = KeyCache::new(config.key_cache_entries);
        let quiet = Arc::default();
        let node = Arc::new_cyclic(|weak| Node {
            config,
            raft,
            reader,
            hsm,
            channels,
            advertise,
            contact,
            keys,
            quiet,
            reads: Arc::default(),
            follower_reads: Coalescer::default(),
            batcher: Batcher::start(weak.clone()),
            ready: OnceCell::new(),
        });
        if node.reader.cluster()?.is_some() {
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
    /// `Unavailable` while the node has not seen its cluster's record; `KcvMismatch`; HSM failures.
    pub(crate) async fn ready(&self) -> Result<&Ready, Error> {
        self.ready
            .get_or_try_init(|| async {
                let Some(cluster) = self.reader.cluster()? else { return Err(not_initialised()) };
                check_kcv(&cluster, &self.hsm)?;
                let mut keys = Vec::new();
                for record in self.reader.keyrings()? {
                    keys.push((record.version, self.hsm.unwrap(&record.wrapped).await?));
                }
                let keyring = Keyring::new(keys)?;
                tracing::info!(cluster_id = %cluster.cluster_id, keyring = ?keyring, "node ready");
                Ok(Ready { keyring })
            })
            .await
    }

    /// Makes this empty node the first voter of a new cluster and records the cluster.
    ///
    /// # Errors
    /// `AlreadyInitialized` when the node is part of a cluster; Raft or HSM failures.
    pub async fn init_cluster(&self) -> Result<ClusterRecord, Error> {
        if self.raft.is_initialized().await.map_err(|e| Error::Internal(Box::new(e)))? {
            return Err(Error::AlreadyInitialized);
        }
        let members = BTreeMap::from([(self.config.node_id, BasicNode { addr: self.advertise.clone() })]);
        self.raft.initialize(members).await.map_err(|e| Error::Internal(Box::new(e)))?;
        self.raft
            .wait(Some(LEADER_WAIT))
            .current_leader(self.config.node_id, "init")
            .await
            .map_err(|e| Error::Unavailable { reason: format!("this node did not become leader: {e}") })?;
        let cluster = init_cluster(&self.raft, &self.hsm).await?;
        self.ready().await?;
        Ok(cluster)
    }

    /// Proposes a command through Raft and returns what applying it produced.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when there is no leader to take it (retryable).
    /// Concurrent commands share one Raft entry (see [`crate::batch`]). A follower forwards the
    /// command, or its batch, to the leader. The wait is bounded by `write-timeout`: a
    /// write that is not committed by then (no quorum) is reported `UNAVAILABLE`, and may still
    /// be applied later, which is what request ids are for.
    pub(crate) async fn propose(&self, command: Command) -> Result<Response, Error> {
        let timeout = self.config.write_timeout;
        match tokio::time::timeout(timeout, self.batcher.propose(command)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Unavailable {
                reason: format!(
                    "the write was not committed within {} (no quorum?); it may still be applied: \
                     retry with the same request_id",
                    humantime::format_duration(timeout)
                ),
            }),
        }
    }

    pub(crate) async fn propose_unbounded(&self, command: Command) -> Result<Response, Error> {
        self.quiet.wait().await;
        if let Some(age) =
            coffer_raft::leading_without_quorum(&self.raft, coffer_raft::quorum_loss_threshold(&self.raft))
        {
            return Err(Error::Unavailable {
                reason: format!(
                    "this node leads but no quorum has acknowledged it for {} ms: it is cut off from the majority; \
                     retry against another node",
                    age.as_millis()
                ),
            });
        }
        // Leader or not, from the metrics: no copy of the command is kept to retry with, and a
        // follower does not queue it through its own Raft core only to be told where to send it.
        let Some((_, leader)) = self.leader_elsewhere()? else {
            return match self.raft.client_write(command).await {
                Ok(written) => Ok(written.data),
                // Leadership moved between the metrics and the write. Not forwarded: the entry may
                // have been appended here and may still commit under the new leader.
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(Error::Unavailable {
                    reason: format!(
                        "leadership moved (leader now: {}) while the write was proposed; it may still be applied: \
                         retry with the same request_id",
                        f.leader_id.map_or_else(|| "unknown".to_owned(), |id| format!("node {id}"))
                    ),
                }),
                Err(RaftError::APIError(e @ ClientWriteError::ChangeMembershipError(_))) => {
                    Err(Error::Internal(Box::new(e)))
                }
                Err(RaftError::Fatal(f)) => Err(Error::Unavailable { reason: format!("raft has stopped: {f}") }),
            };
        };
        let mut client = self.channels.client(&leader.addr).map_err(|e| Error::Internal(Box::new(e)))?;
        let payload = postcard::to_allocvec(&command).map_err(|e| Error::Internal(Box::new(e)))?;
        let reply = client
            .client_write(Envelope { payload, quorum_ack_age_ms: None })
            .await
            .map_err(|s| forward_failed(&leader.addr, &s))?;
        postcard::from_bytes(&reply.into_inner().payload).map_err(|e| Error::Internal(Box::new(e)))
    }

    /// Who leads, as this node's Raft metrics say: `None` when this node does, else the leader's
    /// id and address.
    ///
    /// # Errors
    /// `Unavailable` when no leader is known (an election, no quorum) or its address is not.
    pub(crate) fn leader_elsewhere(&self) -> Result<Option<(u64, BasicNode)>, Error> {
        let receiver = self.raft.metrics();
        let metrics = receiver.borrow();
        match metrics.current_leader {
            Some(id) if id == metrics.id => Ok(None),
            Some(id) => {
                let node = metrics.membership_config.membership().get_node(&id).cloned().ok_or_else(no_leader)?;
                Ok(Some((id, node)))
            }
            None => Err(no_leader()),
        }
    }

    /// Waits until this node may serve a linearizable read of its local state.
    ///
    /// # Errors
    /// [`Error::Unavailable`] when leadership cannot be confirmed.
    /// On the leader, openraft confirms leadership with a quorum and waits for the read index to be
    /// applied. A follower asks the leader for a read index, then waits to apply up to it.
    pub(crate) async fn linearizable(&self) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + READ_INDEX_WAIT;
        // Long enough for one election to finish.
        let mut election_wait = self.config.raft.election_timeout_max * 2;
        self.quiet.wait().await;
        let leader = loop {
            match self.leader_read().await {
                Ok(()) => return Ok(()),
                Err(NotLeader(Some(leader))) => break leader,
                Err(NotLeader(None)) => {
                    let metrics = self.raft.metrics().borrow().clone();
                    // No leader address yet: an election is under way, or this node is catching up
                    // (a restarted or wiped member learns the leader's id before the membership
                    // entry with its address). Wait a little for either to settle.
                    let settling = metrics.current_leader.is_some() || election_wait > Duration::ZERO;
                    if settling && tokio::time::Instant::now() < deadline {
                        let step = Duration::from_millis(20);
                        election_wait = election_wait.saturating_sub(step);
                        tokio::time::sleep(step).await;
                        continue;
                    }
                    if metrics.membership_config.membership().voter_ids().next().is_none() {
                        return Err(not_initialised());
                    }
                    return Err(no_leader());
                }
                Err(Other(e)) => return Err(e),
            }
        };
        let client = self.channels.client(&leader.addr).map_err(|e| Error::Internal(Box::new(e)))?;
        let index = self
            .follower_reads
            .run(|| {
                let mut client = client.clone();
                async move { client.read_index(ReadIndexRequest {}).await.map(|r| r.into_inner().index) }
            })
            .await
            .map_err(|s| forward_failed(&leader.addr, &s))?;
        self.raft
            .wait(Some(READ_INDEX_WAIT))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map_err(|e| Error::Unavailable { reason: format!("this node did not catch up to the read index: {e}") })?;
        Ok(())
    }

    /// Whether this node may serve a read from local state that is at most `max` stale: the leader
    /// while a quorum has acknowledged it within `max`; a follower while it has applied the commit
    /// index of an AppendEntries received within `max` (hearing from the leader is not enough: a
    /// restarted follower hears heartbeats before it has caught up).
    ///
    /// # Errors
    /// [`Error::Unavailable`] naming how stale the node is.
    pub(crate) fn fresh_within(&self, max: Duration) -> Result<(), Error> {
        // On every Keys call: read the few fields needed under the watch's read guard instead of
        // cloning the whole metrics (its replication map allocates), and drop the guard at once.
        let (is_leader, sole_voter, quorum_ack_ms, applied) = {
            let receiver = self.raft.metrics();
            let m = receiver.borrow();
            (
                m.state == openraft::ServerState::Leader,
                m.membership_config.membership().voter_ids().eq([self.config.node_id]),
                m.millis_since_quorum_ack,
                m.last_applied.map(|l| l.index),
            )
        };
        let staleness = if is_leader && sole_voter {
            // A single-node cluster is its own quorum.
            Some(Duration::ZERO)
        } else if is_leader {
            quorum_ack_ms.map(Duration::from_millis)
        } else {
            self.contact.since(applied)
        };
        match staleness {
            Some(s) if s <= max => Ok(()),
            Some(s) => Err(Error::Unavailable {
                reason: format!(
                    "this node last heard from the {} {} ago, more than the {} max_staleness asked for",
                    if is_leader { "quorum" } else { "leader" },
                    humantime::format_duration(Duration::from_millis(u64::try_from(s.as_millis()).unwrap_or(u64::MAX))),
                    humantime::format_duration(max)
                ),
            }),
            None => Err(Error::Unavailable { reason: "this node has not heard from a leader since it started".into() }),
        }
    }

    /// The barrier before a read: linearizable by default, or bounded staleness when asked; then
    /// the keyring, which exists once the cluster record has been applied here.
    ///
    /// # Errors
    /// `Unavailable` when the read cannot be served as asked.
    pub(crate) async fn read_barrier(&self, max_staleness: Option<Duration>) -> Result<&Ready, Error> {
        match max_staleness {
            Some(max) => self.fresh_within(max)?,
            None => self.linearizable().await?,
        }
        self.ready().await
    }

    /// Stops Raft. Requests still in flight fail with `UNAVAILABLE`.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not shut down cleanly");
        }
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

/// Why a local linearizable read could not be served.
enum ReadRefusal {
    /// This node is not the leader; the leader, if known.
    NotLeader(Option<BasicNode>),
    /// Anything else.
    Other(Error),
}
use ReadRefusal::{NotLeader, Other};

impl Node {
    /// A linearizable read on the leader: a read-index round shared with concurrent reads (see
    /// `coffer_raft::Coalescer`), then waiting until the read index is applied.
    async fn leader_read(&self) -> Result<(), ReadRefusal> {
        let raft = &self.raft;
        match self.reads.run(|| raft.get_read_log_id()).await {
            Ok((read, applied)) => {
                let index = read.map(|l| l.index);
                if index > applied.map(|l| l.index) {
                    raft.wait(Some(READ_INDEX_WAIT)).applied_index_at_least(index, "read index").await.map_err(
                        |e| {
                            Other(Error::Unavailable {
                                reason: format!("the leader did not apply its read index: {e}"),
                            })
                        },
                    )?;
                }
                Ok(())
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(NotLeader(f.leader_node)),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => Err(Other(Error::Unavailable {
                reason: format!("no quorum: the leader cannot confirm its leadership ({q})"),
            })),
            Err(RaftError::Fatal(f)) => Err(Other(Error::Unavailable { reason: format!("raft has stopped: {f}") })),
        }
    }
}

fn not_initialised() -> Error {
    Error::Unavailable {
        reason: "this node is not part of an initialised cluster yet (run `coffer operator init` on the first node, \
                 `coffer operator join --peer ADDR` on the others)"
            .into(),
    }
}

fn no_leader() -> Error {
    Error::Unavailable {
        reason: "no leader is known: an election is under way, or the cluster has no quorum; retry".into(),
    }
}

/// A forwarded call to the leader failed: the leader went away, or refused.
fn forward_failed(addr: &str, status: &tonic::Status) -> Error {
    Error::Unavailable {
        reason: format!("the leader at {addr} did not take the request ({}); retry", status.message()),
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
    match raft.client_write(command).await.map_err(|e| Error::Internal(Box::new(e)))?.data {
        Response::Applied => {
            tracing::info!(cluster_id = %cluster.cluster_id, kcv = %cluster.root_kcv, "cluster initialised");
            Ok(cluster)
        }
        Response::Rejected(Rejection::AlreadyInitialized) => Err(Error::AlreadyInitialized),
        other => Err(Error::Internal(format!("unexpected response to InitCluster: {other:?}").into())),
    }
}

/// Opens the HSM; a cluster member waits out an unreachable HSM (see the module documentation).
async fn open_hsm(config: &Config, member: bool) -> Result<Hsm, Error> {
    let mut attempts = 0u64;
    loop {
        // Blocking PKCS#11 login; needs the multi-threaded runtime.
        match tokio::task::block_in_place(|| Hsm::open(&config.hsm)) {
            Ok(hsm) => return Ok(hsm),
            Err(e @ (HsmError::Unavailable { .. } | HsmError::Pkcs11(_) | HsmError::TokenNotFound { .. }))
                if member =>
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

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
