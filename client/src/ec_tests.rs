//! Erasure-coded chunks against the in-memory cluster ([`crate::fake`]): healthy and degraded
//! reads with every choice of lost, corrupt, missing, unreachable and slow shards, conversion
//! of replicated chunks, and writes into erasure-coded chunks.

use crate::convert::convert;
use crate::ec_read::codec;
use crate::fake::Fake;
use crate::locations::Locations;
use crate::read_path::{read_piece, Suspects};
use crate::store::Store;
use crate::{ClientError, FileIo};
use rawfs_metadata_api::{
    ChunkLoc, ColdChunk, EcLoc, MetaError, Replica, Shard, CHUNK_SIZE, EC_SHARDS,
};
use std::sync::Arc;

const INO: u64 = 77;
const MIB: u64 = 1 << 20;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(131)
                .wrapping_add(seed * 17 + (i as u64 >> 16))
                % 251) as u8
        })
        .collect()
}

/// Puts `data` into chunk 0 of `INO` as an erasure-coded chunk, shard `k` on server `k + 1`
/// at version 3.
fn install_ec(fake: &Fake, data: &[u8]) -> ChunkLoc {
    let enc = codec().unwrap().encode_chunk(data).unwrap();
    let mut st = fake.st();
    let mut shards = Vec::new();
    for (k, bytes) in enc.shards.iter().enumerate() {
        let server = k as u64 + 1;
        let id = 1000 + k as u64;
        let stored = st.data.entry((server, id)).or_default();
        stored.version = 3;
        stored.write(0, bytes);
        shards.push(Shard {
            chunk: id,
            replica: Some(Replica {
                server,
                data_addr: format!("s{server}"),
            }),
        });
    }
    let loc = ChunkLoc {
        index: 0,
        chunk: 500,
        version: 3,
        replicas: Vec::new(),
        term: 1,
        shared: true,
        ec: Some(EcLoc {
            length: data.len() as u64,
            shards,
        }),
    };
    st.map.insert((INO, 0), loc.clone());
    st.sizes.insert(INO, data.len() as u64);
    loc
}

/// A way to lose a shard.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Loss {
    /// The chunk map says it is lost (`replica: None`).
    Listed,
    /// Its server is down.
    Down,
    /// Its server times out.
    Slow,
    /// Its blocks fail their checksum.
    Corrupt,
    /// Its server does not have it.
    Missing,
}

impl Loss {
    /// Whether the client must report the shard as lost.
    fn reported(self) -> bool {
        matches!(self, Loss::Corrupt | Loss::Missing)
    }
}

fn lose(fake: &Fake, loc: &ChunkLoc, k: usize, how: Loss) {
    let shard = &loc.ec.as_ref().unwrap().shards[k];
    let server = k as u64 + 1;
    let mut st = fake.st();
    match how {
        Loss::Listed => {
            let l = st.map.get_mut(&(INO, 0)).unwrap();
            l.ec.as_mut().unwrap().shards[k].replica = None;
        }
        Loss::Down => {
            st.down.insert(server);
        }
        Loss::Slow => {
            st.timeouts.insert(server);
        }
        Loss::Corrupt => {
            st.corrupt.insert((server, shard.chunk));
        }
        Loss::Missing => {
            st.data.remove(&(server, shard.chunk));
        }
    }
}

/// Reads `off..off + len` of chunk 0 through the read path with a fresh location cache.
async fn read(fake: &Arc<Fake>, off: u64, len: u64) -> Result<Vec<u8>, ClientError> {
    let locs = Locations::new(INO);
    let suspects = Suspects::default();
    read_piece(&**fake, &locs, &suspects, 0, off as u32, len as u32)
        .await
        .map(|b| b.to_vec())
}

/// `data[off..off + len]`, zeros past its end.
fn expect(data: &[u8], off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|i| data.get(i as usize).copied().unwrap_or(0))
        .collect()
}

/// Ranges that start, end and cross cells and stripes, and run past the length.
fn ranges(n: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 4096),
        (MIB - 100, 200),
        (2 * MIB + 5, 1000),
        (3 * MIB + 5, MIB),
        (4 * MIB - 10, 20),
        (5 * MIB + 3, 300_000),
        (n - 1000, 70_000),
        (n + 5, 1000),
    ]
}

