//! rawfs-chunkserver: stores chunks as checksummed files and serves them over the framed data
//! protocol, with a tarpc control port and a heartbeat loop to the metadata leader.
//!
//! ```text
//!   DataClient ──frames──▶ data_server ─┐                       ┌─▶ data_dir/chunks/xx/<id>
//!                                       ├─ spawn_blocking ─▶ Storage (fences, LRU of files)
//!   control client ─tarpc─▶ control ────┘                       └─▶ data_dir/term
//!   client on this host ─unix─▶ local_server ─▶ read-only fd of a chunk file (SCM_RIGHTS)
//!   metadata leader ◀─heartbeat (capacity, inventory, corrupt)── heartbeat
//!                   ──reply (term fence, chunks to delete)──────▶
//!
//!   scrub ──(every block of every chunk, paced to --scrub-rate)──▶ Storage ─▶ corrupt set
//! ```
//!
//! Each chunk is one file: a header, a crc32c per 4 KiB block, and a sparse data region (the
//! layout is `rawfs_chunkserver_api::layout`; files made with 64 KiB blocks keep them). Clients
//! on the same host read chunk files through descriptors handed out on `DATA_DIR/local.sock`
//! (module `local_server`), checking the same checksums. Writes are fenced by the chunk version and by the highest metadata term seen;
//! every read is verified and a checksum failure is answered with CORRUPT, never with data.
//! Long runs of whole blocks (256 KiB or more, as streaming writers send) are written with
//! `O_DIRECT` from a reused aligned buffer rather than through fresh page-cache pages (module
//! `direct`); short writes stay buffered until the client's flush.
//!
//! Data nobody reads is checked too: the background scrub ([`Scrubber`], module `scrub`)
//! walks every chunk file (replicas and RS shards alike), block by block, through the same
//! check as a read, at most `scrub_rate` bytes per second ([`DEFAULT_SCRUB_RATE`], 0 turns it
//! off; the control service's `set_scrub_rate` changes it at run time and `scrub_status`
//! shows its progress). A bad block puts the chunk in the corrupt set the heartbeat reports,
//! so the metadata leader drops that copy and the healer makes a new one from a good copy.

mod accept;
mod chunk_file;
mod control;
mod data_server;
mod direct;
mod fence;
mod heartbeat;
mod inflight;
mod local_server;
mod payload_crc;
mod scrub;
mod space;
mod storage;
mod tombstones;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use fence::FenceError;
pub use scrub::{Scrubber, DEFAULT_SCRUB_RATE};
pub use storage::OpenStorageError;

/// Default pause between heartbeats.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// How a chunkserver runs.
#[derive(Clone, Debug)]
pub struct ChunkserverConfig {
    /// This chunkserver's id, stable across restarts.
    pub id: u64,
    /// Where chunks and the term fence live.
    pub data_dir: PathBuf,
    /// Address of the framed data protocol (port 0: any free port).
    pub data_listen: SocketAddr,
    /// Address of the tarpc control service (port 0: any free port).
    pub control_listen: SocketAddr,
    /// Client addresses of the metadata replicas.
    pub metadata: Vec<String>,
    /// Capacity to report and enforce; `None` means the data directory's filesystem size.
    pub capacity: Option<u64>,
    /// Pause between heartbeats (default 1 s).
    pub heartbeat_interval: Duration,
}

/// Everything [`serve`] takes: a [`ChunkserverConfig`] and the scrub rate.
///
/// The scrub rate sits beside the config rather than in it so that code building a
/// `ChunkserverConfig` literally keeps compiling; a plain config converts with the default
/// rate, and this type derefs to its config.
#[derive(Clone, Debug)]
pub struct ChunkserverOptions {
    /// Identity, addresses, storage and heartbeat settings.
    pub config: ChunkserverConfig,
    /// Bytes per second the background scrub may read (0: no scrub).
    pub scrub_rate: u64,
    /// Free bytes of the data directory's filesystem that chunk writes leave alone; `None`:
    /// 2% of the filesystem, within 64 MiB and 4 GiB.
    pub reserve: Option<u64>,
}

impl From<ChunkserverConfig> for ChunkserverOptions {
    fn from(config: ChunkserverConfig) -> Self {
        ChunkserverOptions {
            config,
            scrub_rate: DEFAULT_SCRUB_RATE,
            reserve: None,
        }
    }
}

impl Deref for ChunkserverOptions {
    type Target = ChunkserverConfig;

