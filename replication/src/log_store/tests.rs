//! Unit tests of the segmented log store (openraft's conformance suite runs in
//! `tests/replication/storage.rs`).

use std::path::Path;
use std::time::Duration;

use openraft::EntryPayload;

use super::*;

pub(super) fn payload_for(index: u64) -> Vec<u8> {
    format!("entry-{index}-")
        .repeat((index % 7 + 1) as usize)
        .into_bytes()
}

pub(super) fn entry(term: u64, index: u64) -> RaftEntry {
    RaftEntry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(crate::Command(payload_for(index))),
    }
}

/// Tiny segments (a handful of records each) and a tiny cache, so that tests cross segment
/// boundaries and read from disk.
pub(super) fn small() -> Options {
    Options {
        segment_bytes: 512,
        cache_entries: 4,
        cache_bytes: 1 << 20,
        sync_delay: super::SYNC_DELAY,
    }
}

fn open(dir: &Path, opts: Options) -> LogStore {
    LogStore::open_with(dir, opts).expect("open the log store")
}

fn append(store: &LogStore, term: u64, indexes: impl IntoIterator<Item = u64>) {
    let batch = indexes.into_iter().map(|i| entry(term, i)).collect();
    store.append_batch(batch).expect("append");
}

/// Reads every present entry and checks its payload; returns (term, index) pairs.
async fn contents(store: &LogStore) -> Vec<(u64, u64)> {
    let mut s = store.clone();
    let all = s.try_get_log_entries(..).await.expect("read the log");
    for e in &all {
        assert_eq!(
            e.payload,
            EntryPayload::Normal(crate::Command(payload_for(e.log_id.index))),
            "payload of {}",
            e.log_id
        );
    }
    all.iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect()
}

fn segment_names(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|d| segment::parse_file_name(&d.expect("dirent").file_name().to_string_lossy()))
        .collect();
    v.sort_unstable();
    v
}

fn seg_path(dir: &Path, first: u64) -> std::path::PathBuf {
    dir.join(segment::file_name(first))
}

fn records_of(dir: &Path, first: u64) -> Vec<segment::Scanned> {
    segment::scan(&seg_path(dir, first), first, false, None)
        .expect("scan")
        .records
}

fn flip_byte(path: &Path, offset: u64) {
    let mut raw = std::fs::read(path).expect("read");
    raw[offset as usize] ^= 0x55;
    std::fs::write(path, raw).expect("write");
}

fn terms(term: u64, r: std::ops::Range<u64>) -> Vec<(u64, u64)> {
    r.map(|i| (term, i)).collect()
}

#[tokio::test]
async fn torn_tail_record_is_dropped_on_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        segment_bytes: 1 << 20,
        ..small()
    };
    {
        let store = open(dir.path(), opts);
        for i in 0..10 {
            append(&store, 1, [i]);
        }
    }
    // A crash in the middle of the write of entry 9: only part of its record is there.
    let path = seg_path(dir.path(), 0);
    let len = std::fs::metadata(&path).expect("stat").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_len(len - 5))
        .expect("tear");
    {
        let store = open(dir.path(), opts);
        assert_eq!(contents(&store).await, terms(1, 0..9));
        append(&store, 2, [9, 10]);
    }
    // A power loss after the file grew but before its data reached the disk: zeros.
    let mut raw = std::fs::read(&path).expect("read");
    raw.extend_from_slice(&[0u8; 300]);
    std::fs::write(&path, raw).expect("write");
    let store = open(dir.path(), opts);
    let mut want = terms(1, 0..9);
    want.extend(terms(2, 9..11));
    assert_eq!(contents(&store).await, want);
    assert_eq!(
        std::fs::metadata(&path).expect("stat").len(),
        records_of(dir.path(), 0)
            .last()
            .map(|r| r.offset + u64::from(r.len))
            .expect("records"),
        "the torn tail is cut off the file"
    );
}

