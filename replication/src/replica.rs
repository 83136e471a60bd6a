//! A running replica: the openraft node, its stores and its RPC listener, behind the small
//! API the metadata service uses.
//!
//! ```text
//!  Replica::start --> bind raft listener --> open log store + state machine adaptor
//!                 --> openraft::Raft::new --> serve raft RPCs --> bootstrap (see membership.rs)
//!  propose(cmd) ----> Raft::client_write --> (commit + apply) --> response bytes
//!  ensure_leader ---> Raft::ensure_linearizable (ReadIndex: a quorum confirms leadership)
//!  sync_log -------> LogStore::sync (waits for the log's fsync: a power-loss barrier)
//!  add_peer -------> add_learner --> wait until it caught up --> change_membership (+voter)
//!  remove_peer ----> change_membership (-voter / -learner)
//! ```

mod election;
mod membership;

pub(crate) use election::Contact;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::ChangeMembershipError;
use openraft::error::CheckIsLeaderError;
use openraft::error::ClientWriteError;
use openraft::error::Fatal;
use openraft::error::InitializeError;
use openraft::error::RaftError;
use openraft::ServerState;
use openraft::SnapshotPolicy;
use serde::Deserialize;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::log_store::LogStore;
use crate::log_store::LogStoreError;
use crate::log_store::LOG_DIR;
use crate::network::NetworkFactory;
use crate::network::NetworkFaults;
use crate::state_machine::SmError;
use crate::state_machine::SmStore;
use crate::types::Raft;
use crate::Command;
use crate::Node;
use crate::StateMachine;

/// Configuration of one replica. Build it with [`ReplicaConfig::new`] and adjust fields.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This replica's id, stable across restarts and unique in the group.
    pub id: u64,
    /// Directory of the raft log (the `log/` segment directory) and the snapshot file
    /// (`snapshot.bin`).
    pub dir: PathBuf,
    /// Address of the raft RPC listener (port 0 allowed; see [`Replica::raft_addr`]). With
    /// peers it must be an address they can reach: it is recorded in the membership.
    pub raft_listen: SocketAddr,
    /// This replica's metadata client address, handed out in `NotLeader` redirects.
    pub client_addr: String,
    /// The other initial members of the group; empty for a single-node group.
    pub peers: BTreeMap<u64, Node>,
    /// Whether this replica may form a new group (with itself and `peers`) if it finds none.
    ///
    /// A replica forms a group only if this is true, its own log is empty and it never voted,
    /// its id is the lowest of itself and its peers, and every peer answers that it belongs to
    /// no group either. Otherwise it waits to be added by a leader ([`Replica::add_peer`]) or,
    /// if it is still a member, to be brought up to date by the leader. Pass `false` for a
    /// replica joining an existing group. Default `true`.
    pub bootstrap: bool,
    /// How long [`Replica::add_peer`] waits for the new member to catch up (possibly by a
    /// snapshot) before promoting it to voter.
    pub catch_up_timeout: Duration,
    /// How often the leader heartbeats; also the deadline of an AppendEntries call.
    pub heartbeat_interval: Duration,
    /// Election timing. The maximum is also openraft's leader lease: a follower refuses to
    /// vote for anyone else for that long after it heard from the leader. A follower that
    /// heard no leader for the lease plus a random part of (max - min) holds a pre-vote and,
    /// if a majority would vote for it, an election; a failed round is retried after a
    /// random time in this range. The failover time is about the maximum plus half the
    /// difference.
    pub election_timeout: (Duration, Duration),
    /// Deadline of [`Replica::propose`] and [`Replica::ensure_leader`].
    pub op_timeout: Duration,
    /// Build a snapshot once this many entries were applied since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (so slightly lagging followers catch up
    /// from the log rather than by snapshot).
    pub logs_to_keep: u64,
    /// Test hook: decides the fate of every raft RPC this replica sends (loss, delay,
    /// partitions). `None` (the default) in production.
    pub faults: Option<Arc<dyn NetworkFaults>>,
}

