//! Pure offset arithmetic: splitting a file range into per-chunk pieces and frames, and the
//! write buffer's bookkeeping. No I/O here, so all of it is unit-tested directly.

use crate::spares::Spares;
use crate::write_path::Dirty;
use bytes::{Bytes, BytesMut};
use rawfs_metadata_api::CHUNK_SIZE;
use std::collections::BTreeMap;
use std::sync::Arc;

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

    /// Bytes of this extent in chunk `index` that lie past `committed` (the size the metadata
    /// service knows): the estimate of newly stored bytes for `st_blocks` where no chunkserver
    /// counted them (overwrites and writes into holes below the size add nothing).
    pub fn growth_in_chunk(&self, index: u64, committed: u64) -> u64 {
        let chunk_start = index.saturating_mul(CHUNK_SIZE);
        let chunk_end = chunk_start.saturating_add(CHUNK_SIZE);
        self.end()
            .min(chunk_end)
            .saturating_sub(self.start.max(committed).max(chunk_start))
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

/// Most separate extents a write buffer holds: each costs its own requests when flushed.
/// 2048 lets 4 KiB random writes fill the default 8 MiB buffer (1024: ~10-15% fewer IOPS).
pub(crate) const MAX_EXTENTS: usize = 2048;

/// Extents to be stored together: sorted by offset, disjoint. One flush writes them all in
/// parallel and records them with a single `commit_write`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Batch {
    pub extents: Vec<Extent>,
}

impl Batch {
    /// End of the last extent (0 if empty).
    pub fn end(&self) -> u64 {
        self.extents.iter().map(Extent::end).max().unwrap_or(0)
    }

    pub fn overlaps(&self, offset: u64, end: u64) -> bool {
        self.extents.iter().any(|e| e.overlaps(offset, end))
    }

    pub fn covers(&self, offset: u64, end: u64) -> bool {
        self.extents.iter().any(|e| e.covers(offset, end))
    }

    pub fn overlay(&self, offset: u64, out: &mut [u8]) {
        for e in &self.extents {
            e.overlay(offset, out);
        }
    }

    /// Drops the bytes at or past `size`.
    pub fn truncate(&mut self, size: u64) {
        for e in &mut self.extents {
            e.truncate(size);
        }
        self.extents.retain(|e| !e.data.is_empty());
    }

    /// Bytes this batch adds to the file's stored space, once written as `written`: per
    /// chunk, what the chunkservers counted, and at least its growth past `committed` (a
    /// batch written again after a failed flush finds its blocks already filled, and a
    /// chunkserver before this count says nothing).
    pub fn added(&self, written: &[Dirty], committed: u64) -> u64 {
        written
            .iter()
            .map(|d| {
                let growth: u64 = self
                    .extents
                    .iter()
                    .map(|e| e.growth_in_chunk(d.index, committed))
                    .sum();
                d.added.unwrap_or(0).max(growth)
            })
            .sum()
    }

    /// Bytes of data held.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.data.len() as u64).sum()
    }
}

/// An extent this long that grows is a streaming write (see [`WriteBuf::try_absorb`]).
const STREAMING: usize = 1 << 20;

/// The write buffer of one file: writes collected until they total `cap` bytes (or
/// [`MAX_EXTENTS`] separate ranges). Overlapping and adjacent writes merge, the newest bytes
/// winning, so sequential writers build one large extent and random writers many small ones.
#[derive(Debug)]
pub(crate) struct WriteBuf {
    /// Disjoint, non-adjacent extents by start offset.
    extents: BTreeMap<u64, BytesMut>,
    bytes: usize,
    cap: usize,
    /// Where a streaming extent finds room, and flushed batches leave theirs.
    spares: Arc<Spares>,
}

impl WriteBuf {
    #[cfg(test)]
    pub fn new(cap: usize) -> Self {
        Self::with_spares(cap, Arc::default())
    }

    /// A buffer of up to `cap` bytes that reuses the memory kept in `spares`.
    pub fn with_spares(cap: usize, spares: Arc<Spares>) -> Self {
        WriteBuf {
            extents: BTreeMap::new(),
            bytes: 0,
            cap: cap.max(1),
            spares,
        }
    }

    /// Where the memory of this buffer's flushed batches goes ([`Spares::give`] returns what
    /// it does not keep, to be freed outside the caller's locks).
    pub fn spares(&self) -> Arc<Spares> {
        self.spares.clone()
    }

