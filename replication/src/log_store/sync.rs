//! The sync thread: group commit of the active segment.
//!
//! ```text
//!  append: write(2) --> appended += n --notify if idle-->  sync thread: first dirty byte seen
//!  sync():  urgent = true ---------------notify---------->  wait <= sync_delay (2 ms) unless
//!                                                          urgent, then target = appended,
//!                                                          fdatasync(active segment) [+ dir]
//!  sync_log waiters <--watch(synced = target)-----------   then the hint (committed, synced
//!                                                          position; pwrite, not fsynced)
//! ```
//!
//! Once the thread sees unsynced bytes it waits up to [`super::Options::sync_delay`] for more
//! appends before it fsyncs, so one fsync covers every append of that window and appends
//! arriving meanwhile wake nobody (only an idle thread is notified: waking a sleeping thread
//! costs tens of microseconds on a small VM, more than the append itself). A `sync()` caller
//! (a power-loss barrier) cuts the wait short. Under load an append is on disk within about
//! the delay plus two fsyncs. Appends are in the page cache before they are acknowledged, so
//! the delay changes nothing for a process crash (`kill -9`). An fsync error is final: after
//! it the kernel may have dropped the dirty pages, so the store refuses every later write and
//! waiters get the error.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::meta;
use super::meta::Hint;
use super::meta::HintFile;
use super::Shared;
use crate::types::LogId;

/// What the sync thread has made durable, published to [`super::LogStore::sync`] waiters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SyncProgress {
    /// Every byte appended before this count is on disk.
    pub bytes: u64,
    /// An fsync failed: nothing appended after the failure will ever be synced.
    pub failed: bool,
}

/// One round of work, taken under the lock and done without it.
struct Job {
    target: u64,
    /// The active segment (path, file, first index, length) if it has unsynced bytes.
    segment: Option<(PathBuf, Arc<File>, u64, u64)>,
    dir: bool,
    committed: Option<LogId>,
    /// [`super::State::truncations`] when the job was taken.
    truncations: u64,
}

/// Runs until the store is dropped (after finishing pending work) or an fsync fails.
pub(super) fn run(shared: Arc<Shared>, hint_file: HintFile, mut hint: Option<Hint>) {
    // Truncations already reflected in `hint`: a truncation invalidates its synced position
    // (the bytes past the cut are rewritten, unsynced), so it triggers a round.
    let mut seen_truncations = 0;
    loop {
        let job = {
            let mut st = shared.lock();
            // When the pending work was first seen (the group commit window starts there).
            let mut dirty_since: Option<Instant> = None;
            loop {
                if st.failed.is_some() {
                    return;
                }
                let paused = st.sync_paused();
                let pending = st.appended > st.synced
                    || st.dir_dirty
                    || st.committed_dirty
                    || st.truncations != seen_truncations;
                if pending && (!paused || st.stop) {
                    if st.urgent || st.stop {
                        break;
                    }
                    let since = *dirty_since.get_or_insert_with(Instant::now);
                    let left = shared.opts.sync_delay.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        break;
                    }
                    // Not idle: appends do not wake us, `sync()` callers and stop do.
                    st = shared
                        .wake
                        .wait_timeout(st, left)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                    continue;
                }
                if st.stop && !pending {
                    return;
                }
                st.sync_idle = true;
                st = shared
                    .wake
                    .wait(st)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                st.sync_idle = false;
            }
            // Everything a `sync()` caller waits for so far is in this round's target.
            st.urgent = false;
            Job {
                target: st.appended,
                segment: (st.appended > st.synced)
                    .then(|| st.active_segment())
                    .flatten(),
                dir: std::mem::take(&mut st.dir_dirty),
                committed: {
                    st.committed_dirty = false;
                    st.committed
                },
                truncations: st.truncations,
            }
        };

        let mut res = Ok(());
        if let Some((path, file, ..)) = &job.segment {
            res = file.sync_data().map_err(|e| (path.clone(), e));
        }
        if res.is_ok() && job.dir {
            res = File::open(&shared.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| (shared.dir.clone(), e));
        }
        let truncated_meanwhile = {
            let mut st = shared.lock();
            match res {
                Ok(()) => {
                    st.synced = st.synced.max(job.target);
                    st.syncs += 1;
                    shared.progress.send_replace(SyncProgress {
                        bytes: st.synced,
                        failed: false,
                    });
                }
                Err((path, e)) => {
                    tracing::error!(path = %path.display(), error = %e,
                        "fsync of the raft log failed; the log store refuses further writes");
                    st.failed = Some((path, Arc::new(e)));
                    shared.progress.send_replace(SyncProgress {
                        bytes: st.synced,
                        failed: true,
                    });
                    return;
                }
            }
            st.truncations != job.truncations
        };
        // After the fsync: the hint never points past what is on disk.
        let synced = match job.segment {
            _ if truncated_meanwhile => None,
            Some((_, _, first, len)) => Some((first, len)),
            None if job.truncations == seen_truncations => hint.and_then(|h| h.synced),
            None => None,
        };
        seen_truncations = job.truncations;
        let next = Hint {
            committed: job.committed,
            synced,
        };
        if hint != Some(next) {
            match hint_file.write("log hint", &next) {
                Ok(()) => hint = Some(next),
                Err(e) => {
                    tracing::warn!(error = %e, file = meta::COMMITTED, "cannot update the log hint")
                }
            }
        }
    }
}
