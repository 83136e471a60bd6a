use super::*;
use rawfs_chunkserver_api::layout::Geometry;

const DATA_OFFSET: u64 = Geometry::current().data_offset;
use rawfs_chunkserver_api::BLOCK_SIZE;
use std::os::unix::fs::FileExt;

const BS: u64 = BLOCK_SIZE as u64;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed)
        .collect()
}

#[test]
fn write_read_and_reopen_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(300_000, 1);
    {
        let s = Storage::open(dir.path(), None).unwrap();
        s.write(7, 1, 1, 1000, &data, true).unwrap();
        s.write(0x1_0000_0100, 3, 1, 0, b"abc", false).unwrap();
        assert_eq!(
            &s.read(7, 1, 1000, data.len() as u64).unwrap()[..],
            &data[..]
        );
        assert_eq!(s.chunk_count(), 2);
        assert!(s.used() > 0);
    }
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(s.inventory(), vec![(7, 1), (0x1_0000_0100, 3)]);
    assert_eq!(
        &s.read(7, 1, 1000, data.len() as u64).unwrap()[..],
        &data[..]
    );
    let head = s.read(7, 1, 0, 1000).unwrap();
    assert!(head.iter().all(|&b| b == 0));
    assert_eq!(&s.read(0x1_0000_0100, 3, 0, 3).unwrap()[..], b"abc");
    assert!(s.used() > 0);
    assert_eq!(s.term(), 1);
}

#[test]
fn second_open_of_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = Storage::open(dir.path(), None).unwrap();
    assert!(matches!(
        Storage::open(dir.path(), None),
        Err(OpenStorageError::Locked { .. })
    ));
}

#[test]
fn read_of_missing_chunk_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(s.read(1, 1, 0, 10), Err(StoreError::NotFound));
    assert_eq!(s.sync(1, 1), Err(StoreError::NotFound));
}

#[test]
fn version_fencing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    s.write(1, 5, 1, 0, b"v5", false).unwrap();
    assert_eq!(
        s.write(1, 4, 1, 0, b"v4", false),
        Err(StoreError::StaleVersion { current: 5 })
    );
    assert_eq!(
        s.read(1, 4, 0, 2),
        Err(StoreError::StaleVersion { current: 5 })
    );
    // A higher version is adopted and persisted.
    s.write(1, 6, 1, 0, b"v6", false).unwrap();
    assert_eq!(
        s.write(1, 5, 1, 0, b"v5", false),
        Err(StoreError::StaleVersion { current: 6 })
    );
    // Reads at a newer version than stored are served.
    assert_eq!(&s.read(1, 7, 0, 2).unwrap()[..], b"v6");
    drop(s);
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(s.inventory(), vec![(1, 6)]);
    assert_eq!(
        s.write(1, 5, 1, 0, b"v5", false),
        Err(StoreError::StaleVersion { current: 6 })
    );
}

#[test]
fn term_fencing_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Storage::open(dir.path(), None).unwrap();
        s.write(1, 1, 3, 0, b"t3", false).unwrap();
        assert_eq!(
            s.write(1, 1, 2, 0, b"t2", false),
            Err(StoreError::StaleTerm { current: 3 })
        );
        s.observe_term(9).unwrap();
        assert_eq!(
            s.write(2, 1, 8, 0, b"t8", false),
            Err(StoreError::StaleTerm { current: 9 })
        );
    }
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(s.term(), 9);
    assert_eq!(
        s.write(1, 1, 3, 0, b"t3", false),
        Err(StoreError::StaleTerm { current: 9 })
    );
    s.write(1, 1, 9, 0, b"t9", false).unwrap();
}

