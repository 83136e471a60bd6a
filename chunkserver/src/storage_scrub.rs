//! The scrubber's side of [`Storage`]: walking a chunk a piece at a time under its lock.

use super::{lock, lock_quiet, Slot, Storage, StoreError};
use crate::chunk_file::Verified;
use crate::inflight::Quiet;
use std::sync::{Arc, Mutex, Weak};

/// A chunk the scrubber is walking. It keeps the chunk's slot alive between pieces, so the
/// file stays open without the scrub pushing hot chunks out of the open-file cache.
pub(crate) struct ScrubTarget {
    chunk: u64,
    version: u64,
    slot: Arc<Slot>,
}

/// The outcome of one scrubbed piece of a chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ScrubStep {
    /// These blocks checked out.
    Verified(Verified),
    /// A block failed its checksum; the chunk is now in the corrupt set.
    Bad { offset: u64 },
    /// The chunk was deleted or moved to another version since the pass began: skipped.
    Gone,
}

impl Storage {
    /// Starts scrubbing `chunk` as of `version` (from [`Storage::inventory`]). No I/O.
    pub(crate) fn scrub_target(&self, chunk: u64, version: u64) -> ScrubTarget {
        let mut slots = lock(&self.slots);
        // `peek`, not `get`: a scrub must not make a cold chunk look recently used.
        let existing = slots
            .lru
            .peek(&chunk)
            .cloned()
            .or_else(|| slots.live.get(&chunk).and_then(Weak::upgrade));
        let slot = existing.unwrap_or_else(|| {
            // Registered as live only, so a foreground call finds this same slot (one table
            // in memory per chunk) and the file closes when the scrub lets go of it.
            let s = Arc::new(Mutex::new(None));
            slots.live.insert(chunk, Arc::downgrade(&s));
            s
        });
        ScrubTarget {
            chunk,
            version,
            slot,
        }
    }

    /// Verifies up to `budget` bytes of `t`'s blocks holding data from chunk offset `from` on,
    /// under the chunk's lock (so no write is half seen) but only for this piece. A bad block
    /// marks the chunk corrupt, as a failed read does; a chunk deleted or rewritten at another
    /// version since the pass began is [`ScrubStep::Gone`], never reported.
    pub(crate) fn scrub_piece(
        &self,
        t: &ScrubTarget,
        from: u64,
        budget: u64,
    ) -> Result<ScrubStep, StoreError> {
        let mut guard = lock_quiet(&t.slot, |_| Quiet::All);
        let cf = match self.load(t.chunk, &mut guard, None) {
            Ok(cf) => cf,
            Err(StoreError::NotFound) => return Ok(ScrubStep::Gone),
            // An unreadable header: `load` has marked the chunk corrupt already.
            Err(StoreError::Corrupt { offset }) => return Ok(ScrubStep::Bad { offset }),
            Err(e) => return Err(e),
        };
        if cf.version() != t.version {
            return Ok(ScrubStep::Gone);
        }
        match cf.verify(from, budget) {
            Ok(v) => Ok(ScrubStep::Verified(v)),
            Err(StoreError::Corrupt { offset }) => {
                self.mark_corrupt(t.chunk);
                Ok(ScrubStep::Bad { offset })
            }
            Err(e) => Err(e),
        }
    }
}
