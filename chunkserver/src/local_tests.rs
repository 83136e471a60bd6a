//! Local reads against an in-process chunkserver: the same bytes as the data port, and the
//! data port's answer whenever the chunk file cannot be trusted as it is.

use super::*;
use crate::server_tests::start;
use bytes::Bytes;
use rawfs_chunkserver_api::frame::{self, Opcode, Request};
use rawfs_chunkserver_api::layout::Geometry;
use rawfs_chunkserver_api::{DataClient, DataError, WriteReq};
use std::os::unix::fs::FileExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

const T: Duration = Duration::from_secs(10);
const DATA_OFFSET: u64 = Geometry::current().data_offset;

fn write(chunk: u64, version: u64, offset: u32, data: Vec<u8>) -> WriteReq {
    WriteReq {
        chunk,
        version,
        term: 1,
        offset,
        data: Bytes::from(data),
        sync: false,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

#[tokio::test]
async fn local_reads_return_what_the_data_port_returns() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let local = DataClient::new(T);
    let remote = DataClient::with_local_reads(T, false);
    // Written blocks, a hole between them, a partly written block and the end of the file
    // inside a block.
    local
        .write(&s.data, write(3, 1, 0, pattern(200_000, 1)))
        .await
        .unwrap();
    local
        .write(&s.data, write(3, 1, 400_000, pattern(70_000, 2)))
        .await
        .unwrap();
    let ranges = [
        (0u32, 4096u32),
        (1, 1),
        (65_000, 2_000),
        (0, 600_000),
        (190_000, 300_000),
        (262_144, 65_536),
        (469_000, 4_000),
        (1 << 20, 4096),
        ((64 << 20) - 4096, 4096),
    ];
    for (offset, len) in ranges {
        let before = local.local_reads();
        let a = local.read(&s.data, 3, 1, offset, len).await.unwrap();
        let b = remote.read(&s.data, 3, 1, offset, len).await.unwrap();
        assert_eq!(a, b, "range {offset}+{len}");
        assert_eq!(
            local.local_reads(),
            before + 1,
            "range {offset}+{len} read locally"
        );
    }
    assert_eq!(remote.local_reads(), 0);
    // A chunk this server does not have: the data port's answer.
    assert_eq!(
        local.read(&s.data, 4, 1, 0, 10).await,
        Err(DataError::NotFound)
    );
    s.stop().await;
}

/// Reads of 512 KiB and more go through a memory map of the chunk file: the same bytes, and
/// damage is still caught (and then reported by the data port).
#[tokio::test]
async fn large_local_reads_are_checked_like_small_ones() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(T);
    let data = pattern(4 << 20, 5);
    c.write(&s.data, write(0x31, 1, 0, data.clone()))
        .await
        .unwrap();
    let got = c.read(&s.data, 0x31, 1, 4096, 3 << 20).await.unwrap();
    assert_eq!(&got[..], &data[4096..4096 + (3 << 20)]);
    assert_eq!(c.local_reads(), 1);

    let path = dir.path().join("chunks/31/0000000000000031");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"rot", DATA_OFFSET + (2 << 20) + 5).unwrap();
    drop(f);
    assert_eq!(
        c.read(&s.data, 0x31, 1, 0, 4 << 20).await,
        Err(DataError::Corrupt { offset: 2 << 20 })
    );
    assert_eq!(c.local_reads(), 1);
    s.stop().await;
}

