//! FileIo against the in-memory cluster ([`crate::fake`]): buffering, replication, failover,
//! fsync, holes, punch, truncate and read-ahead, with failures injected.

use crate::fake::Fake;
use crate::{ClientError, FileIo};
use rawfs_metadata_api::CHUNK_SIZE;
use std::sync::Arc;

const INO: u64 = 42;

fn setup(servers: u64, buffer: usize) -> (Arc<Fake>, FileIo) {
    let fake = Arc::new(Fake::new(servers));
    let io = FileIo::new(INO, 0, fake.clone(), buffer);
    (fake, io)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(31).wrapping_add(seed * 7) % 251) as u8)
        .collect()
}

#[tokio::test]
async fn writes_that_fit_are_buffered_at_once_and_others_are_left_to_write() {
    let (fake, io) = setup(3, 16);
    assert!(io.write_if_buffered(0, b"0123456789"));
    assert!(
        io.write_if_buffered(4, b"ab"),
        "an overwrite inside the buffer"
    );
    assert_eq!(io.size(), 10);
    assert!(
        !io.write_if_buffered(10, b"0123456789"),
        "past the buffer's room"
    );
    assert!(
        !io.write_if_buffered(u64::MAX - 1, b"xyz"),
        "past the largest offset"
    );
    assert!(!io.write_if_buffered(3, b""), "nothing to buffer");
    assert_eq!(io.size(), 10, "a refused write changes nothing");
    assert_eq!(fake.st().writes, 0);
    // The refused write goes the usual way (the full buffer is flushed to make room).
    io.write(10, b"0123456789").await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(
        io.read(0, 100).await.unwrap().to_vec(),
        b"0123ab67890123456789"
    );
}

#[tokio::test]
async fn files_share_the_clients_write_budget() {
    use crate::budget::{WriteBudget, FAIR_SHARE};
    let fake = Arc::new(Fake::new(3));
    let share = FAIR_SHARE as usize;
    let budget = Arc::new(WriteBudget::new(FAIR_SHARE * 2));
    let file = |ino| {
        let (suspects, budget) = (Arc::default(), budget.clone());
        FileIo::with_shared(
            ino,
            0,
            fake.clone(),
            share * 4,
            suspects,
            budget,
            Arc::default(),
        )
    };
    let (a, b) = (file(INO), file(INO + 1));
    // Within the budget, a buffer grows past a fair share.
    assert!(a.write_if_buffered(0, &pattern(1, share * 2)));
    assert!(a.write_if_buffered((share * 2) as u64, &pattern(2, 1 << 20)));
    assert_eq!(budget.used(), (share * 2 + (1 << 20)) as u64);
    // Past it, a buffer that holds a fair share stops growing; a smaller one still grows.
    assert!(!a.write_if_buffered((share * 2 + (1 << 20)) as u64, b"x"));
    assert!(b.write_if_buffered(0, &pattern(3, 1 << 20)));
    assert_eq!(fake.st().writes, 0);
    // The refused write flushes the full buffer in the background; the bytes are counted
    // until they are stored, and uncounted once they are.
    a.write((share * 2 + (1 << 20)) as u64, b"x").await.unwrap();
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(budget.used(), 0);
    let want: Vec<u8> = [pattern(1, share * 2), pattern(2, 1 << 20), b"x".to_vec()].concat();
    assert_eq!(a.read(0, want.len() as u32).await.unwrap().to_vec(), want);
    // A dropped FileIo gives back what it held.
    assert!(b.write_if_buffered(0, b"y"));
    drop(b);
    assert_eq!(budget.used(), 0);
}

