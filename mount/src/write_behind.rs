//! Write-behind of new small files in held directories: `close` returns once the data is
//! handed to a background flush, and the next commit of the directory places the first
//! chunks of every file waiting so, in its one log entry.
//!
//! ```text
//!  close(f) ─► FLUSH: f fresh in held dir D, ≤ 1 MiB, a slot free ─► task: flush_file(f) ─► reply
//!  commit of D's queue (timer; a task still unplaced after PLACE_WAIT) ─►
//!      commit_held_allocating(D, ops, [every waiting fresh file]) ─► each FileIo learns
//!      its chunk; `placed` remembers them
//!  task of f ─► settle_to_write finds f placed ─► data to 3 replicas ─► HeldOp::Wrote queued
//! ```
//!
//! Unpacking a tree (`tar x`, `cp -r`, `rsync`) used to wait at each close for a log entry
//! (the create with the file's chunk) and the replicas' answers; now those overlap with the
//! next files, and one log entry places the chunks of many files.
//!
//! Why a close may return first: nobody but this mount can see a file created in a held
//! directory until its queue is committed, and the queue goes to the leader for others
//! only when the directory is given back, which first waits for these flushes
//! (`give_back`). So another client's open after this close still finds the data. Until
//! then the file is like its queued create: `fsync` makes it durable (it waits for the
//! flush, and returns its error); a mount killed before that loses it.
//!
//! Errors: a failed flush is logged, and the file's next `close`, `fsync` or `write` here
//! returns the error. After a failure, and after any write of this mount that found the
//! cluster full, no close is written behind for [`PAUSE_AFTER_FAILURE`], so that a full or
//! unreachable cluster reaches the next files' `close` calls at once. Every operation that
//! orders itself after the data (truncate, fallocate, copy) waits for the file's flush
//! first; times set meanwhile (`rsync` sets them by path after close) are queued with the
//! data's commit instead (`times_also_after`, `held_wrote`). Until that commit the leader
//! has the file's create size: nothing here learns the size from it meanwhile, and a
//! closed file's answers take the size its close left in the kept attributes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::Errno;
use futures::future::{BoxFuture, FutureExt, Shared};
use rawfs_client::{ClientError, FileIo};
use rawfs_metadata_api::{Attr, Ino, SetAttr, CHUNK_SIZE};
use tokio::sync::{Notify, Semaphore};
use tracing::warn;

use crate::inner::{lock, Inner};

/// Files written behind at once; a close past it flushes before it returns.
const SLOTS: usize = 64;
/// Largest file written behind (so at most `SLOTS` MiB wait in memory).
const MAX_BYTES: u64 = 1 << 20;
/// After a failed flush, closes flush before they return for this long.
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// Errors kept for files not opened again; past it the oldest are only in the log.
const ERRORS_MAX: usize = 4096;
/// Nothing is written behind while the cluster has less free space than this per copy, so
/// that a full cluster's ENOSPC reaches `close` (the figure is at most this old).
const MIN_FREE_PER_COPY: u64 = 1 << 30;
const SPACE_EVERY: Duration = Duration::from_secs(1);
/// How long a flush behind waits for the directory's scheduled commit to place its chunk
/// (a little over the commit interval) before it commits for itself.
const PLACE_WAIT: Duration = Duration::from_millis(15);

const _: () = assert!(
    MAX_BYTES <= CHUNK_SIZE,
    "a file written behind fits one chunk"
);

/// A flush in the background.
struct Pending {
    /// The held directory the file was created in.
    dir: Ino,
    /// Times set while the data was buffered, set again after its commit.
    times: Option<SetAttr>,
    done: Shared<BoxFuture<'static, ()>>,
}

/// The mount's write-behind flushes (see the module docs).
pub(crate) struct WriteBehind {
    slots: Arc<Semaphore>,
    pending: Mutex<HashMap<Ino, Pending>>,
    /// `pending.len()`, read without the lock by every write on the FUSE thread.
    running: AtomicUsize,
    /// Files whose first chunk a commit placed while their flush waited: the directory and
    /// the file's attributes as committed (what `settle_to_write` would have returned).
    placed: Mutex<HashMap<Ino, (Ino, Attr)>>,
    /// Woken when a commit placed files, or someone waits for a flush behind (see
    /// `wait_for_placement`).
    placed_now: Notify,
    /// Counts the waits for flushes behind: a flush that sees it move stops waiting for a
    /// commit to place its chunk.
    hurried: AtomicU64,
    /// Errors of failed flushes, for the file's next close, fsync or write.
    failed: Mutex<HashMap<Ino, Errno>>,
    last_failure: Mutex<Option<Instant>>,
    /// The cluster had room at the last look (`MIN_FREE_PER_COPY`); none until it is known.
    room: AtomicBool,
    /// When free space was last asked for.
    space_asked: Mutex<Option<Instant>>,
}

