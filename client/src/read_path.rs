//! The read path: one piece of one chunk from one healthy replica, and the sequential
//! read-ahead cache.
//!
//! ```text
//!  read_piece: location (cached; hole ⇒ zeros) ──▶ replica[(chunk + i) % n], i = 0, 1, ...
//!     corrupt copy            ──▶ next replica, then drop_replica for the bad copy
//!     missing copy            ──▶ next replica (none has it: zeros, remembered a while)
//!     unreachable / timeout   ──▶ next replica
//!     stale version           ──▶ refresh the location once
//!  erasure-coded chunk (`loc.ec`) ──▶ shards, see `ec_read.rs` (same refresh and reporting)
//! ```
//!
//! Read-ahead works on aligned windows of [`WINDOW`] bytes (a chunk is a whole number of
//! windows, so a window never spans two chunks). Once reads are sequential, the [`AHEAD`]
//! windows after the one being read are fetched in the background.

use crate::error::ClientError;
use crate::locations::Locations;
use crate::store::Store;
use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, Shared};
use rawfs_chunkserver_api::DataError;
use rawfs_metadata_api::{ChunkLoc, ServerId, CHUNK_SIZE};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Read-ahead window: 4 MiB (divides `CHUNK_SIZE`).
pub(crate) const WINDOW: u64 = 4 << 20;
/// Windows fetched ahead of a sequential reader: six (24 MiB), so that the disk under a
/// cold read always has several window reads queued, not one: on this project's 2-core test
/// VM a cold 1 GiB read went from ~1.5 GB/s with two windows ahead to ~1.65 with six (local
/// disk 1.7-2.0). Only sequential readers fetch ahead, and a file keeps at most
/// [`MAX_WINDOWS`] windows.
pub(crate) const AHEAD: u64 = 6;
/// Windows kept per file: the one being read, those fetched ahead, and two for readers
/// that interleave.
const MAX_WINDOWS: usize = 3 + AHEAD as usize;
/// How far from the end of the previous read a read may start and still be sequential.
const SEQ_SLACK: u64 = 1 << 20;

/// How long a chunkserver that failed to answer is tried last.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

/// Chunkservers that recently did not answer (unreachable, timeout), shared by every file of
/// a client: reads try them last, so that a hung server costs one deadline, not one per read.
#[derive(Default)]
pub(crate) struct Suspects {
    since: Mutex<HashMap<ServerId, Instant>>,
}

impl Suspects {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<ServerId, Instant>> {
        self.since.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn mark(&self, server: ServerId) {
        self.map().insert(server, Instant::now());
    }

    pub(crate) fn clear(&self, server: ServerId) {
        self.map().remove(&server);
    }

    /// True if `server` recently failed to answer (it is then tried last).
    pub(crate) fn is_suspect(&self, server: ServerId) -> bool {
        self.map()
            .get(&server)
            .is_some_and(|at| at.elapsed() < SUSPECT_FOR)
    }

