//! Tiering: quiet replicated chunks become RS 4+2, one at a time, after the repairs.
//!
//! ```text
//!  each scan, after the repair pass, while the lease is held (and for at most a budget):
//!     cold_chunks(cursor, cold_after, PAGE) ─▶ [ColdChunk ...] ─▶ Client::convert_to_ec, one by one
//!        (an erasure-coded chunk of a file that became `hot`: Client::convert_to_replicas)
//!        success ─▶ "tiered chunk"; the chunk leaves the listing
//!        raced (stale version, file gone) ─▶ info, listed again next scan if still due
//!        no room (fewer than 6 live servers, full) ─▶ the pass ends: the next chunk would fail too
//!        other failure ─▶ warn, tried again on the next scan
//!     the cursor survives between scans, so a pass cut short by the budget resumes where it
//!     stopped; at the end of the listing it goes back to the start
//! ```
//!
//! The metadata service decides what is due: every chunk of `cold` files and the chunks of
//! `auto` files unchanged for `cold_after` (it lists only replicated, unshared chunks; one
//! still marked converting is listed again, since its converter died or lost the lease, and
//! a new conversion replaces its plan). The conversion itself (write 6 shards, verify them, commit fenced
//! by term and chunk version, only then drop the replicas) is the client library's
//! crash-safe [`Client::convert_to_ec`]; a healer killed in the middle leaves the old layout
//! authoritative, and the leftover shards are garbage collected.
//!
//! A conversion reads and writes a whole chunk (up to 64 MiB), so tiering runs after the
//! repair pass of a scan and stops once its time budget is spent: a chunk at risk never waits
//! behind more than one budget of tiering.

use std::time::{Duration, Instant};

use rawfs_client::{Client, ClientError};
use rawfs_metadata_api::{ChunkLoc, ColdChunk, Ino, MetaError};
use tokio_util::sync::CancellationToken;

/// Most chunks asked for per `cold_chunks` page (each is up to a 64 MiB conversion, so a
/// page lasts long; a small one keeps the listing fresh).
const PAGE: u32 = 64;

/// Default quiet time after which an `auto` file's chunks are converted to RS 4+2.
pub const DEFAULT_COLD_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Where the listing of due chunks resumes: after `(ino, index)`, exclusive. Kept between
/// scans. A core without I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    after: (Ino, u64),
}

impl Cursor {
    /// The `after` argument of the next `cold_chunks` call; `(0, 0)` lists from the start
    /// (inode numbers start at 1).
    pub fn after(&self) -> (Ino, u64) {
        self.after
    }

    /// Records that `c` was handled (converted or failed): a pass cut short resumes after it.
    pub fn handled(&mut self, c: &ColdChunk) {
        self.after = (c.ino, c.index);
    }

    /// Records the end of a page whose continuation is `next`. Returns true when the
    /// listing is exhausted: the cursor is back at the start and the pass is over. A `next`
    /// that does not move forward is treated as the end, so a confused server cannot make
    /// the pass loop forever.
    pub fn page_end(&mut self, next: Option<(Ino, u64)>) -> bool {
        match next {
            Some(n) if n > self.after => {
                self.after = n;
                false
            }
            _ => {
                self.after = (0, 0);
                true
            }
        }
    }
}

/// What a failed conversion means for the pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// There is no room for 6 shards (fewer than 6 live chunkservers, or full): the next
    /// chunk would fail the same way, so the pass ends.
    NoRoom,
    /// A writer or another converter got there first, or the file is gone: normal, the
    /// chunk is listed again later if it is still due.
    Raced,
    /// Anything else (a chunkserver failed, a checksum mismatch, the service unreachable):
    /// logged as a warning, tried again on the next scan.
    Other,
}

/// Classifies a conversion error.
pub fn classify(e: &ClientError) -> Failure {
    match e {
        ClientError::NoSpace { .. } | ClientError::Meta(MetaError::NoSpace { .. }) => {
            Failure::NoRoom
        }
        ClientError::Meta(
            MetaError::StaleVersion { .. } | MetaError::NotFound | MetaError::StaleTerm { .. },
        ) => Failure::Raced,
        _ => Failure::Other,
    }
}

/// The `quiet_ms` argument of `cold_chunks` for a `--cold-after` duration.
pub fn quiet_ms(cold_after: Duration) -> u64 {
    u64::try_from(cold_after.as_millis()).unwrap_or(u64::MAX)
}

/// What one tiering pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    /// Chunks converted to RS 4+2.
    pub converted: u64,
    /// Conversions that failed (all kinds).
    pub failed: u64,
    /// Logical bytes converted.
    pub bytes: u64,
}

/// The tiering worker: its cursor and settings, kept between scans.
#[derive(Debug)]
pub struct Tiering {
    cold_after: Duration,
    budget: Duration,
    cursor: Cursor,
    /// True while the passes end for lack of room: said once, not on every scan.
    no_room: bool,
}

impl Tiering {
    /// A worker converting `auto` files quiet for `cold_after`, spending at most `budget`
    /// per pass (a conversion already started finishes).
    pub fn new(cold_after: Duration, budget: Duration) -> Tiering {
        Tiering {
            cold_after,
            budget,
            cursor: Cursor::default(),
            no_room: false,
        }
    }