#[tokio::test]
async fn healthy_ec_reads_fetch_only_the_data_they_need() {
    let fake = Arc::new(Fake::new(6));
    let n = 9 * MIB + 12_345;
    let data = pattern(1, n as usize);
    install_ec(&fake, &data);
    for (off, len) in ranges(n) {
        fake.st().read_log.clear();
        let got = read(&fake, off, len).await.unwrap();
        assert!(got == expect(&data, off, len), "range {off}+{len}");
        let log = fake.st().read_log.clone();
        let layout = crate::erasure::Layout::DEFAULT;
        let lens = layout.shard_lens(n);
        let want: Vec<_> = layout
            .plan_read(off, len)
            .unwrap()
            .into_iter()
            .filter(|p| p.shard_offset < lens[p.shard])
            .collect();
        assert_eq!(log.len(), want.len(), "one read per cell touched: {log:?}");
        for (r, p) in log.iter().zip(&want) {
            assert_eq!(r.0, p.shard as u64 + 1, "a data shard's server");
            assert_eq!(u64::from(r.2), p.shard_offset);
            assert!(u64::from(r.3) <= p.len, "never more than asked");
        }
    }
    // A small read inside one cell is one read of one data shard.
    fake.st().read_log.clear();
    let got = read(&fake, 6 * MIB + 10, 4096).await.unwrap();
    assert!(got == expect(&data, 6 * MIB + 10, 4096));
    let log = fake.st().read_log.clone();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].0, log[0].2),
        (3, (MIB + 10) as u32),
        "cell 6 is shard 2, row 1"
    );
    // Through FileIo too, the whole chunk at once and piecewise.
    let io = FileIo::new(INO, n, fake.clone(), 1 << 20);
    assert!(io.read(0, n as u32).await.unwrap() == data);
}

/// All `k`-subsets of the 6 shards.
fn subsets(k: usize) -> Vec<Vec<usize>> {
    (0u32..1 << EC_SHARDS)
        .filter(|m| m.count_ones() as usize == k)
        .map(|m| (0..EC_SHARDS).filter(|i| m & (1 << i) != 0).collect())
        .collect()
}

#[tokio::test]
async fn every_one_or_two_lost_shards_still_read_right_and_bad_ones_are_reported() {
    let n = 5 * MIB + 100_007;
    let data = pattern(2, n as usize);
    let modes = [
        Loss::Listed,
        Loss::Down,
        Loss::Slow,
        Loss::Corrupt,
        Loss::Missing,
    ];
    for lost in subsets(1).into_iter().chain(subsets(2)) {
        for how in modes {
            let fake = Arc::new(Fake::new(6));
            let loc = install_ec(&fake, &data);
            for &k in &lost {
                lose(&fake, &loc, k, how);
            }
            let locs = Locations::new(INO);
            let suspects = Suspects::default();
            for (off, len) in ranges(n) {
                let got = read_piece(&*fake, &locs, &suspects, 0, off as u32, len as u32)
                    .await
                    .unwrap_or_else(|e| panic!("{how:?} {lost:?} range {off}+{len}: {e}"));
                assert!(
                    got == expect(&data, off, len),
                    "{how:?} {lost:?} range {off}+{len}"
                );
            }
            let st = fake.st();
            let shards = &loc.ec.as_ref().unwrap().shards;
            let mut reported: Vec<_> = st.lost_reports.iter().map(|r| r.0).collect();
            reported.sort_unstable();
            reported.dedup();
            // The ranges touch every data shard, so each lost data shard is found bad; a lost
            // parity shard only when a degraded read needed it.
            let ids = |ks: &mut dyn Iterator<Item = &usize>| -> Vec<u64> {
                ks.map(|&k| shards[k].chunk).collect()
            };
            let must = ids(&mut lost.iter().filter(|&&k| k < 4));
            let may = ids(&mut lost.iter());
            if how.reported() {
                assert!(
                    must.iter().all(|c| reported.contains(c)),
                    "{how:?} {lost:?}: reported {reported:?}"
                );
                assert!(reported.iter().all(|c| may.contains(c)), "{how:?} {lost:?}");
                let now = &st.map[&(INO, 0)];
                for (k, s) in now.ec.as_ref().unwrap().shards.iter().enumerate() {
                    assert_eq!(
                        s.replica.is_none(),
                        reported.contains(&shards[k].chunk),
                        "{how:?} {lost:?}: shard {k} marked lost iff reported"
                    );
                }
            } else {
                assert!(reported.is_empty(), "{how:?} {lost:?}: {reported:?}");
            }
        }
    }
}