#[tokio::test]
async fn corrupt_middle_record_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(dir.path(), small());
        for i in 0..40 {
            append(&store, 1, [i]);
        }
    }
    let names = segment_names(dir.path());
    assert!(names.len() >= 3, "several segments: {names:?}");

    // Damage in the middle of the last segment (valid records follow it).
    let last = *names.last().expect("last");
    let recs = records_of(dir.path(), last);
    assert!(recs.len() >= 2);
    flip_byte(&seg_path(dir.path(), last), recs[0].offset + 30);
    assert!(matches!(
        LogStore::open_with(dir.path(), small()),
        Err(LogStoreError::Corrupt { .. })
    ));
    flip_byte(&seg_path(dir.path(), last), recs[0].offset + 30);
    assert!(LogStore::open_with(dir.path(), small()).is_ok(), "repaired");

    // Damage at the end of an older segment is no torn write either.
    let recs = records_of(dir.path(), names[0]);
    let tail = recs.last().expect("records");
    flip_byte(&seg_path(dir.path(), names[0]), tail.offset + 26);
    assert!(matches!(
        LogStore::open_with(dir.path(), small()),
        Err(LogStoreError::Corrupt { .. })
    ));
    flip_byte(&seg_path(dir.path(), names[0]), tail.offset + 26);

    // A missing segment is a gap.
    std::fs::remove_file(seg_path(dir.path(), names[1])).expect("remove");
    assert!(matches!(
        LogStore::open_with(dir.path(), small()),
        Err(LogStoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn damage_past_the_synced_position_of_the_last_segment_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        segment_bytes: 1 << 20,
        ..small()
    };
    {
        let store = open(dir.path(), opts);
        for i in 0..10 {
            append(&store, 1, [i]);
        }
    }
    let recs = records_of(dir.path(), 0);
    // A power loss kept the pages of entries 7..10 but not those of entry 6, which the last
    // fsync before it had not covered.
    let hint = |synced_len: u64| {
        let h = meta::HintFile::open(dir.path(), meta::COMMITTED).expect("hint");
        let hint = meta::Hint {
            committed: None,
            synced: Some((0, synced_len)),
        };
        h.write("hint", &hint).expect("write hint");
    };
    flip_byte(&seg_path(dir.path(), 0), recs[6].offset + 30);
    hint(recs[7].offset);
    assert!(
        matches!(
            LogStore::open_with(dir.path(), opts),
            Err(LogStoreError::Corrupt { .. })
        ),
        "entry 6 was fsynced: its damage is corruption"
    );
    hint(recs[6].offset);
    let store = open(dir.path(), opts);
    assert_eq!(contents(&store).await, terms(1, 0..6));
}

#[tokio::test]
async fn checksummed_garbage_is_a_storage_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut buf = segment::header().to_vec();
    segment::encode_record(&mut buf, 0, 1, &entry(1, 0)).expect("encode");
    // A record whose checksum is right but whose payload is not an entry.
    segment::encode_record(&mut buf, 1, 1, &"not an entry").expect("encode");
    std::fs::write(seg_path(dir.path(), 0), &buf).expect("write");
    let mut store = open(dir.path(), small());
    assert_eq!(
        store.try_get_log_entries(0..1).await.expect("read").len(),
        1
    );
    assert!(store.try_get_log_entries(0..2).await.is_err());
    drop(store);

    // A record for the wrong index.
    let mut buf = segment::header().to_vec();
    segment::encode_record(&mut buf, 7, 1, &entry(1, 7)).expect("encode");
    std::fs::write(seg_path(dir.path(), 0), &buf).expect("write");
    assert!(matches!(
        LogStore::open_with(dir.path(), small()),
        Err(LogStoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn truncate_and_purge_across_segment_boundaries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = open(dir.path(), small());
    for start in (0..60).step_by(3) {
        append(&store, 1, start..start + 3);
    }
    let names = segment_names(dir.path());
    assert!(names.len() >= 6, "{names:?}");

    // Exactly at a segment boundary: that segment and all later ones go.
    let cut = names[5];
    store.truncate(log_id(1, cut)).await.expect("truncate");
    assert_eq!(segment_names(dir.path()), names[..5].to_vec());
    assert_eq!(contents(&store).await, terms(1, 0..cut));

    // In the middle of a segment: it is cut, later ones go.
    let cut = names[3] + 1;
    store.truncate(log_id(1, cut)).await.expect("truncate");
    assert_eq!(segment_names(dir.path()), names[..4].to_vec());
    assert_eq!(contents(&store).await, terms(1, 0..cut));
    // A new leader's entries replace the suffix.
    append(&store, 2, cut..cut + 10);
    let mut want = terms(1, 0..cut);
    want.extend(terms(2, cut..cut + 10));
    assert_eq!(contents(&store).await, want);

    // Purge in the middle of the third segment: the first two go, the rest stays.
    let purged = names[2] + 1;
    store.purge(log_id(1, purged)).await.expect("purge");
    let now = segment_names(dir.path());
    assert_eq!(now[0], names[2]);
    let want: Vec<_> = want.into_iter().filter(|(_, i)| *i > purged).collect();
    assert_eq!(contents(&store).await, want);
    drop(store);

    let mut store = open(dir.path(), small());
    assert_eq!(contents(&store).await, want);
    let st = store.get_log_state().await.expect("state");
    assert_eq!(st.last_purged_log_id, Some(log_id(1, purged)));
    assert_eq!(st.last_log_id, Some(log_id(2, cut + 9)));

    // Purge past the end (a snapshot from the leader): everything goes, the log resumes after.
    let far = cut + 30;
    store.purge(log_id(3, far)).await.expect("purge all");
    assert!(segment_names(dir.path()).is_empty());
    let st = store.get_log_state().await.expect("state");
    assert_eq!(st.last_log_id, Some(log_id(3, far)));
    // Entries the purge point covers are dropped; the log must resume right after it.
    append(&store, 3, [far]);
    assert_eq!(contents(&store).await, vec![]);
    assert!(matches!(
        store.append_batch(vec![entry(3, far + 2)]),
        Err(LogStoreError::OutOfOrder { .. })
    ));
    append(&store, 3, far + 1..far + 4);
    drop(store);
    let mut store = open(dir.path(), small());
    assert_eq!(contents(&store).await, terms(3, far + 1..far + 4));
    let st = store.get_log_state().await.expect("state");
    assert_eq!(st.last_purged_log_id, Some(log_id(3, far)));
}

#[tokio::test]
async fn reopen_after_many_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        segment_bytes: 64 << 10,
        cache_entries: 100,
        ..small()
    };
    let n = 20_000u64;
    {
        let store = open(dir.path(), opts);
        let mut next = 0;
        let mut size = 1;
        while next < n {
            let end = (next + size).min(n);
            let batch = (next..end).map(|i| entry(1 + i / 5000, i)).collect();
            store.append_batch(batch).expect("append");
            next = end;
            size = size % 17 + 1;
        }
        // Everything was appended by the time the sync returns.
        store.sync().await.expect("sync");
    }
    assert!(segment_names(dir.path()).len() > 10);
    let mut store = open(dir.path(), opts);
    let got = contents(&store).await;
    assert_eq!(got.len() as u64, n);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, (t, idx))| *idx == i as u64 && *t == 1 + *idx / 5000));
    let st = store.get_log_state().await.expect("state");
    assert_eq!(st.last_log_id, Some(log_id(4, n - 1)));
    // A window in the middle, from disk.
    let mid = store
        .try_get_log_entries(9_990..10_010)
        .await
        .expect("read");
    assert_eq!(mid.len(), 20);
    assert_eq!(mid[0].log_id, log_id(2, 9_990));
    assert_eq!(mid[19].log_id, log_id(3, 10_009));
}

