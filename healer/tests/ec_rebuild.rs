//! Shard rebuilds on a real in-process cluster (1 metadata replica, 9 chunkservers on
//! 127.0.0.1:0 in tempdirs): with one shard's server stopped and another shard corrupt on
//! disk, the healer daemon decodes both from the 4 good ones (never from the corrupt one,
//! which it reports), places them on servers holding no shard of the chunk, and every shard
//! then holds exactly what the RS 4+2 encoding of the file says.

mod common;
use common::*;
use rawfs_chunkserver_api::DataClient;
use rawfs_client::erasure::{Codec, Layout};
use rawfs_healer::tiering::Tiering;
use rawfs_metadata_api::{ChunkLoc, ServerId, StorageClass};
use std::collections::HashSet;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Polls `check` every 50 ms until it returns `Some`, for at most `secs`.
async fn until<T, F: Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    check: impl Fn() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn shard_servers(loc: &ChunkLoc) -> Vec<Option<ServerId>> {
    loc.ec
        .as_ref()
        .expect("erasure coded")
        .shards
        .iter()
        .map(|s| s.replica.as_ref().map(|r| r.server))
        .collect()
}

/// Path of `chunk`'s file in a chunkserver's data directory.
fn chunk_file(dir: &std::path::Path, chunk: u64) -> PathBuf {
    dir.join("chunks")
        .join(format!("{:02x}", chunk & 0xff))
        .join(format!("{chunk:016x}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_and_a_corrupt_shard_are_rebuilt_from_the_good_ones() {
    let TestCluster {
        meta,
        addr,
        mut servers,
        client,
    } = test_cluster(9).await;

    // Two stripes and a bit: every shard stores bytes, the last stripe is partial.
    let len = (9 << 20) + 12345;
    let data = pattern(7, len);
    let ino = file_with(&client, "cold.bin", &data).await;
    client
        .meta()
        .set_class(ino, StorageClass::Cold)
        .await
        .expect("set cold");
    let stop = CancellationToken::new();
    let mut t = Tiering::new(Duration::ZERO, Duration::from_secs(60));
    let s = t.pass(&client, &|| true, &stop).await;
    assert_eq!((s.converted, s.failed), (1, 0), "{s:?}");
    let before = chunk0(&client, ino).await;
    let ec = before.ec.clone().expect("erasure coded");
    let holders = shard_servers(&before);

    // Shard 1's server stops; shard 0 is corrupt on disk (a data block, not the header).
    let down = holders[1].expect("placed");
    servers[(down - 1) as usize] = None;
    let bad = holders[0].expect("placed");
    let bad_dir = servers[(bad - 1) as usize]
        .as_ref()
        .expect("running")
        .dir
        .path()
        .to_path_buf();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(chunk_file(&bad_dir, ec.shards[0].chunk))
        .expect("shard 0's file");
    let mut b = [0u8; 1];
    let at = rawfs_chunkserver_api::layout::Geometry::current().data_offset + 100;
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0xff], at).expect("corrupt");
    f.sync_all().expect("sync");
    drop(f);
    until("the stopped chunkserver seen down", 30, || async {
        let st = client.meta().status().await.ok()?;
        st.chunkservers
            .iter()
            .any(|c| c.id == down && !c.up)
            .then_some(())
    })
    .await;

    let healer = spawn_healer(&addr, &stop);
    // The new leader grants no lease for its first 10 s; then two scans at most.
    let after = until("both shards rebuilt", 60, || async {
        let loc = chunk0(&client, ino).await;
        let s = shard_servers(&loc);
        let live: HashSet<ServerId> = s.iter().flatten().copied().collect();
        let done = live.len() == 6 && !live.contains(&down) && s[0] != Some(bad);
        done.then_some(loc)
    })
    .await;
    stop.cancel();
    healer.join().expect("healer thread").expect("healer");

    assert_eq!((after.chunk, after.version), (before.chunk, before.version));
    let after_ec = after.ec.as_ref().expect("still erasure coded");
    for (k, (a, b)) in after_ec.shards.iter().zip(&ec.shards).enumerate() {
        assert_eq!(a.chunk, b.chunk, "shard {k} keeps its id");
    }
    // Untouched shards stayed where they were.
    let now = shard_servers(&after);
    assert_eq!(now[2..], holders[2..]);
    // Every shard (the rebuilt ones included) holds exactly the encoding of the file.
    let codec = Codec::new(Layout::DEFAULT).expect("codec");
    let want = codec.encode_chunk(&data).expect("encode");
    let dc = DataClient::new(Duration::from_secs(10));
    for (k, shard) in after_ec.shards.iter().enumerate() {
        let r = shard.replica.as_ref().expect("placed");
        let got = dc
            .read(
                &r.data_addr,
                shard.chunk,
                after.version,
                0,
                want.shards[k].len() as u32,
            )
            .await
            .unwrap_or_else(|e| panic!("shard {k} on {}: {e}", r.server));
        assert!(got[..] == want.shards[k][..], "shard {k} differs");
    }
    // And the file reads back whole through the client.
    let io = client.file(ino, len as u64);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let n = (len - out.len()).min(1 << 20) as u32;
        let got = io.read(out.len() as u64, n).await.expect("read");
        assert!(!got.is_empty(), "short read at {}", out.len());
        out.extend_from_slice(&got);
    }
    assert!(out == data, "file reads back identical");
    let _ = &meta.dir;
}
