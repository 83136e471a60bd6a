//! An in-process chunkserver on 127.0.0.1:0 driven through `DataClient` and the control client.

use super::*;
use bytes::Bytes;
use rawfs_chunkserver_api::frame::{self, Opcode, Request, Status};
use rawfs_chunkserver_api::{connect_control, deadline, DataClient, DataError, WriteReq};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// A chunkserver serving in this process (also used by `local_tests`).
pub(crate) struct TestServer {
    handle: ChunkserverHandle,
    stop: oneshot::Sender<()>,
    /// The data port's address.
    pub(crate) data: String,
    control: String,
}

pub(crate) async fn start(dir: &std::path::Path) -> TestServer {
    start_at(dir, "127.0.0.1:0".parse().unwrap()).await
}

async fn start_at(dir: &std::path::Path, data_listen: SocketAddr) -> TestServer {
    let cfg = ChunkserverConfig {
        id: 4,
        data_dir: dir.to_path_buf(),
        data_listen,
        control_listen: "127.0.0.1:0".parse().unwrap(),
        // Nothing listens here: the heartbeat loop must keep retrying without harm.
        metadata: vec!["127.0.0.1:1".to_string()],
        capacity: None,
        heartbeat_interval: Duration::from_millis(50),
    };
    let (stop, rx) = oneshot::channel::<()>();
    let handle = serve(cfg, async {
        let _ = rx.await;
    })
    .await
    .unwrap();
    TestServer {
        data: handle.data_addr().to_string(),
        control: handle.control_addr().to_string(),
        handle,
        stop,
    }
}

impl TestServer {
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle.join())
            .await
            .expect("shutdown took too long")
            .unwrap();
    }
}

fn w(chunk: u64, version: u64, term: u64, offset: u32, data: &[u8]) -> WriteReq {
    WriteReq {
        chunk,
        version,
        term,
        offset,
        data: Bytes::copy_from_slice(data),
        sync: false,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

#[tokio::test]
async fn write_read_sync_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(10));
    c.ping(&s.data).await.unwrap();
    let big = pattern(3 << 20, 9);
    let mut req = w(10, 1, 1, 4096, &big);
    req.sync = true;
    c.write(&s.data, req).await.unwrap();
    c.write(&s.data, w(10, 1, 1, 10, b"hello")).await.unwrap();
    c.sync(&s.data, 10, 1).await.unwrap();
    let got = c
        .read(&s.data, 10, 1, 0, 4096 + big.len() as u32)
        .await
        .unwrap();
    assert_eq!(&got[10..15], b"hello");
    assert!(got[15..4096].iter().all(|&b| b == 0));
    assert_eq!(&got[4096..], &big[..]);
    assert_eq!(c.read(&s.data, 11, 1, 0, 1).await, Err(DataError::NotFound));
    assert_eq!(c.sync(&s.data, 11, 1).await, Err(DataError::NotFound));

    let ctl = connect_control(&s.control, Duration::from_secs(5))
        .await
        .unwrap();
    let st = ctl.status(deadline(Duration::from_secs(5))).await.unwrap();
    assert_eq!((st.id, st.chunks, st.term, st.healthy), (4, 1, 1, true));
    assert!(st.used_bytes >= big.len() as u64 && st.total_bytes > st.used_bytes);
    assert_eq!(
        ctl.list_chunks(deadline(Duration::from_secs(5)))
            .await
            .unwrap(),
        vec![(10, 1)]
    );
    s.stop().await;

    // Same directory, new process-equivalent: the data and the fence are back.
    let s = start(dir.path()).await;
    let got = c
        .read(&s.data, 10, 1, 4096, big.len() as u32)
        .await
        .unwrap();
    assert_eq!(&got[..], &big[..]);
    assert_eq!(
        c.write(&s.data, w(10, 1, 0, 0, b"old")).await,
        Err(DataError::StaleTerm { current: 1 })
    );
    s.stop().await;
}

#[tokio::test]
async fn stale_fences_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(10));
    c.write(&s.data, w(1, 3, 5, 0, b"abc")).await.unwrap();
    let e = c.write(&s.data, w(1, 2, 5, 0, b"old")).await.unwrap_err();
    assert_eq!(e, DataError::StaleVersion { current: 3 });
    assert!(!e.is_replica_failure());
    let e = c.write(&s.data, w(1, 3, 4, 0, b"old")).await.unwrap_err();
    assert_eq!(e, DataError::StaleTerm { current: 5 });
    assert_eq!(
        c.read(&s.data, 1, 2, 0, 3).await,
        Err(DataError::StaleVersion { current: 3 })
    );
    // A bumped version is adopted; the old one is then stale.
    c.write(&s.data, w(1, 4, 6, 1, b"X")).await.unwrap();
    assert_eq!(
        c.write(&s.data, w(1, 3, 6, 0, b"old")).await,
        Err(DataError::StaleVersion { current: 4 })
    );
    assert_eq!(&c.read(&s.data, 1, 4, 0, 3).await.unwrap()[..], b"aXc");
    // Out-of-chunk ranges are refused, not served.
    assert!(matches!(
        c.write(&s.data, w(1, 4, 6, (64 << 20) - 1, b"ab")).await,
        Err(DataError::Protocol { .. })
    ));
    s.stop().await;
}