    /// `replicas` indices in the order to try: rotated by chunk id to spread readers, then
    /// recent suspects moved to the end.
    pub(crate) fn order(&self, loc: &ChunkLoc) -> Vec<usize> {
        let n = loc.replicas.len();
        if n == 0 {
            return Vec::new();
        }
        let first = (loc.chunk % n as u64) as usize;
        let mut order: Vec<usize> = (0..n).map(|i| (first + i) % n).collect();
        let map = self.map();
        let suspect = |i: &usize| {
            map.get(&loc.replicas[*i].server)
                .is_some_and(|at| at.elapsed() < SUSPECT_FOR)
        };
        // Stable: keeps the rotation among the healthy and among the suspects.
        order.sort_by_key(suspect);
        order
    }
}

/// Reads `len` bytes at `off` within chunk `index`. A chunk that does not exist reads as
/// zeros.
pub(crate) async fn read_piece(
    store: &dyn Store,
    locs: &Locations,
    suspects: &Suspects,
    index: u64,
    off: u32,
    len: u32,
) -> Result<Bytes, ClientError> {
    let zeros = || Bytes::from(vec![0u8; len as usize]);
    let Some(mut loc) = locs.for_read(store, index).await? else {
        return Ok(zeros());
    };
    let mut refreshed = false;
    // Bytes past an erasure-coded chunk's length inside the file: another client appended to
    // it since the location was cached (see `ec_write.rs`). Look again once.
    if loc
        .ec
        .as_ref()
        .is_some_and(|ec| u64::from(off) + u64::from(len) > ec.length)
    {
        refreshed = true;
        match locs.refresh(store, index).await? {
            Some(fresh) => loc = fresh,
            None => return Ok(zeros()),
        }
    }
    loop {
        if let Some(ec) = &loc.ec {
            let attempt =
                crate::ec_read::read(store, suspects, &loc, ec, u64::from(off), u64::from(len))
                    .await;
            if attempt.result.is_err() && attempt.stale && !refreshed {
                refreshed = true;
                match locs.refresh(store, index).await? {
                    None => return Ok(zeros()),
                    Some(fresh) if fresh != loc => {
                        loc = fresh;
                        continue;
                    }
                    Some(_) => {}
                }
            }
            if let Some(new) = crate::ec_read::report_lost(store, &loc, &attempt.bad).await {
                locs.update(&new);
            }
            return attempt.result;
        }
        if locs.is_unwritten(index, loc.chunk) {
            return Ok(zeros());
        }
        let epoch = locs.write_epoch();
        let n = loc.replicas.len();
        let mut last: Option<DataError> = None;
        let mut bad: Vec<ServerId> = Vec::new();
        let mut missing = 0;
        let mut stale = false;
        for i in suspects.order(&loc) {
            let r = &loc.replicas[i];
            match store
                .read(&r.data_addr, loc.chunk, loc.version, off, len)
                .await
            {
                Ok(data) => {
                    suspects.clear(r.server);
                    report_bad(store, locs, &loc, &bad).await;
                    return Ok(data);
                }
                Err(e) => {
                    if e == DataError::NotFound {
                        // Normal for a chunk allocated but not written yet, or whose first
                        // write is still on its way to this replica.
                        tracing::debug!(chunk = loc.chunk, addr = %r.data_addr, "replica has no such chunk; trying the next");
                    } else {
                        tracing::warn!(chunk = loc.chunk, addr = %r.data_addr, error = %e, "replica read failed; trying the next");
                    }
                    match e {
                        DataError::Corrupt { .. } => bad.push(r.server),
                        // Not reported as bad even when another replica serves: the
                        // first write of a chunk reaches its replicas one by one, and a
                        // read in between would drop healthy copies. A copy really lost
                        // is found by its chunkserver's inventory (confirmed twice).
                        DataError::NotFound => {
                            missing += 1;
                            stale = true;
                        }
                        DataError::StaleVersion { .. } | DataError::StaleTerm { .. } => {
                            stale = true
                        }
                        DataError::Unreachable { .. } | DataError::Timeout => {
                            suspects.mark(r.server)
                        }
                        _ => {}
                    }
                    last = Some(e);
                }
            }
        }
        if stale && !refreshed {
            refreshed = true;
            match locs.refresh(store, index).await? {
                None => return Ok(zeros()),
                Some(fresh) if fresh != loc => {
                    loc = fresh;
                    continue;
                }
                Some(_) => {}
            }
        }
        if n > 0 && missing == n {
            // Allocated but not written on any replica yet (a file created in a held
            // directory, or a writer that died between allocating and writing): the chunk
            // has no data, which reads as a hole.
            tracing::debug!(
                chunk = loc.chunk,
                "no replica holds the chunk; reading zeros"
            );
            locs.mark_unwritten(index, loc.chunk, epoch);
            return Ok(zeros());
        }
        return Err(ClientError::NoReplica {
            index,
            chunk: loc.chunk,
            last,
        });
    }
}

/// Reports copies that failed their checksum, once another replica served
/// the read. Failures to report are only logged: the read itself succeeded.
async fn report_bad(store: &dyn Store, locs: &Locations, loc: &ChunkLoc, bad: &[ServerId]) {
    let mut loc = loc.clone();
    for &server in bad {
        match locs.drop_replica(store, &loc, server).await {
            Ok(new) => loc = new,
            Err(e) => {
                tracing::warn!(chunk = loc.chunk, server, error = %e, "could not report a bad replica");
                return;
            }
        }
    }
}

/// A window being fetched: shared so that a reader waiting for it and the prefetch task see
/// the same result. `None` means the fetch failed (the reader then reads directly and gets
/// the real error).
pub(crate) type Fetch = Shared<BoxFuture<'static, Option<Frames>>>;

/// What a read should do about read-ahead.
pub(crate) enum Plan {
    /// Not sequential: read directly.
    Direct,
    /// Sequential: serve from windows `first..=last`.
    Windows { first: u64, last: u64 },
}

/// Sequential-access detection and the window cache of one file.
#[derive(Default)]
pub(crate) struct ReadAhead {
    /// End of the previous read; a read starting there is sequential.
    next: u64,
    /// Consecutive sequential reads seen.
    streak: u32,
    /// Cached windows by window number, each clipped at the file size when fetched.
    windows: BTreeMap<u64, Frames>,
    /// Windows being fetched.
    inflight: HashMap<u64, Fetch>,
    /// Bumped by every invalidation; a fetch started under an older generation is discarded.
    pub generation: u64,
}

impl ReadAhead {
    /// Notes a read of `offset..end` and decides whether windows serve it.
    pub fn plan(&mut self, offset: u64, end: u64) -> Plan {
        // `next` starts at 0, so a reader starting at the beginning of the file counts as
        // sequential from its first read. The slack lets the kernel's parallel read-ahead
        // requests, which arrive slightly out of order, still count as sequential.
        if offset + SEQ_SLACK >= self.next && offset <= self.next + SEQ_SLACK {
            self.streak = self.streak.saturating_add(1);
        } else {
            self.streak = 0;
        }
        self.next = end;
        let (first, last) = (offset / WINDOW, (end - 1) / WINDOW);
        let cached = (first..=last).all(|w| self.windows.contains_key(&w));
        // A read as large as a window is worth windowing at once; otherwise wait for a second
        // sequential read so that random readers never fetch 4 MiB for 4 KiB.
        if cached || self.streak >= 2 || end - offset >= WINDOW {
            Plan::Windows { first, last }
        } else {
            Plan::Direct
        }
    }

