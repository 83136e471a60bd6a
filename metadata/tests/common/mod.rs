//! Helpers shared by the metadata service's integration tests (each test crate uses some).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rawfs_metadata::{serve, MetadataConfig, MetadataHandle};
use rawfs_metadata_api::*;
use serde_bytes::ByteBuf;
use tokio::sync::oneshot;

/// Free loopback ports for replicas that must know each other's addresses before they bind.
///
/// Drawn at random from below the kernel's ephemeral range (`ip_local_port_range`, 32768 up
/// by default): a port the kernel hands out for `127.0.0.1:0` is also one it hands to the
/// next outgoing connection, so a replica started later in a test (after its peers had
/// connected to each other) could find its port taken by one of those connections.
/// Every port is held open until all are chosen, so none repeats.
pub fn free_ports(n: usize) -> Vec<u16> {
    let lo_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&lo| lo > 12000)
        .unwrap_or(32768);
    let (lo, hi) = (lo_ephemeral - 12000, lo_ephemeral);
    let mut held = Vec::new();
    for _ in 0..n * 200 {
        if held.len() == n {
            break;
        }
        let port = lo + rand::random::<u16>() % (hi - lo);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    assert_eq!(held.len(), n, "no {n} free ports in {lo}..{hi}");
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A name from a string.
pub fn n(s: &str) -> Name {
    ByteBuf::from(s.as_bytes().to_vec())
}

/// Root, as the caller of namespace operations.
pub const ME: Caller = Caller { uid: 0, gid: 0 };

/// A single-replica metadata service on a loopback port, stopped by the sender.
pub async fn start(dir: &Path) -> (MetadataHandle, oneshot::Sender<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let cfg = MetadataConfig {
        id: 1,
        listen: "127.0.0.1:0".parse().unwrap(),
        raft_listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        peers: vec![],
        bootstrap: true,
        chunkserver_timeout: Duration::from_secs(2),
        snapshot_every: rawfs_metadata::DEFAULT_SNAPSHOT_EVERY,
    };
    let h = serve(cfg, async move {
        let _ = rx.await;
    })
    .await
    .expect("serve");
    (h, tx)
}

/// A client of the service at `addr`.
pub fn client(addr: SocketAddr) -> MetadataClient {
    MetadataClient::new(
        vec![addr.to_string()],
        ClientTimeouts {
            call: Duration::from_secs(5),
            op: Duration::from_secs(20),
        },
    )
}

/// Makes the regular file `parent/name`.
pub async fn file(c: &MetadataClient, parent: Ino, name: &str) -> Attr {
    c.mknod(
        parent,
        n(name),
        NewNode {
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            exclusive: true,
        },
        ME,
    )
    .await
    .unwrap()
}
