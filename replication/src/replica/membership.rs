//! Forming the group at first start, and changing its membership online.
//!
//! ```text
//!  start (bootstrap allowed, empty, lowest id) --probe every peer--> all empty? --> initialize
//!                                                                  \-> one has a group: wait
//!  add_peer(id)    --> add_learner (replication starts, snapshot if needed)
//!                  --> wait: the learner's log reaches the membership entry that added it
//!                  --> change_membership(+voter)   (joint, then uniform configuration)
//!  remove_peer(id) --> change_membership(-voter) or (-learner)
//! ```
//!
//! Why the probe: a replica whose disk was wiped looks exactly like a member of a brand-new
//! group (no log, no vote). If it formed a group on its own it would start a second history
//! next to the real one. Asking every peer first makes that impossible as long as one peer
//! of the real group answers; and when no peer answers, waiting is the safe choice.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;
use std::time::Instant;

use openraft::error::InitializeError;
use openraft::error::RaftError;
use openraft::metrics::WaitError;
use openraft::ChangeMembers;
use openraft::RaftMetrics;
use openraft::ServerState;

use super::ProposeError;
use super::Replica;
use super::ReplicaConfig;
use super::ReplicationError;
use crate::network::PeerClient;
use crate::types::Raft;
use crate::Node;

/// Deadline of one probe of a peer while forming the group.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between two rounds of probes while some peer does not answer.
const PROBE_RETRY: Duration = Duration::from_millis(200);
/// How often a replica still waiting for its peers says so in the log.
const PROBE_LOG_EVERY: Duration = Duration::from_secs(10);

impl Replica {
    /// Forms the group if this replica is allowed to (see [`ReplicaConfig::bootstrap`]): at
    /// once without peers, otherwise in a background task that first probes every peer.
    pub(super) async fn bootstrap(&self, cfg: &ReplicaConfig) -> Result<(), ReplicationError> {
        let raft = &self.inner.raft;
        if raft.is_initialized().await? {
            return Ok(());
        }
        if !cfg.bootstrap {
            tracing::info!(
                id = cfg.id,
                "empty replica, not allowed to form a group: waiting for a leader to add it"
            );
            return Ok(());
        }
        let lowest = cfg.peers.keys().copied().chain([cfg.id]).min();
        if lowest != Some(cfg.id) {
            tracing::info!(
                id = cfg.id,
                lowest,
                "empty replica; waiting for the lowest-numbered replica to form the group"
            );
            return Ok(());
        }
        if self.inner.raft_addr.ip().is_unspecified() && !cfg.peers.is_empty() {
            tracing::warn!(
                addr = %self.inner.raft_addr,
                "raft listens on an unspecified address; peers will be told to connect to it"
            );
        }
        let mut members = cfg.peers.clone();
        members.insert(
            cfg.id,
            Node {
                raft_addr: self.inner.raft_addr.to_string(),
                client_addr: cfg.client_addr.clone(),
            },
        );
        if cfg.peers.is_empty() {
            return initialize(raft, members).await;
        }
        let task = tokio::spawn(form_group(raft.clone(), cfg.id, cfg.peers.clone(), members));
        *self
            .inner
            .bootstrap
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    /// Adds voter `id` (reachable at `node`) online: as a learner first, waits until its log
    /// has caught up (by a snapshot if the leader's log no longer goes back far enough), then
    /// changes the membership to make it a voter.
    ///
    /// Leader only ([`ProposeError::NotLeader`] otherwise). Idempotent: a voter already at
    /// `node` is left alone; a member already known under another address is
    /// [`ProposeError::Rejected`] (remove it first). The catch-up is bounded by
    /// [`ReplicaConfig::catch_up_timeout`] and each membership change by the operation
    /// deadline; after a timeout the replica may remain a learner, which a retry promotes.
    pub async fn add_peer(&self, id: u64, node: Node) -> Result<(), ProposeError> {
        let m = self.leader_metrics()?;
        let membership = m.membership_config.membership();
        let is_voter = membership.voter_ids().any(|v| v == id);
        match membership.get_node(&id) {
            Some(known) if *known != node => {
                return Err(ProposeError::Rejected {
                    reason: format!(
                        "replica {id} is already a member at {known}; remove it before adding it at {node}"
                    ),
                })
            }
            Some(_) if is_voter => return Ok(()),
            _ => {}
        }
        tracing::info!(id, %node, "adding a replica as a learner");
        let started = Instant::now();
        let added = tokio::time::timeout(
            self.inner.op_timeout,
            self.inner.raft.add_learner(id, node, false),
        )
        .await
        .map_err(|_| self.timed_out("adding the learner"))?
        .map_err(|e| self.write_error(e))?;

        // Caught up: its log holds the membership entry that made it a learner, so whatever
        // it still misses is what arrived since (or, with a snapshot, nothing much).
        let target = added.log_id.index;
        let wait = self.inner.raft.wait(Some(
            self.inner
                .catch_up_timeout
                .saturating_sub(started.elapsed()),
        ));
        let m = wait
            .metrics(
                |m| {
                    m.state != ServerState::Leader
                        || m.membership_config.membership().get_node(&id).is_none()
                        || matched(m, id).is_some_and(|i| i >= target)
                },
                format!("replica {id} to catch up"),
            )
            .await
            .map_err(|e| match e {
                WaitError::Timeout(..) => ProposeError::Unavailable {
                    reason: format!(
                        "replica {id} did not catch up within {:?}; it stays a learner",
                        self.inner.catch_up_timeout
                    ),
                },
                WaitError::ShuttingDown => ProposeError::Unavailable {
                    reason: "replica stopping".to_string(),
                },
            })?;
        if m.state != ServerState::Leader {
            return Err(self.not_leader(m.current_leader, None));
        }
        if m.membership_config.membership().get_node(&id).is_none() {
            return Err(ProposeError::Unavailable {
                reason: format!("replica {id} was removed while it caught up"),
            });
        }
        tracing::info!(id, elapsed = ?started.elapsed(), "learner caught up; making it a voter");
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
            .await?;
        tracing::info!(id, "replica added as a voter");
        Ok(())
    }

    /// Removes member `id` (voter or learner) online; a non-member is not an error.
    ///
    /// Leader only ([`ProposeError::NotLeader`] otherwise). Removing the leader itself is
    /// allowed: it keeps leading until the change commits, then steps down and the remaining
    /// voters elect a leader after an election timeout. Removing the last voter is
    /// [`ProposeError::Rejected`]. The removed replica is not told to stop: stop it (a
    /// removed replica that keeps running only wastes its own resources).
    pub async fn remove_peer(&self, id: u64) -> Result<(), ProposeError> {
        let m = self.leader_metrics()?;
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(ProposeError::Rejected {
                    reason: format!("replica {id} is the only voter of the group"),
                });
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if membership.get_node(&id).is_some() {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Ok(());
        };
        tracing::info!(id, voter = voters.contains(&id), "removing a replica");
        self.change_membership(change).await?;
        tracing::info!(id, "replica removed");
        Ok(())
    }

    /// The metrics of this replica if it is the leader, a `NotLeader` redirect otherwise.
    fn leader_metrics(&self) -> Result<RaftMetrics<u64, Node>, ProposeError> {
        let m = self.inner.raft.metrics().borrow().clone();
        if m.state == ServerState::Leader {
            Ok(m)
        } else {
            Err(self.not_leader(m.current_leader, None))
        }
    }

    /// Commits a membership change (retain = false: removed voters leave the group).
    async fn change_membership(
        &self,
        change: ChangeMembers<u64, Node>,
    ) -> Result<(), ProposeError> {
        let change = self.inner.raft.change_membership(change, false);
        tokio::time::timeout(self.inner.op_timeout, change)
            .await
            .map_err(|_| self.timed_out("changing the membership"))?
            .map_err(|e| self.write_error(e))?;
        Ok(())
    }

    fn timed_out(&self, what: &str) -> ProposeError {
        ProposeError::Unavailable {
            reason: format!(
                "{what} did not commit within {:?}; it may still take effect",
                self.inner.op_timeout
            ),
        }
    }
}

/// On the leader, the index of the last entry known to be in `id`'s log.
fn matched(m: &RaftMetrics<u64, Node>, id: u64) -> Option<u64> {
    m.replication.as_ref()?.get(&id)?.map(|l| l.index)
}

async fn initialize(raft: &Raft, members: BTreeMap<u64, Node>) -> Result<(), ReplicationError> {
    tracing::info!(?members, "initializing the replication group");
    match raft.initialize(members).await {
        Ok(()) => Ok(()),
        Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
            tracing::info!(%e, "group already initialized");
            Ok(())
        }
        Err(RaftError::APIError(e)) => Err(ReplicationError::Initialize(Box::new(e))),
        Err(RaftError::Fatal(f)) => Err(f.into()),
    }
}

