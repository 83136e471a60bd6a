//! Cache invalidation events: what the leader publishes after it applies a change, so that
//! mounts can take back the names and attributes their kernels cache.

use serde::{Deserialize, Serialize};

use crate::types::{Ino, Name};

/// Something a client may have cached that a change made stale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Inval {
    /// The attributes (or data) of an inode changed.
    Inode(Ino),
    /// The entry `name` of directory `parent` was added, removed or now names another inode.
    Entry { parent: Ino, name: Name },
    /// Another client needs directory `dir`, whose creates are delegated to mount session
    /// `holder`: the holder must commit them and give the delegation back (see
    /// `MetadataRpc::mkdir_held`). Appended last: older encodings stay readable.
    Recall { dir: Ino, holder: u64 },
    /// Another client asks for a lock on `ino`, whose locks are delegated to mount session
    /// `holder`: the holder must give them back (see `MetadataRpc::delegate_locks`).
    RecallLocks { ino: Ino, holder: u64 },
}

/// One published event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalEvent {
    /// The `ReqId::client` of the change that caused it (0: not a client's change).
    pub origin: u64,
    pub inval: Inval,
}

/// The answer to `watch`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchReply {
    /// The event log this answer comes from. It changes with every leadership (and every
    /// restart of the leader); a client that sees a new epoch missed events.
    pub epoch: u64,
    /// The sequence number to ask for next.
    pub next: u64,
    /// True if the events from the requested point are gone (another epoch, or the log
    /// moved past them): the client must drop everything it caches.
    pub lost: bool,
    /// Events in order, starting at the requested sequence number.
    pub events: Vec<InvalEvent>,
}