#[tokio::test]
async fn sync_waits_for_the_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), small());
    store.sync().await.expect("sync of nothing");
    append(&store, 1, [0]);
    store.sync().await.expect("first sync");
    store.set_sync_paused(true);
    let before = store.syncs();
    append(&store, 1, 1..5);
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.sync().await }
    });
    // The sync thread is held: the barrier must not pass.
    let held = tokio::time::timeout(Duration::from_millis(200), async {
        while !waiter.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(held.is_err(), "sync returned while nothing was fsynced");
    assert_eq!(store.syncs(), before);
    store.set_sync_paused(false);
    tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("sync within 10 s")
        .expect("task")
        .expect("sync");
    assert!(store.syncs() > before);
    let st = store.shared.lock();
    assert!(st.synced >= st.appended);
}

#[tokio::test]
async fn vote_committed_and_purge_point_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = open(dir.path(), small());
        store
            .save_vote(&Vote::new_committed(4, 2))
            .await
            .expect("vote");
        append(&store, 4, 0..6);
        store.purge(log_id(4, 2)).await.expect("purge");
        store.truncate(log_id(4, 5)).await.expect("truncate");
        store
            .save_committed(Some(log_id(4, 4)))
            .await
            .expect("committed");
        // Dropping the store stops the sync thread after it wrote the hint.
    }
    let mut store = open(dir.path(), small());
    assert_eq!(
        store.read_vote().await.expect("vote"),
        Some(Vote::new_committed(4, 2))
    );
    assert_eq!(
        store.read_committed().await.expect("committed"),
        Some(log_id(4, 4))
    );
    let st = store.get_log_state().await.expect("state");
    assert_eq!(st.last_purged_log_id, Some(log_id(4, 2)));
    assert_eq!(st.last_log_id, Some(log_id(4, 4)));
    assert_eq!(contents(&store).await, terms(4, 3..5));
}