#[tokio::test]
async fn a_deferred_flush_stores_the_data_and_leaves_its_commit_to_the_caller() {
    use crate::Deferred;
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, b"hello ").await.unwrap();
    let d = io.flush_deferred().await.unwrap();
    assert_eq!(
        d,
        Some(Deferred {
            end: 6,
            stored_delta: 6
        })
    );
    assert_eq!(fake.st().commits, 0, "the caller commits it");
    assert!(fake.st().writes > 0, "the data is on the replicas");
    io.write(6, b"world").await.unwrap();
    let d = io.flush_deferred().await.unwrap();
    assert_eq!(
        d,
        Some(Deferred {
            end: 11,
            stored_delta: 5
        }),
        "counted from the deferred end"
    );
    assert_eq!(io.flush_deferred().await.unwrap(), None, "nothing left");
    assert_eq!(io.read(0, 100).await.unwrap().to_vec(), b"hello world");
    // A plain flush commits as usual.
    io.write(11, b"!").await.unwrap();
    let attr = io.flush().await.unwrap().expect("a commit");
    assert_eq!(fake.st().commits, 1);
    assert_eq!(attr.size, 12);
}

#[tokio::test]
async fn an_fsync_through_a_later_open_syncs_what_a_closed_one_wrote() {
    use crate::unsynced::Unsynced;
    let fake = Arc::new(Fake::new(3));
    let unsynced: Arc<Unsynced> = Arc::default();
    let open = |size| {
        let shared = (Arc::default(), Arc::default(), unsynced.clone());
        FileIo::with_shared(
            INO,
            size,
            fake.clone(),
            1 << 20,
            shared.0,
            shared.1,
            shared.2,
        )
    };
    let a = open(0);
    a.write(0, b"data").await.unwrap();
    a.flush().await.unwrap();
    drop(a);
    assert!(fake.st().synced.is_empty(), "a close syncs nothing");
    let b = open(4);
    b.fsync().await.unwrap();
    assert_eq!(
        fake.st().synced.len(),
        3,
        "the later open's fsync syncs every replica the closed one wrote"
    );
    drop(b);
    open(4).fsync().await.unwrap();
    assert_eq!(fake.st().synced.len(), 3, "nothing is left to sync");
}

#[tokio::test]
async fn buffered_writes_are_read_back_before_and_after_flush() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, b"hello ").await.unwrap();
    io.write(6, b"world").await.unwrap();
    assert_eq!(io.size(), 11);
    assert_eq!(fake.st().writes, 0, "nothing sent before a flush");
    assert_eq!(io.read(0, 100).await.unwrap().to_vec(), b"hello world");
    let attr = io.flush().await.unwrap().expect("a commit");
    assert_eq!(attr.size, 11);
    assert_eq!(fake.st().commits, 1);
    assert!(io.flush().await.unwrap().is_none(), "nothing left to flush");
    assert_eq!(io.read(6, 5).await.unwrap().to_vec(), b"world");
    assert_eq!(
        io.read(11, 5).await.unwrap().to_vec(),
        b"",
        "clipped at the size"
    );
}

#[tokio::test]
async fn writes_across_a_chunk_boundary_reach_three_replicas() {
    let (fake, io) = setup(4, 256 << 10);
    let start = CHUNK_SIZE - 300_000;
    let data = pattern(1, 1_000_000);
    for (i, part) in data.chunks(100_000).enumerate() {
        io.write(start + (i * 100_000) as u64, part).await.unwrap();
    }
    io.flush().await.unwrap();
    for index in [0, 1] {
        let loc = fake.loc(INO, index).expect("chunk allocated");
        assert_eq!(loc.replicas.len(), 3);
        let st = fake.st();
        for r in &loc.replicas {
            assert!(st.data.contains_key(&(r.server, loc.chunk)));
        }
    }
    let back = io.read(start, 1_000_000).await.unwrap();
    assert!(back == data, "data differs after the round trip");
    // The hole before the data reads as zeros and costs no chunkserver read.
    let reads = fake.st().reads;
    let fresh = FileIo::new(INO, start + 1_000_000, fake.clone(), 1 << 20);
    assert_eq!(fresh.read(1000, 4096).await.unwrap(), vec![0u8; 4096]);
    assert_eq!(fresh.read(start, 1_000_000).await.unwrap(), data);
    assert!(fake.st().reads > reads);
}

