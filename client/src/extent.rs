//! Pure offset arithmetic: splitting a file range into per-chunk pieces and frames, and the
//! write buffer's bookkeeping. No I/O here, so all of it is unit-tested directly.

use bytes::{Bytes, BytesMut};
use rawfs_metadata_api::CHUNK_SIZE;

/// Largest file size the client accepts: offsets must fit the kernel's `loff_t` (i64).
pub const MAX_FILE_SIZE: u64 = i64::MAX as u64;

/// The part of a file range that falls into one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    /// Chunk index within the file.
    pub index: u64,
    /// Offset within the chunk.
    pub off: u32,
    /// Length of the piece (at most `CHUNK_SIZE`).
    pub len: u32,
    /// Offset of the piece from the start of the split range (position in the caller's buffer).
    pub pos: usize,
}

/// Splits `offset..offset + len` at chunk boundaries. The caller has checked that the range
/// ends at or before [`MAX_FILE_SIZE`].
pub(crate) fn split_by_chunk(offset: u64, len: u64) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let index = at / CHUNK_SIZE;
        let off = at % CHUNK_SIZE;
        let n = (CHUNK_SIZE - off).min(end - at);
        // Both fit in u32 because they are bounded by CHUNK_SIZE (64 MiB).
        pieces.push(Piece {
            index,
            off: off as u32,
            len: n as u32,
            pos: (at - offset) as usize,
        });
        at += n;
    }
    pieces
}

/// Splits `len` bytes into frames of at most `max` bytes: `(offset from the start, length)`.
pub(crate) fn frames(len: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let max = max.max(1);
    (0..len)
        .step_by(max)
        .map(move |start| (start, max.min(len - start)))
}

/// Checks that `offset..offset + len` is a valid file range; returns its end.
pub(crate) fn range_end(offset: u64, len: u64) -> Option<u64> {
    offset.checked_add(len).filter(|end| *end <= MAX_FILE_SIZE)
}

/// Contiguous bytes of a file at `start`: a flushed or flushing write buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    pub start: u64,
    pub data: Bytes,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// Copies the bytes of this extent that fall into `offset..offset + out.len()` into
    /// `out`. Returns the number of bytes copied.
    pub fn overlay(&self, offset: u64, out: &mut [u8]) -> usize {
        overlay(self.start, &self.data, offset, out)
    }

    /// True if the extent intersects `offset..end`.
    pub fn overlaps(&self, offset: u64, end: u64) -> bool {
        self.start < end && offset < self.end()
    }

    /// True if this extent holds every byte of `offset..end`.
    pub fn covers(&self, offset: u64, end: u64) -> bool {
        self.start <= offset && end <= self.end()
    }

    /// Drops the bytes at or past `size`.
    pub fn truncate(&mut self, size: u64) {
        if size <= self.start {
            self.data.clear();
        } else if size < self.end() {
            self.data.truncate((size - self.start) as usize);
        }
    }

    /// Bytes of this extent that lie past `committed` (the size the metadata service knows):
    /// a cheap estimate of newly stored bytes for `st_blocks` (overwrites add nothing).
    pub fn growth_past(&self, committed: u64) -> u64 {
        self.end().saturating_sub(self.start.max(committed))
    }
}

fn overlay(start: u64, data: &[u8], offset: u64, out: &mut [u8]) -> usize {
    let from = start.max(offset);
    let to = (start + data.len() as u64).min(offset + out.len() as u64);
    if from >= to {
        return 0;
    }
    let n = (to - from) as usize;
    let src = (from - start) as usize;
    let dst = (from - offset) as usize;
    out[dst..dst + n].copy_from_slice(&data[src..src + n]);
    n
}

/// The write buffer of one file: contiguous (possibly overlapping) writes collected until
/// they reach `cap` bytes or a write lands elsewhere.
#[derive(Debug)]
pub(crate) struct WriteBuf {
    start: u64,
    data: BytesMut,
    cap: usize,
}

