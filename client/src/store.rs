//! [`Store`]: the calls the client makes to the metadata service and to chunkservers, behind a
//! trait so the write and read paths can be tested against an in-memory cluster with injected
//! failures. [`RemoteStore`] is the real one: it adds a deadline to every call.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rawfs_chunkserver_api::{DataClient, DataError, EncodedWrite, WriteReq};
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{Attr, ChunkId, ChunkLoc, CowLoc, EcPlan, Ino, MetaError, ServerId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// One data write (never with `sync`: durability is asked for separately by `fsync`).
#[derive(Clone, Debug)]
pub(crate) struct Put {
    pub chunk: ChunkId,
    pub version: u64,
    /// The metadata term from the chunk's location (the fencing token).
    pub term: u64,
    pub offset: u32,
    pub data: Bytes,
}

/// Several pieces of one chunk written in one request (a WRITEV).
#[derive(Clone, Debug)]
pub(crate) struct PutV {
    pub chunk: ChunkId,
    pub version: u64,
    /// The metadata term from the chunk's location (the fencing token).
    pub term: u64,
    /// The pieces and their encoding, made once for every replica.
    pub frame: Arc<Frame>,
}

/// The pieces of one write request (not overlapping; at most
/// [`rawfs_chunkserver_api::MAX_PIECES`] and one frame's bytes) and their encoding.
#[derive(Debug)]
pub(crate) struct Frame {
    pub pieces: Vec<rawfs_chunkserver_api::Piece>,
    pub encoded: EncodedWrite,
}

/// Metadata and chunkserver calls used by [`crate::FileIo`]. Every call ends within a
/// deadline.
pub(crate) trait Store: Send + Sync + 'static {
    fn chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<Vec<ChunkLoc>, MetaError>>;
    fn allocate_chunk(&self, ino: Ino, index: u64) -> BoxFuture<'_, Result<ChunkLoc, MetaError>>;
    fn commit_write(
        &self,
        ino: Ino,
        end: u64,
        delta: i64,
    ) -> BoxFuture<'_, Result<Attr, MetaError>>;
    fn release_chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<(), MetaError>>;
    fn drop_replica(
        &self,
        chunk: ChunkId,
        version: u64,
        server: ServerId,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>>;
    /// The private copy of the shared chunk `chunk` at `(ino, index)` (see `cow.rs`).
    fn cow_chunk(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
    ) -> BoxFuture<'_, Result<CowLoc, MetaError>>;
    /// Ends a copy-on-write; `failed` replicas could not make the copy.
    fn cow_done(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        failed: Vec<ServerId>,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>>;
    /// Starts converting chunk `index` of `ino` (at `version`) to RS 4+2 (see `convert.rs`).
    fn ec_prepare(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
    ) -> BoxFuture<'_, Result<EcPlan, MetaError>>;
    /// Commits a conversion to RS 4+2 once every shard is written and verified.
    fn ec_commit(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        length: u64,
        term: u64,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>>;
    /// Commits an RS 4+2 append to chunk `index` of `ino`: its length goes from `from` to `to`
    /// (see `ec_write.rs`). Fenced by the chunk, its version and its exact `shards`.
    #[allow(clippy::too_many_arguments)]
    fn ec_extend(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        shards: Vec<(ChunkId, ServerId)>,
        from: u64,
        to: u64,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>>;
    /// Makes the chunkserver at `addr` refuse versions of `chunk` older than `version`.
    fn fence<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>>;
    /// Copies chunk `src` into the new chunk `dst` on the chunkserver at `addr`.
    fn clone_chunk<'a>(
        &'a self,
        addr: &'a str,
        src: (ChunkId, u64),
        dst: (ChunkId, u64),
        term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>>;
    fn write<'a>(&'a self, addr: &'a str, put: Put) -> BoxFuture<'a, Result<(), DataError>>;
    /// Writes every piece of `put`; by default one [`Store::write`] after the other (and a
    /// ZERO as a write of zeros). Returns the bytes of checksum blocks that held no data
    /// before, when the chunkserver says (`None`: not known; always for a ZERO).
    fn write_v<'a>(
        &'a self,
        addr: &'a str,
        put: PutV,
    ) -> BoxFuture<'a, Result<Option<u64>, DataError>> {
        async move {
            if let Some((offset, len)) = put.frame.encoded.zeroes() {
                let zeros = Put {
                    chunk: put.chunk,
                    version: put.version,
                    term: put.term,
                    offset,
                    data: Bytes::from(vec![0u8; len as usize]),
                };
                return self.write(addr, zeros).await.map(|()| None);
            }
            for p in &put.frame.pieces {
                let one = Put {
                    chunk: put.chunk,
                    version: put.version,
                    term: put.term,
                    offset: p.offset,
                    data: p.data.clone(),
                };
                self.write(addr, one).await?;
            }
            Ok(None)
        }
        .boxed()
    }
    fn read<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Bytes, DataError>>;
    fn sync<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
    ) -> BoxFuture<'a, Result<(), DataError>>;
    /// Which parts of `offset..offset + len` of `chunk` hold data on the server at `addr`
    /// (WRITTEN; chunk byte ranges, ascending).
    fn written<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Vec<std::ops::Range<u32>>, DataError>>;
}

/// The real store: a [`MetadataClient`] and a [`DataClient`].
pub(crate) struct RemoteStore {
    pub meta: MetadataClient,
    pub data: DataClient,
    /// Deadline of a whole metadata operation, as a safety net over the metadata client's own
    /// deadlines (it retries across replicas up to its `op` timeout).
    pub meta_deadline: Duration,
    /// Deadline of one data call, also a safety net over the data client's own.
    pub io_deadline: Duration,
    /// Data calls in flight per chunkserver address. Calls queue here, before their deadline
    /// starts: a busy client must not see its own queueing as a replica timing out (and drop
    /// a healthy replica for it). Kept below the data client's connection limit per address.
    pub slots: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Data calls in flight per chunkserver address from one client.
pub(crate) const SLOTS_PER_ADDR: usize = 12;

impl RemoteStore {
    async fn meta_call<T>(
        &self,
        what: &'static str,
        fut: impl Future<Output = Result<T, MetaError>>,
    ) -> Result<T, MetaError> {
        match tokio::time::timeout(self.meta_deadline, fut).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(call = what, "metadata call exceeded its deadline");
                Err(MetaError::Unavailable {
                    reason: format!("{what} timed out"),
                })
            }
        }
    }

    async fn data_call<T>(
        &self,
        addr: &str,
        fut: impl Future<Output = Result<T, DataError>>,
    ) -> Result<T, DataError> {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(addr.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(SLOTS_PER_ADDR)))
                .clone()
        };
        // The semaphore is never closed, so acquiring cannot fail.
        let _permit = slot.acquire().await.map_err(|_| DataError::Unreachable {
            addr: addr.to_string(),
            reason: "client shutting down".to_string(),
        })?;
        tokio::time::timeout(self.io_deadline, fut)
            .await
            .unwrap_or(Err(DataError::Timeout))
    }
}

