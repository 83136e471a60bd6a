//! Direct RS 4+2 writes of `cold` files ([`crate::ec_write`]) against the in-memory cluster:
//! what is appended as shards, what goes to replicas instead, and that every byte reads back.

use crate::fake::Fake;
use crate::FileIo;
use rawfs_metadata_api::{ChunkLoc, CHUNK_SIZE, EC_SHARDS};
use std::sync::Arc;

const INO: u64 = 91;
const MIB: u64 = 1 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(193)
                .wrapping_add(seed * 7 + (i as u64 >> 12))
                % 253) as u8
        })
        .collect()
}

fn cold_cluster() -> Arc<Fake> {
    let fake = Arc::new(Fake::new(7));
    fake.st().cold.insert(INO);
    fake
}

/// Writes `data` at `at` in writes of at most 1 MiB (as FUSE sends them), then fsyncs.
async fn write_through(io: &FileIo, at: u64, data: &[u8]) {
    for (i, piece) in data.chunks(MIB as usize).enumerate() {
        io.write(at + i as u64 * MIB, piece).await.unwrap();
    }
    io.fsync().await.unwrap();
}

async fn read_all(fake: &Arc<Fake>, size: u64) -> Vec<u8> {
    let io = FileIo::new(INO, size, fake.clone(), 1 << 20);
    let mut out = Vec::new();
    while (out.len() as u64) < size {
        let n = (size - out.len() as u64).min(4 * MIB) as u32;
        out.extend(io.read(out.len() as u64, n).await.unwrap());
    }
    out
}

fn chunk(fake: &Fake, index: u64) -> ChunkLoc {
    fake.loc(INO, index).expect("chunk allocated")
}

#[tokio::test]
async fn a_cold_file_is_written_as_shards_and_reads_back() {
    for n in [
        1,
        4 * MIB - 1,
        4 * MIB,
        4 * MIB + 1,
        9 * MIB + 5,
        CHUNK_SIZE + 3,
    ] {
        let fake = cold_cluster();
        let data = pattern(n, n as usize);
        let io = FileIo::new(INO, 0, fake.clone(), 8 << 20);
        write_through(&io, 0, &data).await;
        for index in 0..n.div_ceil(CHUNK_SIZE) {
            let loc = chunk(&fake, index);
            let ec = loc.ec.as_ref().expect("erasure coded from the start");
            let in_chunk = (n - index * CHUNK_SIZE).min(CHUNK_SIZE);
            assert_eq!(ec.length, in_chunk, "size {n}, chunk {index}");
            assert!(loc.replicas.is_empty());
            let st = fake.st();
            for s in &ec.shards {
                let server = s.replica.as_ref().unwrap().server;
                assert!(
                    st.synced.contains(&(server, s.chunk)),
                    "size {n}: shard synced"
                );
                assert!(
                    st.data.contains_key(&(server, s.chunk)),
                    "every shard exists"
                );
            }
        }
        {
            let st = fake.st();
            let shards = st.map.values().flat_map(|l| l.ec.iter()).count() * EC_SHARDS;
            assert_eq!(st.data.len(), shards, "size {n}: nothing but shards stored");
            assert!(st.extends > 0);
        }
        assert!(read_all(&fake, n).await == data, "size {n}");
        // The writer's own view, through its cached (updated) locations.
        assert!(
            io.read(0, n.min(4 * MIB) as u32).await.unwrap() == data[..n.min(4 * MIB) as usize]
        );
    }
}

#[tokio::test]
async fn appending_whole_stripes_keeps_the_chunk_erasure_coded() {
    let fake = cold_cluster();
    let mut data = pattern(1, 8 * MIB as usize);
    let io = FileIo::new(INO, 0, fake.clone(), 8 << 20);
    write_through(&io, 0, &data).await;
    let before = chunk(&fake, 0);
    // A later writer (another open) appends.
    let more = pattern(2, (4 * MIB + 1) as usize);
    let io2 = FileIo::new(INO, 8 * MIB, fake.clone(), 8 << 20);
    write_through(&io2, 8 * MIB, &more).await;
    data.extend_from_slice(&more);
    let after = chunk(&fake, 0);
    assert_eq!(after.chunk, before.chunk, "the same chunk");
    assert!(
        after.version > before.version,
        "each append bumps the version"
    );
    assert_eq!(after.ec.as_ref().unwrap().length, 12 * MIB + 1);
    assert!(read_all(&fake, data.len() as u64).await == data);
}

