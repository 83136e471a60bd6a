//! [`ClientConfig`]: where the metadata service is and how long calls may take.

use rawfs_metadata_api::client::ClientTimeouts;
use rawfs_metadata_api::Consistency;
use std::time::Duration;

/// Default size of a [`crate::FileIo`] write buffer: 8 MiB.
pub const DEFAULT_WRITE_BUFFER: usize = 8 << 20;
/// Default deadline of one chunkserver data call.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of a [`crate::Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Client addresses (`host:port`) of the metadata replicas; any one will do, the
    /// metadata client follows redirects to the leader.
    pub metadata: Vec<String>,
    /// Deadlines of metadata calls (per call, and per operation including retries).
    pub timeouts: ClientTimeouts,
    /// Deadline of one chunkserver data call (read, write frame, sync).
    pub io_timeout: Duration,
    /// Bytes of contiguous writes a [`crate::FileIo`] collects before it sends them.
    pub write_buffer: usize,
    /// Freshness of metadata reads: linearizable (the leader, the default) or local (any
    /// replica, possibly stale; see [`Consistency`]). Mutations always go to the leader.
    pub consistency: Consistency,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            metadata: Vec::new(),
            timeouts: ClientTimeouts::default(),
            io_timeout: DEFAULT_IO_TIMEOUT,
            write_buffer: DEFAULT_WRITE_BUFFER,
            consistency: Consistency::default(),
        }
    }
}

impl ClientConfig {
    /// A configuration with default deadlines and buffer for the given metadata addresses.
    pub fn new(metadata: Vec<String>) -> Self {
        ClientConfig {
            metadata,
            ..ClientConfig::default()
        }
    }
}