#[test]
fn corruption_is_detected_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    let data = pattern(3 * BLOCK_SIZE as usize, 5);
    s.write(0x42, 1, 1, 0, &data, true).unwrap();
    // Overwrite bytes of block 1 behind the server's back, as a failing disk would.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.chunk_path(0x42))
        .unwrap();
    f.write_all_at(b"garbage", DATA_OFFSET + BS + 100).unwrap();
    drop(f);
    // The open file handle is cached, but the check is against the bytes read now.
    assert_eq!(&s.read(0x42, 1, 0, BS).unwrap()[..], &data[..BS as usize]);
    assert_eq!(
        s.read(0x42, 1, 10, 2 * BS),
        Err(StoreError::Corrupt { offset: BS })
    );
    assert_eq!(s.take_corrupt(), vec![0x42]);
    assert!(s.take_corrupt().is_empty());
    // Reopened from disk, the damage is still caught.
    drop(s);
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(
        s.read(0x42, 1, BS + 100, 7),
        Err(StoreError::Corrupt { offset: BS })
    );
    s.restore_corrupt(&[1, 2]);
    assert_eq!(s.take_corrupt(), vec![1, 2, 0x42]);
}

#[test]
fn corrupt_header_is_reported_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = {
        let s = Storage::open(dir.path(), None).unwrap();
        s.write(5, 1, 1, 0, b"x", true).unwrap();
        s.chunk_path(5)
    };
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"zz", 0).unwrap();
    drop(f);
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(s.take_corrupt(), vec![5]);
    assert_eq!(s.read(5, 1, 0, 1), Err(StoreError::Corrupt { offset: 0 }));
    assert!(s.inventory().is_empty());
}

#[test]
fn delete_frees_space_and_forgets_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    s.write(3, 1, 1, 0, &pattern(1 << 20, 0), false).unwrap();
    assert!(s.used() >= 1 << 20);
    s.delete(3).unwrap();
    s.delete(3).unwrap();
    assert_eq!(s.used(), 0);
    assert_eq!(s.chunk_count(), 0);
    assert_eq!(s.read(3, 1, 0, 1), Err(StoreError::NotFound));
    // A late writer holding the old location cannot bring it back (its write would be
    // acknowledged into a file nobody reads), also after a restart...
    assert_eq!(
        s.write(3, 1, 1, 0, b"late", false),
        Err(StoreError::StaleVersion { current: 1 })
    );
    drop(s);
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(
        s.write(3, 1, 1, 0, b"late", false),
        Err(StoreError::StaleVersion { current: 1 })
    );
    // ...while a newer copy (the healer's, at a bumped version) starts from scratch.
    s.write(3, 2, 1, 10, b"new", false).unwrap();
    assert_eq!(
        &s.read(3, 2, 0, 13).unwrap()[..],
        b"\0\0\0\0\0\0\0\0\0\0new"
    );
}

#[test]
fn a_stale_copy_deletion_spares_a_newer_copy() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    // The inventory showed version 1; the healer has since written a new copy at version 3.
    s.write(4, 1, 1, 0, b"old", false).unwrap();
    s.write(4, 3, 1, 0, b"new", false).unwrap();
    assert_eq!(s.delete_stale(4, 1), Ok(false));
    assert_eq!(&s.read(4, 3, 0, 3).unwrap()[..], b"new");
    assert_eq!(s.delete_stale(4, 3), Ok(true));
    assert_eq!(s.read(4, 3, 0, 3), Err(StoreError::NotFound));
    assert_eq!(s.delete_stale(4, 3), Ok(false), "nothing left to delete");
}

#[test]
fn configured_capacity_refuses_writes_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), Some(256 << 10)).unwrap();
    assert_eq!(s.total(), 256 << 10);
    s.write(1, 1, 1, 0, &pattern(512 << 10, 0), false).unwrap();
    assert_eq!(s.write(2, 1, 1, 0, b"x", false), Err(StoreError::NoSpace));
    assert!(!s.healthy());
    s.delete(1).unwrap();
    s.write(2, 1, 1, 0, b"x", false).unwrap();
    assert!(s.healthy());
}