    /// The largest buffer worth keeping for this one: a streaming extent is reserved at
    /// about `cap`, and a write longer than the buffer goes out in a buffer of its own.
    pub fn largest_spare(&self) -> usize {
        self.cap.saturating_mul(2)
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Bytes buffered.
    pub fn bytes(&self) -> u64 {
        self.bytes as u64
    }

    /// Extents that overlap or touch `offset..end`, as `(start, end)`.
    fn touching(&self, offset: u64, end: u64) -> Vec<(u64, u64)> {
        // An extent starting before `offset` can still reach it; only the last such one can,
        // since extents are disjoint.
        let before = self
            .extents
            .range(..offset)
            .next_back()
            .map(|(s, d)| (*s, *s + d.len() as u64))
            .filter(|(_, e)| *e >= offset);
        let within = self
            .extents
            .range(offset..=end)
            .map(|(s, d)| (*s, *s + d.len() as u64));
        before.into_iter().chain(within).collect()
    }

    /// Takes `data` at `offset`, merging it with the buffered extents it overlaps or
    /// touches. Returns false (and changes nothing) if the buffer must be flushed first.
    pub fn try_absorb(&mut self, offset: u64, data: &[u8]) -> bool {
        let end = offset + data.len() as u64;
        let touching = self.touching(offset, end);
        let (start, stop) = touching
            .iter()
            .fold((offset, end), |(s, e), (ts, te)| (s.min(*ts), e.max(*te)));
        let old: u64 = touching.iter().map(|(s, e)| e - s).sum();
        let bytes = self.bytes as u64 - old + (stop - start);
        if bytes > self.cap as u64 || (touching.is_empty() && self.extents.len() >= MAX_EXTENTS) {
            return false;
        }
        // Fast paths: appending to, or overwriting inside, a single extent.
        if let [(s, e)] = touching[..] {
            if let Some(buf) = self.extents.get_mut(&s).filter(|_| s <= offset) {
                let pos = (offset - s) as usize;
                let overlap = (e.min(end) - offset) as usize;
                buf[pos..pos + overlap].copy_from_slice(&data[..overlap]);
                let grow = data.len() - overlap;
                if grow > buf.capacity() - buf.len() && buf.len() >= STREAMING {
                    // A streaming writer: room at once for all the buffer can still take.
                    // Growing by doubling would copy every byte again and fault in about
                    // twice the pages of a full buffer; a kept buffer faults in none.
                    let room = grow + (self.cap - bytes as usize);
                    match self.spares.take(buf.len() + room) {
                        Some(mut spare) => {
                            spare.extend_from_slice(buf);
                            *buf = spare;
                        }
                        None => buf.reserve(room),
                    }
                }
                buf.extend_from_slice(&data[overlap..]);
                self.bytes = bytes as usize;
                return true;
            }
        }
        let len = (stop - start) as usize;
        let mut merged = self.merge_base(&touching, start, len, bytes as usize);
        for (s, _) in &touching {
            if let Some(old) = self.extents.remove(s) {
                let pos = (s - start) as usize;
                merged[pos..pos + old.len()].copy_from_slice(&old);
            }
        }
        let pos = (offset - start) as usize;
        merged[pos..pos + data.len()].copy_from_slice(data);
        self.extents.insert(start, merged);
        self.bytes = bytes as usize;
        true
    }

    /// Memory for the extent of `len` bytes at `start` that the `touching` extents and a new
    /// write make, with `buffered_after` bytes in the buffer once it is in. If it is a
    /// touching extent's memory, that extent's bytes are already in place (and it is gone
    /// from the map); the rest is for the caller to fill in.
    ///
    /// A streaming writer must not fault in and zero fresh memory for each buffer, nor move
    /// its extent as it grows: the largest touching extent with room is reused (NBD clients
    /// with several writes in flight deliver them slightly out of order, so the big extent
    /// is often the one a late write lands before), and a large new extent starts in a kept
    /// buffer with room for the rest of the buffer.
    fn merge_base(
        &mut self,
        touching: &[(u64, u64)],
        start: u64,
        len: usize,
        buffered_after: usize,
    ) -> BytesMut {
        let roomiest = touching
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| self.extents.get(s).is_some_and(|d| d.capacity() >= len))
            .max_by_key(|s| self.extents[s].capacity());
        if let Some((s, mut d)) = roomiest.and_then(|s| self.extents.remove(&s).map(|d| (s, d))) {
            let old = d.len();
            d.resize(len, 0);
            d.copy_within(0..old, (s - start) as usize);
            return d;
        }
        if len >= STREAMING {
            if let Some(mut spare) = self.spares.take(len.max(self.cap - (buffered_after - len))) {
                spare.resize(len, 0);
                return spare;
            }
        }
        BytesMut::zeroed(len)
    }

    /// Copies buffered bytes within `offset..offset + out.len()` into `out`.
    pub fn overlay(&self, offset: u64, out: &mut [u8]) {
        let end = offset + out.len() as u64;
        for (s, _) in self.touching(offset, end) {
            if let Some(d) = self.extents.get(&s) {
                overlay(s, d, offset, out);
            }
        }
    }