impl ReplicaConfig {
    /// A configuration with default timings: heartbeat 150 ms, election timeout 600–1000 ms,
    /// operation deadline 10 s, catch-up deadline 5 min, a snapshot every 20 000 entries
    /// keeping 5 000 behind it; `bootstrap` is true.
    pub fn new(
        id: u64,
        dir: impl Into<PathBuf>,
        raft_listen: SocketAddr,
        client_addr: impl Into<String>,
        peers: BTreeMap<u64, Node>,
    ) -> ReplicaConfig {
        ReplicaConfig {
            id,
            dir: dir.into(),
            raft_listen,
            client_addr: client_addr.into(),
            peers,
            bootstrap: true,
            catch_up_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_millis(150),
            election_timeout: (Duration::from_millis(600), Duration::from_millis(1000)),
            op_timeout: Duration::from_secs(10),
            snapshot_every: 20_000,
            logs_to_keep: 5_000,
            faults: None,
        }
    }

    fn raft_config(&self) -> Result<openraft::Config, ReplicationError> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let config = openraft::Config {
            cluster_name: "rawfs-metadata".to_string(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout.0),
            election_timeout_max: ms(self.election_timeout.1),
            // Per snapshot chunk, including installing the last one into the state machine.
            install_snapshot_timeout: 30_000,
            snapshot_max_chunk_size: 1 << 20,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            replication_lag_threshold: self.snapshot_every.saturating_add(self.logs_to_keep),
            // Elections are started by this crate's timer (see election.rs).
            enable_elect: false,
            ..Default::default()
        };
        Ok(config.validate()?)
    }
}

/// Errors starting or stopping a replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The replica directory cannot be created.
    #[error("replica directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The raft listener cannot be bound or served.
    #[error("cannot listen for raft RPCs on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The raft log cannot be opened.
    #[error(transparent)]
    LogStore(#[from] LogStoreError),
    /// The state machine or the snapshot file cannot be opened.
    #[error(transparent)]
    StateMachine(#[from] SmError),
    /// The timings in [`ReplicaConfig`] are inconsistent.
    #[error("invalid raft configuration: {0}")]
    Config(Box<openraft::ConfigError>),
    /// openraft stopped (for instance on a storage error).
    #[error("raft: {0}")]
    Raft(Box<Fatal<u64>>),
    /// The group could not be formed with the configured members.
    #[error("cannot initialize the group: {0}")]
    Initialize(Box<InitializeError<u64, Node>>),
    /// A start-up or shutdown task panicked.
    #[error("replica task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<openraft::ConfigError> for ReplicationError {
    fn from(e: openraft::ConfigError) -> Self {
        ReplicationError::Config(Box::new(e))
    }
}

impl From<Fatal<u64>> for ReplicationError {
    fn from(e: Fatal<u64>) -> Self {
        ReplicationError::Raft(Box::new(e))
    }
}

/// Why a proposal or a read barrier failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    /// This replica is not the leader; `leader` (if known) is, in `term`.
    #[error("not the leader (leader: {leader:?}, term {term})")]
    NotLeader {
        /// The leader's id, if this replica knows one.
        leader: Option<u64>,
        /// The leader's addresses (its `client_addr` is where clients should go).
        leader_node: Option<Node>,
        /// The newest term this replica knows.
        term: u64,
    },
    /// No quorum, a deadline passed, leadership was lost mid-way or the replica is stopping.
    /// For a proposal the command may or may not have been applied.
    #[error("replication unavailable: {reason}")]
    Unavailable {
        /// What went wrong, for the logs.
        reason: String,
    },
    /// The replica's storage failed; it has stopped.
    #[error("replica failed: {reason}")]
    Fatal {
        /// What went wrong, for the logs.
        reason: String,
    },
    /// The request makes no sense for the group as it is (a membership change that would
    /// leave no voter, a member re-added under another address); retrying does not help.
    #[error("rejected: {reason}")]
    Rejected {
        /// Why.
        reason: String,
    },
}

