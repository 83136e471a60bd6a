//! Request ids across lost replies, local reads, replica status, digests and membership
//! changes: `serve` on loopback ports, driven through `MetadataClient` over real TCP.

mod common;
use common::{free_ports, n, ME};

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rawfs_metadata::{serve, MetadataConfig, MetadataHandle, Peer, DEFAULT_SNAPSHOT_EVERY};
use rawfs_metadata_api::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

struct Node {
    handle: MetadataHandle,
    stop: oneshot::Sender<()>,
}

impl Node {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.join().await.unwrap();
    }
}

async fn start(
    id: u64,
    dir: &Path,
    listen: &str,
    raft_listen: &str,
    peers: Vec<Peer>,
    bootstrap: bool,
) -> Node {
    let (stop, rx) = oneshot::channel::<()>();
    let cfg = MetadataConfig {
        id,
        listen: listen.parse().unwrap(),
        raft_listen: raft_listen.parse().unwrap(),
        data_dir: dir.to_path_buf(),
        peers,
        bootstrap,
        chunkserver_timeout: Duration::from_secs(2),
        snapshot_every: DEFAULT_SNAPSHOT_EVERY,
    };
    let handle = serve(cfg, async move {
        let _ = rx.await;
    })
    .await
    .expect("serve");
    Node { handle, stop }
}

fn client(addrs: Vec<String>, op: Duration) -> MetadataClient {
    MetadataClient::new(
        addrs,
        ClientTimeouts {
            call: Duration::from_secs(3).min(op),
            op,
        },
    )
}

fn file_node() -> NewNode {
    NewNode {
        kind: FileKind::File,
        perm: 0o644,
        rdev: 0,
        exclusive: true,
    }
}