    pub fn covers(&self, offset: u64, end: u64) -> bool {
        self.touching(offset, end)
            .iter()
            .any(|(s, e)| *s <= offset && end <= *e)
    }

    /// A copy of the buffered bytes within `offset..end`, if any.
    pub fn snapshot(&self, offset: u64, end: u64) -> Option<Batch> {
        let mut extents = Vec::new();
        for (s, e) in self.touching(offset, end) {
            let (from, to) = (s.max(offset), e.min(end));
            if from >= to {
                continue;
            }
            if let Some(d) = self.extents.get(&s) {
                let data = Bytes::copy_from_slice(&d[(from - s) as usize..(to - s) as usize]);
                extents.push(Extent { start: from, data });
            }
        }
        (!extents.is_empty()).then_some(Batch { extents })
    }

    /// Drops buffered bytes at or past `size`.
    pub fn truncate(&mut self, size: u64) {
        let cut: Vec<u64> = self.extents.range(..).map(|(s, _)| *s).collect();
        for s in cut {
            let Some(d) = self.extents.get_mut(&s) else {
                continue;
            };
            if s >= size {
                self.bytes -= d.len();
                self.extents.remove(&s);
            } else if s + d.len() as u64 > size {
                let keep = (size - s) as usize;
                self.bytes -= d.len() - keep;
                d.truncate(keep);
            }
        }
    }