#[tokio::test]
async fn committed_hint_never_points_past_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let mut store = open(dir.path(), small());
        for i in 0..10 {
            append(&store, 1, [i]);
        }
        store
            .save_committed(Some(log_id(1, 9)))
            .await
            .expect("committed");
    }
    // A power loss took the last entries but not the hint.
    let names = segment_names(dir.path());
    std::fs::remove_file(seg_path(dir.path(), *names.last().expect("segments"))).expect("remove");
    let mut store = open(dir.path(), small());
    let last = store
        .get_log_state()
        .await
        .expect("state")
        .last_log_id
        .expect("some log");
    assert!(last.index < 9);
    assert_eq!(store.read_committed().await.expect("committed"), Some(last));
}

#[tokio::test]
async fn gaps_are_refused_and_overlaps_replace_the_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), small());
    append(&store, 1, 3..20);
    for bad in [vec![entry(1, 21)], vec![entry(1, 20), entry(1, 22)]] {
        assert!(matches!(
            store.append_batch(bad),
            Err(LogStoreError::OutOfOrder { .. })
        ));
    }
    append(&store, 2, 8..10);
    let mut want = terms(1, 3..8);
    want.extend(terms(2, 8..10));
    assert_eq!(contents(&store).await, want);
    drop(store);
    assert_eq!(contents(&open(dir.path(), small())).await, want);
}

#[test]
fn unknown_format_version_and_legacy_log_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join(LOG_DIR);
    {
        let store = open(&log, small());
        append(&store, 1, 0..3);
    }
    let path = seg_path(&log, 0);
    let mut raw = std::fs::read(&path).expect("read");
    raw[8..12].copy_from_slice(&(segment::FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&path, raw).expect("write");
    assert!(matches!(
        LogStore::open_with(&log, small()),
        Err(LogStoreError::Format { .. })
    ));
    std::fs::write(dir.path().join(LEGACY_FILE), b"redb").expect("legacy");
    assert!(matches!(
        LogStore::open_with(&log, small()),
        Err(LogStoreError::Legacy { .. })
    ));
}

#[tokio::test]
async fn truncation_withdraws_the_synced_position_of_the_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        segment_bytes: 1 << 20,
        ..small()
    };
    let mut store = open(dir.path(), opts);
    for i in 0..10 {
        append(&store, 1, [i]);
    }
    store.sync().await.expect("sync");
    let cut_at = records_of(dir.path(), 0)[5].offset;
    store.truncate(log_id(1, 5)).await.expect("truncate");
    // The bytes past the cut will be rewritten unsynced: the hint must stop vouching for them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let hint: Option<meta::Hint> = meta::HintFile::read(dir.path(), meta::COMMITTED);
        if hint.is_some_and(|h| h.synced.map_or(true, |(_, len)| len <= cut_at)) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "hint still {hint:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn appends_within_the_sync_delay_share_one_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        sync_delay: Duration::from_secs(1),
        ..small()
    };
    let store = open(dir.path(), opts);
    append(&store, 1, [0]);
    store.sync().await.expect("sync after open");
    let before = store.syncs();
    for i in 1..11 {
        append(&store, 1, [i]);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let done = {
            let st = store.shared.lock();
            st.synced >= st.appended
        };
        if done {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "appends never synced");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.syncs(), before + 1, "one fsync for the whole window");
}

#[tokio::test]
async fn sync_does_not_wait_for_the_sync_delay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options {
        sync_delay: Duration::from_secs(3600),
        ..small()
    };
    let store = open(dir.path(), opts);
    append(&store, 1, 0..5);
    tokio::time::timeout(Duration::from_secs(10), store.sync())
        .await
        .expect("sync cuts the delay short")
        .expect("sync");
    append(&store, 1, 5..8);
    tokio::time::timeout(Duration::from_secs(10), store.sync())
        .await
        .expect("a second sync too")
        .expect("sync");
    let st = store.shared.lock();
    assert!(st.synced >= st.appended);
}
