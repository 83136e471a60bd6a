//! The client library against a real in-process cluster: 1 metadata replica and 3
//! chunkservers on 127.0.0.1:0 in tempdirs. Writes across a chunk boundary, holes, a
//! corrupted chunk file, a chunkserver that stops mid-way, and truncate + extend; and RS 4+2
//! on 6 chunkservers: conversion, degraded reads with 2 servers stopped, and a write into
//! an erasure-coded chunk.

use rawfs_chunkserver::{ChunkserverConfig, ChunkserverHandle};
use rawfs_client::{Client, ClientConfig, DEFAULT_WRITE_BUFFER};
use rawfs_metadata::{MetadataConfig, MetadataHandle};
use rawfs_metadata_api::{
    Caller, ChunkLoc, ClientTimeouts, FileKind, Ino, NewNode, SetAttr, StorageClass, CHUNK_SIZE,
    ROOT_INO,
};
use serde_bytes::ByteBuf;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Start of the data region in a chunk file (the chunkserver's `chunk_file.rs` layout).
const DATA_OFFSET: u64 = rawfs_chunkserver_api::layout::Geometry::current().data_offset;

struct Daemon<H> {
    dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<H>,
}

fn stopper() -> (
    oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

async fn start_metadata() -> Daemon<MetadataHandle> {
    let dir = tempfile::tempdir().unwrap();
    let (tx, shutdown) = stopper();
    let cfg = MetadataConfig {
        id: 1,
        listen: "127.0.0.1:0".parse().unwrap(),
        raft_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        peers: Vec::new(),
        bootstrap: true,
        chunkserver_timeout: Duration::from_secs(3),
        snapshot_every: rawfs_metadata::DEFAULT_SNAPSHOT_EVERY,
    };
    let handle = rawfs_metadata::serve(cfg, shutdown).await.unwrap();
    Daemon {
        dir,
        stop: Some(tx),
        handle: Some(handle),
    }
}

async fn start_chunkserver(id: u64, metadata: &str) -> Daemon<ChunkserverHandle> {
    let dir = tempfile::tempdir().unwrap();
    let (tx, shutdown) = stopper();
    let cfg = ChunkserverConfig {
        id,
        data_dir: dir.path().to_path_buf(),
        data_listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        metadata: vec![metadata.to_string()],
        capacity: Some(4 << 30),
        heartbeat_interval: Duration::from_millis(200),
    };
    let handle = rawfs_chunkserver::serve(cfg, shutdown).await.unwrap();
    Daemon {
        dir,
        stop: Some(tx),
        handle: Some(handle),
    }
}

impl Daemon<ChunkserverHandle> {
    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.join().await.unwrap();
        }
    }
}

impl Daemon<MetadataHandle> {
    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.join().await.unwrap();
        }
    }
}

/// Polls `check` until it returns true or `limit` passes.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn chunk_file(dir: &Path, chunk: u64) -> PathBuf {
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

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8 ^ seed)
        .collect()
}

async fn loc(client: &Client, ino: Ino, index: u64) -> ChunkLoc {
    let mut locs = client.meta().chunks(ino, index, 1).await.unwrap();
    assert_eq!(locs.len(), 1, "chunk {index} exists");
    locs.remove(0)
}

