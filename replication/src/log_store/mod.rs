//! The durable raft log: append-only segment files in `log/` next to the snapshots.
//!
//! ```text
//!  openraft --append(batch)--> encode --> write(2) to the active segment --> callback (at once)
//!                                              | notify (only if the sync thread is idle)
//!                                              v
//!                 sync thread: waits <= 2 ms for more, fdatasync(active segment) (group commit)
//!                              --> sync_log() waiters, hint (committed, synced position)
//!           --save_vote------> vote.tmp, fsync, rename, fsync dir (before returning)
//!           --truncate-------> unlink later segments, fsync dir, ftruncate + fsync
//!           --purge----------> purged marker (durable) first, then unlink whole segments
//!  readers  --try_get--------> cache of the newest entries, else pread + crc check + decode
//! ```
//!
//! Files: `NNNNNNNNNNNNNNNNNNNN.seg` (named after their first index; format in `segment.rs`),
//! `vote`, `purged`, `committed` (format in `meta.rs`). A new segment is started once the
//! active one passes [`SEGMENT_BYTES`]. The store keeps the position of every entry in memory
//! and a bounded cache of the newest entries (those the state machine and lagging followers
//! read next).
//!
//! # Durability policy (a deliberate choice)
//!
//! `append` writes the batch with write(2) into the page cache and tells openraft the entries
//! are flushed right away; it does not wait for an fsync. A dedicated thread fsyncs the active
//! segment at most [`SYNC_DELAY`] after it sees unsynced bytes (group commit), so:
//!
//! - a crash of the *process* (panic, `kill -9`, OOM) loses nothing acknowledged: the kernel
//!   holds the written pages;
//! - a crash of the *machine* (power loss, kernel panic) may lose the entries appended during
//!   the last few milliseconds (the sync delay plus an fsync or two). In a replicated group
//!   the other replicas still hold them; a single-replica group loses those last operations
//!   although they were acknowledged. Callers that promise durability to their own clients (a client's `fsync`)
//!   call [`LogStore::sync`] (through `Replica::sync_log`), which waits until everything
//!   appended so far is on disk.
//!
//! What is always synchronous: the vote (a replica must never vote twice in a term), the purge
//! marker (written before any segment is removed) and truncation (a later append must never
//! land next to the entries it replaced). After each fsync the sync thread overwrites a small
//! hint file in place (not fsynced): openraft's committed log id, which lets a restarted
//! replica re-apply committed entries without a leader (clamped to the log on open), and the
//! position up to which the active segment is known to be on disk.
//!
//! # Crash recovery
//!
//! On open every segment is read and every record's crc32c checked. In the last segment, a
//! bad record is a torn write, cut off with a warning, when no valid record follows it (a
//! crash in the middle of a write) or when it lies past the synced position of the hint (a
//! power loss may keep later pages of an unsynced region and lose earlier ones). Any other
//! damage (a bad record in an older segment or in the synced part, a gap between segments)
//! is an error: the replica refuses to start rather than serve a log with a hole in it.
//!
//! Writes are small and go to the page cache, so they run inline on the async task (as does
//! the fsync of a full segment when the next one starts: about a millisecond per 64 MiB);
//! the rare slow operations (vote, truncate, purge, reads that miss the cache) run on the
//! blocking pool.

#[cfg(test)]
mod crash_tests;
mod meta;
mod ops;
mod recover;
pub(crate) mod segment;
mod sync;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt::Debug;
use std::fs::File;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;

use openraft::storage::LogFlushed;
use openraft::storage::RaftLogStorage;
use openraft::CommittedLeaderId;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogState;
use openraft::RaftLogReader;
use openraft::StorageIOError;

use self::sync::SyncProgress;
use crate::types::LogId;
use crate::types::RaftEntry;
use crate::types::StorageError;
use crate::types::Vote;
use crate::TypeConfig;