impl Default for WriteBehind {
    fn default() -> Self {
        WriteBehind {
            slots: Arc::new(Semaphore::new(SLOTS)),
            pending: Mutex::default(),
            running: AtomicUsize::new(0),
            placed: Mutex::default(),
            placed_now: Notify::new(),
            hurried: AtomicU64::new(0),
            failed: Mutex::default(),
            last_failure: Mutex::default(),
            room: AtomicBool::new(false),
            space_asked: Mutex::default(),
        }
    }
}

impl WriteBehind {
    /// Whether `ino` is being written behind (a write must then wait for it to end).
    pub(crate) fn is_pending(&self, ino: Ino) -> bool {
        self.running.load(Ordering::Relaxed) > 0 && lock(&self.pending).contains_key(&ino)
    }

    /// The times to set again after the commit of `ino`'s data written behind (until
    /// `take_times_after`).
    pub(crate) fn times_after(&self, ino: Ino) -> Option<SetAttr> {
        lock(&self.pending).get(&ino).and_then(|p| p.times.clone())
    }

    /// Whether a flush behind of `ino` has times to set again after it (no lock taken
    /// while nothing is written behind: every `getattr` asks).
    fn has_times_after(&self, ino: Ino) -> bool {
        self.running.load(Ordering::Relaxed) > 0
            && lock(&self.pending)
                .get(&ino)
                .is_some_and(|p| p.times.is_some())
    }

    /// Takes the times to set again after `ino`'s data, to queue them with its commit.
    /// Called under the held directory's lock, as [`WriteBehind::times_also_after`] is, so
    /// that a time set meanwhile is either taken here or queued after the commit.
    pub(crate) fn take_times_after(&self, ino: Ino) -> Option<SetAttr> {
        lock(&self.pending)
            .get_mut(&ino)
            .and_then(|p| p.times.take())
    }

    /// The held directory whose file `ino`'s data is being written behind.
    pub(crate) fn pending_dir(&self, ino: Ino) -> Option<Ino> {
        if self.running.load(Ordering::Relaxed) == 0 {
            return None;
        }
        lock(&self.pending).get(&ino).map(|p| p.dir)
    }

    /// Times of `set` queued in `dir` (under its lock) while `ino`'s data is written behind
    /// from there: set again after that data's commit, unless the commit is queued already.
    pub(crate) fn times_also_after(&self, ino: Ino, dir: Ino, set: &SetAttr) {
        if set.atime.is_none() && set.mtime.is_none() {
            return;
        }
        let mut pending = lock(&self.pending);
        let Some(p) = pending.get_mut(&ino).filter(|p| p.dir == dir) else {
            return;
        };
        let times = p.times.get_or_insert_with(SetAttr::default);
        if set.atime.is_some() {
            times.atime = set.atime;
        }
        if set.mtime.is_some() {
            times.mtime = set.mtime;
        }
    }

    /// A commit placed `ino`'s first chunk, for its next flush.
    pub(crate) fn set_placed(&self, ino: Ino, dir: Ino, attr: Attr) {
        lock(&self.placed).insert(ino, (dir, attr));
        self.placed_now.notify_waiters();
    }

    pub(crate) fn take_placed(&self, ino: Ino) -> Option<(Ino, Attr)> {
        lock(&self.placed).remove(&ino)
    }

    pub(crate) fn is_placed(&self, ino: Ino) -> bool {
        lock(&self.placed).contains_key(&ino)
    }

    /// Someone waits for flushes behind (an fsync, a give-back, a listing): those still
    /// waiting to be placed by a later commit go now.
    fn hurry(&self) {
        self.hurried.fetch_add(1, Ordering::Relaxed);
        self.placed_now.notify_waiters();
    }

    fn record_failure(&self, ino: Ino, e: Errno) {
        *lock(&self.last_failure) = Some(Instant::now());
        let mut failed = lock(&self.failed);
        if failed.len() >= ERRORS_MAX {
            failed.clear();
        }
        failed.insert(ino, e);
    }