#[tokio::test]
async fn concurrent_writers_share_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(20));
    let mut tasks = Vec::new();
    for t in 0..32u32 {
        let c = c.clone();
        let addr = s.data.clone();
        tasks.push(tokio::spawn(async move {
            // Half the writers share chunk 1 (disjoint 8 KiB slots), half have their own.
            let chunk = if t % 2 == 0 { 1 } else { 100 + t as u64 };
            for i in 0..8u32 {
                let off = (i * 32 + t) * 8192;
                let data = vec![(t as u8).wrapping_add(i as u8); 8192];
                c.write(&addr, w(chunk, 1, 1, off, &data)).await.unwrap();
                let back = c.read(&addr, chunk, 1, off, 8192).await.unwrap();
                assert_eq!(&back[..], &data[..]);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for t in (0..32u32).step_by(2) {
        for i in 0..8u32 {
            let off = (i * 32 + t) * 8192;
            let back = c.read(&s.data, 1, 1, off, 8192).await.unwrap();
            assert!(back.iter().all(|&b| b == (t as u8).wrapping_add(i as u8)));
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn corrupt_block_is_reported_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(10));
    let mut req = w(0x77, 1, 1, 0, &pattern(256 << 10, 1));
    req.sync = true;
    c.write(&s.data, req).await.unwrap();
    let path = dir.path().join("chunks/77/0000000000000077");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(
        &f,
        b"rot",
        rawfs_chunkserver_api::layout::Geometry::current().data_offset + 70_000,
    )
    .unwrap();
    drop(f);
    let e = c.read(&s.data, 0x77, 1, 0, 256 << 10).await.unwrap_err();
    // The checksum block holding byte 70,000.
    assert_eq!(e, DataError::Corrupt { offset: 69_632 });
    assert!(e.is_replica_failure());
    // Other blocks are still served.
    c.read(&s.data, 0x77, 1, 131_072, 1000).await.unwrap();
    s.stop().await;
}

/// Sends raw bytes to `addr`, then waits for the server to close the connection.
async fn send_garbage(addr: &str, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let _ = s.shutdown().await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sink)).await;
}

#[tokio::test]
async fn garbage_on_either_port_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(10));
    c.write(&s.data, w(5, 1, 1, 0, b"precious")).await.unwrap();

    let mut noise = vec![0u8; 4096];
    let mut x = 0x1234_5678u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    // A valid header that announces more payload than it sends (truncated frame).
    let mut truncated = Vec::new();
    frame::write_request(
        &mut truncated,
        &Request {
            id: 1,
            op: Opcode::Write,
            flags: 0,
            chunk: 5,
            version: 1,
            term: 1,
            offset: 0,
            length: 1000,
            payload: Bytes::from(vec![b'!'; 1000]),
        },
    )
    .await
    .unwrap();
    truncated.truncate(500);
    // A header claiming a 4 GiB payload.
    let huge = frame::RequestHeader {
        id: 2,
        op: Opcode::Write,
        flags: 0,
        chunk: 5,
        version: 1,
        term: 1,
        offset: 0,
        length: u32::MAX,
        payload_len: u32::MAX,
        payload_crc: 0,
    }
    .encode();

    // While a peer holds a half-sent frame open, others are served.
    let mut held = TcpStream::connect(&s.data).await.unwrap();
    held.write_all(&truncated[..100]).await.unwrap();

    for addr in [&s.data, &s.control] {
        send_garbage(addr, &noise).await;
        send_garbage(addr, &truncated).await;
        send_garbage(addr, &huge).await;
        send_garbage(addr, b"").await;
    }
    c.ping(&s.data).await.unwrap();
    assert_eq!(&c.read(&s.data, 5, 1, 0, 8).await.unwrap()[..], b"precious");
    let ctl = connect_control(&s.control, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        ctl.status(deadline(Duration::from_secs(5)))
            .await
            .unwrap()
            .chunks,
        1
    );
    drop(held);
    s.stop().await;
}

#[tokio::test]
async fn bad_payload_crc_is_answered_and_connection_survives() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let mut conn = TcpStream::connect(&s.data).await.unwrap();
    let mut buf = Vec::new();
    let req = Request {
        id: 9,
        op: Opcode::Write,
        flags: 0,
        chunk: 1,
        version: 1,
        term: 1,
        offset: 0,
        length: 4,
        payload: Bytes::from_static(b"data"),
    };
    frame::write_request(&mut buf, &req).await.unwrap();
    let last = buf.len() - 1;
    buf[last] ^= 0xff;
    conn.write_all(&buf).await.unwrap();
    let resp = frame::read_response(&mut conn).await.unwrap();
    assert_eq!((resp.id, resp.status), (9, Status::BadRequest));
    // The same connection still works, and the damaged write was not applied.
    let read = Request {
        id: 10,
        op: Opcode::Read,
        length: 4,
        payload: Bytes::new(),
        ..req
    };
    frame::write_request(&mut conn, &read).await.unwrap();
    let resp = frame::read_response(&mut conn).await.unwrap();
    assert_eq!((resp.id, resp.status), (10, Status::NotFound));
    s.stop().await;
}