/// A metadata service and `n` chunkservers in this process, and a client of them (with
/// `write_buffer` bytes of write buffer) once every chunkserver is up.
async fn cluster(
    n: u64,
    write_buffer: usize,
) -> (
    Daemon<MetadataHandle>,
    Vec<Daemon<ChunkserverHandle>>,
    Client,
    String,
) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let meta = start_metadata().await;
    let meta_addr = meta.handle.as_ref().unwrap().addr().to_string();
    let mut servers = Vec::new();
    for id in 1..=n {
        servers.push(start_chunkserver(id, &meta_addr).await);
    }
    let client = Client::new(ClientConfig {
        metadata: vec![meta_addr.clone()],
        timeouts: ClientTimeouts {
            call: Duration::from_secs(5),
            op: Duration::from_secs(15),
        },
        io_timeout: Duration::from_secs(5),
        write_buffer,
        ..ClientConfig::default()
    });
    wait_until("the chunkservers up", Duration::from_secs(30), || async {
        match client.meta().status().await {
            Ok(st) => st.chunkservers.iter().filter(|c| c.up).count() == n as usize,
            Err(_) => false,
        }
    })
    .await;
    (meta, servers, client, meta_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_io_on_a_real_cluster() {
    let (mut meta, mut servers, client, meta_addr) = cluster(3, 1 << 20).await;

    let attr = client
        .meta()
        .mknod(
            ROOT_INO,
            ByteBuf::from(b"data.bin".to_vec()),
            NewNode {
                kind: FileKind::File,
                perm: 0o644,
                rdev: 0,
                exclusive: true,
            },
            Caller { uid: 0, gid: 0 },
        )
        .await
        .unwrap();
    let ino = attr.ino;

    // 3 MiB across the boundary of chunks 0 and 1, in 128 KiB writes, then fsync.
    let start = CHUNK_SIZE - (1 << 20);
    let data = pattern(1, 3 << 20);
    let end = start + data.len() as u64;
    let io = client.file(ino, 0);
    for (i, part) in data.chunks(128 << 10).enumerate() {
        io.write(start + (i * (128 << 10)) as u64, part)
            .await
            .unwrap();
    }
    io.fsync().await.unwrap();
    assert_eq!(client.meta().getattr(ino).await.unwrap().size, end);
    assert_eq!(loc(&client, ino, 0).await.replicas.len(), 3);

    let fresh = client.file(ino, end);
    assert!(
        fresh.read(start, 3 << 20).await.unwrap() == data,
        "read back"
    );
    assert_eq!(
        fresh.read(1 << 20, 4096).await.unwrap(),
        vec![0u8; 4096],
        "hole"
    );
    // Sequential reads through the read-ahead windows.
    let mut back = Vec::new();
    for off in (start..end).step_by(128 << 10) {
        back.extend(fresh.read(off, 128 << 10).await.unwrap());
    }
    assert!(back == data, "sequential read back");

    // Corrupt the copy of chunk 1 that is read first: reads still return the right bytes
    // and the bad copy is dropped from the chunk.
    let l1 = loc(&client, ino, 1).await;
    let bad = l1.replicas[(l1.chunk % l1.replicas.len() as u64) as usize].server;
    let path = chunk_file(servers[(bad - 1) as usize].dir.path(), l1.chunk);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x5A; 64], DATA_OFFSET + 4096).unwrap();
    }
    let fresh = client.file(ino, end);
    assert!(fresh.read(CHUNK_SIZE, 1 << 20).await.unwrap() == data[1 << 20..2 << 20]);
    let l1 = loc(&client, ino, 1).await;
    assert!(
        !l1.replicas.iter().any(|r| r.server == bad),
        "corrupt copy dropped"
    );

    // Stop a chunkserver that still holds chunk 1; the write and fsync still succeed.
    let victim = l1.replicas[0].server;
    servers[(victim - 1) as usize].stop().await;
    let more = pattern(2, 1 << 20);
    io.write(end, &more).await.unwrap();
    io.fsync().await.unwrap();
    let l1 = loc(&client, ino, 1).await;
    assert!(
        !l1.replicas.iter().any(|r| r.server == victim),
        "dead replica dropped"
    );
    let total = end + more.len() as u64;
    let fresh = client.file(ino, total);
    assert!(fresh.read(end, 1 << 20).await.unwrap() == more);
    assert!(fresh.read(start, 3 << 20).await.unwrap() == data);
    let st = client.meta().status().await.unwrap();
    assert!(st.chunks.under_replicated >= 1, "{:?}", st.chunks);

    // Truncate into the middle of chunk 1, then extend: the old bytes must read as zeros.
    let cut = CHUNK_SIZE + 10;
    io.flush().await.unwrap();
    let set = |size| SetAttr {
        size: Some(size),
        ..SetAttr::default()
    };
    client.meta().setattr(ino, set(cut)).await.unwrap();
    io.set_size(cut);
    io.truncate_tail(cut).await.unwrap();
    client.meta().setattr(ino, set(total)).await.unwrap();
    io.set_size(total);
    let fresh = client.file(ino, total);
    let back = fresh
        .read(CHUNK_SIZE, (total - CHUNK_SIZE) as u32)
        .await
        .unwrap();
    assert_eq!(back[..10], data[1 << 20..(1 << 20) + 10]);
    assert!(
        back[10..].iter().all(|b| *b == 0),
        "bytes past the truncate came back"
    );

    // Punch chunk 0's tail and all of nothing else; the data before stays.
    io.punch(start, 4096).await.unwrap();
    assert_eq!(io.read(start, 4096).await.unwrap(), vec![0u8; 4096]);
    assert!(io.read(start + 4096, 4096).await.unwrap() == data[4096..8192]);

    for s in &mut servers {
        s.stop().await;
    }
    // With every chunkserver gone, I/O fails within the deadlines instead of hanging.
    let t = Instant::now();
    let dead = client.file(ino, total);
    assert!(dead.read(start, 4096).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(20));
    meta.stop().await;
    // With the metadata service gone too, a flush fails within the client's deadlines.
    let short = Client::new(ClientConfig {
        metadata: vec![meta_addr],
        timeouts: ClientTimeouts {
            call: Duration::from_secs(1),
            op: Duration::from_secs(3),
        },
        io_timeout: Duration::from_secs(1),
        write_buffer: 1 << 20,
        ..ClientConfig::default()
    });
    let t = Instant::now();
    let orphan = short.file(ino, total);
    orphan.write(total, b"lost").await.unwrap();
    assert!(orphan.flush().await.is_err());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_coded_chunks_on_a_real_cluster() {
    let (mut meta, mut servers, client, _) = cluster(6, DEFAULT_WRITE_BUFFER).await;

    // Two cold files of one chunk each, written as replicas, then converted.
    let mut files = Vec::new();
    for (name, size, seed) in [("a", (9 << 20) + 4321, 5u8), ("b", (5 << 20) + 7, 6)] {
        let attr = client
            .meta()
            .mknod(
                ROOT_INO,
                ByteBuf::from(name.as_bytes().to_vec()),
                NewNode {
                    kind: FileKind::File,
                    perm: 0o644,
                    rdev: 0,
                    exclusive: true,
                },
                Caller { uid: 0, gid: 0 },
            )
            .await
            .unwrap();
        let data = pattern(seed, size);
        let io = client.file(attr.ino, 0);
        io.write(0, &data).await.unwrap();
        io.fsync().await.unwrap();
        io.flush().await.unwrap();
        client
            .meta()
            .set_class(attr.ino, StorageClass::Cold)
            .await
            .unwrap();
        files.push((attr.ino, data));
    }
    let page = client.meta().cold_chunks((0, 0), 0, 100).await.unwrap();
    for (ino, data) in &files {
        let c = page
            .chunks
            .iter()
            .find(|c| c.ino == *ino)
            .expect("a cold file's chunk is due");
        assert_eq!(c.length, data.len() as u64);
        let new = client.convert_to_ec(c).await.unwrap();
        let ec = new.ec.as_ref().expect("erasure coded");
        assert_eq!(ec.length, c.length);
        assert_eq!(loc(&client, *ino, 0).await, new);
        let fresh = client.file(*ino, data.len() as u64);
        assert!(fresh.read(0, data.len() as u32).await.unwrap() == *data);
    }

    // Overwrite a few bytes in the middle of b: right data, replicated again.
    let (b, mut b_data) = files.pop().unwrap();
    let io = client.file(b, b_data.len() as u64);
    io.write(3 << 20, b"overwrite").await.unwrap();
    io.fsync().await.unwrap();
    b_data[3 << 20..(3 << 20) + 9].copy_from_slice(b"overwrite");
    let now = loc(&client, b, 0).await;
    assert!(now.ec.is_none() && !now.replicas.is_empty(), "{now:?}");
    let fresh = client.file(b, b_data.len() as u64);
    assert!(fresh.read(0, b_data.len() as u32).await.unwrap() == b_data);

    // Stop the servers of two data shards of a: it still reads back byte-identical.
    let (a, a_data) = files.pop().unwrap();
    let a_loc = loc(&client, a, 0).await;
    let shards = &a_loc.ec.as_ref().unwrap().shards;
    for k in [0, 2] {
        let server = shards[k].replica.as_ref().unwrap().server;
        servers[(server - 1) as usize].stop().await;
    }
    let fresh = client.file(a, a_data.len() as u64);
    assert!(fresh.read(0, a_data.len() as u32).await.unwrap() == a_data);

    for s in &mut servers {
        s.stop().await;
    }
    meta.stop().await;
}