#[tokio::test]
async fn a_sparse_file_reads_zeros_between_its_chunks() {
    let (_fake, io) = setup(3, 1 << 20);
    io.write(0, b"a").await.unwrap();
    io.write(3 * CHUNK_SIZE, b"z").await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(io.size(), 3 * CHUNK_SIZE + 1);
    assert_eq!(io.read(CHUNK_SIZE + 5, 10).await.unwrap(), vec![0u8; 10]);
    assert_eq!(
        io.read(3 * CHUNK_SIZE - 1, 2).await.unwrap().to_vec(),
        b"\0z"
    );
}

#[tokio::test]
async fn a_dead_replica_is_dropped_and_the_write_goes_on() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, &pattern(2, 10_000)).await.unwrap();
    io.flush().await.unwrap();
    let before = fake.loc(INO, 0).unwrap();
    fake.st().down.insert(before.replicas[1].server);
    io.write(10_000, &pattern(3, 10_000)).await.unwrap();
    io.flush().await.unwrap();
    let after = fake.loc(INO, 0).unwrap();
    assert_eq!(after.replicas.len(), 2);
    assert!(after.version > before.version);
    {
        let st = fake.st();
        for r in &after.replicas {
            assert_eq!(
                st.data[&(r.server, after.chunk)].version,
                after.version,
                "survivors follow the map"
            );
        }
    }
    let mut want = pattern(2, 10_000);
    want.extend(pattern(3, 10_000));
    assert_eq!(io.read(0, 20_000).await.unwrap(), want);
    io.fsync().await.unwrap();
}

#[tokio::test]
async fn a_replica_whose_copy_was_deleted_is_dropped_and_the_write_goes_on() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, &pattern(4, 10_000)).await.unwrap();
    io.flush().await.unwrap();
    let before = fake.loc(INO, 0).unwrap();
    // Its server deleted the copy (a late stale-copy order) while the map still lists it:
    // it refuses the current version, also after the location is asked for again.
    let gone = before.replicas[0].server;
    {
        let mut st = fake.st();
        st.data.remove(&(gone, before.chunk));
        st.tombstones.insert((gone, before.chunk), before.version);
    }
    io.write(10_000, &pattern(5, 10_000)).await.unwrap();
    io.flush().await.unwrap();
    let after = fake.loc(INO, 0).unwrap();
    assert_eq!(after.replicas.len(), 2);
    assert!(after.replicas.iter().all(|r| r.server != gone));
    let mut want = pattern(4, 10_000);
    want.extend(pattern(5, 10_000));
    assert_eq!(io.read(0, 20_000).await.unwrap(), want);
    io.fsync().await.unwrap();
}

#[tokio::test]
async fn with_every_replica_down_flush_fails_and_keeps_the_data() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, b"x").await.unwrap();
    io.flush().await.unwrap();
    io.write(1, b"keep me").await.unwrap();
    fake.st().down.extend([1, 2, 3]);
    let err = io.flush().await.unwrap_err();
    assert!(matches!(err, ClientError::NoReplica { .. }), "{err:?}");
    assert_eq!(
        fake.loc(INO, 0).unwrap().replicas.len(),
        3,
        "nothing dropped"
    );
    assert_eq!(
        io.read(1, 7).await.unwrap().to_vec(),
        b"keep me",
        "still buffered"
    );
    fake.st().down.clear();
    assert_eq!(io.flush().await.unwrap().unwrap().size, 8);
    let fresh = FileIo::new(INO, 8, fake.clone(), 1 << 20);
    assert_eq!(fresh.read(0, 8).await.unwrap().to_vec(), b"xkeep me");
}

#[tokio::test]
async fn a_full_cluster_reports_no_space() {
    let (fake, io) = setup(3, 1 << 20);
    fake.st().full.extend([1, 2, 3]);
    io.write(0, b"x").await.unwrap();
    assert!(matches!(io.flush().await, Err(ClientError::NoSpace { .. })));
}