#[test]
fn concurrent_writers_to_one_chunk_and_many_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Storage::open(dir.path(), None).unwrap());
    let mut threads = Vec::new();
    for t in 0..8u8 {
        let s = s.clone();
        threads.push(std::thread::spawn(move || {
            for i in 0..20u64 {
                // Interleaved 4 KiB pieces of shared blocks in chunk 1, and a chunk per thread.
                let off = (i * 8 + t as u64) * 4096;
                s.write(1, 1, 1, off, &[t + 1; 4096], false).unwrap();
                s.write(100 + t as u64, 1, 1, i * 1000, &[t; 1000], false)
                    .unwrap();
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    let all = s.read(1, 1, 0, 160 * 4096).unwrap();
    for (i, piece) in all.chunks(4096).enumerate() {
        let t = (i % 8) as u8;
        assert!(piece.iter().all(|&b| b == t + 1), "piece {i}");
    }
    for t in 0..8u8 {
        let got = s.read(100 + t as u64, 1, 0, 20_000).unwrap();
        assert!(got.iter().all(|&b| b == t));
    }
}

/// A page-aligned copy of `data` (as the data port reads a WRITE payload) and its 4 KiB
/// block crcs (as `payload_crc` derives them).
fn aligned_with_crcs(data: &[u8]) -> (Bytes, Vec<u32>) {
    let mut a = rawfs_chunkserver_api::aligned::AlignedPayload::new(data.len(), 0).unwrap();
    bytes::BufMut::put_slice(&mut a, data);
    let crcs = data.chunks(4096).map(crc32c::crc32c).collect();
    (Bytes::from_owner(a), crcs)
}

fn unlocked_writes() -> u64 {
    crate::chunk_file::UNLOCKED_WRITES.load(Ordering::Relaxed)
}

/// Writes 16 aligned 1 MiB runs of chunk 9 from 4 threads, run `r` holding
/// `pattern(RUN, r + seed)`.
fn write_runs(s: &Arc<Storage>, seed: u8) {
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                for run in (t..16).step_by(4) {
                    let data = pattern(RUN, run as u8 + seed);
                    let (data, crcs) = aligned_with_crcs(&data);
                    s.write_with_crcs(9, 1, 1, run * RUN as u64, &data, false, Some(&crcs))
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
}

const RUN: usize = 1 << 20;

/// Large aligned writes of one chunk run outside its lock, side by side, and read back; a
/// reader of the same chunk while they are rewritten sees every run whole, old or new, never
/// a checksum failure (it waits for a run being written).
#[test]
fn aligned_writes_of_one_chunk_run_unlocked_and_reads_never_see_them_half_done() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Storage::open(dir.path(), None).unwrap());
    let before = unlocked_writes();
    write_runs(&s, 0);
    let (_, refused) = crate::direct::written();
    if !refused {
        assert!(
            unlocked_writes() - before >= 16,
            "the writes took the chunk's lock"
        );
    }
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let mut passes = 0;
            while !done.load(Ordering::Relaxed) || passes == 0 {
                for run in 0..16u64 {
                    let got = match s.read(9, 1, run * RUN as u64, RUN as u64) {
                        Ok(got) => got,
                        Err(e) => panic!("read of run {run} failed: {e}"),
                    };
                    let (old, new) = (pattern(RUN, run as u8), pattern(RUN, run as u8 + 100));
                    assert!(
                        got[..] == old[..] || got[..] == new[..],
                        "run {run} half written"
                    );
                }
                passes += 1;
            }
        })
    };
    write_runs(&s, 100);
    done.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    for run in 0..16u64 {
        let got = s.read(9, 1, run * RUN as u64, RUN as u64).unwrap();
        assert_eq!(&got[..], &pattern(RUN, run as u8 + 100)[..], "run {run}");
    }
    assert!(s.take_corrupt().is_empty());
}

