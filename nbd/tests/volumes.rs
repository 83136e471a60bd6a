//! Volumes on a real in-process cluster (1 metadata replica, 3 chunkservers on 127.0.0.1:0
//! in tempdirs) served by the NBD server: admin operations, and real NBD clients writing
//! through the client library to the chunkservers.

use rawfs_chunkserver::{ChunkserverConfig, ChunkserverHandle};
use rawfs_metadata::{MetadataConfig, MetadataHandle};
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
mod support;

use rawfs_nbd::proto::{CMD_READ, CMD_WRITE, EPERM, FLAG_CAN_MULTI_CONN, FLAG_READ_ONLY};
use rawfs_nbd::{
    serve_volumes, CreateOptions, NbdConfig, NbdHandle, ServerConfig, VolumeError, Volumes,
};
use std::process::Command;
use std::time::{Duration, Instant};
use support::Raw;
use tokio::sync::oneshot;

struct Cluster {
    rt: tokio::runtime::Runtime,
    _dirs: Vec<tempfile::TempDir>,
    stops: Vec<oneshot::Sender<()>>,
    meta: Option<MetadataHandle>,
    chunkservers: Vec<ChunkserverHandle>,
    addr: String,
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

impl Cluster {
    fn start() -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut dirs = Vec::new();
        let mut stops = Vec::new();
        let mdir = tempfile::tempdir().expect("tempdir");
        let (tx, shutdown) = stopper();
        stops.push(tx);
        let cfg = MetadataConfig {
            id: 1,
            listen: "127.0.0.1:0".parse().expect("addr"),
            raft_listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: mdir.path().to_path_buf(),
            peers: Vec::new(),
            bootstrap: true,
            chunkserver_timeout: Duration::from_secs(3),
            snapshot_every: rawfs_metadata::DEFAULT_SNAPSHOT_EVERY,
        };
        let meta = rt
            .block_on(rawfs_metadata::serve(cfg, shutdown))
            .expect("metadata");
        let addr = meta.addr().to_string();
        dirs.push(mdir);
        let mut chunkservers = Vec::new();
        for id in 1..=3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (tx, shutdown) = stopper();
            stops.push(tx);
            let cfg = ChunkserverConfig {
                id,
                data_dir: dir.path().to_path_buf(),
                data_listen: "127.0.0.1:0".parse().expect("addr"),
                control_listen: "127.0.0.1:0".parse().expect("addr"),
                metadata: vec![addr.clone()],
                capacity: Some(8 << 30),
                heartbeat_interval: Duration::from_millis(200),
            };
            chunkservers.push(
                rt.block_on(rawfs_chunkserver::serve(cfg, shutdown))
                    .expect("chunkserver"),
            );
            dirs.push(dir);
        }
        let c = Cluster {
            rt,
            _dirs: dirs,
            stops,
            meta: Some(meta),
            chunkservers,
            addr,
        };
        let meta = c.meta_client();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let up =
                c.rt.block_on(meta.status())
                    .map(|s| s.chunkservers.iter().filter(|cs| cs.up).count())
                    .unwrap_or(0);
            if up == 3 {
                break;
            }
            assert!(Instant::now() < end, "chunkservers did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn meta_client(&self) -> MetadataClient {
        MetadataClient::new(vec![self.addr.clone()], ClientTimeouts::default())
    }

    fn volumes(&self) -> Volumes {
        Volumes::new(self.meta_client())
    }

