//! The sync thread: group commit of the active segment.
//!
//! ```text
//!  append: write(2) --> appended += n --notify-->  sync thread: target = appended
//!                                                   fdatasync(active segment) [+ fsync(dir)]
//!  sync_log waiters <--watch(synced = target)----   then the hint (committed, synced
//!                                                   position; pwrite, not fsynced)
//! ```
//!
//! While there are unsynced bytes the thread fsyncs back to back, so an append waits at most
//! about two fsyncs to be on disk, and one fsync covers every append that arrived during the
//! previous one. An fsync error is final: after it the kernel may have dropped the dirty
//! pages, so the store refuses every later write and waiters get the error.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

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
                    break;
                }
                if st.stop && !pending {
                    return;
                }
                st = shared
                    .wake
                    .wait(st)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
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