/// Polls `f` until it returns `Some`, for at most 20 s.
async fn until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy that, when armed, swallows the next reply coming back from the server and
/// closes that connection: a reply lost after the server applied the request.
async fn lossy_proxy(target: SocketAddr) -> (String, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let armed = Arc::new(AtomicBool::new(false));
    let arm = armed.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            let Ok(up) = TcpStream::connect(target).await else {
                continue;
            };
            let armed = arm.clone();
            tokio::spawn(async move {
                let (mut down_r, mut down_w) = down.into_split();
                let (mut up_r, mut up_w) = up.into_split();
                let requests =
                    tokio::spawn(async move { tokio::io::copy(&mut down_r, &mut up_w).await });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match up_r.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            if armed.swap(false, Ordering::SeqCst) {
                                break;
                            }
                            if down_w.write_all(&buf[..k]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                requests.abort();
            });
        }
    });
    (addr, armed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_retried_after_a_lost_reply_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(1, dir.path(), "127.0.0.1:0", "127.0.0.1:0", vec![], true).await;
    let (proxy, armed) = lossy_proxy(node.handle.addr()).await;
    let c = client(vec![proxy], Duration::from_secs(20));
    let f = c.mknod(ROOT_INO, n("f"), file_node(), ME).await.unwrap();

    armed.store(true, Ordering::SeqCst);
    c.rename(ROOT_INO, n("f"), ROOT_INO, n("g"), RenameFlags::default())
        .await
        .expect("the retry gets the first attempt's reply, not NotFound");
    assert!(!armed.load(Ordering::SeqCst), "the first reply was lost");
    assert_eq!(c.lookup(ROOT_INO, n("g")).await.unwrap().ino, f.ino);
    assert_eq!(c.lookup(ROOT_INO, n("f")).await, Err(MetaError::NotFound));

    // The same for a write whose effect is not idempotent by itself.
    armed.store(true, Ordering::SeqCst);
    let a = c.commit_write(f.ino, 100, 4096).await.unwrap();
    assert!(!armed.load(Ordering::SeqCst));
    assert_eq!(a.stored, 4096);
    assert_eq!(c.getattr(f.ino).await.unwrap().stored, 4096, "applied once");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_report_status_serve_local_reads_agree_and_change_membership() {
    let ports = free_ports(8);
    let client_addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let raft_addr = |i: usize| format!("127.0.0.1:{}", ports[4 + i]);
    let peers = |i: usize| -> Vec<Peer> {
        (0..3)
            .filter(|&j| j != i)
            .map(|j| Peer {
                id: j as u64 + 1,
                addr: client_addr(j),
                raft_addr: raft_addr(j),
            })
            .collect()
    };
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().take(3).enumerate() {
        let node = start(
            i as u64 + 1,
            dir.path(),
            &client_addr(i),
            &raft_addr(i),
            peers(i),
            true,
        )
        .await;
        nodes.push(node);
    }
    let all: Vec<String> = (0..3).map(client_addr).collect();
    let c = client(all.clone(), Duration::from_secs(30));
    let a = c.mknod(ROOT_INO, n("a"), file_node(), ME).await.unwrap();

    // Every replica answers local reads from its own state, and catches up.
    for (i, addr) in all.iter().enumerate() {
        let local =
            client(vec![addr.clone()], Duration::from_secs(5)).with_consistency(Consistency::Local);
        let got = until("a local read to see the write", || {
            let local = local.clone();
            async move { local.lookup(ROOT_INO, n("a")).await.ok() }
        })
        .await;
        assert_eq!(got.ino, a.ino);
        let me = local.replica_status().await.unwrap();
        assert_eq!((me.id, &me.addr), (i as u64 + 1, addr));
        assert!(me.up && me.voter && me.leader.is_some(), "{me:?}");
    }

    // The leader reports every member, up, with its lag; all catch up.
    let status = until("every member up and caught up", || {
        let c = c.clone();
        async move {
            let s = c.status().await.ok()?;
            let ok = s.replicas.len() == 3 && s.replicas.iter().all(|r| r.up && r.lag == 0);
            ok.then_some(s)
        }
    })
    .await;
    let leader = status.leader.unwrap();
    for r in &status.replicas {
        let role = if r.id == leader { "leader" } else { "follower" };
        assert_eq!(
            (r.role.as_str(), r.voter, r.term),
            (role, true, status.term)
        );
        assert!(r.applied > 0);
    }

    // All replicas reach the same digest at the same index.
    let digests = |addrs: Vec<String>| async move {
        let mut out = Vec::new();
        for addr in addrs {
            out.push(
                client(vec![addr], Duration::from_secs(5))
                    .digest()
                    .await
                    .ok()?,
            );
        }
        let first = out[0];
        out.iter().all(|d| *d == first).then_some(first)
    };
    let d1 = until("equal digests", || digests(all.clone())).await;
    c.mknod(ROOT_INO, n("b"), file_node(), ME).await.unwrap();
    let d2 = until("equal digests after a write", || digests(all.clone())).await;
    assert!(d2.applied > d1.applied);
    assert_ne!(d2.digest, d1.digest);

    // A fourth replica that must not form a group of its own waits, refusing local reads...
    let fourth = start(
        4,
        dirs[3].path(),
        &client_addr(3),
        &raft_addr(3),
        peers(3),
        false,
    )
    .await;
    let lonely = client(vec![client_addr(3)], Duration::from_millis(800))
        .with_consistency(Consistency::Local);
    assert!(matches!(
        lonely.getattr(ROOT_INO).await,
        Err(MetaError::Unavailable { .. })
    ));
    // ... until the leader adds it; then it has everything.
    c.add_peer(4, client_addr(3), raft_addr(3)).await.unwrap();
    c.add_peer(4, client_addr(3), raft_addr(3))
        .await
        .expect("adding again is a no-op");
    let mut all4 = all.clone();
    all4.push(client_addr(3));
    until("the new replica to agree", || digests(all4.clone())).await;
    let s = c.status().await.unwrap();
    let new = s.replicas.iter().find(|r| r.id == 4).expect("member 4");
    assert!(new.voter && new.up, "{new:?}");
    let local4 =
        client(vec![client_addr(3)], Duration::from_secs(5)).with_consistency(Consistency::Local);
    assert_eq!(
        local4.lookup(ROOT_INO, n("b")).await.unwrap().kind,
        FileKind::File
    );

    c.remove_peer(4).await.unwrap();
    let s = c.status().await.unwrap();
    assert_eq!(
        s.replicas.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // Writes still commit with the group back to three.
    c.mknod(ROOT_INO, n("c"), file_node(), ME).await.unwrap();

    fourth.stop().await;
    for node in nodes {
        node.stop().await;
    }
}
