//! The scrub against a real `Storage` in a temporary directory, damaged on disk behind its back.

use super::*;
use crate::chunk_file::Verified;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BS: u64 = BLOCK_SIZE as u64;
const DATA_OFFSET: u64 = Geometry::current().data_offset;
/// Fast enough that a test's few MiB take a fraction of a second.
const FAST: u64 = 1 << 30;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed)
        .collect()
}

/// Writes `blocks` whole blocks of data at chunk offset 0 (version 1, term 1).
fn put(s: &Storage, chunk: u64, blocks: usize) {
    s.write(
        chunk,
        1,
        1,
        0,
        &pattern(blocks * BS as usize, chunk as u8),
        true,
    )
    .unwrap();
}

/// Flips one byte of `chunk`'s block `block` in its file, as bitrot would.
fn rot(root: &Path, chunk: u64, block: u64) {
    let path = root
        .join("chunks")
        .join(format!("{:02x}", chunk & 0xff))
        .join(format!("{chunk:016x}"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let at = DATA_OFFSET + block * BS + 321;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    f.sync_all().unwrap();
}

struct Running {
    scrubber: Arc<Scrubber>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start(storage: &Arc<Storage>, rate: u64) -> Running {
    let scrubber = Scrubber::new(rate);
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(scrubber.clone(), storage.clone(), stop.clone()));
    Running {
        scrubber,
        stop,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("scrub did not stop")
            .unwrap();
    }
}

/// Polls `cond` every 10 ms until it holds; fails after `limit`.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_reported_and_intact_chunks_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
    for chunk in 1..=4 {
        put(&storage, chunk, 5);
    }
    rot(dir.path(), 3, 4);
    let r = start(&storage, FAST);
    wait_for("the bad chunk to be found", Duration::from_secs(10), || {
        r.scrubber.status().bad_found == 1
    })
    .await;
    assert_eq!(storage.take_corrupt(), vec![3]);
    // Two more full passes: the intact chunks are read again and never reported; the bad one
    // is marked again (it is still there) but counted once.
    let passes = r.scrubber.status().passes;
    wait_for("two more passes", Duration::from_secs(10), || {
        r.scrubber.status().passes >= passes + 2
    })
    .await;
    let st = r.scrubber.status();
    assert_eq!(st.bad_found, 1);
    assert_eq!(st.rate, FAST);
    // Per pass: 5 blocks of each intact chunk (chunk 3's piece fails as a whole).
    assert!(st.scrubbed_bytes >= 2 * 15 * BS, "{st:?}");
    assert_eq!(storage.take_corrupt(), vec![3]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intact_chunks_are_never_reported() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
    for chunk in [1, 0x100, 0x1_0000_0001] {
        put(&storage, chunk, 17);
    }
    // A chunk with a hole between two written runs, and an empty one.
    storage
        .write(9, 1, 1, 40 * BS + 5, &pattern(3 * BS as usize, 9), true)
        .unwrap();
    storage.write(10, 1, 1, 0, b"", true).unwrap();
    let r = start(&storage, FAST);
    wait_for("three passes", Duration::from_secs(10), || {
        r.scrubber.status().passes >= 3
    })
    .await;
    let st = r.scrubber.status();
    // Per pass, 3 * 17 blocks of 64 KiB and chunk 9's 3 blocks, which start 5 bytes into a
    // checksum block and so take one checksum block more.
    let csum = u64::from(rawfs_chunkserver_api::layout::CSUM_BLOCK);
    assert!(st.scrubbed_bytes >= 3 * (54 * BS + csum), "{st:?}");
    assert_eq!(st.bad_found, 0);
    assert!(storage.take_corrupt().is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_zero_scrubs_nothing_until_turned_on() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
    put(&storage, 5, 2);
    rot(dir.path(), 5, 1);
    let r = start(&storage, 0);
    // An observation window, not a readiness wait: nothing may happen within it.
    let idle = tokio::time::timeout(
        Duration::from_millis(1500),
        wait_for("any scrub activity", Duration::from_secs(60), || {
            let st = r.scrubber.status();
            st.scrubbed_bytes > 0 || st.passes > 0 || st.bad_found > 0
        }),
    )
    .await;
    assert!(
        idle.is_err(),
        "scrub ran at rate 0: {:?}",
        r.scrubber.status()
    );
    assert!(storage.take_corrupt().is_empty());
    // The task was alive all along: turning it on finds the damage.
    r.scrubber.set_rate(FAST);
    wait_for("the bad chunk to be found", Duration::from_secs(10), || {
        r.scrubber.status().bad_found == 1
    })
    .await;
    assert_eq!(storage.take_corrupt(), vec![5]);
    // And turning it off again stops it at the next piece.
    r.scrubber.set_rate(0);
    assert_eq!(r.scrubber.status().rate, 0);
    r.stop().await;
}

#[test]
fn chunk_deleted_or_moved_to_another_version_mid_chunk_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    put(&s, 7, 4);
    put(&s, 8, 4);
    rot(dir.path(), 7, 3);
    rot(dir.path(), 8, 3);
    // Chunk 7: the first piece checks out, then the chunk is deleted before the bad block.
    let t = s.scrub_target(7, 1);
    assert_eq!(
        s.scrub_piece(&t, 0, 2 * BS).unwrap(),
        ScrubStep::Verified(Verified {
            bytes: 2 * BS,
            next: Some(2 * BS)
        })
    );
    s.delete(7).unwrap();
    assert_eq!(s.scrub_piece(&t, 2 * BS, 2 * BS).unwrap(), ScrubStep::Gone);
    // Chunk 8: a snapshot fences it at version 2 mid-scrub; this pass's view is stale.
    let t = s.scrub_target(8, 1);
    assert!(matches!(
        s.scrub_piece(&t, 0, 2 * BS).unwrap(),
        ScrubStep::Verified(_)
    ));
    s.fence(8, 2, 1).unwrap();
    assert_eq!(s.scrub_piece(&t, 2 * BS, 2 * BS).unwrap(), ScrubStep::Gone);
    assert!(s.take_corrupt().is_empty());
    // A pass that starts at the new version does find the damage.
    let t = s.scrub_target(8, 2);
    assert_eq!(
        s.scrub_piece(&t, 2 * BS, 2 * BS).unwrap(),
        ScrubStep::Bad { offset: 3 * BS }
    );
    assert_eq!(s.take_corrupt(), vec![8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_deleted_during_a_running_pass_is_not_reported() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
    // 64 blocks (4 MiB) at 1 MiB/s, 4 blocks a piece: about four seconds inside this one
    // chunk, so the deletion lands well before the bad last block.
    put(&storage, 11, 64);
    rot(dir.path(), 11, 63);
    let r = start(&storage, 1 << 20);
    wait_for(
        "the scrub to be inside the chunk",
        Duration::from_secs(10),
        || r.scrubber.status().scrubbed_bytes > 0,
    )
    .await;
    let st = r.scrubber.status();
    assert!(st.scrubbed_bytes < 32 * BS, "scrub got too far: {st:?}");
    storage.delete(11).unwrap();
    wait_for("the pass to end", Duration::from_secs(10), || {
        r.scrubber.status().passes >= 1
    })
    .await;
    assert_eq!(r.scrubber.status().bad_found, 0);
    assert!(storage.take_corrupt().is_empty());
    r.stop().await;
}

#[test]
fn scrub_and_foreground_share_one_open_copy_of_a_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let s = Storage::open(dir.path(), None).unwrap();
    put(&s, 1, 1);
    // A slot the scrub made is found by a foreground read (one table in memory per chunk),
    // and a write through the foreground path is seen by the scrub's next piece.
    let t = s.scrub_target(1, 1);
    assert!(matches!(
        s.scrub_piece(&t, 0, BS).unwrap(),
        ScrubStep::Verified(_)
    ));
    s.write(1, 1, 1, BS, &pattern(BS as usize, 3), false)
        .unwrap();
    assert_eq!(
        s.scrub_piece(&t, BS, BS).unwrap(),
        ScrubStep::Verified(Verified {
            bytes: BS,
            next: None
        })
    );
    assert_eq!(&s.read(1, 1, BS, 4).unwrap()[..], &pattern(4, 3)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_keeps_to_its_rate() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
    // 8 MiB at 8 MiB/s: a pass cannot end before 7/8 s (only the first 1 MiB piece is free).
    put(&storage, 1, 64);
    put(&storage, 2, 64);
    let started = Instant::now();
    let r = start(&storage, 8 << 20);
    wait_for("one pass", Duration::from_secs(10), || {
        r.scrubber.status().passes >= 1
    })
    .await;
    let bytes = r.scrubber.status().scrubbed_bytes;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(850),
        "a pass took only {took:?}"
    );
    assert!(bytes >= 128 * BS);
    // Never ahead of the rate by more than the one free piece.
    let allowed = (8u64 << 20) as f64 * took.as_secs_f64() + (1u64 << 20) as f64;
    assert!(bytes as f64 <= allowed, "{bytes} bytes in {took:?}");
    r.stop().await;
}
