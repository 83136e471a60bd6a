//! The metadata service's wire errors.

use serde::{Deserialize, Serialize};

/// An error returned by the metadata service. Mapped to `errno` only in the mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetaError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name too long")]
    NameTooLong,
    #[error("no such attribute")]
    NoAttr,
    #[error("too many links")]
    TooManyLinks,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("invalid argument: {reason}")]
    Invalid { reason: String },
    /// Not enough live chunkservers (or space) to place a chunk.
    #[error("no space: {reason}")]
    NoSpace { reason: String },
    /// The caller's chunk version is older than the metadata's.
    #[error("stale chunk version (current {current})")]
    StaleVersion { current: u64 },
    /// The caller acted for an older leader term (its healer lease or its order is void).
    #[error("stale leader term (current {current})")]
    StaleTerm { current: u64 },
    /// Another holder has the lease (the healer's, or a volume's writer lease) for
    /// `remaining_ms` more; holder 0: one an earlier leader granted may still run.
    #[error("lease held by {holder} for {remaining_ms} ms more")]
    LeaseHeld { holder: u64, remaining_ms: u64 },
    /// This replica is not the leader; retry at `leader_addr`.
    #[error("not the leader (leader {leader:?} at {leader_addr:?}, term {term})")]
    NotLeader {
        leader: Option<u64>,
        leader_addr: Option<String>,
        term: u64,
    },
    /// The service cannot answer now (no quorum, shutting down); retry later.
    #[error("metadata unavailable: {reason}")]
    Unavailable { reason: String },
    /// The service's storage failed; the operation was not applied.
    #[error("metadata storage error: {reason}")]
    Storage { reason: String },
}

impl MetaError {
    /// True when the same request may succeed if retried (possibly at another replica).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            MetaError::NotLeader { .. } | MetaError::Unavailable { .. }
        )
    }
}