#[tokio::test]
async fn client_reconnects_after_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(10));
    c.write(&s.data, w(1, 1, 1, 0, b"one")).await.unwrap();
    let addr: SocketAddr = s.data.parse().unwrap();
    s.stop().await;
    // Restart on the same port: the client's pooled connection is dead and must be replaced.
    let s = start_at(dir.path(), addr).await;
    assert_eq!(&c.read(&s.data, 1, 1, 0, 3).await.unwrap()[..], b"one");
    s.stop().await;
    assert!(matches!(
        c.ping(&addr.to_string()).await,
        Err(DataError::Unreachable { .. })
    ));
}

/// Prints data-path throughput; run with `--ignored --nocapture` (not a timed test).
// A benchmark, not a check: `RUSTFLAGS="--cfg rawfs_bench" cargo test ... -- --nocapture`.
#[cfg(rawfs_bench)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_report() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(30));
    let data = Bytes::from(pattern(1 << 20, 3));
    let total: u64 = 256 << 20;
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for stream in 0..4u64 {
        let (c, addr, data) = (c.clone(), s.data.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..(total >> 20) / 4 {
                let off = (i % 64) << 20;
                let chunk = 1000 + stream * 100 + i / 64;
                let req = WriteReq {
                    chunk,
                    version: 1,
                    term: 1,
                    offset: off as u32,
                    data: data.clone(),
                    sync: false,
                };
                c.write(&addr, req).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let w = t.elapsed();
    let t = std::time::Instant::now();
    for stream in 0..4u64 {
        for i in 0..(total >> 20) / 4 {
            let off = (i % 64) << 20;
            let chunk = 1000 + stream * 100 + i / 64;
            c.read(&s.data, chunk, 1, off as u32, 1 << 20)
                .await
                .unwrap();
        }
    }
    let r = t.elapsed();
    let t = std::time::Instant::now();
    for i in 0..2000u32 {
        let off = (i.wrapping_mul(2_654_435_761) % (16 << 10)) * 4096;
        let req = WriteReq {
            chunk: 1000,
            version: 1,
            term: 1,
            offset: off,
            data: data.slice(..4096),
            sync: false,
        };
        c.write(&s.data, req).await.unwrap();
    }
    let small = t.elapsed();
    println!(
        "write {:.0} MiB/s, read {:.0} MiB/s, 4 KiB overwrites {:.0}/s",
        256.0 / w.as_secs_f64(),
        256.0 / r.as_secs_f64(),
        2000.0 / small.as_secs_f64()
    );
    s.stop().await;
}

#[tokio::test]
async fn scrub_rate_and_status_over_the_control_port() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(Duration::from_secs(10));
    let data = pattern(1 << 20, 3);
    let mut req = w(21, 1, 1, 0, &data);
    req.sync = true;
    c.write(&s.data, req).await.unwrap();
    let ctl = connect_control(&s.control, Duration::from_secs(5))
        .await
        .unwrap();
    let ctx = || deadline(Duration::from_secs(5));
    assert_eq!(
        ctl.scrub_status(ctx()).await.unwrap().rate,
        DEFAULT_SCRUB_RATE
    );
    let st = ctl.set_scrub_rate(ctx(), 64 << 20).await.unwrap();
    assert_eq!(st.rate, 64 << 20);
    assert_eq!(s.handle.scrubber().status().rate, 64 << 20);
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = ctl.scrub_status(ctx()).await.unwrap();
        if st.passes >= 1 && st.scrubbed_bytes >= data.len() as u64 {
            assert_eq!(st.bad_found, 0);
            break;
        }
        assert!(std::time::Instant::now() < end, "no scrub pass: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ctl.set_scrub_rate(ctx(), 0).await.unwrap().rate, 0);
    s.stop().await;
}
