//! Cluster-level calls: `status` (with every member's view), `replica_status`, and the
//! membership changes `add_peer` / `remove_peer`.
//!
//! ```text
//!  status (leader) --+-- spawn_blocking: chunk map scan + registry --> ClusterStatus
//!                    +-- each other member: replica_status (300 ms, in parallel)
//!                    |     answered -> its role/term/applied, up
//!                    |     silent   -> role "unknown", up: false
//!                    +-- lag = leader's last log index - matched[member]
//!  add_peer --> one background task per (id, node) --> Replica::add_peer
//!               (a retried call joins the running task instead of starting another)
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use rawfs_metadata_api::client::MAX_FRAME;
use rawfs_metadata_api::*;
use rawfs_replication::{Node, ProposeError, Replica, ReplicationStatus};
use tokio_serde::formats::MessagePack;

use crate::queries;
use crate::server::Server;

/// Deadline of asking one member for its status (connecting included): `status` must stay
/// fast when a member is down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

type AddResult = Result<(), ProposeError>;
/// An `add_peer` running in its own task, awaitable by several callers.
type RunningAdd = Shared<BoxFuture<'static, AddResult>>;

/// Connections to the other members' client ports, and membership additions in progress.
#[derive(Default)]
pub(crate) struct Members {
    conns: Mutex<HashMap<String, MetadataRpcClient>>,
    /// Keyed by (id, raft address, client address).
    adds: Mutex<HashMap<(u64, String, String), RunningAdd>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A replica's description of itself; `addr` is its bound client address, used when the
/// membership does not list it (yet).
pub(crate) fn own_status(st: &ReplicationStatus, addr: &str) -> ReplicaStatus {
    let addr = st
        .members
        .get(&st.id)
        .map_or(addr, |n| n.client_addr.as_str());
    ReplicaStatus {
        id: st.id,
        addr: addr.to_string(),
        role: st.role.to_string(),
        term: st.term,
        applied: st.last_applied,
        last_log_index: st.last_log_index,
        leader: st.leader,
        lag: 0,
        up: true,
        voter: st.voters.contains(&st.id),
    }
}

impl Members {
    /// Asks the replica at `addr` for its own status, within [`PROBE_TIMEOUT`].
    async fn probe(&self, addr: &str) -> Option<ReplicaStatus> {
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let cached = lock(&self.conns).get(addr).cloned();
        let client = match cached {
            Some(c) => c,
            None => {
                let mut connect = tarpc::serde_transport::tcp::connect(addr, MessagePack::default);
                connect.config_mut().max_frame_length(MAX_FRAME);
                let transport = match tokio::time::timeout_at(deadline.into(), connect).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "replica status: cannot connect");
                        return None;
                    }
                    Err(_) => return None,
                };
                let c = MetadataRpcClient::new(tarpc::client::Config::default(), transport).spawn();
                lock(&self.conns)
                    .entry(addr.to_string())
                    .or_insert(c)
                    .clone()
            }
        };
        let mut ctx = tarpc::context::current();
        ctx.deadline = deadline;
        match tokio::time::timeout_at(deadline.into(), client.replica_status(ctx)).await {
            Ok(Ok(Ok(s))) => Some(s),
            Ok(Ok(Err(e))) => {
                tracing::debug!(%addr, error = %e, "replica status refused");
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "replica status failed");
                lock(&self.conns).remove(addr);
                None
            }
            Err(_) => {
                // A member that is slow now may be stuck; reconnect next time.
                lock(&self.conns).remove(addr);
                None
            }
        }
    }

    /// Every member as the leader sees it, in id order: the leader's own status, and each
    /// other member's answer (or a silent member marked down) with its lag behind the
    /// leader's log.
    pub(crate) async fn statuses(&self, st: &ReplicationStatus, addr: &str) -> Vec<ReplicaStatus> {
        let probes = st.members.iter().map(|(&id, node)| async move {
            let voter = st.voters.contains(&id);
            if id == st.id {
                return own_status(st, addr);
            }
            let lag = st
                .last_log_index
                .saturating_sub(st.matched.get(&id).copied().unwrap_or(0));
            match self.probe(&node.client_addr).await {
                Some(s) => ReplicaStatus {
                    id,
                    addr: node.client_addr.clone(),
                    lag,
                    up: true,
                    voter,
                    ..s
                },
                None => ReplicaStatus {
                    id,
                    addr: node.client_addr.clone(),
                    role: "unknown".into(),
                    lag,
                    up: false,
                    voter,
                    ..ReplicaStatus::default()
                },
            }
        });
        futures::future::join_all(probes).await
    }

    /// Runs `replica.add_peer(id, node)` in a task that outlives the caller's deadline (a
    /// catch-up may take minutes); a call for the same `(id, node)` while one runs waits
    /// for that one instead of starting another.
    pub(crate) async fn add_peer(
        self: &std::sync::Arc<Self>,
        replica: &Replica,
        id: u64,
        node: Node,
    ) -> AddResult {
        let key = (id, node.raft_addr.clone(), node.client_addr.clone());
        let running = {
            let mut adds = lock(&self.adds);
            match adds.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let replica = replica.clone();
                    let me = self.clone();
                    let key2 = key.clone();
                    let task = tokio::spawn(async move {
                        let r = replica.add_peer(id, node).await;
                        lock(&me.adds).remove(&key2);
                        r
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(ProposeError::Unavailable {
                                reason: format!("add_peer task failed: {e}"),
                            })
                        })
                    }
                    .boxed()
                    .shared();
                    adds.insert(key, f.clone());
                    f
                }
            }
        };
        running.await
    }
}

impl Server {
    /// The cluster's chunkservers and chunk counts (a full scan of the chunk map: run it on
    /// the blocking pool). `replicas` is left empty for the caller to fill.
    pub(crate) fn build_status(&self, term: u64) -> MetaResult<ClusterStatus> {
        let st = self.0.replica.status();
        let now = Instant::now();
        // One look at the registry, not one lock per replica of every chunk.
        let up: HashSet<ServerId> = self.registry().up_servers(now);
        let is_up = |s| up.contains(&s);
        let (counts, per_server, servers, (files, healer_settings)) = self.0.sm.read(|rt| {
            let (counts, per) = crate::erasure::chunk_counts(rt, &is_up)?;
            let more = (queries::files(rt)?, crate::limits::settings(rt)?);
            Ok((counts, per, queries::servers(rt)?, more))
        })?;
        let reg = self.registry();
        let healer = reg.lease.filter(|l| l.until > now).map(|l| l.holder);
        let chunkservers = servers
            .into_iter()
            .map(|(id, rec)| {
                let live = reg.get(id);
                ChunkserverStatus {
                    id,
                    data_addr: rec.data_addr,
                    control_addr: rec.control_addr,
                    up: reg.is_up(id, now),
                    healthy: live.is_some_and(|l| l.healthy),
                    used_bytes: live.map_or(0, |l| l.used_bytes),
                    total_bytes: live.map_or(0, |l| l.total_bytes),
                    chunks: per_server.get(&id).copied().unwrap_or(0),
                    last_seen_ms: live.map_or(u64::MAX, |l| {
                        now.saturating_duration_since(l.last_seen).as_millis() as u64
                    }),
                    draining: rec.draining,
                }
            })
            .collect();
        Ok(ClusterStatus {
            leader: st.leader,
            term,
            replicas: Vec::new(),
            chunkservers,
            chunks: counts,
            files,
            healer,
            healers: reg.reports.view(healer, now),
            healer_settings,
        })
    }
}