#[tokio::test]
async fn three_lost_shards_fail_with_a_clear_error() {
    let n = 4 * MIB + 1;
    let data = pattern(3, n as usize);
    for lost in subsets(3) {
        for how in [Loss::Down, Loss::Corrupt, Loss::Listed] {
            let fake = Arc::new(Fake::new(6));
            let loc = install_ec(&fake, &data);
            for &k in &lost {
                lose(&fake, &loc, k, how);
            }
            // A whole stripe needs every data shard, so any 3 losses are too many.
            let err = read(&fake, 0, 4 * MIB).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    ClientError::NoReplica {
                        chunk: 500,
                        index: 0,
                        ..
                    }
                ),
                "{how:?} {lost:?}: {err:?}"
            );
        }
    }
    // Even with 3 shards gone, a range whose data shard is healthy still reads.
    let fake = Arc::new(Fake::new(6));
    let loc = install_ec(&fake, &data);
    for k in [0, 1, 4] {
        lose(&fake, &loc, k, Loss::Down);
    }
    assert!(read(&fake, 2 * MIB + 7, 1000).await.unwrap() == expect(&data, 2 * MIB + 7, 1000));
}

/// Writes `data` at the start of `INO` through FileIo and syncs it; returns the chunk's
/// location.
async fn write_file(fake: &Arc<Fake>, data: &[u8]) -> (FileIo, ChunkLoc) {
    let io = FileIo::new(INO, 0, fake.clone(), 8 << 20);
    if data.is_empty() {
        // An allocated, empty chunk: what a truncate to 0 of a written file leaves.
        fake.allocate_chunk(INO, 0).await.unwrap();
    } else {
        io.write(0, data).await.unwrap();
        io.fsync().await.unwrap();
    }
    (io, fake.loc(INO, 0).unwrap())
}

fn cold(loc: &ChunkLoc, length: u64) -> ColdChunk {
    ColdChunk {
        ino: INO,
        index: 0,
        chunk: loc.chunk,
        version: loc.version,
        length,
        to_replicas: false,
    }
}

#[tokio::test]
async fn converted_chunks_read_back_equal() {
    for n in [0, 1, 4 * MIB - 1, 4 * MIB + 1, 9 * MIB] {
        let fake = Arc::new(Fake::new(7));
        let data = pattern(n, n as usize);
        let (old_io, before) = write_file(&fake, &data).await;
        let after = convert(&*fake, &cold(&before, n)).await.unwrap();
        let ec = after.ec.as_ref().expect("erasure coded");
        assert_eq!(ec.length, n);
        assert!(after.replicas.is_empty());
        assert_eq!(after.version, before.version + 1);
        assert_eq!(fake.loc(INO, 0).unwrap(), after);
        {
            let st = fake.st();
            for r in &before.replicas {
                assert!(
                    st.fences.contains(&(r.server, before.chunk, after.version)),
                    "size {n}: replica on {} fenced",
                    r.server
                );
            }
            let mut servers: Vec<_> = ec
                .shards
                .iter()
                .map(|s| s.replica.as_ref().unwrap().server)
                .collect();
            servers.sort_unstable();
            servers.dedup();
            assert_eq!(servers.len(), EC_SHARDS, "6 distinct servers");
            let lens = crate::erasure::Layout::DEFAULT.shard_lens(n);
            for (k, s) in ec.shards.iter().enumerate() {
                let server = s.replica.as_ref().unwrap().server;
                let stored = &st.data[&(server, s.chunk)];
                assert_eq!(stored.version, after.version, "shard at the new version");
                assert!(st.synced.contains(&(server, s.chunk)), "shard synced");
                let tail = stored.read(lens[k] as u32, 4096);
                assert!(
                    tail.iter().all(|b| *b == 0),
                    "nothing past the shard length"
                );
            }
        }
        // A fresh reader, and the old one whose cached location is now stale.
        let fresh = FileIo::new(INO, n, fake.clone(), 1 << 20);
        assert!(fresh.read(0, n as u32).await.unwrap() == data, "size {n}");
        assert!(
            old_io.read(0, n as u32).await.unwrap() == data,
            "size {n}, stale cache"
        );
        if n > 2 {
            let (off, len) = (n / 2 - 1, 3);
            assert_eq!(
                fresh.read(off, len).await.unwrap(),
                expect(&data, off, len as u64)
            );
        }
    }
}