    pub fn window(&self, w: u64) -> Option<Frames> {
        self.windows.get(&w).cloned()
    }

    pub fn fetching(&self, w: u64) -> Option<Fetch> {
        self.inflight.get(&w).cloned()
    }

    pub fn start_fetch(&mut self, w: u64, fetch: Fetch) {
        self.inflight.insert(w, fetch);
    }

    /// Stores a fetched window if no invalidation happened since the fetch began.
    pub fn finish_fetch(&mut self, w: u64, generation: u64, data: Option<Frames>) {
        if generation != self.generation {
            return;
        }
        self.inflight.remove(&w);
        if let Some(data) = data {
            self.windows.insert(w, data);
            while self.windows.len() > MAX_WINDOWS {
                // Evict the lowest window other than the new one: sequential readers move up.
                match self.windows.keys().copied().find(|k| *k != w) {
                    Some(victim) => self.windows.remove(&victim),
                    None => break,
                };
            }
        }
    }

    /// Drops everything cached (after a write, flush or punch).
    pub fn invalidate(&mut self) {
        self.generation += 1;
        self.windows.clear();
        self.inflight.clear();
    }

    /// Drops cached data at or past `size` (after a truncate).
    pub fn clip(&mut self, size: u64) {
        self.generation += 1;
        self.inflight.clear();
        self.windows.retain(|w, _| *w < size.div_ceil(WINDOW));
        // A window that straddles the new size is cut rather than dropped.
        let last = size / WINDOW;
        if let Some(data) = self.windows.get_mut(&last) {
            data.truncate((size - last * WINDOW) as usize);
        }
    }
}

/// Bytes as they were received, one [`Bytes`] per frame, in order and without gaps. A
/// window is kept this way so that a read inside one frame (as the kernel's read-ahead
/// requests are) is answered with a slice of the received buffer rather than a copy.
#[derive(Clone, Debug, Default)]
pub(crate) struct Frames(Vec<Bytes>);

impl Frames {
    pub fn new(frames: Vec<Bytes>) -> Frames {
        Frames(frames)
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    /// Bytes `from..to` (within [`Frames::len`]): a slice when one frame holds them all.
    pub fn slice(&self, from: usize, to: usize) -> Bytes {
        let mut pieces = Vec::new();
        let mut at = 0;
        for f in &self.0 {
            let end = at + f.len();
            if at < to && from < end {
                pieces.push(f.slice(from.max(at) - at..to.min(end) - at));
            }
            at = end;
        }
        concat(pieces)
    }

    /// Keeps the first `len` bytes.
    pub fn truncate(&mut self, len: usize) {
        let mut left = len;
        for f in &mut self.0 {
            let keep = left.min(f.len());
            f.truncate(keep);
            left -= keep;
        }
        self.0.retain(|f| !f.is_empty());
    }
}

/// `pieces` one after another: the piece itself when there is one (no copy).
pub(crate) fn concat(mut pieces: Vec<Bytes>) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(pieces.iter().map(Bytes::len).sum());
    for p in &pieces {
        out.extend_from_slice(p);
    }
    out.freeze()
}

/// The file range of window `w`, clipped at `size`: `(offset, len)`; None if empty.
pub(crate) fn window_range(w: u64, size: u64) -> Option<(u64, u32)> {
    let start = w.checked_mul(WINDOW)?;
    if start >= size {
        return None;
    }
    // WINDOW divides CHUNK_SIZE, so this range stays inside one chunk.
    debug_assert_eq!(CHUNK_SIZE % WINDOW, 0);
    Some((start, (size - start).min(WINDOW) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(b: &[u8]) -> Frames {
        Frames::new(vec![Bytes::copy_from_slice(b)])
    }

    #[test]
    fn frames_slice_without_copying_inside_a_frame_and_join_across() {
        let (a, b) = (Bytes::from(vec![1u8; 100]), Bytes::from(vec![2u8; 50]));
        let mut f = Frames::new(vec![a.clone(), b.clone()]);
        assert_eq!(f.len(), 150);
        let inside = f.slice(10, 90);
        assert_eq!(
            inside.as_ptr(),
            a[10..].as_ptr(),
            "a slice of the frame, not a copy"
        );
        assert_eq!(f.slice(100, 150).as_ptr(), b.as_ptr());
        let across = f.slice(95, 105);
        assert_eq!(&across[..], &[1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
        assert!(f.slice(20, 20).is_empty());
        f.truncate(120);
        assert_eq!(f.len(), 120);
        assert_eq!(&f.slice(98, 120)[..4], &[1, 1, 2, 2]);
        f.truncate(60);
        assert_eq!((f.len(), f.0.len()), (60, 1));
    }

    #[test]
    fn sequential_reads_switch_to_windows() {
        let mut ra = ReadAhead::default();
        let base = 50 << 20;
        assert!(matches!(ra.plan(base, base + 1000), Plan::Direct));
        assert!(matches!(ra.plan(base + 1000, base + 2000), Plan::Direct));
        assert!(matches!(
            ra.plan(base + 2000, base + 3000),
            Plan::Windows {
                first: 12,
                last: 12
            }
        ));
        // A jump resets the streak.
        let far = 100 << 20;
        assert!(matches!(ra.plan(far, far + 10), Plan::Direct));
        // Slightly out of order still counts.
        assert!(matches!(ra.plan(far + 8192, far + 12288), Plan::Direct));
        assert!(matches!(
            ra.plan(far + 4096, far + 8192),
            Plan::Windows { .. }
        ));
        // A large read is windowed at once.
        assert!(matches!(
            ra.plan(0, 2 * WINDOW),
            Plan::Windows { first: 0, last: 1 }
        ));
    }

    #[test]
    fn cached_windows_serve_random_reads() {
        let mut ra = ReadAhead::default();
        let g = ra.generation;
        ra.finish_fetch(3, g, Some(frames(b"x")));
        assert!(matches!(
            ra.plan(3 * WINDOW + 10, 3 * WINDOW + 20),
            Plan::Windows { first: 3, last: 3 }
        ));
        assert!(matches!(ra.plan(9 * WINDOW, 9 * WINDOW + 1), Plan::Direct));
    }

    #[test]
    fn reading_from_the_start_counts_as_sequential() {
        let mut ra = ReadAhead::default();
        assert!(matches!(ra.plan(0, 4096), Plan::Direct));
        assert!(matches!(ra.plan(4096, 8192), Plan::Windows { .. }));
    }

    #[test]
    fn stale_fetches_are_discarded_and_cache_is_bounded() {
        let mut ra = ReadAhead::default();
        let g = ra.generation;
        ra.invalidate();
        ra.finish_fetch(0, g, Some(frames(b"old")));
        assert!(ra.window(0).is_none());
        let g = ra.generation;
        for w in 0..10 {
            ra.finish_fetch(w, g, Some(frames(b"x")));
        }
        assert_eq!(ra.windows.len(), MAX_WINDOWS);
        assert!(ra.window(9).is_some() && ra.window(0).is_none());
    }

    #[test]
    fn clip_cuts_and_drops_windows_past_the_size() {
        let mut ra = ReadAhead::default();
        let g = ra.generation;
        ra.finish_fetch(0, g, Some(frames(&[1u8; WINDOW as usize])));
        ra.finish_fetch(1, g, Some(frames(&[2u8; WINDOW as usize])));
        ra.clip(100);
        assert_eq!(ra.window(0).map(|b| b.len()), Some(100));
        assert!(ra.window(1).is_none());
    }

    #[test]
    fn suspects_are_tried_last() {
        use rawfs_metadata_api::Replica;
        let loc = ChunkLoc {
            index: 0,
            chunk: 4,
            version: 1,
            term: 1,
            shared: false,
            ec: None,
            replicas: (1..=3)
                .map(|s| Replica {
                    server: s,
                    data_addr: String::new(),
                })
                .collect(),
        };
        let s = Suspects::default();
        assert_eq!(s.order(&loc), vec![1, 2, 0], "rotated by chunk id");
        s.mark(2);
        assert_eq!(s.order(&loc), vec![2, 0, 1]);
        s.clear(2);
        assert_eq!(s.order(&loc), vec![1, 2, 0]);
    }

    #[test]
    fn window_range_clips_at_size() {
        assert_eq!(window_range(0, 10), Some((0, 10)));
        assert_eq!(window_range(1, WINDOW + 5), Some((WINDOW, 5)));
        assert_eq!(window_range(1, WINDOW), None);
        assert_eq!(window_range(0, 2 * WINDOW), Some((0, WINDOW as u32)));
    }
}