    fn deref(&self) -> &ChunkserverConfig {
        &self.config
    }
}

/// Why a chunkserver could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ChunkserverError {
    /// The data directory could not be opened (permissions, locked, bad fence file).
    #[error(transparent)]
    Storage(#[from] OpenStorageError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A server task panicked or was cancelled.
    #[error("chunkserver task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A running chunkserver.
#[derive(Debug)]
pub struct ChunkserverHandle {
    data_addr: SocketAddr,
    control_addr: SocketAddr,
    scrubber: Arc<Scrubber>,
    task: tokio::task::JoinHandle<Result<(), ChunkserverError>>,
}

impl ChunkserverHandle {
    /// The bound address of the data protocol.
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The bound address of the control service.
    pub fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }

    /// The background scrub: its status and rate (as the control service has them).
    pub fn scrubber(&self) -> &Arc<Scrubber> {
        &self.scrubber
    }

    /// Waits until the chunkserver has shut down (after `shutdown` resolved).
    pub async fn join(self) -> Result<(), ChunkserverError> {
        self.task.await?
    }
}

/// Opens the storage, binds both ports and starts serving; stops when `shutdown` resolves.
pub async fn serve(
    opts: impl Into<ChunkserverOptions>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ChunkserverHandle, ChunkserverError> {
    let ChunkserverOptions {
        config: cfg,
        scrub_rate,
        reserve,
    } = opts.into();
    let dir = cfg.data_dir.clone();
    let capacity = cfg.capacity;
    let storage = Arc::new(
        tokio::task::spawn_blocking(move || storage::Storage::open_with(&dir, capacity, reserve))
            .await??,
    );
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ChunkserverError::Bind { addr, source })
    };
    let data_listener = bind(cfg.data_listen).await?;
    let control_listener = bind(cfg.control_listen).await?;
    let local = |l: &TcpListener, addr: SocketAddr| {
        l.local_addr()
            .map_err(|source| ChunkserverError::Bind { addr, source })
    };
    let data_addr = local(&data_listener, cfg.data_listen)?;
    let control_addr = local(&control_listener, cfg.control_listen)?;
    if data_addr.ip().is_unspecified() {
        tracing::warn!(%data_addr, "data port bound to a wildcard address; clients are told this address as is");
    }
    tracing::info!(id = cfg.id, %data_addr, %control_addr, data_dir = %cfg.data_dir.display(), "chunkserver serving");

    let stop = CancellationToken::new();
    let scrubber = Scrubber::new(scrub_rate);
    let (local_task, local) = match local_server::bind(&cfg.data_dir) {
        Some((listener, socket)) => {
            let task = tokio::spawn(local_server::run(
                listener,
                socket.token,
                storage.clone(),
                stop.clone(),
            ));
            (Some(task), Some(Arc::new(socket)))
        }
        None => (None, None),
    };
    let data = tokio::spawn(data_server::run(
        data_listener,
        storage.clone(),
        local,
        stop.clone(),
    ));
    let control = tokio::spawn(control::run(
        control_listener,
        control::ControlServer {
            id: cfg.id,
            storage: storage.clone(),
            scrubber: scrubber.clone(),
        },
        stop.clone(),
    ));
    let scrub = tokio::spawn(scrub::run(scrubber.clone(), storage.clone(), stop.clone()));
    let me = heartbeat::Identity {
        id: cfg.id,
        data_addr: data_addr.to_string(),
        control_addr: control_addr.to_string(),
    };
    let beats = tokio::spawn(heartbeat::run(
        heartbeat::ClientLink::new(cfg.metadata.clone()),
        me,
        storage,
        heartbeat::ScrubRate::new(scrubber.clone(), scrub_rate),
        cfg.heartbeat_interval,
        stop.clone(),
    ));
    let task = tokio::spawn(async move {
        shutdown.await;
        tracing::info!("chunkserver shutting down");
        stop.cancel();
        let (d, c, b, s) = tokio::join!(data, control, beats, scrub);
        if let Some(local) = local_task {
            local.await?;
        }
        d?;
        c?;
        b?;
        s?;
        tracing::info!("chunkserver stopped");
        Ok(())
    });
    Ok(ChunkserverHandle {
        data_addr,
        control_addr,
        scrubber,
        task,
    })
}

#[cfg(test)]
mod server_tests;

#[cfg(test)]
mod heartbeat_wire_tests;

#[cfg(test)]
mod local_tests;
