//! Writes that run outside their chunk's lock, and the operations that wait for them.
//!
//! A chunk's lock used to be held for a whole write, the disk write included, so the frames
//! a client streams into one chunk (several in flight per replica) reached the disk one at a
//! time: a queue depth of one per replica, and the disk idle while each frame's lock was
//! handed on. A large write of whole blocks from an aligned payload now takes the lock only
//! to check its fences and register its span, writes the data with no lock held
//! (`O_DIRECT`), and takes the lock again to record the block checksums. Meanwhile:
//!
//! - a write or read that overlaps a registered span waits for it (a read must never see new
//!   data under old checksums and call it damage, two writes of one block must not
//!   interleave with their checksums);
//! - anything that changes the chunk as a whole (fence, version change, copy, delete, scrub)
//!   waits until no span is registered, so that nothing older lands after it;
//! - everything else (other spans, syncs, local-read opens) goes ahead.
//!
//! Lock order: the chunk's slot, then its [`InFlight`]; a waiter holds neither the slot
//! while it waits, and a registered writer needs only the slot to finish.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The largest checksum block of any chunk geometry (older chunk files have 64 KiB blocks):
/// a span widened to it covers every block an operation touches, whatever the file's.
const WIDEST_BLOCK: u64 = 64 << 10;

/// Which registered spans an operation must wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quiet {
    /// Those overlapping chunk bytes `start..end`.
    Span(u64, u64),
    /// All of them.
    All,
}

impl Quiet {
    /// The blocks around chunk bytes `offset..offset + len` (in any geometry).
    pub(crate) fn around(offset: u64, len: u64) -> Quiet {
        let end = offset.saturating_add(len);
        Quiet::Span(
            offset / WIDEST_BLOCK * WIDEST_BLOCK,
            end.div_ceil(WIDEST_BLOCK).saturating_mul(WIDEST_BLOCK),
        )
    }

    fn blocked_by(self, (start, end): (u64, u64)) -> bool {
        match self {
            Quiet::Span(s, e) => start < e && s < end,
            Quiet::All => true,
        }
    }
}

/// The spans of one chunk being written without its lock.
#[derive(Default)]
pub(crate) struct InFlight {
    spans: Mutex<Vec<(u64, u64)>>,
    ended: Condvar,
    /// Operations waiting for spans to end: while there are any, no new span starts (writes
    /// take the lock instead), so that a stream of writes cannot keep a fence, a delete or a
    /// read waiting for ever.
    waiters: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl InFlight {
    /// Whether an operation asking for `quiet` must wait now.
    pub(crate) fn blocks(&self, quiet: Quiet) -> bool {
        lock(&self.spans).iter().any(|s| quiet.blocked_by(*s))
    }

    /// Waits until no registered span blocks `quiet` (call without the chunk's lock).
    pub(crate) fn wait(&self, quiet: Quiet) {
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let mut spans = lock(&self.spans);
        while spans.iter().any(|s| quiet.blocked_by(*s)) {
            spans = self.ended.wait(spans).unwrap_or_else(|p| p.into_inner());
        }
        drop(spans);
        self.waiters.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether an operation is waiting for spans to end (no new span may start then).
    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting() > 0
    }

    /// How many operations are waiting for spans to end.
    pub(crate) fn waiting(&self) -> usize {
        self.waiters.load(Ordering::Acquire)
    }

    /// Registers `start..end` (call with the chunk's lock, after [`InFlight::blocks`] said
    /// no for it); the span ends when the returned guard drops, however the write went.
    pub(crate) fn begin(self: &Arc<Self>, start: u64, end: u64) -> Registered {
        lock(&self.spans).push((start, end));
        Registered {
            inflight: self.clone(),
            span: (start, end),
        }
    }
}

/// A registered span; dropping it ends it and wakes the waiters.
pub(crate) struct Registered {
    inflight: Arc<InFlight>,
    span: (u64, u64),
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut spans = lock(&self.inflight.spans);
        if let Some(i) = spans.iter().position(|s| *s == self.span) {
            spans.swap_remove(i);
        }
        drop(spans);
        self.inflight.ended.notify_all();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Waits until `n` operations wait on `f` (they then stay until a span ends).
    pub(crate) fn wait_for_waiters(f: &InFlight, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while f.waiting() < n {
            assert!(Instant::now() < deadline, "{n} waiters never came");
            std::thread::yield_now();
        }
    }

    #[test]
    fn spans_block_what_overlaps_them_and_all() {
        let f = Arc::new(InFlight::default());
        let r = f.begin(4096, 8192);
        assert!(f.blocks(Quiet::Span(0, 4097)));
        assert!(f.blocks(Quiet::Span(8191, 9000)));
        assert!(!f.blocks(Quiet::Span(0, 4096)));
        assert!(!f.blocks(Quiet::Span(8192, 12288)));
        assert!(f.blocks(Quiet::All));
        drop(r);
        assert!(!f.blocks(Quiet::All));
    }

    #[test]
    fn a_waiter_wakes_when_the_span_ends() {
        let f = Arc::new(InFlight::default());
        let r = f.begin(0, 4096);
        let waiter = {
            let f = f.clone();
            std::thread::spawn(move || f.wait(Quiet::Span(0, 1)))
        };
        wait_for_waiters(&f, 1);
        assert!(
            !waiter.is_finished(),
            "the waiter went ahead of a registered span"
        );
        drop(r);
        waiter.join().expect("waiter");
        assert!(!f.has_waiters());
    }

    #[test]
    fn around_covers_whole_blocks_of_any_geometry() {
        assert_eq!(Quiet::around(70_000, 1), Quiet::Span(65_536, 131_072));
        assert_eq!(Quiet::around(0, 65_536), Quiet::Span(0, 65_536));
        assert_eq!(Quiet::around(65_535, 2), Quiet::Span(0, 131_072));
    }

    #[test]
    fn equal_spans_end_one_at_a_time() {
        let f = Arc::new(InFlight::default());
        let a = f.begin(0, 4096);
        let b = f.begin(0, 4096);
        drop(a);
        assert!(f.blocks(Quiet::All));
        drop(b);
        assert!(!f.blocks(Quiet::All));
    }
}
