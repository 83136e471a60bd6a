//! Chunk storage: the chunk directory tree, fences, open-file cache, capacity and health.
//!
//! Every method here blocks (file I/O): the servers call them inside
//! `tokio::task::spawn_blocking`. Each chunk has one slot (a mutex around its open file), so
//! operations on one chunk are serialized while different chunks proceed in parallel. Slots of
//! recently used chunks stay in an LRU so their files stay open; a slot in use is also found
//! through a weak map, so eviction never lets two open copies of one chunk's table coexist.

use crate::chunk_file::{ChunkFile, OpenError};
use crate::fence::{FenceError, TermFence};
use crate::inflight::Quiet;
use crate::space::Space;
use crate::tombstones::Tombstones;
use bytes::Bytes;
use lru::LruCache;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// Open chunk files kept in the cache.
const OPEN_FILES: usize = 256;
/// Name suffix of a chunk copy being made (renamed to the chunk's name once complete).
const CLONE_SUFFIX: &str = ".clone";

/// The outcome of a failed chunk operation, as the data protocol reports it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("stale chunk version (current {current})")]
    StaleVersion { current: u64 },
    #[error("stale term (current {current})")]
    StaleTerm { current: u64 },
    #[error("chunk not found")]
    NotFound,
    #[error("corrupt block at chunk offset {offset}")]
    Corrupt { offset: u64 },
    #[error("no space left")]
    NoSpace,
    #[error("disk error: {reason}")]
    Disk { reason: String },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace,
            _ => StoreError::Disk {
                reason: e.to_string(),
            },
        }
    }
}

/// Why the storage could not be opened at start.
#[derive(Debug, thiserror::Error)]
pub enum OpenStorageError {
    #[error("cannot prepare data directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("data directory {path} is in use by another chunkserver")]
    Locked { path: PathBuf },
    #[error(transparent)]
    Fence(#[from] FenceError),
}

type Slot = Mutex<Option<ChunkFile>>;

struct Slots {
    lru: LruCache<u64, Arc<Slot>>,
    live: HashMap<u64, Weak<Slot>>,
}

#[derive(Clone, Copy)]
struct ChunkMeta {
    version: u64,
    allocated: u64,
}

/// The chunks of one chunkserver.
pub struct Storage {
    root: PathBuf,
    /// The capacity and the filesystem's reserve (see `space.rs`).
    space: Space,
    fence: TermFence,
    slots: Mutex<Slots>,
    index: Mutex<HashMap<u64, ChunkMeta>>,
    used: AtomicU64,
    corrupt: Mutex<BTreeSet<u64>>,
    /// Chunks created since their directory was last fsynced.
    new_entries: Mutex<HashSet<u64>>,
    healthy: AtomicBool,
    /// Writes were last refused for want of space (for logging the change only).
    full: AtomicBool,
    /// Deleted chunks, refused if a late writer would recreate them.
    tombstones: Tombstones,
    _lock: nix::fcntl::Flock<File>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way
    // that matters more than stopping the server would, so a poisoned lock is taken over.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks `slot` once no write running outside the lock blocks what `quiet` asks of the
/// loaded chunk (see `inflight.rs`); an unloaded chunk has none running.
/// The lock of a chunk's `slot` for a change of `offset..offset + len` at `version`, once no
/// write running outside the lock overlaps it; a new version waits for every such write still
/// running under the old one.
fn lock_for_change(
    slot: &Slot,
    version: u64,
    offset: u64,
    len: u64,
) -> MutexGuard<'_, Option<ChunkFile>> {
    let span = Quiet::around(offset, len);
    lock_quiet(slot, |cf| {
        if version > cf.version() {
            Quiet::All
        } else {
            span
        }
    })
}

fn lock_quiet(
    slot: &Slot,
    quiet: impl Fn(&ChunkFile) -> Quiet,
) -> MutexGuard<'_, Option<ChunkFile>> {
    loop {
        let guard = lock(slot);
        let blocked = guard.as_ref().and_then(|cf| {
            let q = quiet(cf);
            cf.inflight().blocks(q).then(|| (cf.inflight().clone(), q))
        });
        let Some((inflight, q)) = blocked else {
            return guard;
        };
        drop(guard);
        inflight.wait(q);
    }
}