#[tokio::test]
async fn writing_into_an_ec_chunk_copies_it_to_replicas_first() {
    let fake = Arc::new(Fake::new(6));
    let n = 9 * MIB + 77;
    let mut data = pattern(9, n as usize);
    let (_, before) = write_file(&fake, &data).await;
    let ec_loc = convert(&*fake, &cold(&before, n)).await.unwrap();
    // One shard corrupt: the copy decodes around it, and reports it.
    lose(&fake, &ec_loc, 1, Loss::Corrupt);
    let io = FileIo::new(INO, n, fake.clone(), 1 << 20);
    let at = 5 * MIB - 3;
    io.write(at, b"overwritten").await.unwrap();
    io.fsync().await.unwrap();
    data[at as usize..at as usize + 11].copy_from_slice(b"overwritten");
    let now = fake.loc(INO, 0).unwrap();
    assert!(now.ec.is_none(), "replicated again");
    assert!(!now.shared);
    assert_ne!(now.chunk, ec_loc.chunk, "a new chunk");
    assert_eq!(now.replicas.len(), 3);
    assert!(fake.st().cows.is_empty(), "cow_done reported");
    let bad = ec_loc.ec.as_ref().unwrap().shards[1].chunk;
    assert_eq!(fake.st().lost_reports, vec![(bad, 2)]);
    for r in &now.replicas {
        assert!(fake.st().synced.contains(&(r.server, now.chunk)));
    }
    let fresh = FileIo::new(INO, n, fake.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);
    assert!(io.read(0, n as u32).await.unwrap() == data);
}

#[tokio::test]
async fn writing_into_an_empty_ec_chunk_works() {
    let fake = Arc::new(Fake::new(6));
    let (_, before) = write_file(&fake, &[]).await;
    convert(&*fake, &cold(&before, 0)).await.unwrap();
    let io = FileIo::new(INO, 0, fake.clone(), 1 << 20);
    io.write(10, b"abc").await.unwrap();
    io.fsync().await.unwrap();
    let now = fake.loc(INO, 0).unwrap();
    assert!(now.ec.is_none());
    let fresh = FileIo::new(INO, 13, fake.clone(), 1 << 20);
    assert_eq!(
        fresh.read(0, 13).await.unwrap().to_vec(),
        b"\0\0\0\0\0\0\0\0\0\0abc"
    );
}

#[tokio::test]
async fn a_refused_commit_leaves_the_replicated_data_readable() {
    let fake = Arc::new(Fake::new(6));
    let n = 6 * MIB + 5;
    let data = pattern(4, n as usize);
    let (old_io, before) = write_file(&fake, &data).await;
    fake.st().refuse_ec_commit = true;
    let err = convert(&*fake, &cold(&before, n)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Meta(MetaError::StaleVersion { .. })),
        "{err:?}"
    );
    let now = fake.loc(INO, 0).unwrap();
    assert!(now.ec.is_none());
    assert_eq!(now.chunk, before.chunk);
    let fresh = FileIo::new(INO, n, fake.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);
    assert!(
        old_io.read(0, n as u32).await.unwrap() == data,
        "stale cache refreshed"
    );
}

