//! What the healer and the operator exchange through the metadata service: the run-time
//! limits (`rawfs healer set`), replicated with the metadata state, and the healers' progress
//! reports, kept by the leader as soft state for `rawfs status` and `rawfs healer status`.

use serde::{Deserialize, Serialize};

use crate::types::ChunkId;

/// Run-time limits of repair and scrub traffic, replicated (they survive restarts and
/// failovers). `None`: not set, each daemon's own command-line default applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealerSettings {
    /// Bytes per second the working healer copies and rebuilds at most; 0 = unlimited.
    pub repair_rate: Option<u64>,
    /// Bytes per second each chunkserver's background scrub reads at most; 0 = paused.
    pub scrub_rate: Option<u64>,
}

/// A change to one limit of [`HealerSettings`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RateChange {
    /// Left as it is.
    #[default]
    Keep,
    /// Back to "not set": the daemons' own defaults apply.
    Unset,
    /// Bytes per second (0: unlimited for repair, paused for scrub).
    Set(u64),
}

impl RateChange {
    /// `current` after the change.
    pub fn apply(self, current: Option<u64>) -> Option<u64> {
        match self {
            RateChange::Keep => current,
            RateChange::Unset => None,
            RateChange::Set(v) => Some(v),
        }
    }
}

/// A healer's account of itself, sent with every lease renewal (`healer_report`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealerReport {
    /// Holds the lease and works (the others stand by).
    pub active: bool,
    /// What it is doing: `standby`, `idle`, `repairing` or `tiering`.
    pub phase: String,
    /// The repair limit it applies now, bytes per second (0: unlimited).
    pub repair_rate: u64,
    /// Bytes copied or rebuilt per second, averaged over the last few seconds.
    pub throughput: u64,
    /// Repairs (copies and shard rebuilds) planned in the current pass and not done yet.
    pub queued: u64,
    /// Bytes those repairs move.
    pub queued_bytes: u64,
    /// Repairs done since the healer started, and the bytes they moved.
    pub repaired: u64,
    pub repaired_bytes: u64,
    /// Repairs that failed since the healer started (each is retried after a back-off).
    pub failed: u64,
    /// Chunks converted to RS 4+2 since the healer started.
    pub tiered: u64,
    /// The repairs in flight, one per busy worker.
    pub workers: Vec<WorkerReport>,
}

/// One repair in flight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The worker's number.
    pub worker: u32,
    pub chunk: ChunkId,
    /// `copy` or `rebuild`.
    pub kind: String,
    /// The server written to (the first one, for a rebuild of several shards).
    pub target: u64,
    /// Live copies (or shard failures to spare, plus one) before the repair: 1 is most urgent.
    pub copies_left: u32,
    /// Bytes moved so far, out of `bytes`.
    pub done_bytes: u64,
    pub bytes: u64,
    /// Time since the repair started.
    pub elapsed_ms: u64,
}

/// A healer as the leader last heard from it (`ClusterStatus::healers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealerInfo {
    /// The healer's lease holder id.
    pub id: u64,
    /// Holds the lease now, as the leader sees it.
    pub leader: bool,
    /// Time since its last report.
    pub age_ms: u64,
    pub report: HealerReport,
}