#[tokio::test]
async fn a_corrupt_copy_is_skipped_and_reported() {
    let (fake, io) = setup(3, 1 << 20);
    let data = pattern(4, 50_000);
    io.write(0, &data).await.unwrap();
    io.flush().await.unwrap();
    let loc = fake.loc(INO, 0).unwrap();
    // Corrupt the copy that is read first.
    let first = loc.replicas[(loc.chunk % 3) as usize].server;
    fake.st().corrupt.insert((first, loc.chunk));
    let fresh = FileIo::new(INO, 50_000, fake.clone(), 1 << 20);
    assert_eq!(fresh.read(0, 50_000).await.unwrap(), data);
    let after = fake.loc(INO, 0).unwrap();
    assert!(
        !after.replicas.iter().any(|r| r.server == first),
        "bad copy dropped"
    );
    assert_eq!(after.replicas.len(), 2);
    // Reads still work with the bumped version.
    let again = FileIo::new(INO, 50_000, fake.clone(), 1 << 20);
    assert_eq!(again.read(100, 10).await.unwrap(), data[100..110]);
}

#[tokio::test]
async fn a_read_fails_over_to_a_live_replica() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, b"payload").await.unwrap();
    io.flush().await.unwrap();
    let loc = fake.loc(INO, 0).unwrap();
    fake.st()
        .down
        .insert(loc.replicas[(loc.chunk % 3) as usize].server);
    assert_eq!(io.read(0, 7).await.unwrap().to_vec(), b"payload");
    // An unreachable server is not reported as a bad copy (the heartbeat timeout handles it).
    assert_eq!(fake.loc(INO, 0).unwrap().replicas.len(), 3);
    fake.st().down.extend([1, 2, 3]);
    assert!(matches!(
        io.read(0, 7).await,
        Err(ClientError::NoReplica { .. })
    ));
}

#[tokio::test]
async fn fsync_syncs_every_written_replica_once() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, b"abc").await.unwrap();
    io.write(CHUNK_SIZE, b"def").await.unwrap();
    io.fsync().await.unwrap();
    assert_eq!(fake.st().synced.len(), 6, "3 replicas of 2 chunks");
    io.fsync().await.unwrap();
    assert_eq!(fake.st().synced.len(), 6, "nothing written since");
    // One replica dies before the next fsync: it is dropped, 2 durable copies suffice.
    io.write(3, b"g").await.unwrap();
    let loc = fake.loc(INO, 0).unwrap();
    io.flush().await.unwrap();
    fake.st().down.insert(loc.replicas[0].server);
    io.fsync().await.unwrap();
    assert_eq!(fake.loc(INO, 0).unwrap().replicas.len(), 2);
}

#[tokio::test]
async fn a_stale_location_is_refreshed_once() {
    let (fake, io) = setup(4, 1 << 20);
    io.write(0, b"one").await.unwrap();
    io.flush().await.unwrap();
    // Another client drops a replica: our cached version is now stale.
    let loc = fake.loc(INO, 0).unwrap();
    {
        let mut st = fake.st();
        let l = st.map.get_mut(&(INO, 0)).unwrap();
        l.replicas.pop();
        l.version += 1;
        let v = l.version;
        for r in l.replicas.clone() {
            st.data.get_mut(&(r.server, loc.chunk)).unwrap().version = v;
        }
    }
    io.write(3, b"two").await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(io.read(0, 6).await.unwrap().to_vec(), b"onetwo");
    // A new metadata term: the location is refreshed and carries it.
    fake.st().term = 5;
    fake.st().map.get_mut(&(INO, 0)).unwrap().term = 5;
    io.write(6, b"!").await.unwrap();
    io.flush().await.unwrap();
}

#[tokio::test]
async fn scattered_and_oversized_writes_are_batched() {
    let (fake, io) = setup(3, 1000);
    io.write(0, &[1u8; 100]).await.unwrap();
    io.write(500, &[2u8; 100]).await.unwrap();
    io.write(CHUNK_SIZE + 7, &[4u8; 10]).await.unwrap();
    assert_eq!(fake.st().writes, 0, "separate ranges share the buffer");
    assert_eq!(
        io.read(95, 10).await.unwrap().to_vec(),
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
    );
    // Bigger than the buffer: the buffer goes first (in the background), then this.
    io.write(600, &[3u8; 5000]).await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(fake.st().commits, 2, "one commit per batch");
    let back = io.read(0, 6000).await.unwrap();
    assert_eq!(back.len(), 6000);
    assert_eq!(back[..100], [1u8; 100]);
    assert_eq!(back[100..500], [0u8; 400]);
    assert_eq!(back[500..600], [2u8; 100]);
    assert_eq!(back[600..5600], vec![3u8; 5000][..]);
    assert_eq!(back[5600..], [0u8; 400]);
    assert_eq!(io.read(CHUNK_SIZE + 5, 14).await.unwrap()[2..12], [4u8; 10]);
}

