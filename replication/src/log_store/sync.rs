//! The sync thread: group commit of the active segment.
//!
//! ```text
//!  append: write(2) --> appended += n --notify-->  sync thread: target = appended
//!                                                   fdatasync(active segment) [+ fsync(dir)]
//!  sync_log waiters <--watch(synced = target)----   then the committed hint (pwrite)
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
    segment: Option<(PathBuf, Arc<File>)>,
    dir: bool,
    committed: Option<Option<LogId>>,
}

/// Runs until the store is dropped (after finishing pending work) or an fsync fails.
pub(super) fn run(shared: Arc<Shared>, hint: HintFile) {
    loop {
        let job = {
            let mut st = shared.lock();
            loop {
                if st.failed.is_some() {
                    return;
                }
                let paused = st.sync_paused();
                let pending = st.appended > st.synced || st.dir_dirty || st.committed_dirty;
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
                    .then(|| st.active_file())
                    .flatten(),
                dir: std::mem::take(&mut st.dir_dirty),
                committed: std::mem::take(&mut st.committed_dirty).then_some(st.committed),
            }
        };

        let mut res = Ok(());
        if let Some((path, file)) = &job.segment {
            res = file.sync_data().map_err(|e| (path.clone(), e));
        }
        if res.is_ok() && job.dir {
            res = File::open(&shared.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| (shared.dir.clone(), e));
        }
        {
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
        }
        // After the fsync: the hint never points past entries that are on disk.
        if let Some(committed) = job.committed {
            if let Err(e) = hint.write("committed log id", &committed) {
                tracing::warn!(error = %e, file = meta::COMMITTED, "cannot update the committed hint");
            }
        }
    }
}