/// Name of the log directory inside the replica directory.
pub const LOG_DIR: &str = "log";
/// The file of the log store of earlier builds (redb); its presence is refused.
const LEGACY_FILE: &str = "raft-log.redb";
/// A new segment is started once the active one is at least this long.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Group commit window: the sync thread waits this long after it sees the first unsynced
/// append before it fsyncs, unless a `sync()` caller waits (see `sync.rs`).
pub const SYNC_DELAY: std::time::Duration = std::time::Duration::from_millis(2);

/// Tunables of the store (the defaults suit production; tests shrink them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    pub segment_bytes: u64,
    pub cache_entries: usize,
    pub cache_bytes: usize,
    /// How long the sync thread lets appends accumulate before an fsync (see `sync.rs`).
    pub sync_delay: std::time::Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            segment_bytes: SEGMENT_BYTES,
            cache_entries: 8192,
            cache_bytes: 32 << 20,
            sync_delay: SYNC_DELAY,
        }
    }
}

/// Errors of the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// The operation (`read`, `fsync`, ...).
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds something that is not a valid record where one must be.
    #[error("corrupt log store file {path} at offset {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where in the file.
        offset: u64,
        /// Why it is considered corrupt.
        reason: String,
    },
    /// A segment was written by a build with another on-disk format.
    #[error("log segment {path} has format version {found}; this build reads {expected}")]
    Format {
        /// The segment.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The version this build reads.
        expected: u32,
    },
    /// The replica directory holds the redb log of an earlier build.
    #[error("{path} is a raft log of an earlier rawfs build (redb), which this build cannot read")]
    Legacy {
        /// The old log file.
        path: PathBuf,
    },
    /// A record could not be serialized.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// The kind of record.
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },
    /// Appended entries do not directly follow the log.
    #[error("entry {got} does not follow the log (the next index is {expected})")]
    OutOfOrder {
        /// The index the next entry must have.
        expected: u64,
        /// The index it has.
        got: u64,
    },
    /// An fsync of the log failed earlier: the store refuses writes from then on.
    #[error("fsync of {path} failed, the raft log refuses further writes: {source}")]
    SyncFailed {
        /// The file that failed to sync.
        path: PathBuf,
        /// The fsync error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The sync thread is gone (the store is being dropped).
    #[error("the raft log store is closed")]
    Closed,
    /// A blocking task of the store panicked or was cancelled.
    #[error("log store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl LogStoreError {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LogStoreError {
        let path = path.to_path_buf();
        move |source| LogStoreError::Io { op, path, source }
    }

    fn into_storage(self, subject: ErrorSubject<u64>, verb: ErrorVerb) -> StorageError {
        tracing::error!(error = %self, ?verb, "raft log store");
        StorageIOError::new(subject, verb, &self).into()
    }
}

/// The log id of the entry `index` written in `term` (with `single-term-leader` the leader id
/// of a log id is its term alone).
fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

/// One segment file.
struct Seg {
    path: PathBuf,
    file: Arc<File>,
    /// Bytes of valid data (header and records); appends go here.
    len: u64,
    /// The index the next record of this segment must have.
    next: u64,
}

/// Where an entry is on disk.
#[derive(Debug, Clone, Copy)]
struct Loc {
    /// First index of its segment (the key in [`State::segments`]).
    seg: u64,
    offset: u64,
    len: u32,
    term: u64,
}

/// Everything the store knows, behind one mutex (held for memory work and write(2) only).
struct State {
    segments: BTreeMap<u64, Seg>,
    /// Index of `locs[0]`.
    first: u64,
    /// Position of every present (not purged) entry, in index order.
    locs: VecDeque<Loc>,
    /// The newest entries (a suffix of the log) with their encoded sizes.
    cache: VecDeque<(RaftEntry, usize)>,
    cache_bytes: usize,
    purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    /// Bytes written by appends since open; the sync thread chases it.
    appended: u64,
    /// `appended` as of the start of the last successful fsync.
    synced: u64,
    /// Completed sync rounds (for tests and logs).
    syncs: u64,
    /// A segment was created or removed since the last directory fsync.
    dir_dirty: bool,
    committed_dirty: bool,
    /// Truncations since open (the sync thread drops its synced position on each).
    truncations: u64,
    failed: Option<(PathBuf, Arc<std::io::Error>)>,
    stop: bool,
    /// The sync thread waits for work with nothing pending: the next change must wake it.
    sync_idle: bool,
    /// A `sync()` caller waits: the sync thread must not delay its next round.
    urgent: bool,
    #[cfg(test)]
    paused: bool,
}

