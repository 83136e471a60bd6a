//! The rawfs client library: file I/O over the metadata service and the chunkservers, used by
//! the FUSE mount (and later by the NBD server and the healer).
//!
//! A [`Client`] holds the connections; [`Client::file`] gives a [`FileIo`] per open inode.
//! Writes are buffered per file, split at chunk boundaries (64 MiB), and sent to all live
//! replicas of each chunk in parallel; a replica that fails is dropped from the chunk (its
//! version is bumped) and the write goes on with the others. `fsync` asks every written
//! replica to make the data durable. Reads go to one replica, move on to the next on a
//! checksum error or a dead chunkserver, and report the bad copy. Every call has a deadline.
//!
//! ```text
//!   mount / nbd ──▶ FileIo ──write──▶ WriteBuf ──flush──▶ per chunk: allocate_chunk ─┐
//!                     │                      shared / RS 4+2? ──▶ cow_chunk: copy first
//!                     │                                    WRITE ×3 replicas ◀───────┘
//!                     │                                    commit_write (size, mtime)
//!                     ├──fsync──▶ SYNC each written replica (≥ 2 durable)
//!                     └──read───▶ read-ahead windows ──▶ chunks() ──▶ READ one replica
//!                                                         (next replica on error)
//!                                                     or, RS 4+2: READ the data shards
//!                                                         (any 4 of 6 + decode on error)
//!   cold file, new chunk ──▶ allocate_chunk gives RS 4+2 (length 0) ──▶ flush appends whole
//!      stripes (or the file's tail): encode ─▶ WRITE+SYNC 6 shards ─▶ ec_extend (ec_write.rs)
//!   healer / quiet files ──▶ Client::convert_to_ec: ec_prepare ─▶ FENCE replicas ─▶ READ
//!                           ─▶ encode ─▶ WRITE+SYNC 6 shards ─▶ verify crcs ─▶ ec_commit
//!            MetadataClient (tarpc)              DataClient (framed TCP)
//! ```
//!
//! Erasure-coded chunks (RS 4+2, layout and codec in [`erasure`]): a read touches only the
//! data shards holding the range (one, for a read inside a 1 MiB cell); a shard that is
//! listed lost, unreachable, slow, corrupt or missing is replaced by others and the range
//! rebuilt from any 4, and corrupt or missing shards are reported (`drop_replica` with the
//! shard's id). A write into an erasure-coded chunk first copies it into a new replicated
//! chunk (`cow_chunk` answers with `from_ec`): read and decoded here, written to the 3
//! replicas, synced, then `cow_done`. The exception is an append of whole stripes to a chunk
//! whose length ends on a stripe (every new chunk of a `cold` file starts so): it is encoded
//! here and written to the 6 shards directly, see `ec_write.rs`. [`Client::convert_to_ec`] turns a replicated chunk
//! into RS 4+2 without a window of loss: the replicas stay authoritative until every shard
//! is written, synced and verified and the commit (fenced by term and version) succeeds.
//!
//! Design notes:
//! - Double buffering: when the write buffer fills, it becomes the *pending* extent and is
//!   flushed in the background while new writes fill a fresh buffer. A failed flush keeps the
//!   extent pending; the next flush (or fsync, or a write that needs room) retries it and
//!   returns the error. Reads lay the pending extent and the buffer over what the replicas
//!   return, so a file's own writes are always visible.
//! - Invariant: the bytes of a chunk past the file size are zero. A shrinking truncate keeps
//!   it through [`FileIo::truncate_tail`]; holes and never-written ranges read as zeros.
//! - A replica is dropped (`drop_replica`, version bump) only when another replica took the
//!   same write: if every replica fails, the caller gets an error and the chunk map is left
//!   alone, because losing all of them at once more likely means our own network is gone.
//! - Chunkservers that did not answer a read are tried last for a while (shared by all
//!   files of a [`Client`]), so a hung server costs one deadline rather than one per read.

mod budget;
mod config;
mod convert;
mod cow;
mod ec_read;
mod ec_write;
pub mod erasure;
mod error;
mod extent;
mod file_io;
mod locations;
mod read_path;
mod seek;
mod spares;
mod store;
mod unsynced;
mod write_path;