#[tokio::test]
async fn random_small_writes_match_a_reference() {
    let (fake, io) = setup(3, 64 << 10);
    let mut reference = vec![0u8; 2 << 20];
    let mut seed = 12345u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..2000u64 {
        let off = (next() % (reference.len() as u64 - 5000)) as usize;
        let n = 1 + (next() % 4096) as usize;
        let data = pattern(i, n);
        io.write(off as u64, &data).await.unwrap();
        reference[off..off + n].copy_from_slice(&data);
        if i % 97 == 0 {
            let at = (next() % (reference.len() as u64 - 10_000)) as usize;
            let got = io.read(at as u64, 10_000).await.unwrap();
            let size = io.size() as usize;
            let want = &reference[at.min(size)..(at + 10_000).min(size)];
            assert_eq!(got, want, "read at {at} after write {i}");
        }
    }
    io.fsync().await.unwrap();
    let size = io.size();
    let fresh = FileIo::new(INO, size, fake.clone(), 1 << 20);
    assert!(fresh.read(0, size as u32).await.unwrap() == reference[..size as usize]);
}

#[tokio::test]
async fn punch_releases_whole_chunks_and_zeroes_the_edges() {
    let (fake, io) = setup(3, 1 << 20);
    for index in 0..3 {
        io.write(index * CHUNK_SIZE + 10, b"0123456789")
            .await
            .unwrap();
    }
    io.write(3 * CHUNK_SIZE - 5, b"tail!").await.unwrap();
    io.flush().await.unwrap();
    io.punch(15, 2 * CHUNK_SIZE + 2).await.unwrap();
    assert!(fake.loc(INO, 1).is_none(), "chunk 1 released");
    assert!(fake.loc(INO, 0).is_some() && fake.loc(INO, 2).is_some());
    assert_eq!(io.read(10, 10).await.unwrap().to_vec(), b"01234\0\0\0\0\0");
    assert_eq!(io.read(CHUNK_SIZE + 10, 10).await.unwrap(), vec![0u8; 10]);
    assert_eq!(
        io.read(2 * CHUNK_SIZE + 10, 10).await.unwrap().to_vec(),
        b"\x00\x00\x00\x00\x00\x00\x00789"
    );
    assert_eq!(
        io.read(3 * CHUNK_SIZE - 5, 5).await.unwrap().to_vec(),
        b"tail!"
    );
    assert_eq!(io.size(), 3 * CHUNK_SIZE);
}

#[tokio::test]
async fn truncate_then_extend_reads_zeros() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, &pattern(5, 100_000)).await.unwrap();
    io.write(CHUNK_SIZE, b"second chunk").await.unwrap();
    io.flush().await.unwrap();
    // The mount: setattr(size = 1000) on the metadata service, then these.
    fake.st().map.remove(&(INO, 1));
    io.set_size(1000);
    io.truncate_tail(1000).await.unwrap();
    assert_eq!(io.size(), 1000);
    assert_eq!(io.read(0, 2000).await.unwrap(), pattern(5, 100_000)[..1000]);
    io.set_size(200_000);
    let back = io.read(0, 200_000).await.unwrap();
    assert_eq!(back[..1000], pattern(5, 100_000)[..1000]);
    assert!(back[1000..].iter().all(|b| *b == 0), "old bytes came back");
    // Writing again past the end allocates a new chunk 1.
    io.write(CHUNK_SIZE + 2, b"x").await.unwrap();
    io.flush().await.unwrap();
    assert_eq!(io.read(CHUNK_SIZE, 3).await.unwrap().to_vec(), b"\0\0x");
}