    fn nbd(&self) -> (NbdHandle, oneshot::Sender<()>) {
        let (tx, shutdown) = stopper();
        let cfg = NbdConfig {
            metadata: vec![self.addr.clone()],
            server: ServerConfig::new("127.0.0.1:0".parse().expect("addr")),
        };
        let h = self.rt.block_on(serve_volumes(cfg, shutdown)).expect("nbd");
        (h, tx)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for tx in self.stops.drain(..) {
            let _ = tx.send(());
        }
        let cs: Vec<ChunkserverHandle> = self.chunkservers.drain(..).collect();
        let meta = self.meta.take();
        self.rt.block_on(async move {
            for h in cs {
                let _ = tokio::time::timeout(Duration::from_secs(20), h.join()).await;
            }
            if let Some(m) = meta {
                let _ = tokio::time::timeout(Duration::from_secs(20), m.join()).await;
            }
        });
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn volumes_are_created_listed_grown_and_deleted() {
    let c = Cluster::start();
    let v = c.volumes();
    c.rt.block_on(async {
        assert!(v.list().await.expect("list").is_empty(), "no directory yet");
        let a = v.create("vm1", 1 << 30).await.expect("create");
        assert_eq!((a.size, a.used_bytes), (1 << 30, 0));
        v.create("data-2", 512).await.expect("create");
        assert!(matches!(
            v.create("vm1", 4096).await,
            Err(VolumeError::Exists(_))
        ));
        assert!(matches!(
            v.create(".x", 4096).await,
            Err(VolumeError::BadName(_))
        ));
        assert!(matches!(
            v.create("y", 1000).await,
            Err(VolumeError::BadSize { .. })
        ));
        let names: Vec<String> = v
            .list()
            .await
            .expect("list")
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["data-2", "vm1"]);
        assert!(matches!(
            v.resize("vm1", 1 << 20).await,
            Err(VolumeError::Shrink { .. })
        ));
        assert_eq!(v.resize("vm1", 2 << 30).await.expect("grow").size, 2 << 30);
        assert!(matches!(
            v.resize("nope", 1 << 20).await,
            Err(VolumeError::NotFound(_))
        ));
        v.delete("data-2").await.expect("delete");
        assert!(matches!(
            v.delete("data-2").await,
            Err(VolumeError::NotFound(_))
        ));
        assert_eq!(v.list().await.expect("list").len(), 1);
    });
}

#[test]
fn nbd_clients_write_through_to_the_cluster() {
    let c = Cluster::start();
    let v = c.volumes();
    c.rt.block_on(v.create("vm1", 160 << 20)).expect("create");
    let (h, stop) = c.nbd();
    let uri = format!("nbd://{}/vm1", h.addr());
    let map = run(Command::new("nbdinfo").arg("--map").arg(&uri));
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(
        map.contains("hole,zero"),
        "unwritten volume is one hole: {map}"
    );
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{}", h.addr())));
    assert!(list.contains("vm1"), "{list}");

    // 100 MiB of random data across two chunks, in over 4 connections, out again.
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    let back = dir.path().join("back");
    {
        use rand::{RngCore, SeedableRng};
        let mut data = vec![0u8; 100 << 20];
        rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut data);
        std::fs::write(&src, &data).expect("write src");
    }
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    let (a, b) = (
        std::fs::read(&src).expect("src"),
        std::fs::read(&back).expect("back"),
    );
    assert_eq!(b.len(), 160 << 20);
    assert!(a[..] == b[..a.len()], "data differs");
    assert!(
        b[a.len()..].iter().all(|&x| x == 0),
        "the rest reads as zeros"
    );
    let map = run(Command::new("nbdinfo").arg("--map").arg(&uri));
    assert!(
        map.lines().next().is_some_and(|l| l.contains("data")),
        "{map}"
    );
    assert!(
        map.lines().last().is_some_and(|l| l.contains("hole")),
        "third chunk unwritten: {map}"
    );

    // The data is in the cluster, not only in the server: a second server sees it.
    let used =
        c.rt.block_on(v.get("vm1"))
            .expect("get")
            .expect("exists")
            .used_bytes;
    assert_eq!(used, 128 << 20, "two whole chunks allocated");
    let (h2, stop2) = c.nbd();
    let back2 = dir.path().join("back2");
    run(Command::new("nbdcopy")
        .arg(format!("nbd://{}/vm1", h2.addr()))
        .arg(&back2));
    assert!(
        std::fs::read(&back2).expect("back2") == b,
        "second server reads the same"
    );

    // Trim releases whole chunks: the map shows a hole again and the space is freed.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "discard 0 64M", "-c", "flush"])
        .arg(&uri));
    let map = run(Command::new("nbdinfo").arg("--map").arg(&uri));
    assert!(
        map.lines().next().is_some_and(|l| l.contains("hole")),
        "{map}"
    );
    let used =
        c.rt.block_on(v.get("vm1"))
            .expect("get")
            .expect("exists")
            .used_bytes;
    assert_eq!(used, 64 << 20, "one chunk released");
    let _ = stop.send(());
    let _ = stop2.send(());
    c.rt.block_on(async {
        h.join().await;
        h2.join().await;
    });
}

