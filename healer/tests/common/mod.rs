//! The in-process cluster the healer tests share: a metadata replica and chunkservers on
//! 127.0.0.1:0 in temporary directories, stopped when dropped, and small file helpers.

#![allow(dead_code)] // each test binary uses its own part

use rawfs_chunkserver::{ChunkserverConfig, ChunkserverHandle};
use rawfs_client::Client;
use rawfs_metadata::{MetadataConfig, MetadataHandle};
use rawfs_metadata_api::{Caller, ChunkLoc, FileKind, Ino, NewNode, ROOT_INO};
use serde_bytes::ByteBuf;
use std::future::Future;
use std::time::Duration;
use tokio::sync::oneshot;

/// A running daemon: its directory lives as long as it does.
pub struct Daemon<H> {
    pub dir: tempfile::TempDir,
    pub stop: Option<oneshot::Sender<()>>,
    pub handle: Option<H>,
}

impl<H> Drop for Daemon<H> {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn stopper() -> (
    oneshot::Sender<()>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

pub async fn start_metadata(chunkserver_timeout: Duration) -> Daemon<MetadataHandle> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, shutdown) = stopper();
    let cfg = MetadataConfig {
        id: 1,
        listen: "127.0.0.1:0".parse().expect("addr"),
        raft_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_path_buf(),
        peers: Vec::new(),
        bootstrap: true,
        chunkserver_timeout,
        snapshot_every: rawfs_metadata::DEFAULT_SNAPSHOT_EVERY,
    };
    let handle = rawfs_metadata::serve(cfg, shutdown)
        .await
        .expect("metadata");
    Daemon {
        dir,
        stop: Some(tx),
        handle: Some(handle),
    }
}

pub async fn start_chunkserver(id: u64, metadata: &str) -> Daemon<ChunkserverHandle> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, shutdown) = stopper();
    let cfg = ChunkserverConfig {
        id,
        data_dir: dir.path().to_path_buf(),
        data_listen: "127.0.0.1:0".parse().expect("addr"),
        control_listen: "127.0.0.1:0".parse().expect("addr"),
        metadata: vec![metadata.to_string()],
        capacity: Some(4 << 30),
        heartbeat_interval: Duration::from_millis(200),
    };
    let handle = rawfs_chunkserver::serve(cfg, shutdown)
        .await
        .expect("chunkserver");
    Daemon {
        dir,
        stop: Some(tx),
        handle: Some(handle),
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8 ^ seed)
        .collect()
}

pub async fn file_with(client: &Client, name: &str, data: &[u8]) -> Ino {
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
        .expect("mknod");
    let io = client.file(attr.ino, 0);
    io.write(0, data).await.expect("write");
    io.fsync().await.expect("fsync");
    attr.ino
}

pub async fn chunk0(client: &Client, ino: Ino) -> ChunkLoc {
    let mut locs = client.meta().chunks(ino, 0, 1).await.expect("chunks");
    assert_eq!(locs.len(), 1, "chunk 0 of {ino} exists");
    locs.remove(0)
}

/// Runs the healer daemon against `metadata` until `stop`, scanning every 200 ms with its
/// repair throttle lifted. Its future is not `Send` (its repair context borrows a `dyn Fn`):
/// it gets a thread and a runtime of its own, as in `rawfs healer`.
pub fn spawn_healer(
    metadata: &str,
    stop: &tokio_util::sync::CancellationToken,
) -> std::thread::JoinHandle<Result<(), rawfs_healer::HealerError>> {
    let cfg = rawfs_healer::HealerConfig {
        metadata: vec![metadata.to_string()],
        id: 1,
        scan_interval: Duration::from_millis(200),
        lease_ttl: Duration::from_secs(1),
        cold_after: Duration::from_secs(3600),
        repair_rate: 0,
        workers: rawfs_healer::DEFAULT_WORKERS,
    };
    let token = stop.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(rawfs_healer::run(cfg, token))
    })
}

/// An in-process cluster: one metadata replica, `servers` chunkservers (ids from 1; a
/// test stops one by setting its slot to `None`), and a client of them with a 1 MiB write
/// buffer. Returned once every chunkserver is up.
pub struct TestCluster {
    pub meta: Daemon<MetadataHandle>,
    pub addr: String,
    pub servers: Vec<Option<Daemon<ChunkserverHandle>>>,
    pub client: Client,
}

pub async fn test_cluster(servers: u64) -> TestCluster {
    let meta = start_metadata(Duration::from_secs(2)).await;
    let addr = meta.handle.as_ref().expect("handle").addr().to_string();
    let mut daemons = Vec::new();
    for id in 1..=servers {
        daemons.push(Some(start_chunkserver(id, &addr).await));
    }
    let client = Client::new(rawfs_client::ClientConfig {
        metadata: vec![addr.clone()],
        timeouts: rawfs_metadata_api::ClientTimeouts {
            call: Duration::from_secs(5),
            op: Duration::from_secs(15),
        },
        io_timeout: Duration::from_secs(5),
        write_buffer: 1 << 20,
        ..rawfs_client::ClientConfig::default()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.meta().status().await.map_or(true, |st| {
        st.chunkservers.iter().filter(|c| c.up).count() < servers as usize
    }) {
        assert!(
            std::time::Instant::now() < deadline,
            "{servers} chunkservers never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    TestCluster {
        meta,
        addr,
        servers: daemons,
        client,
    }
}