#[tokio::test]
async fn another_clients_growth_is_read_and_zeroed_by_a_truncate_here() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, &pattern(1, 10_000)).await.unwrap();
    io.flush().await.unwrap();
    // Another client appends to the same file (its own FileIo, the same cluster).
    let other = FileIo::new(INO, 10_000, fake.clone(), 1 << 20);
    other.write(10_000, &pattern(2, 5_000)).await.unwrap();
    other.flush().await.unwrap();
    // A size read before a truncate here is not applied after it.
    let stale = io.size_changes();
    io.set_size(10_000);
    io.learn_size(15_000, stale);
    assert_eq!(
        io.size(),
        10_000,
        "a report older than this client's own size"
    );
    let token = io.size_changes();
    io.learn_size(15_000, token);
    assert_eq!(io.size(), 15_000);
    assert_eq!(io.read(10_000, 5_000).await.unwrap(), pattern(2, 5_000));
    io.learn_size(12_000, io.size_changes());
    assert_eq!(
        io.size(),
        15_000,
        "a smaller size is not taken unless another client changed the file"
    );
    // A truncate here zeroes the other client's bytes too, so an extension reads zeros.
    io.set_size(11_000);
    io.truncate_tail(11_000).await.unwrap();
    io.set_size(15_000);
    let back = io.read(10_000, 5_000).await.unwrap();
    assert_eq!(back[..1_000], pattern(2, 5_000)[..1_000]);
    assert!(
        back[1_000..].iter().all(|b| *b == 0),
        "the other client's bytes came back"
    );
}

#[tokio::test]
async fn another_clients_truncate_is_taken_unless_this_client_wrote_since() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, &pattern(1, 10_000)).await.unwrap();
    io.flush().await.unwrap();
    // Another client truncates to 4,000 (the watch tells of a change, the leader the size).
    fake.st().sizes.insert(INO, 4_000);
    io.changed_elsewhere();
    let token = io.size_changes();
    io.learn_size(4_000, token);
    assert_eq!(io.size(), 4_000);
    assert_eq!(io.read(0, 10_000).await.unwrap(), pattern(1, 4_000));
    // A write here not sent yet is not shrunk away, nor is one sent since the change.
    io.write(4_000, &pattern(2, 2_000)).await.unwrap();
    io.changed_elsewhere();
    io.learn_size(4_000, io.size_changes());
    assert_eq!(io.size(), 6_000, "buffered here");
    io.flush().await.unwrap();
    io.learn_size(4_000, io.size_changes());
    assert_eq!(
        io.size(),
        6_000,
        "written here after the other client's change"
    );
    // A report asked for before this client's commit is not taken after it.
    io.changed_elsewhere();
    let stale = io.size_changes();
    io.write(6_000, b"more").await.unwrap();
    io.flush().await.unwrap();
    io.changed_elsewhere();
    io.learn_size(4_000, stale);
    assert_eq!(io.size(), 6_004);
}

#[tokio::test]
async fn growth_elsewhere_into_a_new_chunk_is_not_read_as_a_cached_hole() {
    let (fake, io) = setup(3, 1 << 20);
    io.write(0, b"first").await.unwrap();
    io.flush().await.unwrap();
    // A sparse extension here, read once: chunk 1 is looked up and cached as a hole.
    let first_size = CHUNK_SIZE + 100;
    io.set_size(first_size);
    assert!(io
        .read(CHUNK_SIZE, 100)
        .await
        .unwrap()
        .iter()
        .all(|b| *b == 0));
    // Another client writes there and past the end.
    let other = FileIo::new(INO, first_size, fake.clone(), 1 << 20);
    other.write(CHUNK_SIZE + 50, b"other").await.unwrap();
    other.write(CHUNK_SIZE + 200, b"tail").await.unwrap();
    other.flush().await.unwrap();
    io.learn_size(CHUNK_SIZE + 204, io.size_changes());
    let back = io.read(CHUNK_SIZE + 50, 154).await.unwrap();
    assert_eq!(&back[..5], b"other", "the cached hole was read");
    assert_eq!(&back[150..], b"tail");
}