/// While a write runs outside the chunk's lock, a read of its blocks and a fence wait for
/// it; a read of other blocks and a sync go ahead.
#[test]
fn reads_of_its_blocks_and_fences_wait_for_an_unlocked_write() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Storage::open(dir.path(), None).unwrap());
    s.write(6, 1, 1, 0, &pattern(256 << 10, 1), false).unwrap();
    let inflight = lock(&s.slot(6)).as_ref().unwrap().inflight().clone();
    let span = inflight.begin(0, 64 << 10);
    assert_eq!(s.read(6, 1, 128 << 10, 10).unwrap().len(), 10);
    s.sync(6, 1).unwrap();
    let read = {
        let s = s.clone();
        std::thread::spawn(move || s.read(6, 1, 100, 10))
    };
    let fence = {
        let s = s.clone();
        std::thread::spawn(move || s.fence(6, 1, 1))
    };
    crate::inflight::tests::wait_for_waiters(&inflight, 2);
    assert!(
        !read.is_finished(),
        "a read went ahead of a write of its blocks"
    );
    assert!(
        !fence.is_finished(),
        "a fence went ahead of a running write"
    );
    drop(span);
    assert_eq!(
        &read.join().unwrap().unwrap()[..],
        &pattern(256 << 10, 1)[100..110]
    );
    fence.join().unwrap().unwrap();
}

#[test]
fn many_chunks_beyond_the_open_file_cache() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    let n = OPEN_FILES as u64 + 50;
    for c in 0..n {
        s.write(c, 1, 1, 0, &c.to_be_bytes(), false).unwrap();
    }
    for c in 0..n {
        assert_eq!(&s.read(c, 1, 0, 8).unwrap()[..], &c.to_be_bytes());
    }
    assert_eq!(s.chunk_count(), n);
}

#[test]
fn disk_errors_map_to_protocol_statuses() {
    assert_eq!(
        StoreError::from(io::Error::from_raw_os_error(libc::ENOSPC)),
        StoreError::NoSpace
    );
    assert_eq!(
        StoreError::from(io::Error::from_raw_os_error(libc::EDQUOT)),
        StoreError::NoSpace
    );
    assert!(matches!(
        StoreError::from(io::Error::from_raw_os_error(libc::EIO)),
        StoreError::Disk { .. }
    ));
}

#[test]
fn fence_refuses_older_versions_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Storage::open(dir.path(), None).unwrap();
        s.write(5, 1, 1, 0, b"old", false).unwrap();
        assert_eq!(
            s.fence(9, 2, 1),
            Err(StoreError::NotFound),
            "only existing chunks"
        );
        s.fence(5, 2, 1).unwrap();
        assert_eq!(
            s.write(5, 1, 1, 0, b"new", false),
            Err(StoreError::StaleVersion { current: 2 }),
            "a writer with a pre-snapshot location is refused"
        );
        assert_eq!(
            s.fence(5, 1, 1),
            Err(StoreError::StaleVersion { current: 2 })
        );
        assert_eq!(
            s.fence(5, 3, 0),
            Err(StoreError::StaleTerm { current: 1 }),
            "fenced by term like a write"
        );
    }
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(s.inventory(), vec![(5, 2)]);
    assert_eq!(&s.read(5, 2, 0, 3).unwrap()[..], b"old");
}