#[test]
fn a_deleted_volume_stays_usable_by_connected_clients_only() {
    let c = Cluster::start();
    let v = c.volumes();
    c.rt.block_on(v.create("gone", 8 << 20)).expect("create");
    let (h, stop) = c.nbd();
    let addr = h.addr();
    // A client holds the volume open through the whole test.
    let qemu = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "flush",
            "-c",
            "sleep 3000",
            "-c",
            "read -P 0x5a 0 1M",
        ])
        .arg(format!("nbd://{addr}/gone"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let end = Instant::now() + Duration::from_secs(30);
    while c.rt.block_on(h.catalog().in_use()).is_empty() {
        assert!(Instant::now() < end, "client never attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.rt.block_on(v.delete("gone")).expect("delete");
    let out = Command::new("nbdinfo")
        .arg(format!("nbd://{addr}/gone"))
        .output()
        .expect("nbdinfo");
    assert!(!out.status.success(), "new connections find no export");
    let out = qemu.wait_with_output().expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("read 1048576/1048576"),
        "{text}"
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let _ = stop.send(());
    c.rt.block_on(h.join());
}

/// Writes 512 bytes of `byte` at 0 on `conn`; the NBD error code.
fn write_sector(conn: &mut Raw, handle: u64, byte: u8) -> u32 {
    conn.request(CMD_WRITE, 0, handle, 0, 512, &[byte; 512]);
    let (err, h, _) = conn.simple(0);
    assert_eq!(h, handle);
    err
}

/// The first 512 bytes, as `conn` reads them.
fn read_sector(conn: &mut Raw, handle: u64) -> Vec<u8> {
    conn.request(CMD_READ, 0, handle, 0, 512, &[]);
    let (err, h, data) = conn.simple(512);
    assert_eq!((err, h), (0, handle));
    data
}

#[test]
fn a_second_writer_reads_only_unless_the_volume_is_multi_conn() {
    let c = Cluster::start();
    let v = c.volumes();
    c.rt.block_on(async {
        v.create("solo", 1 << 20).await.expect("create");
        let opts = CreateOptions {
            multi_conn: true,
            ..CreateOptions::default()
        };
        v.create_with("shared", 1 << 20, opts)
            .await
            .expect("create");
    });
    let (h, stop) = c.nbd();
    let addr = h.addr();

    // Single writer: the first connection writes and is not advertised as multi-conn...
    let mut a = Raw::start(addr);
    let (_, fa) = a.go("solo");
    assert_eq!(fa & (FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN), 0, "{fa:#x}");
    assert_eq!(write_sector(&mut a, 1, 0xa1), 0);
    // ...a second one gets it read-only: writes refused, the writer's data visible.
    let mut b = Raw::start(addr);
    let (_, fb) = b.go("solo");
    assert_ne!(
        fb & FLAG_READ_ONLY,
        0,
        "second connection must be read-only: {fb:#x}"
    );
    assert_eq!(write_sector(&mut b, 2, 0xb2), EPERM);
    assert_eq!(read_sector(&mut b, 3), vec![0xa1; 512]);
    assert_eq!(write_sector(&mut a, 4, 0xa4), 0, "the writer keeps writing");
    // Once the writer leaves, the next connection writes.
    drop(a);
    let mut writer = None;
    support::wait_for(
        "the volume to take a new writer",
        Duration::from_secs(10),
        || {
            let mut probe = Raw::start(addr);
            let writable = probe.go("solo").1 & FLAG_READ_ONLY == 0;
            if writable {
                writer = Some(probe);
            }
            writable
        },
    );
    let mut n = writer.expect("a writable connection");
    assert_eq!(write_sector(&mut n, 5, 0xc5), 0);
    assert_eq!(read_sector(&mut b, 6), vec![0xc5; 512]);

    // Multi-conn: every connection writes, and it is advertised.
    let mut x = Raw::start(addr);
    let mut y = Raw::start(addr);
    let (_, fx) = x.go("shared");
    let (_, fy) = y.go("shared");
    for f in [fx, fy] {
        assert_eq!(f & FLAG_READ_ONLY, 0, "{f:#x}");
        assert_ne!(f & FLAG_CAN_MULTI_CONN, 0, "{f:#x}");
    }
    assert_eq!(write_sector(&mut x, 7, 0x77), 0);
    assert_eq!(write_sector(&mut y, 8, 0x88), 0);
    assert_eq!(read_sector(&mut x, 9), vec![0x88; 512]);
    drop((b, n, x, y));
    let _ = stop.send(());
    c.rt.block_on(h.join());
}