impl State {
    fn last_index(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64 - 1)
    }

    fn last_log_id(&self) -> Option<LogId> {
        let last = self.locs.back()?;
        Some(log_id(last.term, self.first + self.locs.len() as u64 - 1))
    }

    /// The active segment: path, file, first index and length.
    fn active_segment(&self) -> Option<(PathBuf, Arc<File>, u64, u64)> {
        let (first, s) = self.segments.last_key_value()?;
        Some((s.path.clone(), s.file.clone(), *first, s.len))
    }

    fn check_failed(&self) -> Result<(), LogStoreError> {
        match &self.failed {
            None => Ok(()),
            Some((path, source)) => Err(LogStoreError::SyncFailed {
                path: path.clone(),
                source: source.clone(),
            }),
        }
    }

    #[cfg(test)]
    fn sync_paused(&self) -> bool {
        self.paused
    }

    #[cfg(not(test))]
    fn sync_paused(&self) -> bool {
        false
    }

    /// Drops the cached entries from `index` on.
    fn uncache_from(&mut self, index: u64) {
        while let Some(&(ref e, n)) = self.cache.back() {
            if e.log_id.index < index {
                break;
            }
            self.cache_bytes -= n;
            self.cache.pop_back();
        }
    }

    /// Removes, from the map and the disk, every segment whose entries are all purged. Only
    /// after the purge marker is durable: a removal lost in a crash is redone on open.
    fn remove_purged_segments(&mut self, purged: u64) -> Result<(), LogStoreError> {
        let doomed: Vec<u64> = self
            .segments
            .iter()
            .filter(|(_, s)| s.next <= purged.saturating_add(1))
            .map(|(k, _)| *k)
            .collect();
        for k in doomed {
            if let Some(s) = self.segments.remove(&k) {
                tracing::debug!(path = %s.path.display(), "removing a purged log segment");
                std::fs::remove_file(&s.path).map_err(LogStoreError::io("remove", &s.path))?;
                self.dir_dirty = true;
            }
        }
        Ok(())
    }
}

struct Shared {
    dir: PathBuf,
    opts: Options,
    state: Mutex<State>,
    /// Wakes the sync thread.
    wake: Condvar,
    progress: tokio::sync::watch::Sender<SyncProgress>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is updated so that a panic cannot leave it half-changed in a way that
        // matters more than the panic itself; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Releases `st` after a change the sync thread must handle, waking the thread only if
    /// it is idle: while it is busy or in its group commit window it looks again by itself.
    fn poke(&self, mut st: MutexGuard<'_, State>) {
        let idle = std::mem::take(&mut st.sync_idle);
        drop(st);
        if idle {
            self.wake.notify_one();
        }
    }
}

/// Stops (and waits for) the sync thread when the last handle is dropped.
struct Owner {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        let thread = self
            .thread
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Joining costs at most the fsync in flight and leaves everything synced.
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the raft log sync thread panicked");
            }
        }
    }
}