#[cfg(test)]
mod ec_tests;
#[cfg(test)]
mod ec_write_tests;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod real_tests;
#[cfg(test)]
mod seek_tests;
#[cfg(test)]
mod tests;

pub use config::{ClientConfig, DEFAULT_IO_TIMEOUT, DEFAULT_WRITE_BUFFER, WRITE_BUDGET_BUFFERS};
pub use cow::snapshot;
pub use error::ClientError;
pub use extent::MAX_FILE_SIZE;
pub use file_io::{Deferred, FileIo};
pub use seek::Scan;

use rawfs_chunkserver_api::DataClient;
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{ChunkLoc, ColdChunk, Ino};
use std::sync::Arc;
use store::{RemoteStore, Store};

/// A connection to a rawfs cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    cfg: Arc<ClientConfig>,
    meta: MetadataClient,
    data: DataClient,
    store: Arc<dyn Store>,
    suspects: Arc<read_path::Suspects>,
    budget: Arc<budget::WriteBudget>,
    unsynced: Arc<unsynced::Unsynced>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("metadata", &self.cfg.metadata)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the cluster whose metadata service is at `cfg.metadata`. Connects lazily:
    /// nothing is contacted until the first call.
    pub fn new(cfg: ClientConfig) -> Client {
        let meta = MetadataClient::new(cfg.metadata.clone(), cfg.timeouts)
            .with_consistency(cfg.consistency);
        let data = DataClient::new(cfg.io_timeout);
        let store = Arc::new(RemoteStore {
            meta: meta.clone(),
            data: data.clone(),
            // The metadata client gives up after `op`; a little slack covers its last call.
            meta_deadline: cfg.timeouts.op + cfg.timeouts.call,
            // The data client has its own deadline; this one only catches a stuck future.
            io_deadline: cfg.io_timeout + cfg.io_timeout / 2,
            slots: Default::default(),
        });
        let budget = (cfg.write_buffer as u64).saturating_mul(WRITE_BUDGET_BUFFERS);
        Client {
            cfg: Arc::new(cfg),
            meta,
            data,
            store,
            suspects: Arc::default(),
            budget: Arc::new(budget::WriteBudget::new(budget)),
            unsynced: Arc::default(),
        }
    }

    /// The metadata client, for namespace calls (lookup, mknod, setattr, ...).
    pub fn meta(&self) -> &MetadataClient {
        &self.meta
    }

    /// The chunkserver data client (shared connection pools).
    pub fn data(&self) -> &DataClient {
        &self.data
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// Converts the replicated chunk `c` (as `cold_chunks` lists it) to RS 4+2 and returns
    /// its new, erasure-coded location. Steps: `ec_prepare`, fence every replica at the new
    /// version (any refusal aborts), read `c.length` bytes from a replica, encode, write and
    /// sync the 6 shards, read every shard back and check its block crc32c, then `ec_commit`
    /// fenced by the plan's term and version. Until the commit the replicated chunk stays
    /// authoritative; on an error nothing is undone here (the metadata service collects the
    /// reserved shards), and the caller may simply try again later. A writer that touches
    /// the chunk meanwhile cancels the conversion: the commit is then refused with
    /// `StaleVersion`.
    ///
    /// On a CPU the erasure-coding kernel cannot run on (see [`erasure::check_cpu`], worth
    /// calling at start) it fails before writing anything.
    pub async fn convert_to_ec(&self, c: &ColdChunk) -> Result<ChunkLoc, ClientError> {
        convert::convert(&*self.store, c).await
    }

    /// Converts the erasure-coded chunk `c` (listed by `cold_chunks` with `to_replicas`: its
    /// file is `hot`) back to 3 replicas, through the same copy-out a write into it makes.
    /// Returns the new replicated location; the shards are deleted by the metadata service.
    pub async fn convert_to_replicas(&self, c: &ColdChunk) -> Result<ChunkLoc, ClientError> {
        convert::to_replicas(&*self.store, c).await
    }

    /// I/O on file `ino` whose size is `size` (from the attributes of the open). Make one
    /// per open inode and share it between that inode's handles.
    pub fn file(&self, ino: Ino, size: u64) -> FileIo {
        FileIo::with_shared(
            ino,
            size,
            self.store.clone(),
            self.cfg.write_buffer,
            self.suspects.clone(),
            self.budget.clone(),
            self.unsynced.clone(),
        )
    }
}
