//! A bound on the bytes that all files of one [`crate::Client`] hold in write buffers.
//!
//! A file's write buffer may grow to `write_buffer` bytes (32 MiB by default): long buffers
//! keep a sequential writer's frames flowing to the replicas with few pauses between
//! flushes. Many files written at once must not each hold that much, so a client counts the
//! bytes buffered or being flushed by all its files; past the budget, a file whose buffer
//! already holds [`FAIR_SHARE`] flushes it instead of growing it.

use crate::spares::Spares;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a file may buffer whatever the others hold (the write buffer before budgets).
pub(crate) const FAIR_SHARE: u64 = 8 << 20;

/// Bytes buffered by the files of one client, against a limit.
#[derive(Debug)]
pub(crate) struct WriteBudget {
    limit: u64,
    used: AtomicU64,
    /// Memory of flushed buffers, shared by the files like the limit.
    spares: Arc<Spares>,
}

impl WriteBudget {
    pub fn new(limit: u64) -> Self {
        WriteBudget {
            limit,
            used: AtomicU64::new(0),
            spares: Arc::default(),
        }
    }

    /// The buffer memory kept for reuse by this client's files.
    pub fn spares(&self) -> Arc<Spares> {
        self.spares.clone()
    }

    /// True when a buffer of `held` bytes should be flushed before it grows further.
    pub fn tight(&self, held: u64) -> bool {
        held >= FAIR_SHARE && self.used.load(Ordering::Relaxed) > self.limit
    }

    /// Records that a file's buffered bytes went from `before` to `now`.
    pub fn moved(&self, before: u64, now: u64) {
        if now >= before {
            self.used.fetch_add(now - before, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(before - now, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }
}

impl Default for WriteBudget {
    /// No limit (tests that make a lone `FileIo`).
    fn default() -> Self {
        WriteBudget::new(u64::MAX)
    }
}
