//! FileIo against real chunkservers (in-process, tempdirs, 127.0.0.1:0) with the in-memory
//! chunk map of [`crate::fake`] standing in for the metadata service: exercises the framed
//! protocol, on-disk checksums, version fences and a server that goes away.

use crate::fake::Fake;
use crate::store::{Put, PutV, Store};
use crate::FileIo;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rawfs_chunkserver::{serve, ChunkserverConfig, ChunkserverHandle};
use rawfs_chunkserver_api::{DataClient, DataError, WriteReq};
use rawfs_metadata_api::{Attr, ChunkId, ChunkLoc, Ino, MetaError, ServerId, CHUNK_SIZE};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Start of the data region in a chunk file (see the chunkserver's `chunk_file.rs`).
const DATA_OFFSET: u64 = rawfs_chunkserver_api::layout::Geometry::current().data_offset;
const INO: u64 = 9;

struct Hybrid {
    meta: Arc<Fake>,
    data: DataClient,
}

impl Store for Hybrid {
    fn chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<Vec<ChunkLoc>, MetaError>> {
        self.meta.chunks(ino, first, count)
    }
    fn allocate_chunk(&self, ino: Ino, index: u64) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta.allocate_chunk(ino, index)
    }
    fn commit_write(
        &self,
        ino: Ino,
        end: u64,
        delta: i64,
    ) -> BoxFuture<'_, Result<Attr, MetaError>> {
        self.meta.commit_write(ino, end, delta)
    }
    fn release_chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<(), MetaError>> {
        self.meta.release_chunks(ino, first, count)
    }
    fn drop_replica(
        &self,
        chunk: ChunkId,
        version: u64,
        server: ServerId,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta.drop_replica(chunk, version, server)
    }
    fn cow_chunk(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
    ) -> BoxFuture<'_, Result<rawfs_metadata_api::CowLoc, MetaError>> {
        self.meta.cow_chunk(ino, index, chunk)
    }
    fn cow_done(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        failed: Vec<ServerId>,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        self.meta.cow_done(ino, index, chunk, failed)
    }
    fn ec_prepare(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
    ) -> BoxFuture<'_, Result<rawfs_metadata_api::EcPlan, MetaError>> {
        self.meta.ec_prepare(ino, index, chunk, version)
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
        self.meta
            .ec_commit(ino, index, chunk, version, length, term)
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
        self.meta
            .ec_extend(ino, index, chunk, version, shards, from, to)
    }
    fn fence<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        self.data.fence(addr, chunk, version, term).boxed()
    }
    fn clone_chunk<'a>(
        &'a self,
        addr: &'a str,
        src: (ChunkId, u64),
        dst: (ChunkId, u64),
        term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        self.data
            .clone_chunk(addr, src.0, src.1, dst.0, dst.1, term)
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
        self.data.write(addr, req).boxed()
    }
    fn write_v<'a>(
        &'a self,
        addr: &'a str,
        put: PutV,
    ) -> BoxFuture<'a, Result<Option<u64>, DataError>> {
        async move {
            self.data
                .write_encoded(addr, put.chunk, put.version, put.term, &put.frame.encoded)
                .await
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
    ) -> BoxFuture<'a, Result<Bytes, DataError>> {
        self.data.read(addr, chunk, version, offset, len).boxed()
    }
    fn sync<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        self.data.sync(addr, chunk, version).boxed()
    }
    fn written<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Vec<std::ops::Range<u32>>, DataError>> {
        self.data.written(addr, chunk, version, offset, len).boxed()
    }
}

struct Server {
    id: ServerId,
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<ChunkserverHandle>,
}

impl Server {
    async fn start(id: ServerId) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let cfg = ChunkserverConfig {
            id,
            data_dir: dir.path().to_path_buf(),
            data_listen: "127.0.0.1:0".parse().unwrap(),
            control_listen: "127.0.0.1:0".parse().unwrap(),
            // No metadata service here: heartbeats fail quietly, data is served regardless.
            metadata: vec!["127.0.0.1:1".to_string()],
            capacity: Some(1 << 30),
            heartbeat_interval: Duration::from_secs(60),
        };
        let handle = serve(cfg, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        Server {
            id,
            dir,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.join().await.unwrap();
        }
    }
}

/// Finds the file of `chunk` under a chunkserver's data directory.
fn chunk_file(dir: &Path, chunk: ChunkId) -> PathBuf {
    let name = format!("{chunk:016x}");
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()) == Some(name.as_str()) {
                return p;
            }
        }
    }
    panic!("no file for chunk {chunk} under {}", dir.display());
}

