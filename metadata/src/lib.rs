//! rawfs-metadata: the metadata service — the namespace, the file -> chunk map and the
//! chunkserver registry, kept in redb and replicated through the `rawfs-replication` log.
//!
//! ```text
//!  MetadataClient --tarpc--> server.rs --(reads: ensure_leader, or none if Local,
//!                               |          + redb read txn)--> queries.rs
//!                               | mutations: leader decides time/placement, encodes a
//!                               v   Command, Tracked with the caller's request id
//!                     Replica::propose --> log (durable) --> MetaStateMachine::apply
//!                                                   (requests: once per id; namespace,
//!                                                    rename, chunks)
//!                                                                  | redb write txn
//!                                                                  v  (durability None,
//!                                                               meta.redb  fsync ~1/s)
//!  chunkserver --heartbeat--> registry.rs (leader soft state) --> placement, deletions
//!              inventories --> missing.rs (listed copies a server lacks: dropped for repair)
//!  open_leased / reopen / release_leased --> open_table.rs (readers' opens in memory)
//!  status / replica_status / digest / add_peer / remove_peer --> cluster.rs
//!  healer: endangered_chunks / add_replica / healer_lease --> healing.rs
//!  healer limits and reports: set_healer_settings / healer_report --> limits.rs
//!  RS 4+2: ec_prepare / ec_commit / cow of EC chunks --> erasure.rs;
//!          cold files' chunks allocated erasure coded, ec_extend --> ec_write.rs
//! ```
//!
//! Apply is deterministic: every input that is not a function of the state (the time, the
//! servers chosen for a new chunk) is decided by the leader and travels in the command.
//! Mutations that arrive together are proposed as one log entry (group commit, see
//! `proposer.rs`), so concurrent callers share log writes.
//!
//! Contracts worth knowing when calling this service:
//! - Truncation (`setattr` with a smaller size) releases only chunks that lie wholly past the
//!   new size. The caller zeroes the rest of the last chunk (from the new size to the chunk's
//!   end or the old size) so that a later extension reads zeros there.
//! - `ChunkLoc::term` is the leader's term when the location was handed out (for a local
//!   read: the term of the last entry the replica applied): the fencing token for chunk
//!   writes. `HeartbeatReply::term` carries the same token to chunkservers, which refuse
//!   orders and writes of a term lower than the highest they have seen.
//! - Every mutation of a client carries a `ReqId`; a repeat within about ten minutes gets
//!   the first reply and is not applied again (`requests.rs`), so retries across a failover
//!   are safe. `open`, `release` and `end_session` carry none (yet).
//! - `Consistency::Local` reads are answered by any replica that knows a leader, from its
//!   applied state: stale by up to the replication delay, without read-your-writes across
//!   replicas (see `rawfs_metadata_api::Consistency`).
//! - `digest` hashes the whole replicated state at the applied index it reports; replicas
//!   at the same index must agree.
//! - Deletions queued for a chunkserver are handed out once, on a heartbeat reply; a lost
//!   reply is repaired by the next inventory, which names every chunk the server still holds.
//! - Snapshots and clones share chunks (reference counts: CHUNK_OWNER plus CHUNK_REFS, see
//!   `shares.rs`). A location with `shared` must not be written in place: the writer asks
//!   `cow_chunk`, has the replicas CLONE the source, and ends with `cow_done`. A chunk's data
//!   is queued for deletion only when its last reference goes. Whatever changes a chunk's
//!   servers or version must change every reference alike (`shares::update_chunk`), and
//!   whatever looks a chunk up by id must accept a pending copy's source (`shares::view_of`).
//! - The healer (`healing.rs`): `add_replica` commits a copy only at the chunk's current
//!   version and in the term it names, and bumps the version (the healer then FENCEs every
//!   replica so cached locations refresh and include the new copy). The healer lease is the
//!   leader's soft state; a new leader grants it only once any earlier lease has lapsed.
//! - Directory delegations (`delegation.rs`, `recall.rs`): a directory made with
//!   `mkdir_held` takes changes (creates, unlinks and renames of the holder's files, in
//!   order) only from its holder's `commit_held` until the holder
//!   gives it back; any other client's lookup, listing or change of it recalls it first
//!   (published as an event, waited for, taken back after 5 s of silence). Rows are
//!   replicated state; they end with the holder's session.
//! - Opens are per `session`; an unlinked inode stays (as an orphan, across restarts) until
//!   its last open is released or its session ends. A session that dies without
//!   `end_session` keeps its orphans (no session leases yet). A reader's `open_leased` is
//!   kept in the leader's memory and logged only with the next command that may remove a
//!   link (`open_table.rs`); its session sends it again to each new leader (`reopen`), which
//!   removes no link for 5 s after taking office. Leased opens are given back with
//!   `release_leased`, logged ones with `release`.
//! - Byte-range locks (`locks.rs`, `set_lock`/`test_lock`/`renew_locks`) are replicated
//!   state judged at apply; the leader drops a session's locks when it has not heard from
//!   it for 10 s (soft state: a new leader starts every session's lease afresh) and at
//!   `end_session`. A conflict seen in the applied state costs no log entry. The locks of
//!   a file only one session locks are delegated to its mount (`delegate_locks`, one log
//!   entry), which decides them itself until another session asks and the leader recalls
//!   them (`Inval::RecallLocks`, `return_locks`).