/// Throughput of sequential I/O through the library (a benchmark, not a check):
/// `cargo test -p rawfs-client --release --test cluster -- --ignored --nocapture`.
// A benchmark, not a check: `RUSTFLAGS="--cfg rawfs_bench" cargo test ... -- --nocapture`.
#[cfg(rawfs_bench)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_throughput() {
    let mut meta = start_metadata().await;
    let meta_addr = meta.handle.as_ref().unwrap().addr().to_string();
    let mut servers = Vec::new();
    for id in 1..=3 {
        servers.push(start_chunkserver(id, &meta_addr).await);
    }
    let client = Client::new(ClientConfig::new(vec![meta_addr.clone()]));
    wait_until("3 chunkservers up", Duration::from_secs(30), || async {
        match client.meta().status().await {
            Ok(st) => st.chunkservers.iter().filter(|c| c.up).count() == 3,
            Err(_) => false,
        }
    })
    .await;
    let attr = client
        .meta()
        .mknod(
            ROOT_INO,
            ByteBuf::from(b"big".to_vec()),
            NewNode {
                kind: FileKind::File,
                perm: 0o644,
                rdev: 0,
                exclusive: true,
            },
            Caller { uid: 0, gid: 0 },
        )
        .await
        .unwrap();
    let total: u64 = 256 << 20;
    let block = pattern(3, 1 << 20);
    let io = client.file(attr.ino, 0);
    let t = Instant::now();
    for off in (0..total).step_by(1 << 20) {
        io.write(off, &block).await.unwrap();
    }
    io.fsync().await.unwrap();
    let w = t.elapsed();
    let fresh = client.file(attr.ino, total);
    let t = Instant::now();
    for off in (0..total).step_by(128 << 10) {
        let got = fresh.read(off, 128 << 10).await.unwrap();
        assert_eq!(got.len(), 128 << 10);
    }
    let r = t.elapsed();
    let mib = (total >> 20) as f64;
    println!(
        "write+fsync {:.0} MiB/s, read {:.0} MiB/s",
        mib / w.as_secs_f64(),
        mib / r.as_secs_f64()
    );
    // 4 KiB random writes (fsync at the end) and reads, one at a time.
    let ops = 4000u64;
    let page = pattern(4, 4096);
    let mut x = 88172645463325252u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % (total / 4096)) * 4096
    };
    let t = Instant::now();
    for _ in 0..ops {
        io.write(next(), &page).await.unwrap();
    }
    io.fsync().await.unwrap();
    let w = t.elapsed();
    let t = Instant::now();
    for _ in 0..ops {
        fresh.read(next(), 4096).await.unwrap();
    }
    let r = t.elapsed();
    println!(
        "4 KiB random: write {:.0} IOPS, read {:.0} IOPS",
        ops as f64 / w.as_secs_f64(),
        ops as f64 / r.as_secs_f64()
    );
    for s in &mut servers {
        s.stop().await;
    }
    meta.stop().await;
}
