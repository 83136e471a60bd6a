//! Page-aligned, reused buffers for the payloads of WRITE and WRITEV requests.
//!
//! A chunkserver writes long runs of whole blocks with `O_DIRECT`, which needs page-aligned
//! memory. A payload read into an ordinary heap buffer had to be copied once more into an
//! aligned staging buffer (a sixth of the chunkserver's CPU during sequential writes), and a
//! fresh megabyte per frame cost a page fault per 4 KiB besides. So a write's payload is read
//! into a buffer taken from a small pool, placed so that the data of its first piece starts
//! on a page boundary: a WRITE's payload at the buffer's start, a WRITEV's after its piece
//! table. Buffers go back to the pool when the last [`bytes::Bytes`] over them is dropped.
//!
//! A peer that announces a frame and stalls holds a whole buffer, not only the first 64 KiB
//! as an ordinary payload read does; but a fresh buffer's pages are only backed as bytes
//! arrive, so what it costs in memory is still what it sent (and the data port's body
//! deadline ends it).

use bytes::buf::UninitSlice;
use bytes::BufMut;
use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;

/// Alignment of the buffers and of the first piece's data within them.
pub const PAGE: usize = 4096;
/// Capacity of a pooled buffer: a 1 MiB frame, the page of padding before it, and a WRITEV
/// piece table of up to 8,000 entries.
pub const POOLED: usize = (1 << 20) + (64 << 10);
/// Buffers kept for reuse (their pages stay backed: that is the point).
const POOL_MAX: usize = 32;

/// One page-aligned allocation of [`POOLED`] bytes.
struct Raw(NonNull<u8>);

// SAFETY: `Raw` owns its allocation exclusively; the pointer is never shared outside it.
unsafe impl Send for Raw {}
// SAFETY: as above; shared access only reads through `AlignedPayload::as_ref`.
unsafe impl Sync for Raw {}

impl Raw {
    fn layout() -> Layout {
        Layout::from_size_align(POOLED, PAGE).expect("valid layout")
    }

    fn new() -> Option<Raw> {
        // SAFETY: the layout has a nonzero size.
        NonNull::new(unsafe { alloc(Self::layout()) }).map(Raw)
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: allocated by `Raw::new` with this layout, and dropped once.
        unsafe { dealloc(self.0.as_ptr(), Self::layout()) };
    }
}

static POOL: Mutex<Vec<Raw>> = Mutex::new(Vec::new());

fn take() -> Option<Raw> {
    let pooled = POOL.lock().unwrap_or_else(|p| p.into_inner()).pop();
    pooled.or_else(Raw::new)
}

/// A payload being read into (and then held in) a pooled buffer: bytes `start..start + len`
/// of it are filled, up to `start + want`.
pub struct AlignedPayload {
    raw: Option<Raw>,
    start: usize,
    len: usize,
    want: usize,
}

impl AlignedPayload {
    /// A buffer for a payload of `want` bytes whose byte `head` must fall on a page boundary;
    /// `None` when that does not fit a pooled buffer (or memory is short).
    pub fn new(want: usize, head: usize) -> Option<AlignedPayload> {
        let start = (PAGE - head % PAGE) % PAGE;
        if start + want > POOLED {
            return None;
        }
        Some(AlignedPayload {
            raw: Some(take()?),
            start,
            len: 0,
            want,
        })
    }

    /// Bytes still to be filled.
    pub fn missing(&self) -> usize {
        self.want - self.len
    }

    fn base(&self) -> *mut u8 {
        let raw = self.raw.as_ref().expect("buffer present until drop");
        // SAFETY: `start < PAGE <= POOLED`, inside the allocation.
        unsafe { raw.0.as_ptr().add(self.start) }
    }
}

impl AsRef<[u8]> for AlignedPayload {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes from `base` were written through `BufMut` (which
        // only advances over bytes it was given to fill) and lie inside the allocation.
        unsafe { std::slice::from_raw_parts(self.base(), self.len) }
    }
}

// SAFETY: `chunk_mut` hands out exactly the unfilled rest of the wanted range, and
// `advance_mut` only counts bytes inside it as filled.
unsafe impl BufMut for AlignedPayload {
    fn remaining_mut(&self) -> usize {
        self.missing()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.missing(), "advanced past the payload");
        self.len += cnt;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        let missing = self.missing();
        // SAFETY: `base + len .. base + want` lies inside the allocation (checked in `new`)
        // and is not borrowed elsewhere while `self` is borrowed mutably.
        unsafe { UninitSlice::from_raw_parts_mut(self.base().add(self.len), missing) }
    }
}

impl Drop for AlignedPayload {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(raw);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_at_head_is_page_aligned_and_buffers_are_reused() {
        for head in [0, 12, 4096, 5000] {
            let mut p = AlignedPayload::new(1 << 20, head).unwrap();
            p.put_slice(&vec![7u8; 1 << 20]);
            assert_eq!(p.missing(), 0);
            let bytes = bytes::Bytes::from_owner(p);
            assert_eq!(bytes.len(), 1 << 20);
            assert_eq!(bytes[head..].as_ptr() as usize % PAGE, 0, "head {head}");
            assert!(bytes.iter().all(|b| *b == 7));
        }
        assert!(!POOL.lock().unwrap().is_empty());
        assert!(AlignedPayload::new(POOLED, 12).is_none());
        assert!(AlignedPayload::new(POOLED, 0).is_some());
    }
}