#[tokio::test]
async fn a_reader_with_an_old_location_sees_bytes_appended_since() {
    let fake = cold_cluster();
    let first = pattern(3, 4 * MIB as usize);
    let writer = FileIo::new(INO, 0, fake.clone(), 8 << 20);
    write_through(&writer, 0, &first).await;
    let reader = FileIo::new(INO, 4 * MIB, fake.clone(), 1 << 20);
    assert!(
        reader.read(0, 4096).await.unwrap() == first[..4096],
        "location cached"
    );
    let second = pattern(4, 4 * MIB as usize);
    write_through(&writer, 4 * MIB, &second).await;
    reader.set_size(8 * MIB);
    assert!(reader.read(4 * MIB, 4096).await.unwrap() == second[..4096]);
}

#[tokio::test]
async fn overwrites_and_appends_inside_a_stripe_go_to_replicas() {
    let fake = cold_cluster();
    let n = 5 * MIB + 3;
    let mut data = pattern(5, n as usize);
    let io = FileIo::new(INO, 0, fake.clone(), 8 << 20);
    write_through(&io, 0, &data).await;
    assert_eq!(chunk(&fake, 0).ec.as_ref().unwrap().length, n);
    // The chunk ends inside a stripe: an append copies it to replicas first.
    let tail = pattern(6, 1000);
    let io2 = FileIo::new(INO, n, fake.clone(), 8 << 20);
    write_through(&io2, n, &tail).await;
    data.extend_from_slice(&tail);
    let loc = chunk(&fake, 0);
    assert!(loc.ec.is_none(), "replicated again");
    assert_eq!(loc.replicas.len(), 3);
    assert!(read_all(&fake, data.len() as u64).await == data);
    // An overwrite of an erasure-coded chunk copies it too.
    let fake = cold_cluster();
    let mut data = pattern(7, 8 * MIB as usize);
    write_through(&FileIo::new(INO, 0, fake.clone(), 8 << 20), 0, &data).await;
    let io = FileIo::new(INO, 8 * MIB, fake.clone(), 8 << 20);
    write_through(&io, 3 * MIB, b"changed").await;
    data[3 * MIB as usize..3 * MIB as usize + 7].copy_from_slice(b"changed");
    assert!(chunk(&fake, 0).ec.is_none());
    assert!(read_all(&fake, data.len() as u64).await == data);
}

#[tokio::test]
async fn a_small_write_inside_a_large_cold_file_goes_to_replicas() {
    // A cold volume: 4 KiB at the start of an unwritten chunk, far from the end of the file.
    let fake = cold_cluster();
    let io = FileIo::new(INO, 3 * CHUNK_SIZE, fake.clone(), 8 << 20);
    write_through(&io, CHUNK_SIZE, &[9u8; 4096]).await;
    let loc = chunk(&fake, 1);
    assert!(loc.ec.is_none(), "not a partial-stripe EC chunk");
    assert_eq!(fake.st().extends, 0);
    let back = io.read(CHUNK_SIZE, 8192).await.unwrap();
    assert!(back[..4096].iter().all(|&b| b == 9) && back[4096..].iter().all(|&b| b == 0));
}

#[tokio::test]
async fn a_refused_extend_or_a_failed_shard_falls_back_to_replicas() {
    for case in ["refused", "server down", "disk full"] {
        let fake = cold_cluster();
        {
            let mut st = fake.st();
            match case {
                "refused" => st.refuse_ec_extend = true,
                "server down" => {
                    st.down.insert(4);
                }
                _ => {
                    st.full.insert(2);
                }
            }
        }
        let data = pattern(8, (9 * MIB) as usize);
        let io = FileIo::new(INO, 0, fake.clone(), 8 << 20);
        write_through(&io, 0, &data).await;
        let loc = chunk(&fake, 0);
        assert!(loc.ec.is_none(), "{case}: written as replicas");
        assert_eq!(fake.st().extends, 0, "{case}");
        assert!(read_all(&fake, data.len() as u64).await == data, "{case}");
    }
}