impl ProposeError {
    /// Whether the caller may retry (here after a pause, or on the leader for `NotLeader`).
    /// Note that a retried proposal may be applied twice if the first one was applied after
    /// all: commands should be idempotent or carry a request id the state machine dedups.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            ProposeError::Fatal { .. } | ProposeError::Rejected { .. }
        )
    }
}

/// Role of a replica in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepts proposals and replicates them.
    Leader,
    /// A voter following the leader.
    Follower,
    /// A voter campaigning for leadership.
    Candidate,
    /// A non-voting member that replicates the log.
    Learner,
    /// The replica is stopping or stopped.
    Shutdown,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        };
        f.write_str(s)
    }
}

/// A point-in-time view of a replica (from openraft's metrics; no I/O).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    /// This replica's id.
    pub id: u64,
    /// Its current role.
    pub role: Role,
    /// The newest term it knows.
    pub term: u64,
    /// The leader it knows of, if any.
    pub leader: Option<u64>,
    /// That leader's addresses.
    pub leader_node: Option<Node>,
    /// Index of the last entry applied to the state machine (0: none).
    pub last_applied: u64,
    /// Index of the last entry in the log (0: none).
    pub last_log_index: u64,
    /// Index of the last entry covered by the latest snapshot, if any.
    pub snapshot_index: Option<u64>,
    /// Index of the last entry purged from the log, if any.
    pub purged_index: Option<u64>,
    /// Every member (voters and learners) with its addresses.
    pub members: BTreeMap<u64, Node>,
    /// The members that vote (the others in `members` are learners). During a membership
    /// change (joint consensus) the voters of both configurations.
    pub voters: BTreeSet<u64>,
    /// On the leader only (empty elsewhere): for each member, the index of the last entry
    /// known to be in its log.
    pub matched: BTreeMap<u64, u64>,
}

/// A running replica. Cheap to clone.
///
/// Call [`Replica::shutdown`] to stop it: dropping the last clone does not stop the raft
/// tasks or the listener.
#[derive(Clone)]
pub struct Replica {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    raft: Raft,
    /// The log store openraft also holds, for [`Replica::sync_log`].
    log: LogStore,
    /// The state machine adaptor openraft also holds, closed at shutdown.
    sm: SmStore,
    raft_addr: SocketAddr,
    op_timeout: Duration,
    catch_up_timeout: Duration,
    server: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The task forming a new group once every peer answered (see [`ReplicaConfig::bootstrap`]).
    bootstrap: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The election timer (see election.rs).
    election: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Leader lease: when the last quorum confirmation started, and in which term.
    lease: std::sync::Mutex<Option<(std::time::Instant, u64)>>,
    /// How long a confirmation stays valid: well under the minimum election timeout, so no
    /// other replica can have been elected meanwhile (followers reset their election timers
    /// on the heartbeats that confirmed us, which were sent after the confirmation started).
    lease_len: Duration,
}

impl Replica {
    /// Binds `cfg.raft_listen` and starts the replica (see [`Replica::start_with_listener`]).
    pub async fn start(
        cfg: ReplicaConfig,
        sm: Arc<dyn StateMachine>,
    ) -> Result<Replica, ReplicationError> {
        let listener = TcpListener::bind(cfg.raft_listen).await.map_err(|source| {
            ReplicationError::Listen {
                addr: cfg.raft_listen,
                source,
            }
        })?;
        Replica::start_with_listener(cfg, listener, sm).await
    }