    /// One pass: converts due chunks, one at a time, until the listing ends, the budget is
    /// spent, `active()` turns false (the lease lapses) or `stop` is cancelled. Stopping
    /// abandons a conversion in flight, which the conversion's crash safety allows.
    pub async fn pass(
        &mut self,
        client: &Client,
        active: &dyn Fn() -> bool,
        stop: &CancellationToken,
    ) -> PassStats {
        let deadline = Instant::now() + self.budget;
        let quiet = quiet_ms(self.cold_after);
        let mut stats = PassStats::default();
        loop {
            let page = match client
                .meta()
                .cold_chunks(self.cursor.after(), quiet, PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list chunks due for RS 4+2");
                    return stats;
                }
            };
            for c in &page.chunks {
                if stop.is_cancelled() || !active() || Instant::now() >= deadline {
                    self.log_pass(&stats, false);
                    return stats;
                }
                let started = Instant::now();
                let res = tokio::select! {
                    r = convert(client, c) => r,
                    _ = stop.cancelled() => return stats,
                };
                self.cursor.handled(c);
                match res {
                    Ok(loc) => {
                        self.no_room = false;
                        stats.converted += 1;
                        stats.bytes += c.length;
                        tracing::info!(
                            ino = c.ino,
                            index = c.index,
                            chunk = c.chunk,
                            version = loc.version,
                            bytes = c.length,
                            ms = started.elapsed().as_millis() as u64,
                            to = if c.to_replicas { "replicas" } else { "RS 4+2" },
                            "tiered chunk"
                        );
                    }
                    Err(e) => {
                        stats.failed += 1;
                        match classify(&e) {
                            Failure::NoRoom => {
                                if !self.no_room {
                                    tracing::warn!(
                                        chunk = c.chunk,
                                        error = %e,
                                        "no room for RS 4+2 (6 live chunkservers with space \
                                         are needed): tiering waits"
                                    );
                                }
                                self.no_room = true;
                                // Start over next time: whatever frees room helps every chunk.
                                self.cursor = Cursor::default();
                                return stats;
                            }
                            Failure::Raced => tracing::info!(
                                ino = c.ino,
                                index = c.index,
                                chunk = c.chunk,
                                error = %e,
                                "chunk not tiered (changed meanwhile): retried when due again"
                            ),
                            Failure::Other => tracing::warn!(
                                ino = c.ino,
                                index = c.index,
                                chunk = c.chunk,
                                error = %e,
                                "tiering chunk to RS 4+2 failed: retried next scan"
                            ),
                        }
                    }
                }
            }
            if self.cursor.page_end(page.next) {
                self.log_pass(&stats, true);
                return stats;
            }
        }
    }

    fn log_pass(&self, stats: &PassStats, complete: bool) {
        if stats.converted + stats.failed > 0 {
            tracing::info!(
                converted = stats.converted,
                failed = stats.failed,
                bytes = stats.bytes,
                complete,
                "tiering pass"
            );
        }
    }
}

/// The crash-safe replicas → RS 4+2 conversion of the client library, or back to replicas
/// for an erasure-coded chunk of a file that became `hot`.
async fn convert(client: &Client, c: &ColdChunk) -> Result<ChunkLoc, ClientError> {
    if c.to_replicas {
        client.convert_to_replicas(c).await
    } else {
        client.convert_to_ec(c).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(ino: Ino, index: u64) -> ColdChunk {
        ColdChunk {
            ino,
            index,
            chunk: ino * 100 + index,
            version: 1,
            length: 1,
            to_replicas: false,
        }
    }

    #[test]
    fn cursor_resumes_after_the_last_handled_chunk() {
        let mut c = Cursor::default();
        assert_eq!(c.after(), (0, 0), "a fresh cursor lists from the start");
        c.handled(&chunk(5, 2));
        assert_eq!(c.after(), (5, 2));
        assert!(!c.page_end(Some((7, 0))), "more pages");
        assert_eq!(c.after(), (7, 0));
    }

    #[test]
    fn cursor_wraps_at_the_end_of_the_listing() {
        let mut c = Cursor::default();
        c.handled(&chunk(9, 1));
        assert!(c.page_end(None));
        assert_eq!(c.after(), (0, 0), "the next pass starts over");
    }

    #[test]
    fn a_next_that_does_not_advance_ends_the_pass() {
        let mut c = Cursor::default();
        c.handled(&chunk(9, 1));
        assert!(c.page_end(Some((9, 1))), "same position");
        c.handled(&chunk(9, 1));
        assert!(c.page_end(Some((3, 0))), "backwards");
        assert_eq!(c.after(), (0, 0));
    }

    #[test]
    fn no_space_ends_the_pass_and_races_are_normal() {
        let nospace = ClientError::Meta(MetaError::NoSpace {
            reason: "5 live chunkservers".into(),
        });
        assert_eq!(classify(&nospace), Failure::NoRoom);
        assert_eq!(
            classify(&ClientError::NoSpace { chunk: 3 }),
            Failure::NoRoom
        );
        let stale = ClientError::Meta(MetaError::StaleVersion { current: 4 });
        assert_eq!(classify(&stale), Failure::Raced);
        assert_eq!(
            classify(&ClientError::Meta(MetaError::NotFound)),
            Failure::Raced
        );
        let down = ClientError::Meta(MetaError::Unavailable {
            reason: "electing".into(),
        });
        assert_eq!(classify(&down), Failure::Other);
        let io = ClientError::NoReplica {
            index: 0,
            chunk: 3,
            last: None,
        };
        assert_eq!(classify(&io), Failure::Other);
    }

    #[test]
    fn quiet_time_is_in_milliseconds_and_saturates() {
        assert_eq!(quiet_ms(Duration::ZERO), 0);
        assert_eq!(quiet_ms(Duration::from_secs(30)), 30_000);
        assert_eq!(quiet_ms(DEFAULT_COLD_AFTER), 86_400_000);
        assert_eq!(quiet_ms(Duration::MAX), u64::MAX);
    }
}