impl Storage {
    /// Opens (creating if needed) the storage under `root`, scanning existing chunks, with
    /// the default reserve.
    #[cfg(test)]
    pub fn open(root: &Path, capacity: Option<u64>) -> Result<Storage, OpenStorageError> {
        Self::open_with(root, capacity, None)
    }

    /// Opens (creating if needed) the storage under `root`, scanning existing chunks, keeping
    /// `reserve` bytes of the filesystem free (`None`: the default, see `space.rs`).
    pub fn open_with(
        root: &Path,
        capacity: Option<u64>,
        reserve: Option<u64>,
    ) -> Result<Storage, OpenStorageError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| OpenStorageError::Io { path, source }
        };
        fs::create_dir_all(root).map_err(io_err(root))?;
        let lock_path = root.join("LOCK");
        let lock_file = File::create(&lock_path).map_err(io_err(&lock_path))?;
        let flock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| OpenStorageError::Locked {
                path: root.to_path_buf(),
            })?;
        let chunks = root.join("chunks");
        fs::create_dir_all(&chunks).map_err(io_err(&chunks))?;
        for b in 0..=255u8 {
            let d = chunks.join(format!("{b:02x}"));
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        // The bucket directories must survive a crash before any chunk entry inside them.
        fsync_dir(&chunks).map_err(io_err(&chunks))?;
        fsync_dir(root).map_err(io_err(root))?;
        let fence = TermFence::load(root)?;
        let tombstones = Tombstones::load(root).map_err(io_err(root))?;
        let storage = Storage {
            root: root.to_path_buf(),
            space: Space::new(root, capacity, reserve),
            fence,
            slots: Mutex::new(Slots {
                lru: LruCache::new(NonZeroUsize::new(OPEN_FILES).unwrap_or(NonZeroUsize::MIN)),
                live: HashMap::new(),
            }),
            index: Mutex::new(HashMap::new()),
            used: AtomicU64::new(0),
            corrupt: Mutex::new(BTreeSet::new()),
            new_entries: Mutex::new(HashSet::new()),
            healthy: AtomicBool::new(true),
            full: AtomicBool::new(false),
            tombstones,
            _lock: flock,
        };
        storage.scan(&chunks).map_err(io_err(&chunks))?;
        Ok(storage)
    }

    fn scan(&self, chunks: &Path) -> io::Result<()> {
        let mut index = lock(&self.index);
        let mut corrupt = lock(&self.corrupt);
        for b in 0..=255u8 {
            let dir = chunks.join(format!("{b:02x}"));
            for entry in fs::read_dir(&dir)? {
                let entry = entry?;
                let path = entry.path();
                let name = entry.file_name();
                if name.to_str().is_some_and(|n| n.ends_with(CLONE_SUFFIX)) {
                    // A copy that did not finish: the chunk it was for does not exist yet.
                    tracing::info!(path = %path.display(), "removing an unfinished chunk copy");
                    fs::remove_file(&path)?;
                    continue;
                }
                let Some(id) = name
                    .to_str()
                    .filter(|n| n.len() == 16)
                    .and_then(|n| u64::from_str_radix(n, 16).ok())
                else {
                    tracing::warn!(path = %path.display(), "ignoring unexpected file in chunk directory");
                    continue;
                };
                match ChunkFile::peek(&path) {
                    Ok((header, allocated)) if header.id == id => {
                        self.used.fetch_add(allocated, Ordering::Relaxed);
                        index.insert(
                            id,
                            ChunkMeta {
                                version: header.version,
                                allocated,
                            },
                        );
                    }
                    Ok((header, _)) => {
                        tracing::error!(
                            chunk = id,
                            header_id = header.id,
                            "chunk file header names another chunk"
                        );
                        corrupt.insert(id);
                    }
                    Err(OpenError::BadHeader {
                        complete: false, ..
                    }) => {
                        // A creation that crashed before its header reached the disk: nothing in
                        // it was ever synced (a sync flushes the header too), so it goes.
                        tracing::warn!(chunk = id, "removing incompletely created chunk file");
                        fs::remove_file(&path)?;
                    }
                    Err(e) => {
                        tracing::error!(chunk = id, error = %e, "unreadable chunk file");
                        corrupt.insert(id);
                    }
                }
            }
        }
        tracing::info!(
            chunks = index.len(),
            used_bytes = self.used.load(Ordering::Relaxed),
            root = %self.root.display(),
            "chunk storage opened"
        );
        Ok(())
    }

    fn chunk_path(&self, chunk: u64) -> PathBuf {
        self.root
            .join("chunks")
            .join(format!("{:02x}", chunk & 0xff))
            .join(format!("{chunk:016x}"))
    }

    fn slot(&self, chunk: u64) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if let Some(s) = slots.lru.get(&chunk) {
            return s.clone();
        }
        let slot = match slots.live.get(&chunk).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                if slots.live.len() > 4 * OPEN_FILES {
                    slots.live.retain(|_, w| w.strong_count() > 0);
                }
                let s = Arc::new(Mutex::new(None));
                slots.live.insert(chunk, Arc::downgrade(&s));
                s
            }
        };
        slots.lru.put(chunk, slot.clone());
        slot
    }

    /// Opens the chunk into its slot if needed. `create` gives the version for a new chunk.
    fn load<'a>(
        &self,
        chunk: u64,
        guard: &'a mut Option<ChunkFile>,
        create: Option<u64>,
    ) -> Result<&'a mut ChunkFile, StoreError> {
        if guard.is_none() {
            let path = self.chunk_path(chunk);
            let cf = match ChunkFile::open(&path) {
                Ok(cf) if cf.id() == chunk => cf,
                Ok(_) | Err(OpenError::BadHeader { .. }) => {
                    self.mark_corrupt(chunk);
                    return Err(StoreError::Corrupt { offset: 0 });
                }
                Err(OpenError::NotFound) => match create {
                    None => return Err(StoreError::NotFound),
                    Some(version) => {
                        if let Some(current) = self.tombstones.refuses(chunk, version) {
                            tracing::info!(
                                chunk,
                                version,
                                deleted_at = current,
                                "refusing to recreate a deleted chunk"
                            );
                            return Err(StoreError::StaleVersion { current });
                        }
                        let cf = ChunkFile::create(&path, chunk, version)?;
                        lock(&self.new_entries).insert(chunk);
                        lock(&self.index).insert(
                            chunk,
                            ChunkMeta {
                                version,
                                allocated: 0,
                            },
                        );
                        cf
                    }
                },
                Err(OpenError::Io(e)) => return Err(e.into()),
            };
            *guard = Some(cf);
        }
        match guard.as_mut() {
            Some(cf) => Ok(cf),
            None => Err(StoreError::NotFound),
        }
    }

    fn mark_corrupt(&self, chunk: u64) {
        tracing::error!(chunk, "chunk failed a checksum");
        lock(&self.corrupt).insert(chunk);
    }

    fn note_io_result<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        match &r {
            Ok(_) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!("disk accepts writes again");
                }
            }
            // A full filesystem is seen by `space` (which looks again now); the health flag
            // is for a disk that fails.
            Err(StoreError::NoSpace) => self.space.look(),
            Err(e @ StoreError::Disk { .. }) => {
                // Logged on the transition only; the heartbeat carries the state from here.
                if self.healthy.swap(false, Ordering::Relaxed) {
                    tracing::error!(error = %e, "disk refused a write; reporting unhealthy");
                }
            }
            Err(_) => {}
        }
        r
    }

    /// Refuses a write of `bytes` when the capacity is reached or the filesystem is down to
    /// its reserve (see `space.rs`).
    fn admit(&self, bytes: u64) -> Result<(), StoreError> {
        if self.space.admits(self.used(), bytes) {
            if self.full.swap(false, Ordering::Relaxed) {
                tracing::info!("room for chunks again; accepting writes");
            }
            return Ok(());
        }
        if !self.full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                reserve = self.space.reserve(),
                used = self.used(),
                "capacity reached or the filesystem is down to its reserve; refusing writes"
            );
        }
        Err(StoreError::NoSpace)
    }

    fn update_allocation(&self, chunk: u64, cf: &ChunkFile) {
        let Ok(now) = cf.allocated() else { return };
        let mut index = lock(&self.index);
        let meta = index.entry(chunk).or_insert(ChunkMeta {
            version: cf.version(),
            allocated: 0,
        });
        if now >= meta.allocated {
            self.used.fetch_add(now - meta.allocated, Ordering::Relaxed);
        } else {
            self.used.fetch_sub(meta.allocated - now, Ordering::Relaxed);
        }
        meta.allocated = now;
        meta.version = cf.version();
    }

    /// Writes `data` at `offset` of `chunk`, creating the chunk if needed, under the
    /// `(version, term)` fences; with `sync`, the chunk is durable on return. Returns the
    /// bytes of blocks that held no data before ([`ChunkFile::write`]).
    pub fn write(
        &self,
        chunk: u64,
        version: u64,
        term: u64,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<u64, StoreError> {
        self.write_with_crcs(chunk, version, term, offset, data, sync, None)
    }

    /// [`Storage::write`] with the crcs of the whole 4 KiB blocks `data` covers already
    /// computed (by `payload_crc::whole_block_crcs`, which also checked the payload).
    #[allow(clippy::too_many_arguments)]
    pub fn write_with_crcs(
        &self,
        chunk: u64,
        version: u64,
        term: u64,
        offset: u64,
        data: &[u8],
        sync: bool,
        known: Option<&[u32]>,
    ) -> Result<u64, StoreError> {
        self.check_term(term)?;
        self.admit(data.len() as u64)?;
        // A large write of whole blocks writes its data without the chunk's lock (see
        // `inflight.rs`).
        let slot = self.slot(chunk);
        let r = (|| {
            let mut guard = lock_for_change(&slot, version, offset, data.len() as u64);
            let cf = self.load_for_change(chunk, &mut guard, version)?;
            // A sync write wants the fsync right after: it keeps the lock.
            let plan = match sync {
                false => cf.plan_unlocked(offset, data, known),
                true => None,
            };
            if let Some(plan) = plan {
                drop(guard);
                let written = plan.write(data);
                let mut guard = lock(&slot);
                // Still loaded: whatever unloads a chunk waits for its spans first.
                let Some(cf) = guard.as_mut() else {
                    return Err(StoreError::NotFound);
                };
                let fresh = match written? {
                    true => cf.finish_unlocked(plan)?,
                    // Refused before anything was written: the locked way (span still held).
                    false => cf.write_with_crcs(offset, data, known)?,
                };
                self.update_allocation(chunk, cf);
                return Ok(fresh);
            }
            let r = cf.write_with_crcs(offset, data, known);
            if let Err(StoreError::Corrupt { .. }) = r {
                self.mark_corrupt(chunk);
            }
            let fresh = r?;
            if sync {
                self.sync_file(chunk, cf)?;
            }
            self.update_allocation(chunk, cf);
            Ok(fresh)
        })();
        self.note_io_result(r)
    }

    /// `chunk` (created if missing) for a change at `version`: refused if that is older than
    /// the stored version, taken if it is newer (a writer's map is ahead of this replica after
    /// a version bump).
    fn load_for_change<'a>(
        &self,
        chunk: u64,
        guard: &'a mut Option<ChunkFile>,
        version: u64,
    ) -> Result<&'a mut ChunkFile, StoreError> {
        let cf = self.load(chunk, guard, Some(version))?;
        if version < cf.version() {
            return Err(StoreError::StaleVersion {
                current: cf.version(),
            });
        }
        if version > cf.version() {
            tracing::debug!(
                chunk,
                from = cf.version(),
                to = version,
                "adopting newer chunk version"
            );
            cf.set_version(version)?;
            if let Some(meta) = lock(&self.index).get_mut(&chunk) {
                meta.version = version;
            }
        }
        Ok(cf)
    }

    /// Makes `offset..offset + len` of `chunk` read as zeros (a ZERO request), fenced like a
    /// write; the space of whole blocks goes back to the filesystem. Not refused on a full
    /// disk: it writes at most two blocks and frees the rest.
    pub fn zero(
        &self,
        chunk: u64,
        version: u64,
        term: u64,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        self.check_term(term)?;
        let slot = self.slot(chunk);
        let r = (|| {
            let mut guard = lock_for_change(&slot, version, offset, len);
            let cf = self.load_for_change(chunk, &mut guard, version)?;
            let r = cf.zero(offset, len);
            if let Err(StoreError::Corrupt { .. }) = r {
                self.mark_corrupt(chunk);
            }
            r?;
            self.update_allocation(chunk, cf);
            Ok(())
        })();
        self.note_io_result(r)
    }

    /// Reads `len` bytes at `offset` of `chunk`, verified. A version newer than the stored one
    /// is served: replicas learn of a version bump only on their next write.
    #[cfg(test)]
    pub fn read(
        &self,
        chunk: u64,
        version: u64,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, StoreError> {
        self.read_checked(chunk, version, offset, len)
            .map(|(data, _)| data)
    }

    /// [`Storage::read`], with the data's crc32c when the range is whole blocks (derived
    /// from the verified block checksums; see [`ChunkFile::read_checked`]).
    pub fn read_checked(
        &self,
        chunk: u64,
        version: u64,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, Option<u32>), StoreError> {
        let quiet = Some(Quiet::around(offset, len));
        let r = self.with_existing(chunk, version, quiet, |cf| cf.read_checked(offset, len));
        if let Err(StoreError::Corrupt { .. }) = r {
            self.mark_corrupt(chunk);
        }
        r
    }

    /// The runs of written blocks of `chunk` within `offset..offset + len` (a WRITTEN
    /// request), once no write running outside the lock covers the range: a write that was
    /// acknowledged shows.
    pub fn written(
        &self,
        chunk: u64,
        version: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<std::ops::Range<u32>>, StoreError> {
        let quiet = Some(Quiet::around(offset, len));
        self.with_existing(chunk, version, quiet, |cf| cf.written(offset, len))
    }

    /// Runs `f` on `chunk` under its lock, if the chunk exists here and `version` is not
    /// older than the stored one (which is what reads, syncs and local opens ask); once no
    /// write running outside the lock blocks `quiet`, if given.
    fn with_existing<T>(
        &self,
        chunk: u64,
        version: u64,
        quiet: Option<Quiet>,
        f: impl FnOnce(&ChunkFile) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let slot = self.slot(chunk);
        let mut guard = match quiet {
            Some(quiet) => lock_quiet(&slot, |_| quiet),
            None => lock(&slot),
        };
        let cf = self.load(chunk, &mut guard, None)?;
        if version < cf.version() {
            return Err(StoreError::StaleVersion {
                current: cf.version(),
            });
        }
        f(cf)
    }

    /// A new read-only descriptor of `chunk`'s file, for a client on this host that reads
    /// it directly; refused like a read (`version` older than the stored one).
    pub fn open_read_only(&self, chunk: u64, version: u64) -> Result<fs::File, StoreError> {
        // A descriptor of its own: the client's reads keep their own position and
        // read-ahead state.
        self.with_existing(chunk, version, None, |_| {
            Ok(fs::File::open(self.chunk_path(chunk))?)
        })
    }

    /// fsyncs `chunk` (and its directory entry if it is new).
    pub fn sync(&self, chunk: u64, version: u64) -> Result<(), StoreError> {
        let r = self.with_existing(chunk, version, None, |cf| self.sync_file(chunk, cf));
        self.note_io_result(r)
    }

    fn sync_file(&self, chunk: u64, cf: &ChunkFile) -> Result<(), StoreError> {
        cf.sync()?;
        if lock(&self.new_entries).contains(&chunk) {
            if let Some(dir) = self.chunk_path(chunk).parent() {
                fsync_dir(dir)?;
            }
            lock(&self.new_entries).remove(&chunk);
        }
        Ok(())
    }

    /// Raises the term fence for an order carrying `term`, or refuses an older term.
    fn check_term(&self, term: u64) -> Result<(), StoreError> {
        let current = self.fence.current();
        if term < current {
            return Err(StoreError::StaleTerm { current });
        }
        if term > current {
            self.note_io_result(self.fence.advance(term).map_err(StoreError::from))?;
        }
        Ok(())
    }

    /// Makes `chunk` refuse versions older than `version` (a snapshot now shares it, and
    /// writers holding older locations must copy instead of writing in place), and makes it
    /// durable: a snapshot's data must survive what its origin's did. The chunk must exist.
    pub fn fence(&self, chunk: u64, version: u64, term: u64) -> Result<(), StoreError> {
        self.check_term(term)?;
        let slot = self.slot(chunk);
        let mut guard = lock_quiet(&slot, |_| Quiet::All);
        let r = (|| {
            let cf = self.load(chunk, &mut guard, None)?;
            if version < cf.version() {
                return Err(StoreError::StaleVersion {
                    current: cf.version(),
                });
            }
            if version > cf.version() {
                cf.set_version(version)?;
                if let Some(meta) = lock(&self.index).get_mut(&chunk) {
                    meta.version = version;
                }
            }
            self.sync_file(chunk, cf)
        })();
        self.note_io_result(r)
    }

    /// Copies chunk `src` (at version `src_version`) into the new chunk `dst` at
    /// `dst_version`: the local half of a copy-on-write. Every block that holds data is read
    /// and verified against its checksum, then written (with a fresh checksum) to a temporary
    /// file; unwritten blocks stay holes. The copy is fsynced and renamed into place, so
    /// `dst` exists only complete, and an existing `dst` means an earlier call made it: done.
    pub fn clone_chunk(
        &self,
        src: u64,
        src_version: u64,
        dst: u64,
        dst_version: u64,
        term: u64,
    ) -> Result<(), StoreError> {
        if src == dst {
            return Err(StoreError::BadRequest {
                reason: "a chunk cannot be copied onto itself".into(),
            });
        }
        self.check_term(term)?;
        // A copy takes at most a chunk's worth (unwritten blocks stay holes).
        self.admit(rawfs_chunkserver_api::MAX_CHUNK_SIZE)?;
        // Lock order: the new chunk, then the source (a new id is never anyone's source).
        let dst_slot = self.slot(dst);
        let mut dst_guard = lock(&dst_slot);
        if dst_guard.is_some() || lock(&self.index).contains_key(&dst) {
            return Ok(());
        }
        let src_slot = self.slot(src);
        let mut src_guard = lock_quiet(&src_slot, |_| Quiet::All);
        let r = (|| {
            let from = self.load(src, &mut src_guard, None)?;
            if src_version < from.version() {
                return Err(StoreError::StaleVersion {
                    current: from.version(),
                });
            }
            let path = self.chunk_path(dst);
            let tmp = path.with_extension(&CLONE_SUFFIX[1..]);
            match fs::remove_file(&tmp) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            let mut to = ChunkFile::create(&tmp, dst, dst_version)?;
            let copied = (|| {
                for offset in from.data_blocks() {
                    let block = match from.read(offset, from.block_size()) {
                        Ok(b) => b,
                        Err(e) => {
                            if let StoreError::Corrupt { .. } = e {
                                self.mark_corrupt(src);
                            }
                            return Err(e);
                        }
                    };
                    to.write(offset, &block)?;
                }
                to.sync()?;
                fs::rename(&tmp, &path)?;
                Ok(())
            })();
            if let Err(e) = copied {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            if let Some(dir) = path.parent() {
                fsync_dir(dir)?;
            }
            let allocated = to.allocated()?;
            self.used.fetch_add(allocated, Ordering::Relaxed);
            lock(&self.index).insert(
                dst,
                ChunkMeta {
                    version: dst_version,
                    allocated,
                },
            );
            *dst_guard = Some(to);
            tracing::debug!(src, dst, "chunk copied");
            Ok(())
        })();
        self.note_io_result(r)
    }

    /// Deletes `chunk` (ordered by the metadata service). A missing chunk is not an error.
    pub fn delete(&self, chunk: u64) -> Result<(), StoreError> {
        self.delete_up_to(chunk, u64::MAX).map(|_| ())
    }

    /// Deletes `chunk` if it is stored at `version` or older (a stale copy the metadata
    /// service saw in an inventory); a newer copy, written since, stays. True if a copy
    /// was deleted.
    pub fn delete_stale(&self, chunk: u64, version: u64) -> Result<bool, StoreError> {
        self.delete_up_to(chunk, version)
    }

    fn delete_up_to(&self, chunk: u64, newest: u64) -> Result<bool, StoreError> {
        let slot = self.slot(chunk);
        let mut guard = lock_quiet(&slot, |_| Quiet::All);
        let version = match guard.as_ref() {
            Some(cf) => Some(cf.version()),
            None => lock(&self.index).get(&chunk).map(|m| m.version),
        };
        if version.is_some_and(|v| v > newest) {
            tracing::info!(
                chunk,
                stored = version,
                newest,
                "stale-copy deletion skipped: a newer copy is here"
            );
            return Ok(false);
        }
        if let Some(version) = version {
            // Durable before the file goes, so no crash forgets it.
            self.tombstones.add(chunk, version)?;
        }
        *guard = None;
        match fs::remove_file(self.chunk_path(chunk)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(meta) = lock(&self.index).remove(&chunk) {
            self.used.fetch_sub(meta.allocated, Ordering::Relaxed);
        }
        lock(&self.new_entries).remove(&chunk);
        lock(&self.corrupt).remove(&chunk);
        tracing::debug!(chunk, "chunk deleted");
        Ok(version.is_some())
    }

    /// Raises the term fence (from a heartbeat reply).
    pub fn observe_term(&self, term: u64) -> io::Result<u64> {
        self.fence.advance(term)
    }

    /// The highest term seen.
    pub fn term(&self) -> u64 {
        self.fence.current()
    }

    /// Every stored chunk with its version, sorted by id.
    pub fn inventory(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<_> = lock(&self.index)
            .iter()
            .map(|(id, m)| (*id, m.version))
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of stored chunks.
    pub fn chunk_count(&self) -> u64 {
        lock(&self.index).len() as u64
    }

    /// Bytes allocated by chunk files.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// What this server can hold: the bytes its chunks take and the room they may still
    /// take (the capacity left, or the filesystem's free space above the reserve, whichever
    /// is less). So placement and `statfs` see a server with room to spare, not a disk size
    /// that other files or a reserve may already have taken.
    pub fn total(&self) -> u64 {
        let used = self.used();
        used + self.space.room(used)
    }

    /// The filesystem holding the chunks (see `Heartbeat::disk`).
    pub fn disk_id(&self) -> u64 {
        self.space.disk_id()
    }

    /// False while the disk refuses writes: after an I/O error until a write succeeds, and
    /// while there is no room left (see [`Storage::total`]).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && self.space.room(self.used()) > 0
    }

    /// Takes the chunks that failed a checksum since the last call.
    pub fn take_corrupt(&self) -> Vec<u64> {
        std::mem::take(&mut *lock(&self.corrupt))
            .into_iter()
            .collect()
    }

    /// Puts back corrupt reports that could not be delivered.
    pub fn restore_corrupt(&self, chunks: &[u64]) {
        lock(&self.corrupt).extend(chunks.iter().copied());
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[path = "storage_scrub.rs"]
mod scrub_side;
pub(crate) use scrub_side::ScrubStep;

#[cfg(test)]
#[path = "storage_tests.rs"]
mod tests;