#[test]
fn clone_copies_data_keeps_holes_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    let a = pattern(100_000, 3);
    let b = pattern(5_000, 4);
    s.write(1, 4, 2, 10, &a, false).unwrap();
    s.write(1, 4, 2, 40 << 20, &b, false).unwrap();
    let before = s.used();
    s.clone_chunk(1, 4, 2, 1, 2).unwrap();
    assert_eq!(s.inventory(), vec![(1, 4), (2, 1)]);
    assert_eq!(&s.read(2, 1, 10, a.len() as u64).unwrap()[..], &a[..]);
    assert_eq!(&s.read(2, 1, 40 << 20, b.len() as u64).unwrap()[..], &b[..]);
    assert!(s.read(2, 1, 1 << 20, 4096).unwrap().iter().all(|&x| x == 0));
    let copy = s.used() - before;
    assert!(
        copy < 4 << 20,
        "holes stay holes: the copy of ~105 KB of data takes {copy} bytes"
    );
    // The copy is independent of its source.
    s.write(2, 1, 2, 10, b"changed", false).unwrap();
    assert_eq!(&s.read(1, 4, 10, 7).unwrap()[..], &a[..7]);
    // Done already: a retry changes nothing.
    s.clone_chunk(1, 4, 2, 1, 2).unwrap();
    assert_eq!(&s.read(2, 1, 10, 7).unwrap()[..], b"changed");
    // Fences: an older source version, an older term, a missing source.
    assert_eq!(
        s.clone_chunk(1, 3, 7, 1, 2),
        Err(StoreError::StaleVersion { current: 4 })
    );
    assert_eq!(
        s.clone_chunk(1, 4, 7, 1, 1),
        Err(StoreError::StaleTerm { current: 2 })
    );
    assert_eq!(s.clone_chunk(99, 1, 7, 1, 2), Err(StoreError::NotFound));
    assert!(s.read(7, 1, 0, 1).is_err(), "no partial copy left behind");
    // It survives a restart.
    drop(s);
    let s = Storage::open(dir.path(), None).unwrap();
    assert_eq!(&s.read(2, 1, 40 << 20, b.len() as u64).unwrap()[..], &b[..]);
}

#[test]
fn clone_of_a_corrupt_block_fails_and_leaves_no_copy() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    s.write(1, 1, 1, 0, &pattern(BS as usize, 5), true).unwrap();
    drop(s);
    let path = dir.path().join("chunks/01/0000000000000001");
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(b"rot", DATA_OFFSET + 100).unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    assert!(matches!(
        s.clone_chunk(1, 1, 2, 1, 1),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(s.take_corrupt(), vec![1], "the bad source is reported");
    assert!(s.read(2, 1, 0, 1).is_err());
    assert_eq!(s.inventory(), vec![(1, 1)]);
}

#[test]
fn whole_block_reads_carry_the_crc_of_their_data() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    // Written blocks, a hole of unwritten blocks, a block written in part, and the file's
    // end inside a block.
    s.write(9, 1, 1, 0, &pattern(3 * BS as usize, 5), false)
        .unwrap();
    s.write(9, 1, 1, 6 * BS + 100, &pattern(1000, 6), false)
        .unwrap();
    s.write(9, 1, 1, 9 * BS, &pattern(70_000, 7), false)
        .unwrap();
    for (offset, len) in [
        (0, BS),
        (0, 3 * BS),
        (BS, 8 * BS),
        (2 * BS, 9 * BS),
        (0, 16 * BS),
        (20 * BS, 2 * BS),
    ] {
        let (data, crc) = s.read_checked(9, 1, offset, len).unwrap();
        assert_eq!(data.len() as u64, len);
        assert_eq!(crc, Some(crc32c::crc32c(&data)), "range {offset}+{len}");
    }
    for (offset, len) in [(1, BS), (0, BS + 1), (100, 4096)] {
        let (_, crc) = s.read_checked(9, 1, offset, len).unwrap();
        assert_eq!(crc, None, "range {offset}+{len} is not whole blocks");
    }
}

#[test]
fn a_reserve_beyond_the_free_space_refuses_writes_and_reports_no_room() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open_with(dir.path(), None, Some(u64::MAX / 4)).unwrap();
    assert_eq!(s.write(1, 1, 1, 0, b"x", false), Err(StoreError::NoSpace));
    assert!(!s.healthy(), "a server with no room reports it");
    assert_eq!(s.total(), 0);
    let roomy = Storage::open_with(&dir.path().join("b"), None, Some(0)).unwrap();
    roomy.write(1, 1, 1, 0, b"x", false).unwrap();
    assert!(roomy.healthy());
}