mod chunks;
mod chunkservers;
mod classes;
mod cluster;
mod commands;
mod delegation;
mod drain;
mod ec_write;
mod erasure;
mod leases;
mod locks;
mod machine;
mod namespace;
mod queries;
mod reads;
mod registry;
mod rename;
mod requests;
mod shares;
mod store;

#[cfg(test)]
mod tests;

pub use commands::{Command, Reply};
pub use machine::MetaStateMachine;
pub use store::StoreError;

mod daemon;
mod events;
mod healing;
mod limits;
mod missing;
mod open_table;
mod proposer;
mod recall;
mod server;
mod volume_lease;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures::Future;

/// Heartbeat silence after which a chunkserver counts as down.
pub const DEFAULT_CHUNKSERVER_TIMEOUT: Duration = Duration::from_secs(5);
/// Entries between snapshots by default: a snapshot copies the whole state, so not too often.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100_000;

/// Configuration of one metadata replica.
#[derive(Clone, Debug)]
pub struct MetadataConfig {
    /// This replica's id, unique in the group and stable across restarts.
    pub id: u64,
    /// Where clients (tarpc `MetadataRpc`) connect; port 0 picks one.
    pub listen: SocketAddr,
    /// Where the other replicas reach this one's replication RPCs; port 0 picks one.
    pub raft_listen: SocketAddr,
    /// Holds `meta.redb` (the state) and the replicated log.
    pub data_dir: PathBuf,
    /// The other replicas; empty for a single-node group.
    pub peers: Vec<Peer>,
    /// May this replica form a new group (with `peers`) when it finds no existing one?
    /// True for the replicas of a brand-new initial cluster (only the lowest id actually
    /// forms it, after checking that no peer already belongs to a group). False for a
    /// replica that joins a running group: it starts empty and waits for the leader to add
    /// it (`add_peer`), then catches up, by snapshot if needed. A replica with existing
    /// state never forms a group, whatever this says.
    pub bootstrap: bool,
    /// Heartbeat silence after which a chunkserver counts as down.
    pub chunkserver_timeout: Duration,
    /// Log entries applied between two snapshots of the state ([`DEFAULT_SNAPSHOT_EVERY`]).
    /// The log behind a snapshot is compacted (keeping a tenth of this, at most 10 000
    /// entries), so a replica further behind catches up from the snapshot.
    pub snapshot_every: u64,
}

/// Another metadata replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: u64,
    /// Its client (tarpc) address.
    pub addr: String,
    /// Its replication address.
    pub raft_addr: String,
}

/// Why the metadata service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store: {0}")]
    Store(#[from] StoreError),
    #[error("replication: {0}")]
    Replication(#[from] rawfs_replication::ReplicationError),
    #[error("metadata task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The replica stopped on its own (its storage failed: a full or failing disk); the
    /// service stopped with it. Starting it again reopens its files as a restart would.
    #[error("replica stopped: {reason}")]
    ReplicaFailed { reason: String },
}

/// A running metadata replica.
#[derive(Debug)]
pub struct MetadataHandle {
    addr: SocketAddr,
    raft_addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), MetadataError>>,
}

impl MetadataHandle {
    /// The client (tarpc) address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The replication address actually bound.
    pub fn raft_addr(&self) -> SocketAddr {
        self.raft_addr
    }

    /// Waits until the service has stopped: after the shutdown future resolved, or with
    /// [`MetadataError::ReplicaFailed`] after its replica stopped on its own.
    pub async fn join(self) -> Result<(), MetadataError> {
        self.task.await?
    }
}

/// Starts a metadata replica; it runs until `shutdown` resolves.
pub async fn serve(
    cfg: MetadataConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<MetadataHandle, MetadataError> {
    daemon::serve(cfg, shutdown).await
}
