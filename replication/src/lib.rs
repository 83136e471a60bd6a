//! The replicated log under the rawfs metadata service.
//!
//! ```text
//!  propose(cmd) --> openraft (leader) --append--> log store (segment files, group fsync)
//!                        |  AppendEntries / Vote / InstallSnapshot over tarpc
//!                        v
//!                  followers' logs --commit (majority)--> StateMachine::apply (on every replica)
//! ```
//!
//! Commands and responses are opaque bytes here: the metadata service defines them. The
//! state machine persists, atomically with each applied batch, a small blob this crate owns
//! (last applied log id and membership), so a restart resumes exactly where it stopped.
//!
//! The term of each entry is handed to [`StateMachine::apply`]: it is the fencing token that
//! every order leaving the leader carries.
//!
//! # Design choices
//!
//! - **Consensus engine**: openraft 0.9 with its `storage-v2` traits, built with the
//!   `single-term-leader` feature. Standard openraft lets several candidates each become a
//!   leader "in" the same term (the leader id is `(term, node)`); with `single-term-leader` a
//!   term has at most one leader, as in the Raft paper, so the term *alone* is a fencing
//!   token: anything stamped with term `T` came from the one leader of `T`, and a receiver
//!   that has seen a higher term refuses it.
//! - **Log store** ([`log_store`]): append-only segment files in `log/` under
//!   [`ReplicaConfig::dir`], each record checksummed (crc32c), entries MessagePack
//!   (rmp-serde). An append is a write(2) into the page cache and is acknowledged at once; a
//!   dedicated thread fsyncs within 2 ms of the first unsynced append (group commit). So a
//!   process crash loses nothing acknowledged, and a power loss the last few milliseconds:
//!   [`Replica::sync_log`] is the barrier for callers that must survive power loss. This is
//!   what makes a proposal cost far less than an fsync. The vote is fsynced before it is
//!   acknowledged, and truncation and purging are crash-safe.
//! - **State machine adaptor** ([`state_machine`]): wraps the application's
//!   [`StateMachine`]. The state machine may lose its last applies on a crash (it is allowed
//!   to commit non-durably between periodic durable commits): the log only purges entries
//!   covered by a durable snapshot file, and on start-up openraft re-applies every committed
//!   entry after the state machine's stored position. If the state machine is even behind
//!   the snapshot file (the log was purged past it), the snapshot is restored first.
//! - **Snapshots**: [`StateMachine::snapshot`] bytes plus their log position, written to
//!   `snapshot.bin` (temp file, fsync, rename, fsync directory). Sent to lagging followers in
//!   chunks through openraft's chunked `install_snapshot`.
//! - **Network** ([`network`]): a tarpc service over TCP with the MessagePack codec, carrying
//!   openraft's own serde request/response types. Every call has a deadline; a peer that
//!   refuses connections is reported to openraft as `Unreachable` so it backs off. Tests
//!   inject message loss, delay and partitions through [`ReplicaConfig::faults`]
//!   ([`NetworkFaults`]); production leaves it unset.
//! - **Elections**: started by this crate's own timer (`replica/election.rs`), not openraft
//!   0.9's, which keeps one random timeout per process checked on a coarse tick and can
//!   livelock two replicas started together (they time out in the same instant in every
//!   round). The timer draws a fresh random timeout per round, counting from the last
//!   accepted leader message or granted vote, plus openraft's leader lease while following.
//! - **Shutdown** ([`Replica::shutdown`]) waits for an apply or snapshot still running on a
//!   task openraft leaves behind, so the application owns its state machine afterwards.
//! - **Bootstrap** ([`ReplicaConfig::bootstrap`]): a replica forms a new group (itself and
//!   its configured peers) only if it is allowed to (`bootstrap`, true by default), its log is
//!   empty and it never voted, its id is the lowest of the group, and *every* peer answers a
//!   probe saying that it belongs to no group either. Any other replica waits: a leader adds it
//!   ([`Replica::add_peer`]) or, if it is still a member, brings it up to date (by snapshot if
//!   needed). So a replica whose disk was wiped never starts a second history next to the
//!   real one while one member of the real group answers, and a restart with existing state
//!   never re-initializes. Pass `bootstrap = false` for a replica joining an existing group.
//!   Caveat: a wiped replica that is still a voter has forgotten its vote; if an election is
//!   in progress in the very term it last voted in, it could vote twice. The safe way to
//!   bring a wiped replica back is `remove_peer` then `add_peer`.
//! - **Membership changes** ([`Replica::add_peer`], [`Replica::remove_peer`]): openraft's
//!   joint consensus; a new member joins as a learner and becomes a voter once its log has
//!   caught up.

#![warn(missing_docs)]