impl Store for RemoteStore {
    fn chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<Vec<ChunkLoc>, MetaError>> {
        self.meta_call("chunks", self.meta.chunks(ino, first, count))
            .boxed()
    }

    fn allocate_chunk(&self, ino: Ino, index: u64) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta_call("allocate_chunk", self.meta.allocate_chunk(ino, index))
            .boxed()
    }

    fn commit_write(
        &self,
        ino: Ino,
        end: u64,
        delta: i64,
    ) -> BoxFuture<'_, Result<Attr, MetaError>> {
        self.meta_call("commit_write", self.meta.commit_write(ino, end, delta))
            .boxed()
    }

    fn release_chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<(), MetaError>> {
        self.meta_call(
            "release_chunks",
            self.meta.release_chunks(ino, first, count),
        )
        .boxed()
    }

    fn drop_replica(
        &self,
        chunk: ChunkId,
        version: u64,
        server: ServerId,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta_call(
            "drop_replica",
            self.meta.drop_replica(chunk, version, server),
        )
        .boxed()
    }

    fn cow_chunk(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
    ) -> BoxFuture<'_, Result<CowLoc, MetaError>> {
        self.meta_call("cow_chunk", self.meta.cow_chunk(ino, index, chunk))
            .boxed()
    }

    fn cow_done(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        failed: Vec<ServerId>,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta_call("cow_done", self.meta.cow_done(ino, index, chunk, failed))
            .boxed()
    }

    fn ec_prepare(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
    ) -> BoxFuture<'_, Result<EcPlan, MetaError>> {
        self.meta_call(
            "ec_prepare",
            self.meta.ec_prepare(ino, index, chunk, version),
        )
        .boxed()
    }

    fn ec_commit(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        length: u64,
        term: u64,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta_call(
            "ec_commit",
            self.meta
                .ec_commit(ino, index, chunk, version, length, term),
        )
        .boxed()
    }

    fn ec_extend(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        shards: Vec<(ChunkId, ServerId)>,
        from: u64,
        to: u64,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta_call(
            "ec_extend",
            self.meta
                .ec_extend(ino, index, chunk, version, shards, from, to),
        )
        .boxed()
    }

    fn fence<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        self.data_call(addr, self.data.fence(addr, chunk, version, term))
            .boxed()
    }

    fn clone_chunk<'a>(
        &'a self,
        addr: &'a str,
        src: (ChunkId, u64),
        dst: (ChunkId, u64),
        term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        self.data_call(
            addr,
            self.data
                .clone_chunk(addr, src.0, src.1, dst.0, dst.1, term),
        )
        .boxed()
    }

    fn write<'a>(&'a self, addr: &'a str, put: Put) -> BoxFuture<'a, Result<(), DataError>> {
        let req = WriteReq {
            chunk: put.chunk,
            version: put.version,
            term: put.term,
            offset: put.offset,
            data: put.data,
            sync: false,
        };
        self.data_call(addr, self.data.write(addr, req)).boxed()
    }

    fn write_v<'a>(
        &'a self,
        addr: &'a str,
        put: PutV,
    ) -> BoxFuture<'a, Result<Option<u64>, DataError>> {
        let call = async move {
            let data = &self.data;
            let encoded = &put.frame.encoded;
            data.write_encoded(addr, put.chunk, put.version, put.term, encoded)
                .await
        };
        self.data_call(addr, call).boxed()
    }

    fn read<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Bytes, DataError>> {
        self.data_call(addr, self.data.read(addr, chunk, version, offset, len))
            .boxed()
    }

    fn sync<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        self.data_call(addr, self.data.sync(addr, chunk, version))
            .boxed()
    }

    fn written<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Vec<std::ops::Range<u32>>, DataError>> {
        self.data_call(addr, self.data.written(addr, chunk, version, offset, len))
            .boxed()
    }
}
