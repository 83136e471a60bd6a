//! Tiering on a real in-process cluster (1 metadata replica, chunkservers on 127.0.0.1:0 in
//! tempdirs): a pass converts the chunks of `cold` files, and of `auto` files once quiet for
//! `cold_after`, never those of `hot` files; the data reads back identical; with fewer than 6
//! chunkservers the pass stops at the first chunk for lack of room.

mod common;
use common::*;
use rawfs_chunkserver::ChunkserverHandle;
use rawfs_client::{Client, ClientConfig};
use rawfs_healer::tiering::Tiering;
use rawfs_metadata::MetadataHandle;
use rawfs_metadata_api::{ClientTimeouts, Ino, StorageClass};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A cluster with `n` chunkservers, all up, and a client for it.
async fn cluster(
    n: u64,
) -> (
    Daemon<MetadataHandle>,
    Vec<Daemon<ChunkserverHandle>>,
    Client,
) {
    let meta = start_metadata(Duration::from_secs(3)).await;
    let addr = meta.handle.as_ref().expect("handle").addr().to_string();
    let mut servers = Vec::new();
    for id in 1..=n {
        servers.push(start_chunkserver(id, &addr).await);
    }
    let client = Client::new(ClientConfig {
        metadata: vec![addr],
        timeouts: ClientTimeouts {
            call: Duration::from_secs(5),
            op: Duration::from_secs(15),
        },
        io_timeout: Duration::from_secs(5),
        write_buffer: 1 << 20,
        ..ClientConfig::default()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = match client.meta().status().await {
            Ok(st) => st.chunkservers.iter().filter(|c| c.up).count() as u64,
            Err(_) => 0,
        };
        if up == n {
            break;
        }
        assert!(Instant::now() < deadline, "{n} chunkservers not up in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (meta, servers, client)
}

async fn read_all(client: &Client, ino: Ino, len: usize) -> Vec<u8> {
    let io = client.file(ino, len as u64);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let want = (len - out.len()).min(1 << 20) as u32;
        let got = io.read(out.len() as u64, want).await.expect("read");
        assert!(!got.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&got);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_then_quiet_auto_chunks_become_rs_4_2_and_hot_ones_never() {
    let (_meta, _servers, client) = cluster(6).await;
    let len = (1 << 20) + 1;
    let (a, b, c) = (pattern(1, len), pattern(2, len), pattern(3, len));
    let cold = file_with(&client, "cold.bin", &a).await;
    let hot = file_with(&client, "hot.bin", &b).await;
    let auto = file_with(&client, "auto.bin", &c).await;
    client
        .meta()
        .set_class(cold, StorageClass::Cold)
        .await
        .expect("set cold");
    client
        .meta()
        .set_class(hot, StorageClass::Hot)
        .await
        .expect("set hot");
    let stop = CancellationToken::new();
    let active = || true;

    // An hour of quiet is far away: only the cold file is due.
    let mut t = Tiering::new(Duration::from_secs(3600), Duration::from_secs(60));
    let s = t.pass(&client, &active, &stop).await;
    assert_eq!((s.converted, s.failed), (1, 0), "{s:?}");
    assert!(
        chunk0(&client, cold).await.ec.is_some(),
        "cold chunk is RS 4+2"
    );
    assert!(
        chunk0(&client, auto).await.ec.is_none(),
        "auto is not quiet yet"
    );
    assert!(chunk0(&client, hot).await.ec.is_none());

    // With no quiet time required the auto file goes too; the hot one never does.
    let mut t = Tiering::new(Duration::ZERO, Duration::from_secs(60));
    let s = t.pass(&client, &active, &stop).await;
    assert_eq!((s.converted, s.failed), (1, 0), "{s:?}");
    assert!(
        chunk0(&client, auto).await.ec.is_some(),
        "quiet auto chunk is RS 4+2"
    );
    let h = chunk0(&client, hot).await;
    assert!(
        h.ec.is_none() && h.replicas.len() == 3,
        "hot stays replicated: {h:?}"
    );
    let s = t.pass(&client, &active, &stop).await;
    assert_eq!((s.converted, s.failed), (0, 0), "nothing left to do: {s:?}");

    assert!(
        read_all(&client, cold, len).await == a,
        "cold file reads back identical"
    );
    assert!(
        read_all(&client, auto, len).await == c,
        "auto file reads back identical"
    );
    assert!(
        read_all(&client, hot, len).await == b,
        "hot file reads back identical"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_six_chunkservers_tiering_waits_and_the_data_stays_replicated() {
    let (_meta, _servers, client) = cluster(3).await;
    let len = 4096;
    let data = pattern(4, len);
    let x = file_with(&client, "x.bin", &data).await;
    let y = file_with(&client, "y.bin", &data).await;
    for ino in [x, y] {
        client
            .meta()
            .set_class(ino, StorageClass::Cold)
            .await
            .expect("set cold");
    }
    let stop = CancellationToken::new();
    let mut t = Tiering::new(Duration::ZERO, Duration::from_secs(60));
    let s = t.pass(&client, &|| true, &stop).await;
    assert_eq!(
        (s.converted, s.failed),
        (0, 1),
        "the pass ends at the first chunk without room: {s:?}"
    );
    for ino in [x, y] {
        let l = chunk0(&client, ino).await;
        assert!(l.ec.is_none() && l.replicas.len() == 3, "{l:?}");
        assert!(read_all(&client, ino, len).await == data);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_without_the_lease_converts_nothing() {
    let (_meta, _servers, client) = cluster(6).await;
    let data = pattern(5, 4096);
    let ino = file_with(&client, "z.bin", &data).await;
    client
        .meta()
        .set_class(ino, StorageClass::Cold)
        .await
        .expect("set cold");
    let stop = CancellationToken::new();
    let mut t = Tiering::new(Duration::ZERO, Duration::from_secs(60));
    let s = t.pass(&client, &|| false, &stop).await;
    assert_eq!((s.converted, s.failed), (0, 0));
    assert!(chunk0(&client, ino).await.ec.is_none());
    let s = t.pass(&client, &|| true, &stop).await;
    assert_eq!((s.converted, s.failed), (1, 0), "{s:?}");
}
