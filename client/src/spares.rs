//! Memory of flushed write buffers, kept for the next buffer of a streaming writer.
//!
//! A sequential writer fills a buffer of tens of MiB, sends it, and starts the next one. A
//! fresh allocation that large comes straight from the kernel (glibc maps it, and unmaps it
//! when freed), so every byte of every buffer first took a page fault and a page clearing:
//! measured on a 1 GiB write through the mount, about 5% of all CPU time went to faulting
//! in buffer pages on the FUSE thread. Reusing the memory of a buffer whose flush is done
//! skips both. A client keeps at most [`KEPT`] such buffers, no larger than twice a file's
//! write buffer (32 MiB by default: that much per kept buffer stays resident once a file
//! was streamed);
//! only buffers whose data is no longer shared (every frame sent from it dropped) can be
//! taken back.

use crate::extent::Batch;
use bytes::{Bytes, BytesMut};
use std::sync::Mutex;

/// Buffers kept at most. A streaming writer needs one: its next buffer starts while the
/// previous one is still being sent, and takes the memory of the one before. The second is
/// for an NBD client's writes in flight, which arrive slightly out of order: a write that
/// lands past the gap a late one leaves starts an extent of its own, which may grow large
/// before the late write joins the two. Measured on a 1 GiB NBD write at queue depth 8:
/// 60,000-140,000 page faults in the server with one kept buffer, under 2,000 with two.
const KEPT: usize = 2;
/// Smallest buffer worth keeping (smaller ones are cheap to allocate).
const WORTH_KEEPING: usize = 1 << 20;

/// Buffers with spare capacity, shared by the files of one client.
#[derive(Debug, Default)]
pub(crate) struct Spares {
    kept: Mutex<Vec<BytesMut>>,
}

impl Spares {
    /// An empty buffer with room for at least `capacity` bytes, if one is kept.
    pub fn take(&self, capacity: usize) -> Option<BytesMut> {
        let mut kept = crate::file_io::lock(&self.kept);
        let i = kept.iter().position(|b| b.capacity() >= capacity)?;
        Some(kept.swap_remove(i))
    }

    /// Keeps the memory of `batch`'s large extents whose data is no longer shared, up to
    /// `largest` bytes each. Returns the rest, to be dropped (and so freed) by the caller
    /// outside its locks: the memory must be back before the writer that waits for the flush
    /// moves on (else its next buffer starts in fresh memory), but freeing a large buffer
    /// (`munmap`) should not happen under the file's lock.
    #[must_use = "dropped outside the caller's locks"]
    pub fn give(&self, batch: Batch, largest: usize) -> Vec<Bytes> {
        let mut rest = Vec::new();
        for e in batch.extents {
            if e.data.len() < WORTH_KEEPING || e.data.len() > largest {
                rest.push(e.data);
                continue;
            }
            let mut buf = match e.data.try_into_mut() {
                Ok(buf) if buf.capacity() <= largest => buf,
                Ok(buf) => {
                    rest.push(buf.freeze());
                    continue;
                }
                Err(shared) => {
                    rest.push(shared);
                    continue;
                }
            };
            buf.clear();
            let mut kept = crate::file_io::lock(&self.kept);
            if kept.len() < KEPT {
                kept.push(buf);
            } else if let Some(smaller) = kept
                .iter_mut()
                .filter(|k| k.capacity() < buf.capacity())
                .min_by_key(|k| k.capacity())
            {
                // A streaming writer asks for a whole buffer's room: a small batch (a write
                // that arrived out of order, a flush of a few MiB) must not hold the place of
                // the large one it would need.
                rest.push(std::mem::replace(smaller, buf).freeze());
            } else {
                rest.push(buf.freeze());
            }
        }
        rest
    }

    #[cfg(test)]
    pub fn kept(&self) -> usize {
        crate::file_io::lock(&self.kept).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use bytes::Bytes;

    fn batch_of(data: Bytes) -> Batch {
        Batch {
            extents: vec![Extent { start: 0, data }],
        }
    }

    #[test]
    fn unshared_large_buffers_come_back_with_their_capacity() {
        let spares = Spares::default();
        let mut buf = BytesMut::with_capacity(8 << 20);
        buf.extend_from_slice(&vec![7u8; 2 << 20]);
        let data = buf.freeze();
        let frame = data.slice(0..4096);
        // Still shared with a frame in flight: not taken.
        let _ = spares.give(batch_of(data.clone()), 8 << 20);
        assert_eq!(spares.kept(), 0);
        drop(frame);
        let _ = spares.give(batch_of(data), 8 << 20);
        assert_eq!(spares.kept(), 1);
        assert!(spares.take(16 << 20).is_none(), "too small for this");
        let again = spares.take(8 << 20).expect("the buffer comes back");
        assert!(again.is_empty());
        assert!(again.capacity() >= 8 << 20);
        assert_eq!(spares.kept(), 0);
    }

    #[test]
    fn small_huge_and_more_than_kept_buffers_are_dropped() {
        let spares = Spares::default();
        // Room for more than a buffer of this client should hold (a write longer than the
        // buffer goes out in a buffer of its own): freed.
        let mut huge = BytesMut::with_capacity(8 << 20);
        huge.extend_from_slice(&vec![1u8; 2 << 20]);
        let _ = spares.give(batch_of(huge.freeze()), 4 << 20);
        assert_eq!(spares.kept(), 0);
        let _ = spares.give(batch_of(Bytes::from(vec![1u8; 4096])), 8 << 20);
        assert_eq!(spares.kept(), 0);
        for _ in 0..KEPT + 2 {
            let _ = spares.give(batch_of(Bytes::from(vec![1u8; 2 << 20])), 8 << 20);
        }
        assert_eq!(spares.kept(), KEPT);
    }

    /// A small batch given first does not keep out the large buffer a streaming writer needs.
    #[test]
    fn a_larger_buffer_takes_a_smaller_ones_place() {
        let spares = Spares::default();
        for _ in 0..KEPT {
            let _ = spares.give(batch_of(Bytes::from(vec![1u8; 1 << 20])), 32 << 20);
        }
        let _ = spares.give(batch_of(Bytes::from(vec![1u8; 16 << 20])), 32 << 20);
        assert_eq!(spares.kept(), KEPT);
        assert!(
            spares.take(16 << 20).is_some(),
            "the 16 MiB buffer was not kept"
        );
    }
}