#[tokio::test]
async fn sequential_reads_are_served_by_read_ahead() {
    let (fake, io) = setup(3, 8 << 20);
    let data = pattern(6, 12 << 20);
    io.write(0, &data).await.unwrap();
    io.flush().await.unwrap();
    let fresh = FileIo::new(INO, data.len() as u64, fake.clone(), 1 << 20);
    let before = fake.st().reads;
    let mut back = Vec::new();
    let step = 128 << 10;
    for off in (0..data.len()).step_by(step) {
        back.extend(fresh.read(off as u64, step as u32).await.unwrap());
    }
    assert!(back == data, "read-ahead returned wrong data");
    let reads = fake.st().reads - before;
    // 96 reads of 128 KiB; windows of 4 MiB in 2 MiB frames need about 6 (+2 direct reads).
    assert!(
        reads < 20,
        "{reads} chunkserver reads for a sequential scan"
    );
}

#[tokio::test]
async fn a_write_invalidates_read_ahead() {
    let (_fake, io) = setup(3, 1 << 20);
    io.write(0, &[7u8; 300_000]).await.unwrap();
    io.flush().await.unwrap();
    for off in (0..200_000).step_by(50_000) {
        io.read(off, 50_000).await.unwrap();
    }
    io.write(250_000, &[9u8; 10]).await.unwrap();
    assert_eq!(io.read(249_995, 20).await.unwrap()[5..15], [9u8; 10]);
    io.flush().await.unwrap();
    assert_eq!(io.read(250_000, 10).await.unwrap().to_vec(), [9u8; 10]);
}

#[tokio::test]
async fn concurrent_writers_and_readers_agree() {
    let (_fake, io) = setup(3, 64 << 10);
    let io = Arc::new(io);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let io = io.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                let off = (t * 20 + i) * 10_000;
                io.write(off, &pattern(t * 100 + i, 10_000)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    io.fsync().await.unwrap();
    for t in 0..4u64 {
        for i in 0..20u64 {
            let off = (t * 20 + i) * 10_000;
            assert_eq!(
                io.read(off, 10_000).await.unwrap(),
                pattern(t * 100 + i, 10_000)
            );
        }
    }
}

#[tokio::test]
async fn ranges_past_the_maximum_size_are_refused() {
    let (_fake, io) = setup(3, 1 << 20);
    assert!(matches!(
        io.write(u64::MAX - 1, b"ab").await,
        Err(ClientError::TooLarge { .. })
    ));
    assert!(matches!(
        io.punch(u64::MAX, 2).await,
        Err(ClientError::TooLarge { .. })
    ));
}

#[test]
fn handles_and_futures_can_move_between_threads() {
    fn send<T: Send>(_: &T) {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FileIo>();
    send_sync::<crate::Client>();
    let (_fake, io) = setup(3, 1024);
    send(&io.write(0, b"x"));
    send(&io.read(0, 1));
    send(&io.flush());
    send(&io.fsync());
    send(&io.punch(0, 1));
    send(&io.truncate_tail(0));
}

/// Seeded random writes, reads, truncates, punches and fsyncs around a chunk boundary,
/// every read compared with an in-memory reference. Set `RAWFS_SEED` to replay a run.
#[tokio::test]
async fn random_operations_match_a_reference() {
    let seed: u64 = std::env::var("RAWFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 | 1)
                .unwrap_or(7)
        });
    println!("RAWFS_SEED={seed}");
    let mut x = seed;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n.max(1)
    };
    let (fake, io) = setup(3, 256 << 10);
    // The region under test: 2 MiB straddling the end of chunk 0; the file before it is a hole.
    let base = CHUNK_SIZE - (1 << 20);
    let span = 2u64 << 20;
    let mut reference = vec![0u8; span as usize];
    let mut size = 0u64;
    for step in 0..600u64 {
        match next(10) {
            0..=4 => {
                let off = next(span - 1);
                let n = 1 + next((span - off).min(300_000));
                let data = pattern(step, n as usize);
                io.write(base + off, &data).await.unwrap();
                reference[off as usize..(off + n) as usize].copy_from_slice(&data);
                size = size.max(base + off + n);
            }
            5..=6 => {
                let off = next(span);
                let n = 1 + next(200_000);
                let got = io.read(base + off, n as u32).await.unwrap();
                let end = (base + off + n).min(size);
                let want: Vec<u8> = (base + off..end.max(base + off))
                    .map(|p| reference[(p - base) as usize])
                    .collect();
                assert!(
                    got == want,
                    "seed {seed} step {step}: read {off}+{n} differs"
                );
            }
            7 => {
                // Truncate as the mount does: flush, setattr (releases chunks wholly past the
                // new size), then truncate_tail; sometimes extend again right away.
                let new = base + next(span);
                io.flush().await.unwrap();
                {
                    let mut st = fake.st();
                    st.map.retain(|(_, index), _| index * CHUNK_SIZE < new);
                    st.sizes.insert(INO, new);
                }
                if new < size {
                    io.truncate_tail(new).await.unwrap();
                    for b in &mut reference[(new - base) as usize..] {
                        *b = 0;
                    }
                } else {
                    io.set_size(new);
                }
                size = new;
                if next(2) == 0 {
                    size = base + span;
                    fake.st().sizes.insert(INO, size);
                    io.set_size(size);
                }
            }
            8 => {
                let off = next(span);
                let n = next(span - off);
                io.punch(base + off, n).await.unwrap();
                let stop = (off + n).min(size.saturating_sub(base));
                for p in off..stop.max(off) {
                    reference[p as usize] = 0;
                }
            }
            _ => io.fsync().await.unwrap(),
        }
        assert_eq!(io.size(), size, "seed {seed} step {step}: size");
    }
    io.fsync().await.unwrap();
    let fresh = FileIo::new(INO, size, fake.clone(), 1 << 20);
    let got = fresh.read(base, span as u32).await.unwrap();
    let keep = size.saturating_sub(base).min(span) as usize;
    assert!(
        got == reference[..keep],
        "seed {seed}: final contents differ"
    );
}

