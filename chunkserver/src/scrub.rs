//! The background scrub: re-verifies every block of every chunk, so bitrot in data nobody
//! reads is found while other copies are still good.
//!
//! ```text
//!   Storage::inventory ─(chunk, version)…─▶ scrub::run ─piece ≤ 1 MiB─▶ spawn_blocking:
//!        ▲                                   │ paced to `rate` B/s      Storage::scrub_piece
//!        │ next pass                         │                          (chunk lock; the same
//!        └────── pass logged ◀───────────────┘                          check as a read)
//!   bad block ─▶ corrupt set ─▶ heartbeat `corrupt` ─▶ metadata drops the copy ─▶ healer
//! ```
//!
//! A pass takes a snapshot of the inventory and walks it chunk by chunk, a piece at a time:
//! each piece holds the chunk's lock only while it is read, so foreground I/O waits at most
//! for one piece. A chunk deleted or moved to another version during the pass is skipped (it
//! is checked in the next pass): only a block that fails its checksum under the chunk's lock,
//! at the version the pass started with, is reported. The rate can change at run time (the
//! control service's `set_scrub_rate`); 0 pauses the scrub where it is.

use crate::storage::{ScrubStep, Storage};
use rawfs_chunkserver_api::layout::Geometry;
use rawfs_chunkserver_api::{ScrubStatus, BLOCK_SIZE};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Default scrub rate per chunkserver (one data directory each): 4 MiB/s.
pub const DEFAULT_SCRUB_RATE: u64 = 4 << 20;
/// Largest piece read under a chunk's lock at once.
const MAX_PIECE: u64 = 1 << 20;
/// Shortest time between the starts of two passes: a server with little data would otherwise
/// re-read it in a tight loop.
const MIN_PASS: Duration = Duration::from_secs(1);

/// The scrub's shared state: its rate (changeable at run time) and its counters.
#[derive(Debug)]
pub struct Scrubber {
    rate: watch::Sender<u64>,
    scrubbed_bytes: AtomicU64,
    bad_found: AtomicU64,
    passes: AtomicU64,
}

impl Scrubber {
    /// A scrubber reading at most `rate` bytes per second (0: off).
    pub fn new(rate: u64) -> Arc<Scrubber> {
        Arc::new(Scrubber {
            rate: watch::Sender::new(rate),
            scrubbed_bytes: AtomicU64::new(0),
            bad_found: AtomicU64::new(0),
            passes: AtomicU64::new(0),
        })
    }

    /// Changes the rate; a scrub paused at 0 resumes, a running one slows down or stops.
    pub fn set_rate(&self, rate: u64) {
        let old = self.rate.send_replace(rate);
        if old != rate {
            tracing::info!(old, rate, "scrub rate changed");
        }
    }

    /// The rate, bytes verified, bad chunks found and passes completed.
    pub fn status(&self) -> ScrubStatus {
        ScrubStatus {
            rate: *self.rate.borrow(),
            scrubbed_bytes: self.scrubbed_bytes.load(Ordering::Relaxed),
            bad_found: self.bad_found.load(Ordering::Relaxed),
            passes: self.passes.load(Ordering::Relaxed),
        }
    }
}

/// Keeps reads to the rate: each piece books its bytes, and the scrub sleeps until the
/// bucket has refilled (a token bucket whose burst is one piece).
struct Pacer {
    rate: watch::Receiver<u64>,
    next: Instant,
}

impl Pacer {
    /// Waits until the scrub is enabled; returns the rate, or `None` once `stop` fires.
    async fn enabled(&mut self, stop: &CancellationToken) -> Option<u64> {
        loop {
            let rate = *self.rate.borrow_and_update();
            if rate > 0 {
                return Some(rate);
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                changed = self.rate.changed() => {
                    // The sender lives in the Scrubber, which outlives this task; if it is gone
                    // nobody can turn the scrub back on.
                    if changed.is_err() {
                        return None;
                    }
                    self.next = Instant::now();
                }
            }
        }
    }

    /// Books `bytes` read at `rate` and sleeps until they are paid for; false once `stop`
    /// fires. A rate change ends the sleep early: the next piece is paced at the new rate.
    async fn pay(&mut self, bytes: u64, rate: u64, stop: &CancellationToken) -> bool {
        let now = Instant::now();
        let cost = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        self.next = self.next.max(now) + cost;
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep_until(self.next.into()) => true,
            changed = self.rate.changed() => {
                self.next = Instant::now();
                changed.is_ok()
            }
        }
    }
}