/// Three real chunkservers, the in-memory chunk map naming them, and a store over both.
async fn three_servers() -> (Vec<Server>, Arc<Fake>, Arc<dyn Store>) {
    let mut servers = Vec::new();
    for id in 1..=3 {
        servers.push(Server::start(id).await);
    }
    let fake = Arc::new(Fake::new(3));
    for s in &servers {
        let addr = s.handle.as_ref().unwrap().data_addr().to_string();
        fake.st().addrs.insert(s.id, addr);
    }
    let store: Arc<dyn Store> = Arc::new(Hybrid {
        meta: fake.clone(),
        data: DataClient::new(Duration::from_secs(5)),
    });
    (servers, fake, store)
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 253) as u8 ^ (i >> 12) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_chunkservers_keep_data_through_corruption_and_a_dead_server() {
    let (mut servers, fake, store) = three_servers().await;

    // 3 MiB across the boundary between chunks 0 and 1, in 128 KiB writes.
    let start = CHUNK_SIZE - (1 << 20);
    let data = pattern(3 << 20);
    let io = FileIo::new(INO, 0, store.clone(), 1 << 20);
    for (i, part) in data.chunks(128 << 10).enumerate() {
        io.write(start + (i * (128 << 10)) as u64, part)
            .await
            .unwrap();
    }
    io.fsync().await.unwrap();
    let end = start + data.len() as u64;
    assert_eq!(io.size(), end);

    let fresh = FileIo::new(INO, end, store.clone(), 1 << 20);
    assert!(fresh.read(start, 3 << 20).await.unwrap() == data);
    assert_eq!(
        fresh.read(4096, 4096).await.unwrap(),
        vec![0u8; 4096],
        "hole"
    );

    // Corrupt the copy of chunk 1 that is read first: the read still returns the right bytes
    // and the bad copy leaves the chunk map.
    let loc1 = fake.loc(INO, 1).unwrap();
    let bad = loc1.replicas[(loc1.chunk % 3) as usize].server;
    let path = chunk_file(servers[(bad - 1) as usize].dir.path(), loc1.chunk);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xA5; 100], DATA_OFFSET + 1000).unwrap();
    }
    let fresh = FileIo::new(INO, end, store.clone(), 1 << 20);
    assert!(fresh.read(CHUNK_SIZE, 1 << 20).await.unwrap() == data[1 << 20..2 << 20]);
    let after = fake.loc(INO, 1).unwrap();
    assert!(
        !after.replicas.iter().any(|r| r.server == bad),
        "corrupt copy reported"
    );
    assert_eq!(after.replicas.len(), 2);

    // Stop a server that holds chunk 1; writing on succeeds with the other replica(s).
    let victim = after.replicas[0].server;
    servers[(victim - 1) as usize].stop().await;
    let more = pattern(1 << 20);
    io.write(end, &more).await.unwrap();
    io.fsync().await.unwrap();
    let loc1 = fake.loc(INO, 1).unwrap();
    assert!(
        !loc1.replicas.iter().any(|r| r.server == victim),
        "dead replica dropped"
    );
    assert!(!loc1.replicas.is_empty());
    let fresh = FileIo::new(INO, end + (1 << 20), store.clone(), 1 << 20);
    assert!(fresh.read(end, 1 << 20).await.unwrap() == more);
    assert!(fresh.read(start, 3 << 20).await.unwrap() == data);

    // Shrink into the middle of chunk 1, then extend: the old bytes must not come back.
    let cut = CHUNK_SIZE + 10;
    io.set_size(cut);
    io.truncate_tail(cut).await.unwrap();
    io.set_size(end);
    let back = io
        .read(CHUNK_SIZE, (end - CHUNK_SIZE) as u32)
        .await
        .unwrap();
    assert_eq!(back[..10], data[(1 << 20)..(1 << 20) + 10]);
    assert!(
        back[10..].iter().all(|b| *b == 0),
        "bytes past the truncate came back"
    );

    for s in &mut servers {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_coded_chunks_on_real_chunkservers() {
    let mut servers = Vec::new();
    for id in 1..=6 {
        servers.push(Server::start(id).await);
    }
    let fake = Arc::new(Fake::new(6));
    for s in &servers {
        let addr = s.handle.as_ref().unwrap().data_addr().to_string();
        fake.st().addrs.insert(s.id, addr);
    }
    let store: Arc<dyn Store> = Arc::new(Hybrid {
        meta: fake.clone(),
        data: DataClient::new(Duration::from_secs(5)),
    });
    let n = (9 << 20) + 4321;
    let mut data = pattern(n);
    let io = FileIo::new(INO, 0, store.clone(), 8 << 20);
    io.write(0, &data).await.unwrap();
    io.fsync().await.unwrap();
    let before = fake.loc(INO, 0).unwrap();
    let cold = rawfs_metadata_api::ColdChunk {
        ino: INO,
        index: 0,
        chunk: before.chunk,
        version: before.version,
        length: n as u64,
        to_replicas: false,
    };
    let after = crate::convert::convert(&*store, &cold).await.unwrap();
    let shards = after.ec.clone().unwrap().shards;
    // The old version is fenced on the replicas: a writer still holding it is refused.
    let stale = store
        .write(
            &before.replicas[0].data_addr,
            Put {
                chunk: before.chunk,
                version: before.version,
                term: before.term,
                offset: 0,
                data: Bytes::from_static(b"late"),
            },
        )
        .await;
    assert!(
        matches!(stale, Err(DataError::StaleVersion { .. })),
        "{stale:?}"
    );
    let fresh = FileIo::new(INO, n as u64, store.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);

    // Corrupt block 1 of shard 0 on disk and stop the server of shard 2: reads still return
    // the right bytes, and only the corrupt shard is reported lost.
    let s0 = shards[0].replica.clone().unwrap().server;
    let path = chunk_file(servers[(s0 - 1) as usize].dir.path(), shards[0].chunk);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x5A; 64], DATA_OFFSET + (64 << 10) + 10)
            .unwrap();
    }
    let s2 = shards[2].replica.clone().unwrap().server;
    servers[(s2 - 1) as usize].stop().await;
    let fresh = FileIo::new(INO, n as u64, store.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);
    assert_eq!(fake.st().lost_reports, vec![(shards[0].chunk, s0)]);

    // A write into the chunk turns it back into replicas (the stopped server's is left out).
    let at = (4 << 20) + 17;
    io.write(at, b"fresh bytes").await.unwrap();
    io.fsync().await.unwrap();
    data[at as usize..at as usize + 11].copy_from_slice(b"fresh bytes");
    let now = fake.loc(INO, 0).unwrap();
    assert!(now.ec.is_none() && !now.replicas.is_empty());
    assert!(!now.replicas.iter().any(|r| r.server == s2));
    let fresh = FileIo::new(INO, n as u64, store.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);

    for s in &mut servers {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_chunkservers_tell_written_blocks_apart_from_holes() {
    let (mut servers, _fake, store) = three_servers().await;
    let io = FileIo::new(INO, 0, store, 1 << 20);
    let block = rawfs_chunkserver_api::layout::Geometry::current().block;
    // Two blocks and a byte of the next, well inside chunk 1; the file ends 2 chunks on.
    let at = CHUNK_SIZE + 40 * block;
    io.write(at, &pattern(2 * block as usize + 1))
        .await
        .unwrap();
    io.set_size(3 * CHUNK_SIZE);
    io.flush().await.unwrap();
    assert_eq!(io.seek_data(0).await.unwrap(), Some(at));
    assert_eq!(io.seek_hole(at).await.unwrap(), Some(at + 3 * block));
    assert_eq!(io.seek_data(at + 3 * block).await.unwrap(), None);
    let step = io.data_ranges(0, 3 * CHUNK_SIZE).await.unwrap();
    assert_eq!(step.data, vec![at..at + 3 * block]);
    assert_eq!(step.covered, 3 * CHUNK_SIZE);
    for s in &mut servers {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_bytes_count_blocks_filled_below_the_size() {
    let (mut servers, fake, store) = three_servers().await;
    let io = FileIo::new(INO, 0, store, 1 << 20);
    let block = rawfs_chunkserver_api::layout::Geometry::current().block;
    let stored = || fake.st().stored.get(&INO).copied().unwrap_or(0);
    // Appending: 10 bytes take one block.
    io.write(0, b"0123456789").await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(stored(), block as i64);
    // The file is made long first, then filled in below its size (a VM image, a database
    // that preallocates): every block written for the first time counts, as tar --sparse
    // and du expect. Growth past the size would count nothing here.
    io.set_size(3 * CHUNK_SIZE);
    let at = CHUNK_SIZE + 40 * block + 100;
    io.write(at, &pattern(2 * block as usize)).await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(stored(), 4 * block as i64, "3 new blocks");
    // Overwrites add nothing, a neighbouring block of a new chunk does.
    io.write(at + 5, b"again").await.unwrap();
    io.write(2 * CHUNK_SIZE, &pattern(1 << 20)).await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(stored(), 4 * block as i64 + (1 << 20));
    for s in &mut servers {
        s.stop().await;
    }
}
