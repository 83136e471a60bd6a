//! The chunkserver's tarpc control service (MessagePack over TCP) and its typed client.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tarpc::tokio_serde::formats::MessagePack;

/// Largest tarpc frame on a control connection, both ways. `list_chunks` of a full server
/// (about a million chunks) fits; requests are tiny, so a garbage length is refused early.
pub const CONTROL_MAX_FRAME: usize = 32 << 20;

/// A chunkserver's state as its control service reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStatus {
    /// The chunkserver's id.
    pub id: u64,
    /// Bytes allocated on disk by chunk files.
    pub used_bytes: u64,
    /// Capacity: configured, or the data directory's filesystem size.
    pub total_bytes: u64,
    /// Number of chunks stored.
    pub chunks: u64,
    /// Highest metadata term seen (the write fence).
    pub term: u64,
    /// False while the disk refuses writes (full or failing).
    pub healthy: bool,
}

/// The background scrub's state (see `rawfs chunkserver --scrub-rate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubStatus {
    /// Bytes per second the scrub may read; 0 means it is off.
    pub rate: u64,
    /// Bytes of chunk data verified since the chunkserver started.
    pub scrubbed_bytes: u64,
    /// Chunks found with a bad block since the chunkserver started (each chunk version once).
    pub bad_found: u64,
    /// Full passes over every chunk completed since the chunkserver started.
    pub passes: u64,
}

/// Control calls: small, infrequent requests that ride tarpc rather than the data protocol.
#[tarpc::service]
pub trait ChunkserverControl {
    /// The chunkserver's id, capacity, chunk count, fence and health.
    async fn status() -> ControlStatus;
    /// Every chunk stored here, with its version, sorted by chunk id.
    async fn list_chunks() -> Vec<(u64, u64)>;
    /// Changes the scrub's rate in bytes per second (0 stops it) until the next restart;
    /// returns the status after the change.
    async fn set_scrub_rate(bytes_per_sec: u64) -> ScrubStatus;
    /// The scrub's rate, progress and findings.
    async fn scrub_status() -> ScrubStatus;
}

/// Failure to reach a chunkserver's control port.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot connect to chunkserver control at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to chunkserver control at {addr} timed out")]
    ConnectTimeout { addr: String },
}

/// Connects to the control service at `addr` within `timeout`. Calls on the returned client
/// need their own deadline: see [`deadline`].
pub async fn connect_control(
    addr: &str,
    timeout: Duration,
) -> Result<ChunkserverControlClient, ControlError> {
    let mut connect = tarpc::serde_transport::tcp::connect(addr, MessagePack::default);
    connect.config_mut().max_frame_length(CONTROL_MAX_FRAME);
    let transport = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| ControlError::ConnectTimeout {
            addr: addr.to_string(),
        })?
        .map_err(|source| ControlError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    Ok(ChunkserverControlClient::new(tarpc::client::Config::default(), transport).spawn())
}

/// A tarpc context whose deadline is `timeout` from now.
pub fn deadline(timeout: Duration) -> tarpc::context::Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + timeout;
    ctx
}