    /// Starts the replica on an already bound raft listener (`cfg.raft_listen` is ignored).
    ///
    /// Opens the log and the state machine in `cfg.dir`, serves raft RPCs, and forms a new
    /// group if [`ReplicaConfig::bootstrap`] allows it. With peers, forming the group waits
    /// (in the background) until every peer has answered that it belongs to no group.
    pub async fn start_with_listener(
        cfg: ReplicaConfig,
        listener: TcpListener,
        sm: Arc<dyn StateMachine>,
    ) -> Result<Replica, ReplicationError> {
        let raft_addr = listener
            .local_addr()
            .map_err(|source| ReplicationError::Listen {
                addr: cfg.raft_listen,
                source,
            })?;
        let config = Arc::new(cfg.raft_config()?);
        let dir = cfg.dir.clone();
        let (log_store, sm_store) =
            tokio::task::spawn_blocking(move || -> Result<_, ReplicationError> {
                std::fs::create_dir_all(&dir).map_err(|source| ReplicationError::Dir {
                    path: dir.clone(),
                    source,
                })?;
                let log_store = LogStore::open(&dir.join(LOG_DIR))?;
                let sm_store = SmStore::open(sm, &dir)?;
                Ok((log_store, sm_store))
            })
            .await??;

        let log = log_store.clone();
        let sm = sm_store.clone();
        let raft = Raft::new(
            cfg.id,
            config,
            NetworkFactory::new(cfg.id, cfg.faults.clone()),
            log_store,
            sm_store,
        )
        .await?;
        tokio::spawn({
            let (sm, server) = (sm.clone(), raft.server_metrics());
            async move { sm.follow_role(server).await }
        });
        let contact = Arc::new(election::Contact::new());
        // openraft's leader lease is the maximum election timeout.
        let lease = cfg.election_timeout.1;
        let served =
            crate::network::serve(listener, raft.clone(), contact.clone(), log.clone(), lease);
        let server = match served.await {
            Ok(server) => server,
            Err(source) => {
                let _ = raft.shutdown().await;
                return Err(ReplicationError::Listen {
                    addr: raft_addr,
                    source,
                });
            }
        };
        let election = tokio::spawn(election::run(election::Timer {
            raft: raft.clone(),
            id: cfg.id,
            contact,
            timing: election::Timing {
                timeout: cfg.election_timeout,
                lease,
                recheck: cfg.heartbeat_interval,
            },
            log: log.clone(),
            faults: cfg.faults.clone(),
        }));
        let replica = Replica {
            inner: Arc::new(Inner {
                id: cfg.id,
                raft,
                log,
                sm,
                raft_addr,
                op_timeout: cfg.op_timeout,
                catch_up_timeout: cfg.catch_up_timeout,
                server: tokio::sync::Mutex::new(Some(server)),
                bootstrap: std::sync::Mutex::new(None),
                election: std::sync::Mutex::new(Some(election)),
                lease: std::sync::Mutex::new(None),
                lease_len: cfg.election_timeout.0 / 3,
            }),
        };
        if let Err(e) = replica.bootstrap(&cfg).await {
            let _ = replica.shutdown().await;
            return Err(e);
        }
        tracing::info!(id = cfg.id, %raft_addr, "replica started");
        Ok(replica)
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The address the raft RPC listener is actually bound to.
    pub fn raft_addr(&self) -> SocketAddr {
        self.inner.raft_addr
    }

    /// Replicates `cmd`, waits until it is committed and applied here, and returns the state
    /// machine's response. Only the leader accepts proposals.
    pub async fn propose(&self, cmd: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let write = self.inner.raft.client_write(Command(cmd));
        match tokio::time::timeout(self.inner.op_timeout, write).await {
            Err(_) => Err(ProposeError::Unavailable {
                reason: format!(
                    "not committed within {:?}; the command may still be applied",
                    self.inner.op_timeout
                ),
            }),
            Ok(Ok(resp)) => Ok(resp.data.0),
            Ok(Err(e)) => Err(self.write_error(e)),
        }
    }

    fn write_error(&self, e: RaftError<u64, ClientWriteError<u64, Node>>) -> ProposeError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                self.not_leader(f.leader_id, f.leader_node)
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::EmptyMembership(e),
            )) => ProposeError::Rejected {
                reason: e.to_string(),
            },
            // Another change in progress, or the learner removed meanwhile: a retry may work.
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ProposeError::Unavailable {
                    reason: e.to_string(),
                }
            }
            RaftError::Fatal(f) => self.fatal(f),
        }
    }

    /// A power-loss barrier: waits until every entry appended to this replica's log so far
    /// (in particular every proposal that has returned) is fsynced.
    ///
    /// Proposals are acknowledged once written to the log files, before they are fsynced
    /// (see the durability policy in [`crate::log_store`]): they survive a crash of the
    /// process but the last millisecond or so of them may not survive a power loss of the
    /// machine. Callers promising durability to their own clients (a file `fsync`) call this
    /// after their proposals. Fails with [`ProposeError::Fatal`] if an fsync failed and with
    /// [`ProposeError::Unavailable`] after the operation deadline or while stopping.
    pub async fn sync_log(&self) -> Result<(), ProposeError> {
        match tokio::time::timeout(self.inner.op_timeout, self.inner.log.sync()).await {
            Err(_) => Err(ProposeError::Unavailable {
                reason: format!("raft log not synced within {:?}", self.inner.op_timeout),
            }),
            Ok(Ok(())) => Ok(()),
            Ok(Err(LogStoreError::Closed)) => Err(ProposeError::Unavailable {
                reason: "replica stopping".to_string(),
            }),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "raft log sync failed");
                Err(ProposeError::Fatal {
                    reason: e.to_string(),
                })
            }
        }
    }

    /// True if this replica still leads in `term` (a cheap look at the metrics, no I/O).
    fn is_leader_in(&self, term: u64) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        m.current_leader == Some(self.inner.id) && m.current_term == term
    }

    /// A linearizable read barrier (ReadIndex): confirms with a quorum that this replica is
    /// still the leader and waits until its state machine has applied everything committed
    /// before the call. Returns the leader's term; reads done after it see every write
    /// acknowledged before it.
    ///
    /// A confirmation is reused for a third of the minimum election timeout (a leader
    /// lease): every write this leader acknowledged was applied here before its reply, so a
    /// read of the local state under a valid lease is linearizable. This assumes clocks on
    /// the replicas advance at roughly the same rate, as every lease does.
    pub async fn ensure_leader(&self) -> Result<u64, ProposeError> {
        let lease = *self.inner.lease.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((since, term)) = lease {
            if since.elapsed() < self.inner.lease_len && self.is_leader_in(term) {
                return Ok(term);
            }
        }
        let before = self.status();
        if before.role != Role::Leader {
            return Err(self.not_leader(before.leader, before.leader_node));
        }
        let started = std::time::Instant::now();
        let check = self.inner.raft.ensure_linearizable();
        match tokio::time::timeout(self.inner.op_timeout, check).await {
            Err(_) => Err(ProposeError::Unavailable {
                reason: format!(
                    "leadership not confirmed within {:?}",
                    self.inner.op_timeout
                ),
            }),
            Ok(Ok(_)) => {
                let after = self.status();
                if after.role == Role::Leader && after.term == before.term {
                    *self.inner.lease.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((started, after.term));
                    Ok(after.term)
                } else {
                    // Leadership changed while confirming: the caller retries on the new leader.
                    Err(self.not_leader(after.leader, after.leader_node))
                }
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                Err(self.not_leader(f.leader_id, f.leader_node))
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                Err(ProposeError::Unavailable {
                    reason: q.to_string(),
                })
            }
            Ok(Err(RaftError::Fatal(f))) => Err(self.fatal(f)),
        }
    }

    fn not_leader(&self, leader: Option<u64>, leader_node: Option<Node>) -> ProposeError {
        let m = self.inner.raft.metrics().borrow().clone();
        // A leader that is this very replica (stale metrics) is no useful redirect.
        let leader = leader.filter(|l| *l != self.inner.id || m.state == ServerState::Leader);
        let leader_node = leader_node.or_else(|| {
            let l = leader?;
            m.membership_config
                .nodes()
                .find(|(id, _)| **id == l)
                .map(|(_, n)| n.clone())
        });
        ProposeError::NotLeader {
            leader,
            leader_node: leader.and(leader_node),
            term: m.current_term,
        }
    }

    fn fatal(&self, f: Fatal<u64>) -> ProposeError {
        // `Stopped` also covers a request dropped because leadership was lost mid-way; the
        // metrics tell whether the core really died and why.
        let running = self.inner.raft.metrics().borrow().running_state.clone();
        match (f, running) {
            (Fatal::Stopped, Ok(())) | (Fatal::Stopped, Err(Fatal::Stopped)) => {
                ProposeError::Unavailable {
                    reason: "replica stopping or leadership lost; the command's outcome is unknown"
                        .to_string(),
                }
            }
            (Fatal::Stopped, Err(cause)) | (cause, _) => {
                tracing::error!(error = %cause, "replica failed");
                ProposeError::Fatal {
                    reason: cause.to_string(),
                }
            }
        }
    }

    /// Resolves when the replica's core stops on its own, with the cause: a storage error (a
    /// full or failing disk) is fatal to it, and it does not start again by itself. Pending
    /// forever while the core runs; a stop asked for with [`Replica::shutdown`] resolves it
    /// too (the cause then says so).
    pub async fn failed(&self) -> String {
        let mut metrics = self.inner.raft.metrics();
        loop {
            if let Err(cause) = &metrics.borrow_and_update().running_state {
                return cause.to_string();
            }
            if metrics.changed().await.is_err() {
                return "the replica's core is gone".to_string();
            }
        }
    }

    /// The newest term this replica knows, and whether it leads in it: the cheap part of
    /// [`Replica::status`] (no copy of the membership), for per-request use.
    pub fn term_and_leading(&self) -> (u64, bool) {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        (m.current_term, m.state == ServerState::Leader)
    }

    /// Where this replica stands: role, term, leader, log and apply positions, members.
    pub fn status(&self) -> ReplicationStatus {
        let m = self.inner.raft.metrics().borrow().clone();
        let members: BTreeMap<u64, Node> = m
            .membership_config
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect();
        let voters = m.membership_config.membership().voter_ids().collect();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        };
        ReplicationStatus {
            id: m.id,
            role,
            term: m.current_term,
            leader: m.current_leader,
            leader_node: m.current_leader.and_then(|l| members.get(&l).cloned()),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            members,
            voters,
            matched: m
                .replication
                .iter()
                .flatten()
                .filter_map(|(id, l)| l.map(|l| (*id, l.index)))
                .collect(),
        }
    }

    /// Stops the replica: raft (its log and state machine are left consistent on disk) and
    /// the RPC listener with its connections. Once it returns the replica no longer touches
    /// the state machine (an apply or snapshot still running is waited for). Idempotent.
    pub async fn shutdown(&self) -> Result<(), ReplicationError> {
        let tasks = [&self.inner.bootstrap, &self.inner.election]
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).take());
        for task in tasks.into_iter().flatten() {
            task.abort();
            // Cancelled is the expected outcome; a panic was already reported by tokio.
            let _ = task.await;
        }
        let res = self.inner.raft.shutdown().await;
        // openraft may leave an apply or a snapshot build running after its shutdown.
        self.inner.sm.close().await;
        // A clean stop leaves the whole log on disk, not only in the page cache.
        if let Err(e) = self.inner.log.sync().await {
            tracing::warn!(error = %e, "cannot sync the raft log while stopping");
        }
        if let Some(server) = self.inner.server.lock().await.take() {
            server.abort();
            // A cancelled task is the expected outcome here.
            if let Err(e) = server.await {
                if !e.is_cancelled() {
                    tracing::warn!(error = %e, "raft listener task failed");
                }
            }
        }
        tracing::info!(id = self.inner.id, "replica stopped");
        Ok(res?)
    }
}
