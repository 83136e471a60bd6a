//! Re-replication on a real in-process cluster (1 metadata replica, 4 chunkservers on
//! 127.0.0.1:0 in tempdirs): the new copy holds everything the surviving replicas hold,
//! also what lies past the file's committed size (a writer's data reaches the replicas
//! before its new size is committed), and keeps the holes between.

mod common;
use bytes::Bytes;
use common::*;
use rawfs_chunkserver_api::{DataClient, WriteReq};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_holds_what_the_replicas_hold_past_the_files_size() {
    let TestCluster {
        meta,
        addr,
        mut servers,
        client,
    } = test_cluster(4).await;

    // A 100-byte file, then a writer's 3 MiB at 1 MiB on every replica, its size not
    // committed (the file still says 100 bytes).
    let head = pattern(1, 100);
    let ino = file_with(&client, "f", &head).await;
    let loc = chunk0(&client, ino).await;
    let tail = Bytes::from(pattern(2, 3 << 20));
    let dc = DataClient::new(Duration::from_secs(10));
    for r in &loc.replicas {
        let w = WriteReq {
            chunk: loc.chunk,
            version: loc.version,
            term: loc.term,
            offset: 1 << 20,
            data: tail.clone(),
            sync: true,
        };
        dc.write(&r.data_addr, w)
            .await
            .expect("write past the size");
    }
    assert_eq!(client.meta().getattr(ino).await.expect("attr").size, 100);

    // One replica's server stops; the healer copies the chunk to the fourth server.
    let down = loc.replicas[0].server;
    servers[(down - 1) as usize] = None;
    let stop = CancellationToken::new();
    let healer = spawn_healer(&addr, &stop);
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let now = chunk0(&client, ino).await;
        if now.replicas.len() == 3 && now.replicas.iter().all(|r| r.server != down) {
            break now;
        }
        assert!(Instant::now() < deadline, "never re-replicated: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.cancel();
    healer.join().expect("healer thread").expect("healer");

    // Every replica, the new one included, holds the head, a hole, and the tail.
    let want: Vec<u8> = [head, vec![0; (1 << 20) - 100], tail.to_vec()].concat();
    for r in &after.replicas {
        let got = dc
            .read(
                &r.data_addr,
                after.chunk,
                after.version,
                0,
                want.len() as u32,
            )
            .await
            .unwrap_or_else(|e| panic!("read from server {}: {e}", r.server));
        assert!(got[..] == want[..], "server {} differs", r.server);
    }
    let _ = &meta.dir;
}