#[tokio::test]
async fn local_reads_give_way_to_corruption_newer_versions_deletion_and_a_dead_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(T);
    c.write(&s.data, write(0x21, 1, 0, pattern(256 << 10, 3)))
        .await
        .unwrap();
    c.read(&s.data, 0x21, 1, 0, 4096).await.unwrap();
    assert_eq!(c.local_reads(), 1);

    // A damaged block fails the local check; the data port reports it.
    let path = dir.path().join("chunks/21/0000000000000021");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"rot", DATA_OFFSET + 70_000).unwrap();
    drop(f);
    assert_eq!(
        c.read(&s.data, 0x21, 1, 65_536, 8192).await,
        Err(DataError::Corrupt { offset: 69_632 })
    );
    assert_eq!(c.local_reads(), 1);

    // A newer version on the server: a reader with the old one is told so.
    let fence = Request {
        id: 1,
        op: Opcode::Fence,
        flags: 0,
        chunk: 0x21,
        version: 2,
        term: 1,
        offset: 0,
        length: 0,
        payload: Bytes::new(),
    };
    let mut conn = TcpStream::connect(&s.data).await.unwrap();
    frame::write_request(&mut conn, &fence).await.unwrap();
    let resp = frame::read_response(&mut conn).await.unwrap();
    assert_eq!(resp.status, frame::Status::Ok);
    assert_eq!(
        c.read(&s.data, 0x21, 1, 0, 4096).await,
        Err(DataError::StaleVersion { current: 2 })
    );
    assert_eq!(c.local_reads(), 1);
    let good = c.read(&s.data, 0x21, 2, 131_072, 4096).await.unwrap();
    assert_eq!(&good[..], &pattern(256 << 10, 3)[131_072..135_168]);
    assert_eq!(c.local_reads(), 2);

    // The file removed under the descriptor: not read locally any more.
    std::fs::remove_file(&path).unwrap();
    let _ = c.read(&s.data, 0x21, 2, 131_072, 4096).await;
    assert_eq!(c.local_reads(), 2);

    // A stopped server is not read behind its back.
    c.write(&s.data, write(0x22, 1, 0, pattern(4096, 4)))
        .await
        .unwrap();
    c.read(&s.data, 0x22, 1, 0, 4096).await.unwrap();
    assert_eq!(c.local_reads(), 3);
    let addr = s.data.clone();
    s.stop().await;
    let e = c.read(&addr, 0x22, 1, 0, 4096).await.unwrap_err();
    assert!(matches!(e, DataError::Unreachable { .. }), "{e:?}");
    assert_eq!(c.local_reads(), 3);
}

#[tokio::test]
async fn garbage_on_the_local_socket_does_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let c = DataClient::new(T);
    c.write(&s.data, write(5, 1, 0, b"precious".to_vec()))
        .await
        .unwrap();
    let sock = dir.path().canonicalize().unwrap().join("local.sock");
    let mut noise = vec![0u8; 4096];
    let mut x = 0x9e37_79b9u32;
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    for bytes in [&noise[..], &noise[..7], b"RFSO\0\0\0\0", &[0u8; 24][..]] {
        let mut u = UnixStream::connect(&sock).await.unwrap();
        let _ = u.write_all(bytes).await;
        let _ = u.shutdown().await;
        let mut sink = Vec::new();
        let read = tokio::time::timeout(T, u.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the server must close a garbage connection");
    }
    let got = c.read(&s.data, 5, 1, 0, 8).await.unwrap();
    assert_eq!(&got[..], b"precious");
    assert_eq!(c.local_reads(), 1);
    s.stop().await;
}

#[tokio::test]
async fn chunk_files_with_64_kib_checksum_blocks_are_read_locally_too() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = Geometry::of(rawfs_chunkserver_api::layout::LEGACY_CSUM_BLOCK).unwrap();
    std::fs::create_dir_all(dir.path().join("chunks/33")).unwrap();
    let path = dir.path().join("chunks/33/0000000000000033");
    let mut cf = crate::chunk_file::ChunkFile::create_in(&path, 0x33, 1, legacy).unwrap();
    cf.write(1000, &pattern(300_000, 6)).unwrap();
    cf.sync().unwrap();
    drop(cf);
    let s = start(dir.path()).await;
    let local = DataClient::new(T);
    let remote = DataClient::with_local_reads(T, false);
    for (offset, len) in [
        (0u32, 4096u32),
        (1000, 300_000),
        (65_000, 1_000),
        (280_000, 70_000),
    ] {
        let a = local.read(&s.data, 0x33, 1, offset, len).await.unwrap();
        let b = remote.read(&s.data, 0x33, 1, offset, len).await.unwrap();
        assert_eq!(a, b, "range {offset}+{len}");
    }
    assert_eq!(local.local_reads(), 4);
    // Written in its own geometry: a 4 KiB write patches a 64 KiB block.
    local
        .write(&s.data, write(0x33, 1, 4096, pattern(4096, 7)))
        .await
        .unwrap();
    let got = local.read(&s.data, 0x33, 1, 0, 12_288).await.unwrap();
    assert_eq!(&got[4096..8192], &pattern(4096, 7)[..]);
    assert_eq!(&got[8192..], &pattern(300_000, 6)[7192..11_288]);
    assert_eq!(local.local_reads(), 5);
    s.stop().await;
}