/// What one round of probes found.
enum Probed {
    /// Every peer answered that it belongs to no group.
    AllEmpty,
    /// This peer belongs to a group already.
    Existing(u64),
    /// These peers did not answer (or answered with another id).
    Missing(Vec<u64>),
}

async fn probe_all(self_id: u64, peers: &BTreeMap<u64, Node>) -> Probed {
    let probes = peers.iter().map(|(id, node)| async move {
        let mut client = PeerClient::new(self_id, *id, node.clone());
        (*id, client.probe(PROBE_TIMEOUT).await)
    });
    let mut missing = Vec::new();
    for (id, res) in futures::future::join_all(probes).await {
        match res {
            Ok(p) if p.id != id => {
                tracing::warn!(peer = id, addr = %peers[&id].raft_addr, answered = p.id,
                    "a different replica answers at this peer's address");
                missing.push(id);
            }
            Ok(p) if p.initialized => return Probed::Existing(id),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(peer = id, error = %e, "peer did not answer the probe");
                missing.push(id);
            }
        }
    }
    if missing.is_empty() {
        Probed::AllEmpty
    } else {
        Probed::Missing(missing)
    }
}

/// Forms the group once every peer has answered that it belongs to none; gives up for good
/// as soon as one peer (or this replica itself, added meanwhile) belongs to a group.
async fn form_group(
    raft: Raft,
    self_id: u64,
    peers: BTreeMap<u64, Node>,
    members: BTreeMap<u64, Node>,
) {
    let mut last_log: Option<Instant> = None;
    loop {
        match raft.is_initialized().await {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                tracing::warn!(error = %e, "raft stopped before the group was formed");
                return;
            }
        }
        match probe_all(self_id, &peers).await {
            Probed::AllEmpty => {
                if let Err(e) = initialize(&raft, members).await {
                    tracing::error!(error = %e, "cannot form the replication group");
                }
                return;
            }
            Probed::Existing(peer) => {
                tracing::info!(
                    peer,
                    "a peer already belongs to a group: not forming a new one; waiting for \
                     a leader to add this replica (or to bring it up to date)"
                );
                return;
            }
            Probed::Missing(ids) => {
                if last_log.map_or(true, |t| t.elapsed() >= PROBE_LOG_EVERY) {
                    tracing::info!(
                        waiting_for = ?ids,
                        "forming the replication group once every peer answers"
                    );
                    last_log = Some(Instant::now());
                }
            }
        }
        tokio::time::sleep(PROBE_RETRY).await;
    }
}
