//! [`ClientConfig`]: where the metadata service is and how long calls may take.

use rawfs_metadata_api::client::ClientTimeouts;
use rawfs_metadata_api::Consistency;
use std::time::Duration;

/// Default size of a [`crate::FileIo`] write buffer: 32 MiB (a sequential writer's flushes
/// then pause the stream to the replicas a quarter as often as with 8 MiB: 10-20% faster
/// sequential writes on a 2-core VM).
pub const DEFAULT_WRITE_BUFFER: usize = 32 << 20;
/// All files of one [`crate::Client`] together buffer at most this many times
/// `write_buffer` before a file's buffer of 8 MiB or more is flushed rather than grown.
pub const WRITE_BUDGET_BUFFERS: u64 = 8;
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
    /// Bytes of contiguous writes a [`crate::FileIo`] collects before it sends them (all
    /// files together: [`WRITE_BUDGET_BUFFERS`] times this).
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