pub mod log_store;
pub mod network;
mod replica;
pub mod state_machine;

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

pub use network::Fault;
pub use network::NetworkFaults;
pub use replica::ProposeError;
pub use replica::Replica;
pub use replica::ReplicaConfig;
pub use replica::ReplicationError;
pub use replica::ReplicationStatus;
pub use replica::Role;

/// One committed log entry handed to the state machine.
#[derive(Debug)]
pub struct Entry<'a> {
    /// Position in the log (the first entry of a group has index 0).
    pub index: u64,
    /// Term of the leader that proposed the entry: the fencing token.
    pub term: u64,
    /// The proposed command, or `None` for entries the log uses internally (blank, membership).
    pub command: Option<&'a [u8]>,
}

/// Failure of the state machine's storage: fatal for the replica.
#[derive(Debug, thiserror::Error)]
#[error("state machine storage: {reason}")]
pub struct StorageError {
    /// What failed, for the logs.
    pub reason: String,
}

/// The application state replicated by the log. Implementations must be deterministic: the
/// same entries applied in the same order give the same state and responses on every replica.
///
/// # Contract
///
/// - Entries arrive in log order without gaps; the first entry of a group has index 0 (a
///   membership entry, `command: None`). Batches with no command at all still carry a new
///   `replication_state` that must be stored.
/// - `replication_state` must be committed atomically with the entries it comes with. The
///   commit need not be durable every time: after a crash the replica reads
///   [`StateMachine::replication_state`] and re-applies every later committed entry.
/// - [`StateMachine::snapshot`] must contain the replication state, and
///   [`StateMachine::restore`] must bring it back (the replica checks it) and be durable.
/// - The replica calls the methods one at a time (the application's own reads may of course
///   run alongside). `snapshot`, `restore`, every `apply` on a follower and `apply` of a big
///   batch run on tokio's blocking pool and may block as long as they need. On the leader,
///   `apply` of a small batch (up to [`state_machine::INLINE_MAX_ENTRIES`] entries and
///   [`state_machine::INLINE_MAX_BYTES`] bytes of commands) runs inline on an async worker
///   thread, which saves two thread hops per commit: it should do memory work and a
///   non-durable commit, not wait for an fsync or the network (an occasional short wait,
///   e.g. on a lock held by a durable commit, is tolerable).
pub trait StateMachine: Send + Sync + 'static {
    /// Applies `entries` in order and stores `replication_state` in the same durable
    /// transaction. Returns one response per entry (empty for entries without a command).
    fn apply(
        &self,
        entries: &[Entry<'_>],
        replication_state: &[u8],
    ) -> Result<Vec<Vec<u8>>, StorageError>;

    /// The `replication_state` stored by the last `apply` or `restore`, if any.
    fn replication_state(&self) -> Result<Option<Vec<u8>>, StorageError>;

    /// A consistent copy of the whole state (including the replication state).
    fn snapshot(&self) -> Result<Vec<u8>, StorageError>;

    /// Replaces the whole state with a snapshot taken by [`StateMachine::snapshot`].
    fn restore(&self, snapshot: &[u8]) -> Result<(), StorageError>;

    /// Told when this replica becomes leader (`true`) or stops being leader. A follower's
    /// applies have nobody waiting on them, so the state machine may gather several before
    /// it commits them (its own reads must still see every applied entry).
    fn set_leading(&self, _leading: bool) {}
}

/// A member of the replication group as openraft sees it: where its raft RPCs go and where
/// its metadata clients should go (handed out in `NotLeader` redirects).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// `host:port` of the replica's raft tarpc listener.
    pub raft_addr: String,
    /// `host:port` of the replica's metadata client listener.
    pub client_addr: String,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

/// A proposed command: opaque bytes defined by the state machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command({} bytes)", self.0.len())
    }
}

/// The state machine's response to one applied entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response(#[serde(with = "serde_bytes")] pub Vec<u8>);

openraft::declare_raft_types!(
    /// The openraft type configuration of the rawfs metadata group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Shorthands for the openraft types instantiated with [`TypeConfig`].
pub(crate) mod types {
    use super::TypeConfig;

    pub type LogId = openraft::LogId<u64>;
    pub type Vote = openraft::Vote<u64>;
    pub type RaftEntry = openraft::Entry<TypeConfig>;
    pub type StoredMembership = openraft::StoredMembership<u64, super::Node>;
    pub type SnapshotMeta = openraft::SnapshotMeta<u64, super::Node>;
    pub type Snapshot = openraft::Snapshot<TypeConfig>;
    pub type StorageError = openraft::StorageError<u64>;
    pub type Raft = openraft::Raft<TypeConfig>;
}
