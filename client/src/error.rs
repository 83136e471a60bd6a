//! [`ClientError`]: why a client operation failed. The mount maps it to an errno, the NBD
//! server to an NBD error; this crate does neither.

use rawfs_chunkserver_api::DataError;
use rawfs_metadata_api::{ChunkId, MetaError};

/// An error from the client library.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The metadata service refused the call or could not be reached in time.
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    /// Every replica of a chunk failed (or none is left): the data could not be written or
    /// read. `last` is the last chunkserver error seen, if any. For an erasure-coded chunk:
    /// fewer than 4 of its 6 shards could be read (or the erasure-coding kernel cannot run on
    /// this CPU); the cause is logged where it is found.
    #[error("no usable replica of chunk {chunk} (file chunk index {index}){}", fmt_last(.last))]
    NoReplica {
        index: u64,
        chunk: ChunkId,
        last: Option<DataError>,
    },
    /// A chunkserver failed in a way that is not a replica failure and retrying did not help
    /// (for example a stale fence that persisted after refreshing the chunk map).
    #[error("chunk {chunk} on {addr}: {source}")]
    Io {
        chunk: ChunkId,
        addr: String,
        #[source]
        source: DataError,
    },
    /// A chunkserver has no space left for the chunk (every replica said so).
    #[error("no space left for chunk {chunk}")]
    NoSpace { chunk: ChunkId },
    /// The range `offset..offset + len` lies past the largest supported file size.
    #[error("range at {offset} of {len} bytes exceeds the maximum file size")]
    TooLarge { offset: u64, len: u64 },
}

fn fmt_last(last: &Option<DataError>) -> String {
    match last {
        Some(e) => format!(": {e}"),
        None => String::new(),
    }
}

impl ClientError {
    /// True when the error came from the metadata service saying the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Meta(MetaError::NotFound))
    }
}