#[tokio::test]
async fn a_chunk_allocated_but_not_yet_written_reads_as_zeros_and_is_not_asked_again() {
    use crate::store::Store;
    let (fake, io) = setup(3, 1 << 20);
    // As a create in a held directory does: the chunk comes with the create, no data yet.
    let loc = fake.allocate_chunk(INO, 0).await.unwrap();
    io.learn_location(&loc);
    io.write(1 << 20, b"late").await.unwrap();
    assert_eq!(io.read(0, 4096).await.unwrap().to_vec(), vec![0; 4096]);
    let asked = fake.st().reads;
    assert_eq!(asked, 3, "every replica was asked once");
    assert_eq!(io.read(8192, 4096).await.unwrap().to_vec(), vec![0; 4096]);
    assert_eq!(fake.st().reads, asked, "the unwritten chunk was remembered");
    // Its first write forgets that: what is stored now is read from the replicas.
    io.flush().await.unwrap();
    assert_eq!(io.read(1 << 20, 4).await.unwrap().to_vec(), b"late");
    assert!(fake.st().reads > asked);
}

#[tokio::test]
async fn a_read_while_the_first_write_reaches_some_replicas_keeps_every_replica() {
    let (fake, io) = setup(3, 0);
    io.write(0, &pattern(9, 4096)).await.unwrap();
    io.flush().await.unwrap();
    let loc = fake.loc(INO, 0).unwrap();
    // As if the chunk's first write had reached only the last replica so far.
    for r in &loc.replicas[..2] {
        fake.st().data.remove(&(r.server, loc.chunk));
    }
    assert_eq!(io.read(0, 4096).await.unwrap().to_vec(), pattern(9, 4096));
    let after = fake.loc(INO, 0).unwrap();
    assert_eq!(
        (after.version, after.replicas.len()),
        (loc.version, 3),
        "no replica dropped for not having the chunk yet"
    );
}