/// What one pass found.
#[derive(Default)]
struct PassStats {
    chunks: u64,
    bytes: u64,
    bad: u64,
}

/// Scrubs `storage` pass after pass until `stop` fires.
pub(crate) async fn run(scrubber: Arc<Scrubber>, storage: Arc<Storage>, stop: CancellationToken) {
    let mut pacer = Pacer {
        rate: scrubber.rate.subscribe(),
        next: Instant::now(),
    };
    // Chunk versions already counted as bad: one that stays (its only copy, or not deleted
    // yet) is marked corrupt again each pass, but counted and logged loudly once.
    let mut known_bad: HashSet<(u64, u64)> = HashSet::new();
    tracing::info!(
        rate = *pacer.rate.borrow(),
        "scrub started (bytes/s; 0 is off)"
    );
    loop {
        if pacer.enabled(&stop).await.is_none() {
            return;
        }
        let started = Instant::now();
        let inventory = storage.inventory();
        let mut stats = PassStats::default();
        for &(chunk, version) in &inventory {
            let Some(outcome) =
                scrub_chunk(&scrubber, &storage, &mut pacer, chunk, version, &stop).await
            else {
                return;
            };
            stats.chunks += 1;
            stats.bytes += outcome.bytes;
            if let Some(offset) = outcome.bad_at {
                stats.bad += 1;
                if known_bad.insert((chunk, version)) {
                    scrubber.bad_found.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(chunk, version, offset, "scrub found a bad block");
                } else {
                    tracing::debug!(chunk, version, offset, "scrub found the bad block again");
                }
            }
        }
        let present: HashSet<(u64, u64)> = inventory.into_iter().collect();
        known_bad.retain(|k| present.contains(k));
        scrubber.passes.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            chunks = stats.chunks,
            bytes = stats.bytes,
            bad = stats.bad,
            duration_ms = started.elapsed().as_millis() as u64,
            "scrub pass done"
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until((started + MIN_PASS).into()) => {}
        }
    }
}

/// What scrubbing one chunk found.
struct ChunkOutcome {
    bytes: u64,
    bad_at: Option<u64>,
}

/// Scrubs one chunk piece by piece; `None` once `stop` fires.
async fn scrub_chunk(
    scrubber: &Scrubber,
    storage: &Arc<Storage>,
    pacer: &mut Pacer,
    chunk: u64,
    version: u64,
    stop: &CancellationToken,
) -> Option<ChunkOutcome> {
    let target = Arc::new(storage.scrub_target(chunk, version));
    let mut outcome = ChunkOutcome {
        bytes: 0,
        bad_at: None,
    };
    let mut from = 0;
    // Opening the chunk reads its header and block table: paid like data.
    let mut overhead = Geometry::current().data_offset;
    loop {
        let rate = pacer.enabled(stop).await?;
        // About four pieces a second, whole blocks, at most MAX_PIECE under the lock.
        let budget = (rate / 4).clamp(u64::from(BLOCK_SIZE), MAX_PIECE);
        let (s, t) = (storage.clone(), target.clone());
        let step = tokio::task::spawn_blocking(move || s.scrub_piece(&t, from, budget)).await;
        let step = match step {
            Ok(Ok(step)) => Some(step),
            Ok(Err(e)) => {
                tracing::warn!(chunk, error = %e, "scrub could not read a chunk; skipped");
                None
            }
            Err(e) => {
                tracing::error!(chunk, error = %e, "scrub task failed; chunk skipped");
                None
            }
        };
        // What was read is paid for whatever it showed: a run of failing or vanished chunks
        // must not turn into a tight loop of opens.
        let read = match &step {
            Some(ScrubStep::Verified(v)) => v.bytes,
            _ => 0,
        };
        if !pacer.pay(read + overhead, rate, stop).await {
            return None;
        }
        overhead = 0;
        match step {
            Some(ScrubStep::Verified(v)) => {
                outcome.bytes += v.bytes;
                scrubber
                    .scrubbed_bytes
                    .fetch_add(v.bytes, Ordering::Relaxed);
                match v.next {
                    Some(next) => from = next,
                    None => return Some(outcome),
                }
            }
            Some(ScrubStep::Bad { offset }) => {
                outcome.bad_at = Some(offset);
                return Some(outcome);
            }
            Some(ScrubStep::Gone) => {
                tracing::debug!(
                    chunk,
                    version,
                    "chunk changed or went during scrub; skipped"
                );
                return Some(outcome);
            }
            None => return Some(outcome),
        }
    }
}

#[cfg(test)]
#[path = "scrub_tests.rs"]
mod tests;