#[tokio::test]
async fn a_replica_that_cannot_be_fenced_aborts_the_conversion() {
    let fake = Arc::new(Fake::new(6));
    let n = 2 * MIB;
    let data = pattern(5, n as usize);
    let (_, before) = write_file(&fake, &data).await;
    let victim = before.replicas[2].server;
    fake.st().down.insert(victim);
    let err = convert(&*fake, &cold(&before, n)).await.unwrap_err();
    assert!(matches!(err, ClientError::Io { .. }), "{err:?}");
    {
        let st = fake.st();
        let shard_written = st.converting[&(INO, 0)].shards.iter().any(|s| {
            st.data
                .contains_key(&(s.replica.as_ref().unwrap().server, s.chunk))
        });
        assert!(
            !shard_written,
            "nothing written before every replica is fenced"
        );
        assert!(st.map[&(INO, 0)].ec.is_none());
    }
    fake.st().down.clear();
    let fresh = FileIo::new(INO, n, fake.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);
}

#[tokio::test]
async fn a_write_during_a_conversion_cancels_it() {
    let fake = Arc::new(Fake::new(6));
    let n = MIB;
    let mut data = pattern(6, n as usize);
    let (io, before) = write_file(&fake, &data).await;
    // The converter got its plan and fenced the replicas; then a writer comes.
    let plan = fake
        .ec_prepare(INO, 0, before.chunk, before.version)
        .await
        .unwrap();
    for r in &plan.loc.replicas {
        fake.fence(
            &r.data_addr,
            plan.loc.chunk,
            plan.loc.version,
            plan.loc.term,
        )
        .await
        .unwrap();
    }
    io.write(100, b"new").await.unwrap();
    io.fsync().await.unwrap();
    data[100..103].copy_from_slice(b"new");
    let err = fake
        .ec_commit(INO, 0, before.chunk, plan.loc.version, n, plan.loc.term)
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::StaleVersion { .. }), "{err:?}");
    let fresh = FileIo::new(INO, n, fake.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);
}

#[tokio::test]
async fn a_chunk_longer_than_a_chunk_is_refused_before_any_change() {
    let fake = Arc::new(Fake::new(6));
    let (_, before) = write_file(&fake, b"x").await;
    let err = convert(&*fake, &cold(&before, CHUNK_SIZE + 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::TooLarge { .. }), "{err:?}");
    assert!(fake.st().converting.is_empty());
}

#[tokio::test]
async fn a_shard_that_reads_back_wrong_aborts_the_conversion() {
    let fake = Arc::new(Fake::new(6));
    let n = 3 * MIB + 9;
    let data = pattern(7, n as usize);
    let (_, before) = write_file(&fake, &data).await;
    // Server 3 gets shard 2 and stores its bytes wrong, as a lying disk would.
    fake.st().garble.insert(3);
    let err = convert(&*fake, &cold(&before, n)).await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Io {
                source: rawfs_chunkserver_api::DataError::Corrupt { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(fake.loc(INO, 0).unwrap().ec.is_none(), "not committed");
    fake.st().garble.clear();
    let fresh = FileIo::new(INO, n, fake.clone(), 1 << 20);
    assert!(fresh.read(0, n as u32).await.unwrap() == data);
}

#[tokio::test]
async fn an_fsync_after_the_chunk_was_converted_succeeds() {
    // Written and flushed (so acknowledged by the replicas) but not yet synced when the healer
    // converts the chunk and deletes the replicas: the fsync finds the shards, which the
    // conversion synced, instead of failing on the deleted copies.
    let fake = Arc::new(Fake::new(9));
    let n = 5 * MIB;
    let data = pattern(3, n as usize);
    let io = FileIo::new(INO, 0, fake.clone(), 8 << 20);
    io.write(0, &data).await.unwrap();
    io.flush().await.unwrap();
    let before = fake.loc(INO, 0).unwrap();
    let after = convert(&*fake, &cold(&before, n)).await.unwrap();
    assert!(after.ec.is_some());
    io.fsync().await.expect("fsync after a conversion");
    assert!(read(&fake, 0, n).await.unwrap() == data);
}