impl WriteBuf {
    pub fn new(cap: usize) -> Self {
        WriteBuf {
            start: 0,
            data: BytesMut::new(),
            cap: cap.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }

    /// Takes `data` at `offset` if it extends or overwrites the buffered range without a gap
    /// and the result stays within the capacity. Returns false (and changes nothing) if the
    /// buffer must be flushed first.
    pub fn try_absorb(&mut self, offset: u64, data: &[u8]) -> bool {
        let len = data.len() as u64;
        if self.data.is_empty() {
            if data.len() > self.cap {
                return false;
            }
            self.start = offset;
            self.data.extend_from_slice(data);
            return true;
        }
        let end = self.end();
        if offset < self.start || offset > end {
            return false;
        }
        let new_end = end.max(offset + len);
        if new_end - self.start > self.cap as u64 {
            return false;
        }
        let pos = (offset - self.start) as usize;
        let overlap = (end - offset).min(len) as usize;
        self.data[pos..pos + overlap].copy_from_slice(&data[..overlap]);
        self.data.extend_from_slice(&data[overlap..]);
        true
    }

    /// Copies buffered bytes within `offset..offset + out.len()` into `out`.
    pub fn overlay(&self, offset: u64, out: &mut [u8]) -> usize {
        overlay(self.start, &self.data, offset, out)
    }

    pub fn covers(&self, offset: u64, end: u64) -> bool {
        !self.data.is_empty() && self.start <= offset && end <= self.end()
    }

    /// True if the buffered range intersects `offset..end`.
    pub fn overlaps(&self, offset: u64, end: u64) -> bool {
        !self.data.is_empty() && self.start < end && offset < self.end()
    }

    /// A copy of the buffered bytes within `offset..end`, if any.
    pub fn snapshot(&self, offset: u64, end: u64) -> Option<Extent> {
        if !self.overlaps(offset, end) {
            return None;
        }
        let from = self.start.max(offset);
        let to = self.end().min(end);
        let data = Bytes::copy_from_slice(
            &self.data[(from - self.start) as usize..(to - self.start) as usize],
        );
        Some(Extent { start: from, data })
    }

    /// Drops buffered bytes at or past `size`.
    pub fn truncate(&mut self, size: u64) {
        if size <= self.start {
            self.data.clear();
        } else if size < self.end() {
            self.data.truncate((size - self.start) as usize);
        }
    }

    /// Empties the buffer, returning its contents (None if it was empty).
    pub fn take(&mut self) -> Option<Extent> {
        if self.data.is_empty() {
            return None;
        }
        let data = std::mem::take(&mut self.data).freeze();
        Some(Extent {
            start: self.start,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_within_one_chunk() {
        let p = split_by_chunk(100, 50);
        assert_eq!(
            p,
            vec![Piece {
                index: 0,
                off: 100,
                len: 50,
                pos: 0
            }]
        );
    }

    #[test]
    fn split_across_chunk_boundaries() {
        let off = CHUNK_SIZE - 10;
        let p = split_by_chunk(off, CHUNK_SIZE + 20);
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].index, p[0].off, p[0].len, p[0].pos),
            (0, (CHUNK_SIZE - 10) as u32, 10, 0)
        );
        assert_eq!(
            (p[1].index, p[1].off, p[1].len, p[1].pos),
            (1, 0, CHUNK_SIZE as u32, 10)
        );
        assert_eq!(
            (p[2].index, p[2].off, p[2].len, p[2].pos),
            (2, 0, 10, CHUNK_SIZE as usize + 10)
        );
        let total: u64 = p.iter().map(|x| u64::from(x.len)).sum();
        assert_eq!(total, CHUNK_SIZE + 20);
    }

    #[test]
    fn split_empty_range_has_no_pieces() {
        assert!(split_by_chunk(5, 0).is_empty());
    }

    #[test]
    fn frames_cover_the_length() {
        let f: Vec<_> = frames(10, 4).collect();
        assert_eq!(f, vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(frames(0, 4).count(), 0);
        assert_eq!(frames(8, 4).collect::<Vec<_>>(), vec![(0, 4), (4, 4)]);
    }

    #[test]
    fn range_end_rejects_overflow() {
        assert_eq!(range_end(1, 2), Some(3));
        assert_eq!(range_end(u64::MAX, 1), None);
        assert_eq!(range_end(MAX_FILE_SIZE, 1), None);
    }

    #[test]
    fn buffer_absorbs_contiguous_and_overlapping_writes() {
        let mut b = WriteBuf::new(16);
        assert!(b.try_absorb(100, b"abcd"));
        assert!(b.try_absorb(104, b"efgh"));
        // Overwrite in the middle and extend past the end in one write.
        assert!(b.try_absorb(106, b"XYZW"));
        assert_eq!(b.end(), 110);
        let mut out = [0u8; 10];
        assert_eq!(b.overlay(100, &mut out), 10);
        assert_eq!(&out, b"abcdefXYZW");
        assert!(b.covers(101, 110));
        assert!(!b.covers(99, 101));
        let snap = b.snapshot(108, 200).unwrap();
        assert_eq!((snap.start, &snap.data[..]), (108, &b"ZW"[..]));
        assert!(b.snapshot(110, 120).is_none());
    }

    #[test]
    fn buffer_refuses_gaps_and_overflow() {
        let mut b = WriteBuf::new(8);
        assert!(b.try_absorb(10, b"1234"));
        assert!(!b.try_absorb(15, b"x"), "gap after the end");
        assert!(!b.try_absorb(9, b"x"), "before the start");
        assert!(!b.try_absorb(14, b"12345"), "past the capacity");
        assert!(b.try_absorb(14, b"1234"), "exactly full");
        assert!(!b.try_absorb(18, b"x"));
        let e = b.take().unwrap();
        assert_eq!(e.start, 10);
        assert_eq!(&e.data[..], b"12341234");
        assert!(b.is_empty());
        assert!(b.take().is_none());
        // An empty buffer takes any write that fits, anywhere.
        assert!(b.try_absorb(1000, b"z"));
        assert!(!WriteBuf::new(2).try_absorb(0, b"abc"));
    }

    #[test]
    fn overlay_copies_only_the_intersection() {
        let e = Extent {
            start: 10,
            data: Bytes::from_static(b"abcdef"),
        };
        let mut out = [b'.'; 6];
        assert_eq!(e.overlay(7, &mut out), 3);
        assert_eq!(&out, b"...abc");
        let mut out = [b'.'; 4];
        assert_eq!(e.overlay(14, &mut out), 2);
        assert_eq!(&out, b"ef..");
        assert_eq!(e.overlay(100, &mut out), 0);
    }

    #[test]
    fn truncate_and_growth() {
        let mut b = WriteBuf::new(64);
        assert!(b.try_absorb(10, b"abcdef"));
        b.truncate(13);
        assert_eq!(b.end(), 13);
        b.truncate(5);
        assert!(b.is_empty());
        let mut e = Extent {
            start: 10,
            data: Bytes::from_static(b"abcdef"),
        };
        assert_eq!(e.growth_past(0), 6);
        assert_eq!(e.growth_past(12), 4);
        assert_eq!(e.growth_past(100), 0);
        e.truncate(12);
        assert_eq!(e.end(), 12);
    }
}
