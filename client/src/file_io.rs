//! [`FileIo`]: buffered, replicated I/O on one open file.
//!
//! Locking: `bufs` (a std mutex, never held across an await) guards the write buffer and the
//! extent being flushed; `flush` (an async mutex) serializes flushes, fsyncs, punches and
//! tail truncations, and holds the chunks written since the last fsync. Reads take neither
//! for the duration of their I/O: they snapshot the buffered bytes they overlap, read the
//! replicas, and lay the snapshot over the result, so parallel reads never queue on a lock.

use crate::budget::WriteBudget;
use crate::error::ClientError;
use crate::extent::{range_end, split_by_chunk, Batch, Extent, WriteBuf};
use crate::locations::Locations;
use crate::read_path::{
    concat, read_piece, window_range, Fetch, Frames, Plan, ReadAhead, Suspects, AHEAD, WINDOW,
};
use crate::seek::Scan;
use crate::store::Store;
use crate::unsynced::Unsynced;
use crate::write_path::{sync_chunks, write_extents, zero_piece, Dirty, FRAME, FRAMES_IN_FLIGHT};
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use futures::{FutureExt, StreamExt, TryStreamExt};
use rawfs_metadata_api::{Attr, ChunkLoc, Ino, CHUNK_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The write buffer and the extent being flushed (kept until it is safely stored, so that a
/// failed flush can be retried and reads still see it).
struct Bufs {
    buffer: WriteBuf,
    pending: Option<Batch>,
    /// Bytes of `pending` (summed once per change of it, not per write).
    pending_bytes: u64,
    /// Bytes of `buffer` and `pending` as last counted in `budget`.
    charged: u64,
    budget: Arc<WriteBudget>,
}

impl Bufs {
    /// Brings this file's share of the client's write budget up to date; called after every
    /// change of `buffer` (after a change of `pending`: [`Bufs::pending_changed`]).
    fn recount(&mut self) {
        let now = self.buffer.bytes() + self.pending_bytes;
        self.budget.moved(self.charged, now);
        self.charged = now;
    }

    fn pending_changed(&mut self) {
        self.pending_bytes = self.pending.as_ref().map_or(0, Batch::bytes);
        self.recount();
    }
}

impl Drop for Bufs {
    fn drop(&mut self) {
        self.budget.moved(self.charged, 0);
    }
}

struct Inner {
    ino: Ino,
    store: Arc<dyn Store>,
    /// File size including buffered writes.
    size: AtomicU64,
    /// Size as the metadata service last reported it (for the stored-bytes estimate).
    committed: AtomicU64,
    /// Highest end of data this client may have stored: bytes of the last chunk past this
    /// are known to be zero, so a truncate only has to zero up to here.
    high_water: AtomicU64,
    /// Counts the sizes set and committed here ([`FileIo::set_size`], truncates,
    /// `commit_write`s), so that a size read from the metadata service before one is not
    /// taken after it (see [`FileIo::learn_size`]).
    size_changes: AtomicU64,
    /// Another client changed the file since this one last wrote it or set its size: a
    /// smaller size at the leader is then that client's truncate.
    foreign_change: AtomicBool,
    bufs: Mutex<Bufs>,
    flush: tokio::sync::Mutex<Vec<Dirty>>,
    /// Where the unsynced chunks go when this file's last `FileIo` is dropped.
    unsynced: Arc<Unsynced>,
    locs: Locations,
    suspects: Arc<Suspects>,
    ra: Mutex<ReadAhead>,
}

/// Buffered I/O on one file, shared by every handle of the inode in a mount (wrap it in an
/// `Arc`). Writes are collected in a buffer of up to `write_buffer` bytes (overlapping and
/// adjacent writes merge; up to 2048 separate ranges) and sent to all replicas by
/// [`FileIo::flush`], or in the background when the buffer fills; reads see the buffered
/// data. Dropping a `FileIo` with unflushed data loses that data: flush on release.
pub struct FileIo {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FileIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileIo")
            .field("ino", &self.inner.ino)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

/// What a write does with its data.
enum Step {
    /// Taken into the write buffer.
    Absorbed,
    /// Bigger than the buffer: became the pending extent, to be flushed at once.
    HandedOver,
    /// The full buffer became the pending extent, to be flushed in the background; the
    /// write went into the emptied buffer if `absorbed`.
    Background { absorbed: bool },
    /// The previous buffer is still being flushed (or its flush failed): wait for it.
    WaitPending,
}

/// What follows each write of [`Inner::flush_locked`].
enum AfterWrite<'a> {
    /// One `commit_write`.
    Commit,
    /// One `commit_write`, while every chunk written since the last fsync is made durable
    /// (for `fsync`).
    CommitWhileSyncing,
    /// Nothing: what `commit_write` would record is added here (if every copy went to
    /// replicas; otherwise committed as usual).
    Defer(&'a mut Option<Deferred>),
}

/// A write stored on its replicas whose `commit_write` is left to the caller
/// ([`FileIo::flush_deferred`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deferred {
    /// The file is at least this long.
    pub end: u64,
    /// More bytes stored (one replica).
    pub stored_delta: i64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state is updated in single steps, so a panic elsewhere cannot leave it
    // half-changed; keep going rather than poisoning every later call.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FileIo {
    #[cfg(test)]
    pub(crate) fn new(ino: Ino, size: u64, store: Arc<dyn Store>, write_buffer: usize) -> Self {
        Self::with_shared(
            ino,
            size,
            store,
            write_buffer,
            Arc::default(),
            Arc::default(),
            Arc::default(),
        )
    }

    /// A `FileIo` that shares the client's suspect replicas, write budget and the unsynced
    /// chunks of closed files (it takes those of `ino`).
    pub(crate) fn with_shared(
        ino: Ino,
        size: u64,
        store: Arc<dyn Store>,
        write_buffer: usize,
        suspects: Arc<Suspects>,
        budget: Arc<WriteBudget>,
        unsynced: Arc<Unsynced>,
    ) -> Self {
        FileIo {
            inner: Arc::new(Inner {
                ino,
                store,
                size: AtomicU64::new(size),
                committed: AtomicU64::new(size),
                high_water: AtomicU64::new(size),
                size_changes: AtomicU64::new(0),
                foreign_change: AtomicBool::new(false),
                bufs: Mutex::new(Bufs {
                    buffer: WriteBuf::with_spares(write_buffer, budget.spares()),
                    pending: None,
                    pending_bytes: 0,
                    charged: 0,
                    budget,
                }),
                flush: tokio::sync::Mutex::new(unsynced.take(ino)),
                unsynced,
                locs: Locations::new(ino),
                suspects,
                ra: Mutex::new(ReadAhead::default()),
            }),
        }
    }

    /// The inode this `FileIo` writes.
    pub fn ino(&self) -> Ino {
        self.inner.ino
    }

    /// Takes `loc`, a chunk of this file allocated on its behalf (with the commit of its
    /// create, say), so that the next flush writes there without asking for it.
    pub fn learn_location(&self, loc: &ChunkLoc) {
        self.inner.locs.update(loc);
    }

    /// Takes the locations of chunks `first..first + count` the metadata service gave with
    /// an open (`found`; a missing index is a hole), so that reads there ask for none.
    pub fn learn_chunks(&self, first: u64, count: u64, found: Vec<ChunkLoc>) {
        self.inner.locs.learn(first, count, found);
    }

    /// The file size, including buffered writes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// A token for [`FileIo::learn_size`]: take it before asking the metadata service for
    /// the size.
    pub fn size_changes(&self) -> u64 {
        self.inner.size_changes.load(Ordering::Acquire)
    }

    /// The leader reported `size` (asked after `changes` was taken from
    /// [`FileIo::size_changes`]). Ignored if a size was set or committed here since the
    /// token (the report may predate it). A larger size is what another client's writes
    /// reached: reads here then reach it too, and a truncate zeroes up to it. A smaller
    /// one is another client's truncate, taken only if another client changed the file
    /// since this one last wrote it and nothing written here is unsent (a write of this
    /// client not committed yet, as in a held directory, is not shrunk away).
    pub fn learn_size(&self, size: u64, changes: u64) {
        let inner = &self.inner;
        let grew = {
            let b = lock(&inner.bufs);
            if inner.size_changes.load(Ordering::Acquire) != changes {
                return;
            }
            let current = inner.size.load(Ordering::Acquire);
            if size < current {
                let unsent = b.pending.is_some() || b.buffer.bytes() > 0;
                if unsent || !inner.foreign_change.load(Ordering::Acquire) {
                    return;
                }
                inner.size.store(size, Ordering::Release);
                inner.committed.store(size, Ordering::Release);
                drop(b);
                lock(&inner.ra).clip(size);
                inner.locs.forget_from(size.div_ceil(CHUNK_SIZE));
                return;
            }
            inner.committed.fetch_max(size, Ordering::AcqRel);
            inner.high_water.fetch_max(size, Ordering::AcqRel);
            let old = inner.size.fetch_max(size, Ordering::AcqRel);
            (old < size).then_some(old)
        };
        if let Some(old) = grew {
            // A window fetched before may end at the old end of file, and chunks past it
            // may be cached as holes that the other client has written since.
            lock(&inner.ra).invalidate();
            inner.locs.forget_from(old / CHUNK_SIZE);
        }
    }

    /// Another client changed the file: data read ahead and where its chunks are (holes,
    /// chunks not written yet) are forgotten, so that the next read asks again.
    pub fn changed_elsewhere(&self) {
        self.inner.foreign_change.store(true, Ordering::Release);
        lock(&self.inner.ra).invalidate();
        self.inner.locs.forget_all();
    }

    /// Whether written bytes are not stored yet: buffered, or in a flush that is under way
    /// or failed. When false, a flush has nothing to do.
    pub fn has_unwritten(&self) -> bool {
        let b = lock(&self.inner.bufs);
        b.pending.is_some() || b.buffer.bytes() > 0
    }

    /// Sets the size after a truncate or extension done through `meta().setattr`: buffered
    /// bytes and cached read-ahead data past it are dropped, and so are cached locations of
    /// chunks wholly past it (the metadata service released them). Flush before the
    /// `setattr`, or buffered data past the new size may still be written. After a shrink,
    /// call [`FileIo::truncate_tail`] too.
    pub fn set_size(&self, size: u64) {
        self.inner.set_size(size);
    }

    /// Takes `data` at `offset` into the write buffer if it fits there now, without waiting
    /// for anything; returns false (and changes nothing) when [`FileIo::write`] is needed.
    /// Lets a caller on a thread that must not block (a FUSE reader) answer most small
    /// writes at once instead of handing each one to another thread.
    pub fn write_if_buffered(&self, offset: u64, data: &[u8]) -> bool {
        let Some(end) = range_end(offset, data.len() as u64) else {
            return false;
        };
        if data.is_empty() {
            return false;
        }
        {
            let mut b = lock(&self.inner.bufs);
            if b.budget.tight(b.buffer.bytes()) || !b.buffer.try_absorb(offset, data) {
                return false;
            }
            b.recount();
        }
        self.inner.grew(end);
        true
    }

    /// Writes `data` at `offset` (buffered). The data is stored on the replicas by a later
    /// flush; errors of that flush may surface here when the buffer has to make room.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let end = range_end(offset, data.len() as u64).ok_or(ClientError::TooLarge {
            offset,
            len: data.len() as u64,
        })?;
        if data.is_empty() {
            return Ok(());
        }
        let inner = &self.inner;
        loop {
            let step = {
                let mut b = lock(&inner.bufs);
                // Past the client's budget, a buffer of a fair share is full.
                let full = b.budget.tight(b.buffer.bytes());
                if !full && b.buffer.try_absorb(offset, data) {
                    b.recount();
                    Step::Absorbed
                } else if b.pending.is_some() {
                    Step::WaitPending
                } else if b.buffer.is_empty() {
                    // Bigger than the buffer: send it as it is (one copy, no merging).
                    b.pending = Some(Batch {
                        extents: vec![Extent {
                            start: offset,
                            data: Bytes::copy_from_slice(data),
                        }],
                    });
                    b.pending_changed();
                    Step::HandedOver
                } else {
                    // Double buffering: the full buffer is sent in the background while
                    // this write starts the next one.
                    b.pending = b.buffer.take();
                    let absorbed = b.buffer.try_absorb(offset, data);
                    b.pending_changed();
                    Step::Background { absorbed }
                }
            };
            match step {
                Step::Absorbed => {
                    inner.grew(end);
                    return Ok(());
                }
                Step::HandedOver => {
                    inner.grew(end);
                    inner.flush_pending().await?;
                    return Ok(());
                }
                Step::Background { absorbed } => {
                    inner.clone().flush_in_background().await?;
                    if absorbed {
                        inner.grew(end);
                        return Ok(());
                    }
                }
                Step::WaitPending => {
                    inner.flush_pending().await?;
                }
            }
        }
    }

    /// Sends buffered writes to the replicas and records them with `commit_write` (size and
    /// mtime). Returns the attributes from the last commit, or `None` if nothing was
    /// buffered. On error the data stays buffered and a later flush tries again.
    pub async fn flush(&self) -> Result<Option<Attr>, ClientError> {
        let mut dirty = self.inner.flush.lock().await;
        self.inner
            .flush_locked(&mut dirty, true, AfterWrite::Commit)
            .await
    }

    /// Like [`FileIo::flush`], but a write stored on replicas is not recorded with
    /// `commit_write`: what it would have recorded is returned, for the caller to commit
    /// itself (a mount queues it with the changes of the directory it holds). Writes that
    /// need their commit at once (appends to RS 4+2 shards, fenced by their length) are
    /// committed as usual. Until the caller's commit, the metadata service has the file
    /// shorter than it is: only for a file nobody else can see yet.
    pub async fn flush_deferred(&self) -> Result<Option<Deferred>, ClientError> {
        let mut dirty = self.inner.flush.lock().await;
        let mut deferred = None;
        self.inner
            .flush_locked(&mut dirty, true, AfterWrite::Defer(&mut deferred))
            .await?;
        Ok(deferred)
    }

    /// Flushes, then makes every chunk written since the last fsync durable: SYNC on each
    /// written replica in parallel; at least 2 replicas of each chunk (or all live ones if
    /// fewer are left) must confirm. Failed replicas are dropped from the chunk.
    pub async fn fsync(&self) -> Result<(), ClientError> {
        let inner = &self.inner;
        let mut dirty = inner.flush.lock().await;
        inner
            .flush_locked(&mut dirty, true, AfterWrite::CommitWhileSyncing)
            .await?;
        // Chunks written by earlier flushes when there was nothing left to write now.
        let todo = std::mem::take(&mut *dirty);
        if let Err((failed, e)) = sync_chunks(&*inner.store, &inner.locs, todo).await {
            for d in failed {
                merge_dirty(&mut dirty, d);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Reads up to `len` bytes at `offset`: clipped at [`FileIo::size`], holes read as zeros,
    /// buffered writes are visible. A read inside one read-ahead window or one frame is a
    /// slice of what was received, not a copy.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ClientError> {
        let inner = &self.inner;
        let size = self.size();
        if offset >= size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = size.min(offset + u64::from(len));
        // Snapshot what is buffered in the range (pending first: the buffer is newer).
        let (pending, buffered) = {
            let b = lock(&inner.bufs);
            if b.buffer.covers(offset, end) {
                let mut out = vec![0u8; (end - offset) as usize];
                b.buffer.overlay(offset, &mut out);
                return Ok(out.into());
            }
            let pending = b
                .pending
                .as_ref()
                .filter(|p| p.overlaps(offset, end))
                .cloned();
            (pending, b.buffer.snapshot(offset, end))
        };
        if pending.is_none() && buffered.is_none() {
            return inner.clone().read_stored(offset, end, size).await;
        }
        // Buffered bytes overlay what is stored: one owned copy to write them into.
        let mut out = match &pending {
            Some(p) if p.covers(offset, end) => vec![0u8; (end - offset) as usize],
            _ => inner.clone().read_stored(offset, end, size).await?.to_vec(),
        };
        for batch in pending.iter().chain(buffered.iter()) {
            batch.overlay(offset, &mut out);
        }
        Ok(out.into())
    }

    /// One step of a scan for data in `offset..end` (clipped to the size), after flushing
    /// buffered writes: see [`crate::seek`]. What the step does not list as data up to its
    /// `covered` offset reads as zeros.
    pub async fn data_ranges(&self, offset: u64, end: u64) -> Result<Scan, ClientError> {
        self.flush().await?;
        let inner = &self.inner;
        let end = end.min(self.size());
        crate::seek::scan(
            &*inner.store,
            &inner.locs,
            &inner.suspects,
            inner.ino,
            offset,
            end,
        )
        .await
    }

    /// Zeroes `offset..offset + len` without changing the size: chunks wholly inside are
    /// released, the partial chunks at the edges get a ZERO (their whole 4 KiB blocks are
    /// freed by the chunkservers and read as holes afterwards).
    pub async fn punch(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let end = range_end(offset, len).ok_or(ClientError::TooLarge { offset, len })?;
        let inner = &self.inner;
        let mut dirty = inner.flush.lock().await;
        inner
            .flush_locked(&mut dirty, true, AfterWrite::Commit)
            .await?;
        // Past the size every stored byte is already zero.
        let end = end.min(self.size());
        if offset >= end {
            return Ok(());
        }
        lock(&inner.ra).invalidate();
        let pieces = split_by_chunk(offset, end - offset);
        let whole: Vec<u64> = pieces
            .iter()
            .filter(|p| u64::from(p.len) == CHUNK_SIZE)
            .map(|p| p.index)
            .collect();
        if let (Some(&first), Some(&last)) = (whole.first(), whole.last()) {
            let count = last - first + 1;
            inner.store.release_chunks(inner.ino, first, count).await?;
            inner.locs.forget_range(first, count);
        }
        for p in pieces.iter().filter(|p| u64::from(p.len) < CHUNK_SIZE) {
            inner
                .zero(&mut dirty, p.index, p.off, p.off + p.len)
                .await?;
        }
        lock(&inner.ra).invalidate();
        Ok(())
    }

    /// After a shrinking truncate to `new_size` (done through `meta().setattr`), zeroes the
    /// rest of the chunk that now holds the end of the file, so that a later extension reads
    /// zeros there. Zeros are written only up to the highest offset this `FileIo` may have
    /// stored (the largest size it knew, starting with the one given to [`crate::Client::file`]):
    /// a `FileIo` made just for the truncate must be made with the size *before* it. Also
    /// applies [`FileIo::set_size`].
    pub async fn truncate_tail(&self, new_size: u64) -> Result<(), ClientError> {
        let inner = &self.inner;
        let mut dirty = inner.flush.lock().await;
        inner.set_size(new_size);
        let high = inner.high_water.load(Ordering::Acquire);
        let within = new_size % CHUNK_SIZE;
        if new_size < high && within != 0 {
            let index = new_size / CHUNK_SIZE;
            let stop = high.min((index + 1) * CHUNK_SIZE) - index * CHUNK_SIZE;
            // Casts: both are within one chunk (< 64 MiB).
            inner
                .zero(&mut dirty, index, within as u32, stop as u32)
                .await?;
        }
        inner.high_water.fetch_min(
            new_size.max(inner.size.load(Ordering::Acquire)),
            Ordering::AcqRel,
        );
        Ok(())
    }
}

impl Drop for FileIo {
    fn drop(&mut self) {
        let b = lock(&self.inner.bufs);
        if !b.buffer.is_empty() || b.pending.is_some() {
            tracing::warn!(ino = self.inner.ino, "FileIo dropped with unflushed writes");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A later open's fsync must still sync what this one wrote (see unsynced.rs).
        let dirty = std::mem::take(self.flush.get_mut());
        self.unsynced.park(self.ino, dirty);
    }
}

pub(crate) fn merge_dirty(dirty: &mut Vec<Dirty>, d: Dirty) {
    if d.servers.is_empty() {
        return;
    }
    match dirty.iter_mut().find(|x| x.chunk == d.chunk) {
        Some(x) => {
            for s in d.servers {
                if !x.servers.contains(&s) {
                    x.servers.push(s);
                }
            }
        }
        None => dirty.push(d),
    }
}

impl Inner {
    /// Notes that buffered data now reaches `end`.
    fn grew(&self, end: u64) {
        self.size.fetch_max(end, Ordering::AcqRel);
        self.high_water.fetch_max(end, Ordering::AcqRel);
        lock(&self.ra).invalidate();
    }

    fn set_size(&self, size: u64) {
        {
            // Under the buffer lock, as `learn_size` checks the count: a size it read
            // before this one cannot be applied after it.
            let mut b = lock(&self.bufs);
            self.size_changes.fetch_add(1, Ordering::AcqRel);
            self.foreign_change.store(false, Ordering::Release);
            self.size.store(size, Ordering::Release);
            self.committed.store(size, Ordering::Release);
            b.buffer.truncate(size);
            if let Some(p) = &mut b.pending {
                p.truncate(size);
            }
            b.pending_changed();
        }
        lock(&self.ra).clip(size);
        self.locs.forget_from(size.div_ceil(CHUNK_SIZE));
    }

    /// Flushes the pending extent only (a write waiting for room).
    async fn flush_pending(&self) -> Result<(), ClientError> {
        let mut dirty = self.flush.lock().await;
        self.flush_locked(&mut dirty, false, AfterWrite::Commit)
            .await
            .map(|_| ())
    }

    /// Flushes the pending extent in a background task when there is a runtime to run it
    /// (else here). A failure there leaves the extent pending: the next flush retries it and
    /// reports the error.
    async fn flush_in_background(self: Arc<Self>) -> Result<(), ClientError> {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = self.flush_pending().await {
                        tracing::warn!(ino = self.ino, error = %e, "background flush failed; will retry");
                    }
                });
                Ok(())
            }
            Err(_) => self.flush_pending().await,
        }
    }

    /// Writes the pending extent (being flushed, or left by a failed flush) and then, if
    /// `buffer`, the write buffer; each followed by what `after` says. Called with the
    /// flush lock held.
    async fn flush_locked(
        &self,
        dirty: &mut Vec<Dirty>,
        buffer: bool,
        mut after: AfterWrite<'_>,
    ) -> Result<Option<Attr>, ClientError> {
        let mut attr = None;
        let mut sync_failed = None;
        // At most the pending extent and the buffer as it is now: data written meanwhile by
        // other handles waits for the next flush, so a busy writer cannot starve this one.
        for _ in 0..2 {
            let batch = {
                let mut b = lock(&self.bufs);
                match &b.pending {
                    Some(p) => p.clone(),
                    None if !buffer => break,
                    None => match b.buffer.take() {
                        Some(e) => {
                            b.pending = Some(e.clone());
                            b.pending_changed();
                            e
                        }
                        None => break,
                    },
                }
            };
            if !batch.extents.is_empty() {
                // Resolve each chunk's location once, before the extents fan out: many small
                // extents in one chunk must not all ask to allocate it at the same time.
                let mut indices: Vec<u64> = batch
                    .extents
                    .iter()
                    .flat_map(|e| split_by_chunk(e.start, e.data.len() as u64))
                    .map(|p| p.index)
                    .collect();
                indices.dedup();
                for result in join_all(
                    indices
                        .iter()
                        .map(|i| self.locs.for_write(&*self.store, *i)),
                )
                .await
                {
                    result?;
                }
                let file_end = self.size.load(Ordering::Acquire).max(batch.end());
                let written =
                    write_extents(&*self.store, &self.locs, &batch.extents, file_end).await?;
                self.foreign_change.store(false, Ordering::Release);
                // An RS append lists no servers: its length commit is its fence.
                let replicated = written.iter().all(|d| !d.servers.is_empty());
                let committed = self.committed.load(Ordering::Acquire);
                let delta = i64::try_from(batch.added(&written, committed)).unwrap_or(i64::MAX);
                for d in written {
                    merge_dirty(dirty, d);
                }
                match &mut after {
                    AfterWrite::Defer(d) if replicated => {
                        let d = d.get_or_insert_with(Deferred::default);
                        d.end = d.end.max(batch.end());
                        d.stored_delta = d.stored_delta.saturating_add(delta);
                        self.committed.fetch_max(batch.end(), Ordering::AcqRel);
                        self.size.fetch_max(batch.end(), Ordering::AcqRel);
                    }
                    _ => {
                        let commit = self.store.commit_write(self.ino, batch.end(), delta);
                        let a = if matches!(after, AfterWrite::CommitWhileSyncing) {
                            // The data is on every replica already: making it durable
                            // need not wait for the size and mtime to be recorded.
                            let todo = std::mem::take(dirty);
                            let sync = sync_chunks(&*self.store, &self.locs, todo);
                            let (a, synced) = futures::future::join(commit, sync).await;
                            if let Err((failed, e)) = synced {
                                for d in failed {
                                    merge_dirty(dirty, d);
                                }
                                sync_failed.get_or_insert(e);
                            }
                            a?
                        } else {
                            commit.await?
                        };
                        {
                            // Under the buffer lock, as `learn_size` checks the count.
                            let _b = lock(&self.bufs);
                            self.size_changes.fetch_add(1, Ordering::AcqRel);
                        }
                        self.committed.fetch_max(a.size, Ordering::AcqRel);
                        self.size.fetch_max(a.size, Ordering::AcqRel);
                        attr = Some(a);
                    }
                }
            }
            // Invalidate before dropping `pending`: a reader that no longer sees the pending
            // bytes must not find a window fetched before they were stored.
            lock(&self.ra).invalidate();
            let freed = {
                let mut b = lock(&self.bufs);
                b.pending = None;
                b.pending_changed();
                // Under the lock: a writer waiting for this flush must find the memory
                // kept when it starts its next buffer.
                b.buffer.spares().give(batch, b.buffer.largest_spare())
            };
            drop(freed);
        }
        match sync_failed {
            Some(e) => Err(e),
            None => Ok(attr),
        }
    }

    /// Writes zeros over `from..to` of chunk `index`, if the chunk exists (a hole already
    /// reads as zeros). No `commit_write`: the size does not change.
    async fn zero(
        &self,
        dirty: &mut Vec<Dirty>,
        index: u64,
        from: u32,
        to: u32,
    ) -> Result<(), ClientError> {
        if from >= to || self.locs.refresh(&*self.store, index).await?.is_none() {
            return Ok(());
        }
        let d = zero_piece(&*self.store, &self.locs, index, from, to - from).await?;
        merge_dirty(dirty, d);
        lock(&self.ra).invalidate();
        Ok(())
    }

    /// Reads `offset..end` (within `size`) from the replicas, through the read-ahead windows
    /// when the access pattern is sequential.
    async fn read_stored(
        self: Arc<Self>,
        offset: u64,
        end: u64,
        size: u64,
    ) -> Result<Bytes, ClientError> {
        let plan = lock(&self.ra).plan(offset, end);
        let Plan::Windows { first, last } = plan else {
            return self.read_direct(offset, end).await;
        };
        let mut pieces = Vec::new();
        for w in first..=last {
            let from = offset.max(w * WINDOW);
            let to = end.min((w + 1) * WINDOW);
            let piece = match self.clone().window(w, size).await {
                Some(data) if w * WINDOW + data.len() as u64 >= to => {
                    let src = (from - w * WINDOW) as usize;
                    data.slice(src, src + (to - from) as usize)
                }
                // Fetch failed or the window is shorter than the file now is: read directly
                // (and get the real error, if any).
                _ => self.read_direct(from, to).await?,
            };
            pieces.push(piece);
        }
        // AHEAD windows ahead, in the background.
        for w in last + 1..=last + AHEAD {
            if w * WINDOW >= size {
                break;
            }
            let _ = self.clone().fetch_window(w, size);
        }
        Ok(concat(pieces))
    }

    /// Window `w` from the cache, from a fetch in flight, or fetched now.
    async fn window(self: Arc<Self>, w: u64, size: u64) -> Option<Frames> {
        if let Some(data) = lock(&self.ra).window(w) {
            return Some(data);
        }
        self.fetch_window(w, size)?.await
    }

    /// Starts fetching window `w` (unless cached or in flight) and returns the shared fetch.
    fn fetch_window(self: Arc<Self>, w: u64, size: u64) -> Option<Fetch> {
        let (start, len) = window_range(w, size)?;
        let mut ra = lock(&self.ra);
        if ra.window(w).is_some() {
            return None;
        }
        if let Some(f) = ra.fetching(w) {
            return Some(f);
        }
        let generation = ra.generation;
        let inner = self.clone();
        let fetch: Fetch = async move {
            let data = match inner.read_frames(start, start + u64::from(len)).await {
                Ok(frames) => Some(frames),
                Err(e) => {
                    tracing::debug!(ino = inner.ino, window = w, error = %e, "read-ahead failed");
                    None
                }
            };
            lock(&inner.ra).finish_fetch(w, generation, data.clone());
            data
        }
        .boxed()
        .shared();
        ra.start_fetch(w, fetch.clone());
        drop(ra);
        // Drive the fetch even if no reader waits for it (read-ahead); without a tokio
        // runtime the first reader that awaits it drives it.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(fetch.clone());
        }
        Some(fetch)
    }

    /// Reads `offset..end` from the replicas: every chunk in parallel, each in frames.
    async fn read_direct(&self, offset: u64, end: u64) -> Result<Bytes, ClientError> {
        let frames = self.read_frames(offset, end).await?;
        Ok(frames.slice(0, (end - offset) as usize))
    }

    /// [`Inner::read_direct`], as the frames received.
    async fn read_frames(&self, offset: u64, end: u64) -> Result<Frames, ClientError> {
        let mut parts = Vec::new();
        for p in split_by_chunk(offset, end - offset) {
            let mut at = 0u32;
            while at < p.len {
                let n = (FRAME as u32).min(p.len - at);
                parts.push((p.index, p.off + at, n, p.pos + at as usize));
                at += n;
            }
        }
        let store = &*self.store;
        let locs = &self.locs;
        let suspects = &*self.suspects;
        let mut results: Vec<(usize, Bytes)> = futures::stream::iter(parts)
            .map(|(index, off, n, pos)| async move {
                let data = read_piece(store, locs, suspects, index, off, n).await?;
                Ok::<_, ClientError>((pos, exactly(data, n as usize)))
            })
            .buffer_unordered(FRAMES_IN_FLIGHT)
            .try_collect()
            .await?;
        results.sort_unstable_by_key(|(pos, _)| *pos);
        Ok(Frames::new(results.into_iter().map(|(_, b)| b).collect()))
    }
}

/// `data` made exactly `len` bytes long. A replica never sends more than asked; a short
/// answer (a chunk file shorter than its data claims) reads as zeros past its end, as the
/// hole it is.
fn exactly(data: Bytes, len: usize) -> Bytes {
    if data.len() >= len {
        return data.slice(..len);
    }
    let mut out = BytesMut::with_capacity(len);
    out.extend_from_slice(&data);
    out.resize(len, 0);
    out.freeze()
}