    /// Empties the buffer, returning its contents (None if it was empty).
    pub fn take(&mut self) -> Option<Batch> {
        if self.extents.is_empty() {
            return None;
        }
        self.bytes = 0;
        let extents = std::mem::take(&mut self.extents)
            .into_iter()
            .map(|(start, d)| Extent {
                start,
                data: d.freeze(),
            })
            .collect();
        Some(Batch { extents })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A streaming writer's extent takes room for the whole buffer once it is 1 MiB long:
    /// later appends neither move nor copy it.
    #[test]
    fn a_streaming_extent_grows_in_place() {
        let mut b = WriteBuf::new(32 << 20);
        let mib = vec![5u8; 1 << 20];
        assert!(b.try_absorb(0, &mib));
        assert!(b.try_absorb(1 << 20, &mib));
        let at = b.extents[&0].as_ptr();
        for i in 2..32u64 {
            assert!(b.try_absorb(i << 20, &mib));
        }
        assert_eq!(b.extents[&0].as_ptr(), at, "the extent was moved");
        assert_eq!(b.bytes(), 32 << 20);
        assert!(!b.try_absorb(32 << 20, b"x"));
    }

    /// A streaming writer's next buffer starts in the memory its previous one left.
    #[test]
    fn a_new_buffer_starts_in_a_kept_one() {
        let spares = Arc::new(Spares::default());
        let mut b = WriteBuf::with_spares(8 << 20, spares.clone());
        let mib = vec![5u8; 1 << 20];
        for i in 0..8u64 {
            assert!(b.try_absorb(i << 20, &mib));
        }
        let batch = b.take().expect("buffered");
        let at = batch.extents[0].data.as_ptr();
        let _ = spares.give(batch, b.largest_spare());
        assert!(b.try_absorb(8 << 20, &mib));
        assert_eq!(b.extents[&(8 << 20)].as_ptr(), at, "fresh memory was taken");
        assert_eq!(spares.kept(), 0);
        for i in 9..16u64 {
            assert!(b.try_absorb(i << 20, &mib));
        }
        assert_eq!(b.extents[&(8 << 20)].as_ptr(), at, "the extent was moved");
        assert_eq!(contents(&b, 8 << 20, 8 << 20), vec![5u8; 8 << 20]);
    }

    /// A write landing just before a large extent (an NBD client's writes in flight arrive
    /// slightly out of order) moves that extent within its own memory, not into fresh memory.
    #[test]
    fn an_early_write_merges_into_the_roomy_extent_after_it() {
        let spares = Arc::new(Spares::default());
        let _ = spares.give(
            Batch {
                extents: vec![Extent {
                    start: 0,
                    data: Bytes::from(vec![0u8; 8 << 20]),
                }],
            },
            16 << 20,
        );
        let mut b = WriteBuf::with_spares(8 << 20, spares);
        assert!(b.try_absorb(1 << 20, &vec![2u8; 1 << 20]));
        let at = b.extents[&(1 << 20)].as_ptr();
        assert!(b.try_absorb(0, &vec![1u8; 1 << 20]));
        assert_eq!(b.extents.len(), 1);
        assert_eq!(
            b.extents[&0].as_ptr(),
            at,
            "the extent was moved to fresh memory"
        );
        assert!(b.try_absorb(2 << 20, &vec![3u8; 1 << 20]));
        assert_eq!(b.extents[&0].as_ptr(), at);
        let mut want = vec![1u8; 1 << 20];
        want.extend(vec![2u8; 1 << 20]);
        want.extend(vec![3u8; 1 << 20]);
        assert_eq!(contents(&b, 0, 3 << 20), want);
    }

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

    fn contents(b: &WriteBuf, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![b'.'; len];
        b.overlay(offset, &mut out);
        out
    }

    #[test]
    fn buffer_absorbs_contiguous_and_overlapping_writes() {
        let mut b = WriteBuf::new(16);
        assert!(b.try_absorb(100, b"abcd"));
        assert!(b.try_absorb(104, b"efgh"));
        // Overwrite in the middle and extend past the end in one write.
        assert!(b.try_absorb(106, b"XYZW"));
        assert_eq!(contents(&b, 100, 10), b"abcdefXYZW");
        assert!(b.covers(101, 110));
        assert!(!b.covers(99, 101));
        let snap = b.snapshot(108, 200).unwrap();
        assert_eq!(snap.extents.len(), 1);
        assert_eq!(
            (snap.extents[0].start, &snap.extents[0].data[..]),
            (108, &b"ZW"[..])
        );
        assert!(b.snapshot(110, 120).is_none());
        let batch = b.take().unwrap();
        assert_eq!(batch.extents.len(), 1);
        assert_eq!(batch.end(), 110);
    }

    #[test]
    fn buffer_keeps_separate_ranges_and_merges_bridges() {
        let mut b = WriteBuf::new(64);
        assert!(b.try_absorb(10, b"aaaa"));
        assert!(b.try_absorb(30, b"cccc"));
        assert!(b.try_absorb(0, b"zz"));
        assert_eq!(b.take().unwrap().extents.len(), 3);
        assert!(b.try_absorb(10, b"aaaa"));
        assert!(b.try_absorb(20, b"cccc"));
        // A write before both that bridges them into one extent.
        assert!(b.try_absorb(8, b"BBBBBBBBBBBBB"));
        assert_eq!(contents(&b, 6, 20), b"..BBBBBBBBBBBBBccc..");
        assert!(b.covers(8, 24));
        let batch = b.take().unwrap();
        assert_eq!(batch.extents.len(), 1);
        assert_eq!((batch.extents[0].start, batch.end()), (8, 24));
    }

    #[test]
    fn buffer_refuses_overflow() {
        let mut b = WriteBuf::new(8);
        assert!(b.try_absorb(10, b"1234"));
        assert!(!b.try_absorb(14, b"12345"), "past the capacity");
        assert!(b.try_absorb(14, b"1234"), "exactly full");
        assert!(!b.try_absorb(100, b"x"));
        assert!(b.try_absorb(12, b"zz"), "overwrites need no room");
        assert_eq!(&b.take().unwrap().extents[0].data[..], b"12zz1234");
        assert!(b.is_empty());
        assert!(b.take().is_none());
        assert!(!WriteBuf::new(2).try_absorb(0, b"abc"));
        let mut many = WriteBuf::new(1 << 20);
        for i in 0..MAX_EXTENTS as u64 {
            assert!(many.try_absorb(i * 10, b"x"));
        }
        assert!(!many.try_absorb(1 << 19, b"x"), "too many extents");
        assert!(many.try_absorb(1, b"y"), "merging is still fine");
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
        assert!(b.try_absorb(30, b"xyz"));
        b.truncate(13);
        assert_eq!(b.snapshot(0, 100).unwrap().end(), 13);
        assert!(b.try_absorb(13, &[1u8; 51]), "truncate gave the room back");
        b.truncate(5);
        assert!(b.is_empty());
        let mut e = Extent {
            start: 10,
            data: Bytes::from_static(b"abcdef"),
        };
        assert_eq!(e.growth_in_chunk(0, 0), 6);
        assert_eq!(e.growth_in_chunk(0, 12), 4);
        assert_eq!(e.growth_in_chunk(0, 100), 0);
        assert_eq!(e.growth_in_chunk(1, 0), 0, "not in chunk 1");
        let across = Extent {
            start: CHUNK_SIZE - 4,
            data: Bytes::from_static(b"abcdefgh"),
        };
        assert_eq!(across.growth_in_chunk(0, 0), 4);
        assert_eq!(across.growth_in_chunk(1, 0), 4);
        assert_eq!(across.growth_in_chunk(1, CHUNK_SIZE + 1), 3);
        e.truncate(12);
        assert_eq!(e.end(), 12);
    }
}