    /// A data write of this mount found the cluster full: closes flush before they return
    /// for [`PAUSE_AFTER_FAILURE`], as after a failed write-behind. The free-space figure
    /// alone can be too old to see a cluster that just filled up (it lags by a heartbeat
    /// and a statfs), and a close that returned 0 must not lose its data to ENOSPC.
    fn saw_no_space(&self) {
        *lock(&self.last_failure) = Some(Instant::now());
    }

    fn paused(&self) -> bool {
        lock(&self.last_failure).is_some_and(|t| t.elapsed() < PAUSE_AFTER_FAILURE)
    }
}

impl Inner {
    /// Starts writing `io`'s buffer behind if `ino` may be (see the module docs), with
    /// `times` to set again after the data's commit; false if the caller must flush it.
    pub(crate) async fn write_behind(
        self: &Arc<Self>,
        ino: Ino,
        io: &Arc<FileIo>,
        times: Option<SetAttr>,
    ) -> bool {
        let wb = &self.write_behind;
        if io.size() == 0 || io.size() > MAX_BYTES || wb.paused() || !self.cluster_has_room().await
        {
            return false;
        }
        let Some(dir) = lock(&self.held.queued).get(&ino).copied() else {
            return false;
        };
        // Not in a directory about to be given back: its give-back waits for these.
        if self.fresh_in(dir, ino) != Some(false) {
            return false;
        }
        let Ok(slot) = wb.slots.clone().try_acquire_owned() else {
            return false;
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        {
            let mut pending = lock(&wb.pending);
            if pending.contains_key(&ino) {
                return false;
            }
            let done = rx.map(drop).boxed().shared();
            pending.insert(ino, Pending { dir, times, done });
            wb.running.fetch_add(1, Ordering::Relaxed);
        }
        let (me, io) = (self.clone(), io.clone());
        self.tasks.spawn(async move {
            me.wait_for_placement(dir, ino).await;
            let mut flushed = me.flush_file(ino, &io).await;
            lock(&me.write_behind.placed).remove(&ino);
            // Unless queued with the data's commit (`held_wrote`), after it: its mtime is now.
            if let (Ok(()), Some(times)) = (flushed, me.write_behind.times_after(ino)) {
                flushed = me.set_times_again(ino, &times).await;
            }
            let wb = &me.write_behind;
            if let Err(e) = flushed {
                warn!(ino, error = ?e, "writing a closed file behind failed; its next close or fsync reports it");
                wb.record_failure(ino, e);
            }
            lock(&wb.pending).remove(&ino);
            wb.running.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
            let _ = tx.send(());
        });
        true
    }

    /// Lets the directory's next scheduled commit place `ino`'s first chunk with those of
    /// the other files closed meanwhile, instead of a commit for this file alone: `cp -r`
    /// and `tar x` close a file every millisecond or so, and a commit placing one or two
    /// files at a time was most of their log entries. Gives up after [`PLACE_WAIT`] (the
    /// flush then commits for itself), once the file's create went without it, or once
    /// someone waits for a flush behind (the wait would be theirs).
    async fn wait_for_placement(&self, dir: Ino, ino: Ino) {
        let wb = &self.write_behind;
        let deadline = tokio::time::Instant::now() + PLACE_WAIT;
        let hurried = wb.hurried.load(Ordering::Relaxed);
        loop {
            // Made before the look, so that a placement between the two still wakes it.
            let placed = wb.placed_now.notified();
            if wb.is_placed(ino)
                || self.fresh_in(dir, ino).is_none()
                || wb.hurried.load(Ordering::Relaxed) != hurried
            {
                return;
            }
            if tokio::time::timeout_at(deadline, placed).await.is_err() {
                return;
            }
        }
    }

    /// The errno of a failed data call (see [`crate::errno::client`]); an ENOSPC pauses
    /// write-behind.
    pub(crate) fn data_errno(&self, e: ClientError) -> Errno {
        let errno = crate::errno::client(e);
        if errno == Errno::ENOSPC {
            self.write_behind.saw_no_space();
        }
        errno
    }

    /// Whether the cluster has room for writes behind, as last seen; looks again once that
    /// look is [`SPACE_EVERY`] old (this caller waits for it, the others meanwhile use the
    /// last answer).
    async fn cluster_has_room(&self) -> bool {
        let wb = &self.write_behind;
        let due = {
            let mut asked = lock(&wb.space_asked);
            let due = !asked.is_some_and(|t| t.elapsed() < SPACE_EVERY);
            if due {
                *asked = Some(Instant::now());
            }
            due
        };
        if due {
            let room = match self.client.meta().statfs().await {
                Ok(s) => s.free_bytes / u64::from(s.replicas.max(1)) >= MIN_FREE_PER_COPY,
                Err(_) => false,
            };
            wb.room.store(room, Ordering::Relaxed);
        }
        wb.room.load(Ordering::Relaxed)
    }

    /// Times set by `setattr` while `ino`'s data was buffered, set again after the data:
    /// queued in its held directory, else through the leader.
    async fn set_times_again(self: &Arc<Self>, ino: Ino, times: &SetAttr) -> Result<(), Errno> {
        if let Some(done) = self.held_setattr_queued(ino, times).await {
            return done.map(drop);
        }
        let meta = self.client.meta();
        meta.setattr(ino, times.clone())
            .await
            .map(drop)
            .map_err(crate::errno::meta)
    }

    /// Before `set`'s times (setattr of a file in a held directory): `io`'s buffer is
    /// written behind if it may be, and the times are set again after its commit;
    /// otherwise it is flushed first.
    pub(crate) async fn data_before_times(
        self: &Arc<Self>,
        ino: Ino,
        io: &Arc<FileIo>,
        set: &SetAttr,
    ) -> Result<(), Errno> {
        self.written(ino).await?;
        if !io.has_unwritten() {
            return Ok(());
        }
        let times = SetAttr {
            atime: set.atime,
            mtime: set.mtime,
            ..SetAttr::default()
        };
        if self.write_behind(ino, io, Some(times)).await {
            return Ok(());
        }
        self.flush_file(ino, io).await
    }

    /// Waits until nothing of `ino` is being written behind; the error of a failed flush
    /// (reported once).
    pub(crate) async fn written(&self, ino: Ino) -> Result<(), Errno> {
        if self.write_behind.is_pending(ino) {
            self.write_behind.hurry();
        }
        self.behind_done(ino).await;
        self.writing_behind(ino).map(drop)
    }

    /// Waits for a flush behind of `ino` that has times to set again after it (before an
    /// answer with its attributes, which the kernel keeps: in between, the leader has the
    /// data's commit with its own mtime).
    pub(crate) async fn times_settled(&self, ino: Ino) {
        if self.write_behind.has_times_after(ino) {
            self.behind_done(ino).await;
        }
    }

    /// Waits until nothing of `ino` is being written behind, leaving the error of a failed
    /// flush for the next caller that can report it (`release` cannot).
    pub(crate) async fn behind_done(&self, ino: Ino) {
        loop {
            let done = lock(&self.write_behind.pending)
                .get(&ino)
                .map(|p| p.done.clone());
            match done {
                Some(done) => done.await,
                None => return,
            }
        }
    }

    /// Whether `ino` is being written behind; if not, the error of a failed flush of it
    /// (reported once).
    pub(crate) fn writing_behind(&self, ino: Ino) -> Result<bool, Errno> {
        let wb = &self.write_behind;
        if lock(&wb.pending).contains_key(&ino) {
            return Ok(true);
        }
        match lock(&wb.failed).remove(&ino) {
            Some(e) => Err(e),
            None => Ok(false),
        }
    }

    /// Whether a flush behind of `ino` failed with an error not reported yet.
    pub(crate) fn write_behind_failed(&self, ino: Ino) -> bool {
        lock(&self.write_behind.failed).contains_key(&ino)
    }

    /// Waits for every file of `dir` being written behind (before `dir` is given back).
    pub(crate) async fn written_in(&self, dir: Ino) {
        while self.written_in_now(dir).await {}
    }

    /// Waits for the files of `dir` being written behind now (not for those that start
    /// meanwhile); returns whether there were any.
    pub(crate) async fn written_in_now(&self, dir: Ino) -> bool {
        let waits: Vec<_> = lock(&self.write_behind.pending)
            .values()
            .filter(|p| p.dir == dir)
            .map(|p| p.done.clone())
            .collect();
        let any = !waits.is_empty();
        if any {
            self.write_behind.hurry();
        }
        futures::future::join_all(waits).await;
        any
    }
}