/// The raft log of one replica. Cloning shares the store.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl LogStore {
    /// Opens (or creates) the log directory `dir` (normally `<replica dir>/`[`LOG_DIR`]),
    /// verifies every segment and starts the sync thread. Blocking: call it from a blocking
    /// context or at start-up.
    pub fn open(dir: &Path) -> Result<LogStore, LogStoreError> {
        LogStore::open_with(dir, Options::default())
    }

    pub(crate) fn open_with(dir: &Path, opts: Options) -> Result<LogStore, LogStoreError> {
        if let Some(parent) = dir.parent() {
            let legacy = parent.join(LEGACY_FILE);
            if legacy.exists() {
                return Err(LogStoreError::Legacy { path: legacy });
            }
        }
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(LogStoreError::io("create", dir))?;
            if let Some(parent) = dir.parent() {
                meta::sync_dir(parent)?;
            }
        }
        let mut state = recover::recover(dir)?;
        // Read before recovery rewrites anything; the sync thread starts from it.
        let old_hint: Option<meta::Hint> = meta::HintFile::read(dir, meta::COMMITTED);
        let hint = meta::HintFile::open(dir, meta::COMMITTED)?;
        state.dir_dirty = true;
        let (progress, _) = tokio::sync::watch::channel(SyncProgress::default());
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts,
            state: Mutex::new(state),
            wake: Condvar::new(),
            progress,
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("raft-log-sync".to_string())
                .spawn(move || sync::run(shared, hint, old_hint))
                .map_err(LogStoreError::io("spawn the sync thread for", dir))?
        };
        Ok(LogStore {
            _owner: Arc::new(Owner {
                shared: shared.clone(),
                thread: Mutex::new(Some(thread)),
            }),
            shared,
        })
    }

    /// The id of the last entry in the log (or of the last purged one if the log is empty):
    /// what a vote request compares, for the pre-vote round of the election timer.
    pub(crate) fn last_log_id(&self) -> Option<LogId> {
        let st = self.shared.lock();
        st.last_log_id().or(st.purged)
    }

    /// Waits until every entry appended before the call is on disk (fsynced): the barrier for
    /// callers that promise durability against power loss.
    pub async fn sync(&self) -> Result<(), LogStoreError> {
        let mut rx = self.shared.progress.subscribe();
        let target = {
            let mut st = self.shared.lock();
            st.check_failed()?;
            st.urgent = true;
            st.appended
        };
        self.shared.wake.notify_one();
        let p = *rx
            .wait_for(|p| p.bytes >= target || p.failed)
            .await
            .map_err(|_| LogStoreError::Closed)?;
        if p.failed {
            self.shared.lock().check_failed()?;
        }
        Ok(())
    }

    /// Runs `f` on tokio's blocking pool with the shared state.
    async fn blocking<T, F>(&self, f: F) -> Result<T, LogStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, LogStoreError> + Send + 'static,
    {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared)).await?
    }

    /// Writes a batch of consecutive entries to the active segment (page cache only).
    ///
    /// openraft appends right after the last entry (after truncating any conflict). Anything
    /// else is handled the way a key-value log would (openraft's conformance suite relies on
    /// it): entries at or below the purge point are dropped (a snapshot covers them), and a
    /// batch starting inside the log replaces the entries from its start on.
    pub(crate) fn append_batch(&self, mut entries: Vec<RaftEntry>) -> Result<(), LogStoreError> {
        let (purged, last) = {
            let st = self.shared.lock();
            (st.purged, st.last_index())
        };
        if let Some(p) = purged {
            entries.retain(|e| e.log_id.index > p.index);
        }
        let Some(head) = entries.first() else {
            return Ok(());
        };
        let start = head.log_id.index;
        if last.is_some_and(|l| start <= l) {
            tracing::warn!(start, ?last, "append overlaps the log; replacing its end");
            ops::truncate(&self.shared, start)?;
        }
        let mut buf = Vec::new();
        let mut lens = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            let expected = start + i as u64;
            if e.log_id.index != expected {
                return Err(LogStoreError::OutOfOrder {
                    expected,
                    got: e.log_id.index,
                });
            }
            lens.push(segment::encode_record(
                &mut buf,
                e.log_id.index,
                e.log_id.leader_id.term,
                e,
            )?);
        }

        let shared = &self.shared;
        let mut st = shared.lock();
        st.check_failed()?;
        match (st.last_index(), st.purged) {
            (Some(last), _) if start != last + 1 => {
                return Err(LogStoreError::OutOfOrder {
                    expected: last + 1,
                    got: start,
                })
            }
            (None, Some(p)) if start != p.index + 1 => {
                return Err(LogStoreError::OutOfOrder {
                    expected: p.index + 1,
                    got: start,
                })
            }
            _ => {}
        }
        let roll = match st.segments.last_key_value() {
            None => true,
            Some((_, s)) => s.len >= shared.opts.segment_bytes || s.next != start,
        };
        if roll {
            ops::roll_segment(&shared.dir, &mut st, start)?;
        }
        let Some((&seg_first, seg)) = st.segments.last_key_value() else {
            return Err(LogStoreError::Closed);
        };
        seg.file
            .write_all_at(&buf, seg.len)
            .map_err(LogStoreError::io("write", &seg.path))?;
        let mut offset = seg.len;
        if st.locs.is_empty() {
            st.first = start;
        }
        for (e, len) in entries.iter().zip(&lens) {
            st.locs.push_back(Loc {
                seg: seg_first,
                offset,
                len: *len,
                term: e.log_id.leader_id.term,
            });
            offset += u64::from(*len);
        }
        let next = start + entries.len() as u64;
        if let Some(seg) = st.segments.get_mut(&seg_first) {
            seg.len = offset;
            seg.next = next;
        }
        for (e, len) in entries.into_iter().zip(lens) {
            st.cache_bytes += len as usize;
            st.cache.push_back((e, len as usize));
        }
        while st.cache.len() > shared.opts.cache_entries
            || (st.cache_bytes > shared.opts.cache_bytes && st.cache.len() > 1)
        {
            if let Some((_, n)) = st.cache.pop_front() {
                st.cache_bytes -= n;
            }
        }
        st.appended += buf.len() as u64;
        shared.poke(st);
        Ok(())
    }

    /// Reads the present entries in `[start, end)`.
    async fn read_range(&self, start: u64, end: u64) -> Result<Vec<RaftEntry>, LogStoreError> {
        let (disk, cached) = {
            let st = self.shared.lock();
            let lo = start.max(st.first);
            let hi = end.min(st.first + st.locs.len() as u64);
            if lo >= hi {
                return Ok(Vec::new());
            }
            let cache_start = st.first + (st.locs.len() - st.cache.len()) as u64;
            let mut disk = Vec::new();
            for i in lo..hi.min(cache_start) {
                let loc = st.locs[(i - st.first) as usize];
                let Some(seg) = st.segments.get(&loc.seg) else {
                    return Err(LogStoreError::Closed);
                };
                disk.push((i, loc, seg.path.clone(), seg.file.clone()));
            }
            let cached: Vec<RaftEntry> = (lo.max(cache_start)..hi)
                .map(|i| st.cache[(i - cache_start) as usize].0.clone())
                .collect();
            (disk, cached)
        };
        if disk.is_empty() {
            return Ok(cached);
        }
        let mut out = tokio::task::spawn_blocking(move || ops::read_locs(&disk)).await??;
        out.extend(cached);
        Ok(out)
    }

    #[cfg(test)]
    fn set_sync_paused(&self, paused: bool) {
        self.shared.lock().paused = paused;
        self.shared.wake.notify_all();
    }

    #[cfg(test)]
    fn syncs(&self) -> u64 {
        self.shared.lock().syncs
    }
}

fn bounds<RB: RangeBounds<u64>>(range: &RB) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        let (start, end) = bounds(&range);
        self.read_range(start, end)
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let st = self.shared.lock();
        Ok(LogState {
            last_purged_log_id: st.purged,
            last_log_id: st.last_log_id().or(st.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.blocking(move |sh| {
            meta::write_durable(&sh.dir, meta::VOTE, "vote", &vote)?;
            sh.lock().vote = Some(vote);
            Ok(())
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.shared.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint written by the sync thread after its next fsync (see the module docs).
        let mut st = self.shared.lock();
        st.committed = committed;
        st.committed_dirty = true;
        self.shared.poke(st);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.shared.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        // The write goes to the page cache: a few microseconds, less than a hop to the
        // blocking pool. Flushed as far as a process crash is concerned (see the module docs).
        match self.append_batch(entries.into_iter().collect()) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e.into_storage(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating the raft log from here on");
        self.blocking(move |sh| ops::truncate(sh, log_id.index))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging the raft log up to here");
        self.blocking(move |sh| ops::purge(sh, log_id))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}
