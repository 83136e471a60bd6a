//! Directories whose creates this mount makes on its own: a directory this mount makes is
//! delegated to it by the metadata leader (`mkdir_held`; see rawfs-metadata's
//! `delegation.rs`), so until it gives the delegation back, the mount alone adds entries to
//! it and knows its whole content.
//!
//! ```text
//!  mkdir ──► mkdir_held ──► HeldDir { names: {}, attr }
//!  LOOKUP(dir, x)  ──► answered here (ENOENT, or the fresh file's attributes)
//!  CREATE(dir, x)  ──► inode from a reserved range, answered here, queued
//!  UNLINK(dir, x), RENAME(dir, x, dir, y) ──► answered here, queued
//!  GETATTR(dir | fresh file) ──► answered here
//!  every COMMIT_DELAY (or COMMIT_MAX queued) ──► commit_held(dir, queue): one log entry
//!  anything else on a file with a queued change ──► the queue committed first ("settle")
//!  READDIR(dir) ──► queue committed, listed by the leader with readdir_held (kept)
//!  RMDIR(dir, sub) ──► sub given back if held, removed by the leader with rmdir_held (kept)
//!  other changes in or of dir, a recall, unmount ──► give_back
//! ```
//!
//! Why a create can be answered before the leader has it: nobody else can see the
//! directory's entries without recalling the delegation first, and the recall waits for the
//! queue (see the leader's `recall.rs`). What is queued is like data in a write buffer: it
//! is on the leader once `fsync` (of the file or the directory) returns, and if the mount
//! dies before that it is gone. A mount cut off from the leader for longer than the
//! recall wait loses its delegation; its late commit is refused, the files it had shown are
//! gone, and the error is logged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::Errno;
use rawfs_client::FileIo;
use rawfs_metadata_api::{
    Attr, Caller, ChunkLoc, FileKind, HeldCreate, HeldOp, Ino, Name, Timespec, CHUNK_SIZE,
    MAX_HELD_ALLOCATIONS,
};
use tracing::warn;

use crate::errno;
use crate::inner::{lock, Inner};

/// How long creates wait in the queue before they are committed: long enough to gather
/// many into one log entry, short enough that other clients see them soon.
const COMMIT_DELAY: Duration = Duration::from_millis(10);
/// A queue this long is committed at once.
const COMMIT_MAX: usize = 2048;
/// Pause before a failed background commit is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Inode numbers reserved per `reserve_inodes` call.
const RESERVE: u32 = 8192;
/// A new reservation starts when fewer numbers than this are left.
const RESERVE_LOW: u64 = 4096;
/// Most names all held directories keep here together (each costs memory in the mount,
/// about 100 bytes); past it, a directory that gets another create is given back and grows
/// through the leader.
const HELD_NAMES_MAX: usize = 1_000_000;
/// Most directories held at once; the one held longest is given back for a new one.
const HELD_DIRS_MAX: usize = 4096;

/// What a held directory says about a name.
pub(crate) enum Found {
    Missing,
    /// Created here and not committed yet: its attributes are only known here.
    Fresh(Attr),
    /// Committed: the leader has its attributes.
    Committed(Ino),
}

/// The outcome of a create in a held directory.
pub(crate) enum Made {
    /// The directory is not held here: ask the leader.
    NotHeld,
    /// The name exists and the create is not exclusive: give the directory back and open
    /// the existing file through the leader.
    Exists,
    Created(Attr),
}

/// The mount's held directories and its reserved inode numbers.
#[derive(Default)]
pub(crate) struct Held {
    dirs: Mutex<HashMap<Ino, Arc<HeldDir>>>,
    /// Held directories, oldest first (some may have been given back since).
    order: Mutex<VecDeque<Ino>>,
    /// Names kept by all held directories.
    names: std::sync::atomic::AtomicUsize,
    /// Inode with a change in a queue (a fresh file, or one unlinked, renamed, replaced or
    /// given new attributes here since the last commit) -> the directory whose queue has it.
    pub(crate) queued: Mutex<HashMap<Ino, Ino>>,
    /// File named in a held directory -> that directory (for attribute changes made here).
    pub(crate) files: Mutex<HashMap<Ino, Ino>>,
    pool: Mutex<Pool>,
    /// Woken when a reservation arrives.
    refilled: tokio::sync::Notify,
}

#[derive(Default)]
struct Pool {
    /// Reserved ranges `start..end`, in order of use.
    ranges: VecDeque<(Ino, Ino)>,
    refilling: bool,
}

impl Pool {
    fn left(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    fn take(&mut self) -> Option<Ino> {
        let (start, end) = self.ranges.front_mut()?;
        let ino = *start;
        *start += 1;
        if start == end {
            self.ranges.pop_front();
        }
        Some(ino)
    }
}

pub(crate) struct HeldDir {
    pub(crate) state: Mutex<DirState>,
    /// Commits of one directory go one at a time, in order.
    commits: tokio::sync::Mutex<()>,
}

pub(crate) struct DirState {
    /// The directory's attributes as this mount shows them.
    pub(crate) attr: Attr,
    names: HashMap<Vec<u8>, Ino>,
    /// Children not committed yet, with the attributes the kernel was given.
    pub(crate) fresh: HashMap<Ino, Attr>,
    /// Committed files with an attribute change queued, with their attributes after it.
    pub(crate) pending: HashMap<Ino, Attr>,
    /// Directories made in it through the leader while it was held (every other entry is a
    /// file made here): the leader refuses a held unlink or rename of a directory, so
    /// those go through the leader too.
    subdirs: HashSet<Ino>,
    /// Changes not sent yet, in order.
    pub(crate) queue: Vec<HeldOp>,
    /// Being given back (or lost): nothing more is answered here.
    pub(crate) gone: bool,
    /// Being given back once the flushes behind its files end: no more start.
    pub(crate) draining: bool,
    /// A commit of the queue is scheduled.
    commit_due: bool,
}

/// The inodes `op` changes (creates, unlinks, renames or replaces).
fn op_inos(op: &HeldOp) -> impl Iterator<Item = Ino> {
    let (ino, other) = match op {
        HeldOp::Create(e) => (e.ino, None),
        HeldOp::Unlink { ino, .. } => (*ino, None),
        HeldOp::Rename { ino, replaced, .. } => (*ino, *replaced),
        HeldOp::SetAttr { ino, .. } | HeldOp::Wrote { ino, .. } => (*ino, None),
    };
    std::iter::once(ino).chain(other)
}

impl DirState {
    /// A file lost its name at `now` (unlinked or renamed over): the attributes kept here
    /// for it (fresh, or with a change queued) say so until the commit.
    fn unlinked(&mut self, ino: Ino, now: Timespec) {
        if let Some(a) = self.fresh.get_mut(&ino).or(self.pending.get_mut(&ino)) {
            a.nlink = 0;
            a.ctime = now;
        }
    }

    /// The subdirectory called `name`: ENOENT if there is none, ENOTDIR if it is a file.
    pub(crate) fn subdir(&self, name: &[u8]) -> Result<Ino, Errno> {
        match self.names.get(name) {
            None => Err(Errno::ENOENT),
            Some(i) if !self.subdirs.contains(i) => Err(Errno::ENOTDIR),
            Some(i) => Ok(*i),
        }
    }

    /// The subdirectory `name` (`ino`) was made through the leader at `time`.
    fn subdir_made(&mut self, name: Vec<u8>, ino: Ino, time: Timespec) {
        self.names.insert(name, ino);
        self.subdirs.insert(ino);
        self.attr.nlink += 1;
        (self.attr.mtime, self.attr.ctime) = (time, time);
    }

    /// The subdirectory `name` (`ino`) was removed through the leader at `time`; false if
    /// `name` no longer names it here.
    fn subdir_removed(&mut self, name: &[u8], ino: Ino, time: Timespec) -> bool {
        if self.names.get(name) != Some(&ino) {
            return false;
        }
        self.names.remove(name);
        self.subdirs.remove(&ino);
        self.attr.nlink = self.attr.nlink.saturating_sub(1);
        (self.attr.mtime, self.attr.ctime) = (time, time);
        true
    }

    /// Queues `op` made at `now` (the directory's times follow); returns whether the queue
    /// is full and whether a commit must be scheduled.
    fn push(&mut self, op: HeldOp, now: Timespec) -> (bool, bool) {
        // Only a change of its entries changes the directory (not one of a file's
        // attributes or data, nor of its own attributes, set by the op's maker).
        if matches!(
            op,
            HeldOp::Create(_) | HeldOp::Unlink { .. } | HeldOp::Rename { .. }
        ) {
            self.attr.mtime = now;
            self.attr.ctime = now;
        }
        self.queue.push(op);
        let schedule = !self.commit_due;
        self.commit_due = true;
        (self.queue.len() >= COMMIT_MAX, schedule)
    }
}

impl Inner {
    /// Makes directory `parent/name` as a held one: the leader records the delegation with
    /// the directory. Reserves inode numbers first if none are left.
    ///
    /// A `parent` held here stays held (its queue goes first, so the leader has every name
    /// the new one could clash with): a tree unpacked by `tar` or `cp -r` keeps answering
    /// the creates of each directory here, though it makes subdirectories in between.
    pub(crate) async fn mkdir_held(
        self: &Arc<Self>,
        parent: Ino,
        name: Name,
        node: rawfs_metadata_api::NewNode,
        caller: Caller,
    ) -> Result<Attr, Errno> {
        let held_parent = self.held_dir(parent).filter(|d| !lock(&d.state).gone);
        match &held_parent {
            Some(d) => {
                if lock(&d.state).names.contains_key(name.as_slice()) {
                    return Err(Errno::EEXIST);
                }
                self.commit_held(parent, false).await?;
            }
            None => self.give_back(parent).await,
        }
        self.reserve().await;
        let a = self
            .client
            .meta()
            .mkdir_held(parent, name.clone(), node, caller, self.session)
            .await
            .map_err(errno::meta)?;
        if let Some(d) = held_parent {
            let mut st = lock(&d.state);
            if !st.gone {
                st.subdir_made(name.into_vec(), a.ino, a.ctime);
                self.held.names.fetch_add(1, Ordering::Relaxed);
            }
        }
        let dir = HeldDir {
            state: Mutex::new(DirState {
                attr: a.clone(),
                names: HashMap::new(),
                fresh: HashMap::new(),
                pending: HashMap::new(),
                subdirs: HashSet::new(),
                queue: Vec::new(),
                gone: false,
                draining: false,
                commit_due: false,
            }),
            commits: tokio::sync::Mutex::new(()),
        };
        lock(&self.held.dirs).insert(a.ino, Arc::new(dir));
        let oldest = {
            let mut order = lock(&self.held.order);
            order.push_back(a.ino);
            let dirs = lock(&self.held.dirs);
            order.retain(|d| dirs.contains_key(d));
            if order.len() > HELD_DIRS_MAX {
                order.pop_front()
            } else {
                None
            }
        };
        if let Some(old) = oldest {
            self.give_back(old).await;
        }
        Ok(a)
    }

    pub(crate) fn held_dir(&self, dir: Ino) -> Option<Arc<HeldDir>> {
        lock(&self.held.dirs).get(&dir).cloned()
    }

    /// `name` in `dir` if `dir` is held here (and not being given back).
    pub(crate) fn held_lookup(&self, dir: Ino, name: &[u8]) -> Option<Found> {
        let d = self.held_dir(dir)?;
        let st = lock(&d.state);
        if st.gone {
            return None;
        }
        Some(match st.names.get(name) {
            None => Found::Missing,
            Some(ino) => match st.fresh.get(ino) {
                Some(a) => Found::Fresh(a.clone()),
                None => Found::Committed(*ino),
            },
        })
    }

    /// `f` of the attributes of file `ino` kept here for a change queued in a held
    /// directory.
    fn with_kept<T>(&self, ino: Ino, f: impl FnOnce(&Attr) -> T) -> Option<T> {
        let dir = *lock(&self.held.queued).get(&ino)?;
        let d = self.held_dir(dir)?;
        let st = lock(&d.state);
        st.fresh.get(&ino).or(st.pending.get(&ino)).map(f)
    }

    /// The size of file `ino` as kept here for a change queued in a held directory.
    pub(crate) fn kept_size(&self, ino: Ino) -> Option<u64> {
        self.with_kept(ino, |k| k.size)
    }

    /// The attributes of a held directory or of a fresh file, if `ino` is one.
    pub(crate) fn held_attr(&self, ino: Ino) -> Option<Attr> {
        if let Some(d) = self.held_dir(ino) {
            let st = lock(&d.state);
            if !st.gone {
                return Some(st.attr.clone());
            }
        }
        self.with_kept(ino, Attr::clone)
    }

    /// Creates the empty file `dir/name` here if `dir` is held.
    pub(crate) async fn held_create(
        self: &Arc<Self>,
        dir: Ino,
        name: &Name,
        perm: u32,
        caller: Caller,
        exclusive: bool,
    ) -> Result<Made, Errno> {
        let Some(d) = self.held_dir(dir) else {
            return Ok(Made::NotHeld);
        };
        if self.held.names.load(Ordering::Relaxed) >= HELD_NAMES_MAX {
            self.give_back(dir).await;
            return Ok(Made::NotHeld);
        }
        let ino = loop {
            if let Some(ino) = self.take_ino() {
                break ino;
            }
            if !self.reserve().await {
                // No numbers to be had: hand the directory to the leader.
                self.give_back(dir).await;
                return Ok(Made::NotHeld);
            }
        };
        let now = Timespec::now();
        let (attr, commit_now, schedule) = {
            let mut st = lock(&d.state);
            if st.gone {
                return Ok(Made::NotHeld);
            }
            if st.names.contains_key(name.as_slice()) {
                return if exclusive {
                    Err(Errno::EEXIST)
                } else {
                    Ok(Made::Exists)
                };
            }
            let gid = if st.attr.perm & crate::privs::S_ISGID != 0 {
                st.attr.gid
            } else {
                caller.gid
            };
            let attr = Attr {
                ino,
                kind: FileKind::File,
                perm: perm & 0o7777,
                uid: caller.uid,
                gid,
                nlink: 1,
                size: 0,
                rdev: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
                stored: 0,
                no_xattrs: true,
            };
            st.names.insert(name.to_vec(), ino);
            self.held.names.fetch_add(1, Ordering::Relaxed);
            st.fresh.insert(ino, attr.clone());
            let op = HeldOp::Create(HeldCreate {
                name: name.clone(),
                ino,
                perm: attr.perm,
                uid: attr.uid,
                gid: attr.gid,
                time: now,
                open: false,
            });
            let (commit_now, schedule) = st.push(op, now);
            (attr, commit_now, schedule)
        };
        lock(&self.held.queued).insert(ino, dir);
        lock(&self.held.files).insert(ino, dir);
        self.commit_later(dir, commit_now, schedule);
        Ok(Made::Created(attr))
    }

    /// Unlinks `dir/name` here if `dir` is held (every entry there is a file this mount
    /// created); `None` if it is not.
    pub(crate) fn held_unlink(
        self: &Arc<Self>,
        dir: Ino,
        name: &Name,
    ) -> Option<Result<(), Errno>> {
        self.held_change(dir, |st, now| {
            let ino = *st.names.get(name.as_slice()).ok_or(Errno::ENOENT)?;
            if st.subdirs.contains(&ino) {
                return Err(Errno::EISDIR);
            }
            st.names.remove(name.as_slice());
            self.held.names.fetch_sub(1, Ordering::Relaxed);
            lock(&self.held.files).remove(&ino);
            st.unlinked(ino, now);
            Ok(Some(HeldOp::Unlink {
                name: name.clone(),
                ino,
                time: now,
            }))
        })
    }

    /// Renames `dir/from` to `dir/to` here if `dir` is held (replacing the file `to`
    /// names, unless `noreplace`); `None` if it is not.
    pub(crate) fn held_rename(
        self: &Arc<Self>,
        dir: Ino,
        from: &Name,
        to: &Name,
        noreplace: bool,
    ) -> Option<Result<(), Errno>> {
        let d = self.held_dir(dir)?;
        {
            let st = lock(&d.state);
            let subdir = |n: &Name| {
                st.names
                    .get(n.as_slice())
                    .is_some_and(|i| st.subdirs.contains(i))
            };
            if subdir(from) || subdir(to) {
                // The leader's rules (and its checks of the subtree) decide.
                return None;
            }
        }
        self.held_change(dir, |st, now| {
            let ino = *st.names.get(from.as_slice()).ok_or(Errno::ENOENT)?;
            let replaced = st.names.get(to.as_slice()).copied();
            if replaced.is_some() && noreplace {
                return Err(Errno::EEXIST);
            }
            if from == to || replaced == Some(ino) {
                return Ok(None);
            }
            st.names.remove(from.as_slice());
            st.names.insert(to.to_vec(), ino);
            if let Some(r) = replaced {
                self.held.names.fetch_sub(1, Ordering::Relaxed);
                lock(&self.held.files).remove(&r);
                st.unlinked(r, now);
            }
            if let Some(a) = st.fresh.get_mut(&ino).or(st.pending.get_mut(&ino)) {
                a.ctime = now;
            }
            Ok(Some(HeldOp::Rename {
                from: from.clone(),
                to: to.clone(),
                ino,
                replaced,
                time: now,
            }))
        })
    }

    /// Makes a change in `dir` here if `dir` is held (and not being given back): `change`
    /// updates the listing and returns the operation to queue (`None`: nothing to do), or
    /// the error for the caller. `None` if `dir` is not held.
    pub(crate) fn held_change(
        self: &Arc<Self>,
        dir: Ino,
        change: impl FnOnce(&mut DirState, Timespec) -> Result<Option<HeldOp>, Errno>,
    ) -> Option<Result<(), Errno>> {
        self.held_changes(dir, |st, now| Ok(change(st, now)?.into_iter().collect()))
    }

    /// `held_change` for a change that queues several operations at once (committed in
    /// the same batch: no answer of the leader shows one without the others).
    pub(crate) fn held_changes(
        self: &Arc<Self>,
        dir: Ino,
        change: impl FnOnce(&mut DirState, Timespec) -> Result<Vec<HeldOp>, Errno>,
    ) -> Option<Result<(), Errno>> {
        let d = self.held_dir(dir)?;
        let now = Timespec::now();
        let (mut commit_now, mut schedule) = (false, false);
        {
            let mut st = lock(&d.state);
            if st.gone {
                return None;
            }
            let ops = match change(&mut st, now) {
                Ok(ops) => ops,
                Err(e) => return Some(Err(e)),
            };
            let mut queued = lock(&self.held.queued);
            for op in ops {
                // The directory's own change (its attributes) is known from its state
                // here; registering it would make a lookup of it commit the queue first.
                for ino in op_inos(&op).filter(|&ino| ino != dir) {
                    queued.insert(ino, dir);
                }
                let (full, first) = st.push(op, now);
                commit_now |= full;
                schedule |= first;
            }
        }
        self.commit_later(dir, commit_now, schedule);
        Some(Ok(()))
    }

    /// Starts the commit of `dir`'s queue: now if it is full, after [`COMMIT_DELAY`] if
    /// none is scheduled yet; retried while the leader cannot be reached.
    fn commit_later(self: &Arc<Self>, dir: Ino, now: bool, schedule: bool) {
        if !now && !schedule {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            if !now {
                tokio::time::sleep(COMMIT_DELAY).await;
            }
            while me.commit_held(dir, false).await.is_err() && me.has_queue(dir) {
                tokio::time::sleep(RETRY).await;
            }
        });
    }

    /// Commits the queue that has a change of `ino` (its create, an unlink or a rename), so
    /// that the leader knows it before anything else is asked about it.
    pub(crate) async fn settle(&self, ino: Ino) -> Result<(), Errno> {
        let dir = lock(&self.held.queued).get(&ino).copied();
        match dir {
            Some(dir) => self.commit_held(dir, false).await,
            None => Ok(()),
        }
    }

    /// Commits what `dir` has queued, if it is held (`fsync` of the directory).
    pub(crate) async fn commit_dir(&self, dir: Ino) -> Result<(), Errno> {
        self.commit_held(dir, false).await
    }

    /// Commits what `dir` has queued and gives the delegation back (before this mount
    /// changes or lists `dir` through the leader, on a recall, at unmount). A no-op if
    /// `dir` is not held.
    pub(crate) async fn give_back(&self, dir: Ino) {
        let Some(d) = self.held_dir(dir) else { return };
        // Others see the directory after this: the data of its files closed here first,
        // committed with its queue (so no more writes behind start, and the directory is
        // held until they end).
        lock(&d.state).draining = true;
        self.written_in(dir).await;
        lock(&d.state).gone = true;
        if let Err(e) = self.commit_held(dir, true).await {
            warn!(dir, error = ?e, "giving a held directory back failed");
        }
    }

    /// After the leader removed the subdirectory `name` (`ino`) of `d`, held here.
    pub(crate) fn forget_subdir(&self, d: &HeldDir, name: &[u8], ino: Ino) {
        if lock(&d.state).subdir_removed(name, ino, Timespec::now()) {
            self.held.names.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Gives every held directory back (at unmount).
    pub(crate) async fn give_back_all(&self) {
        let dirs: Vec<Ino> = lock(&self.held.dirs).keys().copied().collect();
        for dir in dirs {
            self.give_back(dir).await;
        }
    }

    /// `settle` before `io`'s data goes out: if `ino` is a fresh file (its create still
    /// queued) that fits one chunk, its chunk is allocated with the commit, in the same log
    /// entry, and `io` learns where it is. Returns the directory and the file's attributes
    /// as committed when it did that: the write's own commit can then be queued in that
    /// directory (see `flush_file`), and a new file's first flush costs one log entry.
    /// A file being written behind may find its chunk placed by an earlier commit of the
    /// directory (see `write_behind`).
    pub(crate) async fn settle_to_write(
        &self,
        ino: Ino,
        io: &FileIo,
    ) -> Result<Option<(Ino, Attr)>, Errno> {
        if let Some(placed) = self.write_behind.take_placed(ino) {
            return Ok(Some(placed));
        }
        let Some(dir) = lock(&self.held.queued).get(&ino).copied() else {
            return Ok(None);
        };
        let alloc = (io.size() > 0 && io.size() <= CHUNK_SIZE && self.fresh_in(dir, ino).is_some())
            .then_some(ino);
        match self.commit_held_with(dir, false, alloc).await? {
            Some((loc, attr)) => {
                io.learn_location(&loc);
                Ok(Some((dir, attr)))
            }
            // Placed by the commit another task sent while this one waited for it.
            None => Ok(self.write_behind.take_placed(ino)),
        }
    }

    /// If `ino` was created in `dir`, held here, and its create is not committed yet:
    /// whether `dir` is draining (about to be given back; see `write_behind`).
    pub(crate) fn fresh_in(&self, dir: Ino, ino: Ino) -> Option<bool> {
        let d = self.held_dir(dir)?;
        let st = lock(&d.state);
        (!st.gone && st.fresh.contains_key(&ino)).then_some(st.draining)
    }

    /// Sends `dir`'s queue to the leader (with `give_back`, ending the delegation).
    pub(crate) async fn commit_held(&self, dir: Ino, give_back: bool) -> Result<(), Errno> {
        self.commit_held_with(dir, give_back, None).await.map(drop)
    }

    /// [`Inner::commit_held`], allocating chunk 0 of `alloc` (a file created in this
    /// queue) with it when `alloc` is given; returns that chunk and the file's attributes
    /// as committed if it was allocated. The chunks of the directory's files being written
    /// behind are placed with it too (see `write_behind`).
    async fn commit_held_with(
        &self,
        dir: Ino,
        give_back: bool,
        alloc: Option<Ino>,
    ) -> Result<Option<(ChunkLoc, Attr)>, Errno> {
        let Some(d) = self.held_dir(dir) else {
            return Ok(None);
        };
        let _one_at_a_time = d.commits.lock().await;
        if !self.held_dir(dir).is_some_and(|x| Arc::ptr_eq(&x, &d)) {
            // Given back while this waited: its queue went with it.
            return Ok(None);
        }
        if alloc.is_some_and(|ino| !lock(&d.state).fresh.contains_key(&ino)) {
            // The commit this waited for created the file (and placed its chunk if it was
            // being written behind): nothing else needs to go before its data.
            return Ok(None);
        }
        let (mut ops, fresh) = {
            let mut st = lock(&d.state);
            st.commit_due = false;
            let ops = std::mem::take(&mut st.queue);
            // The files this creates, with their attributes as the queue leaves them.
            let fresh: HashMap<Ino, Attr> = ops
                .iter()
                .filter_map(|op| match op {
                    HeldOp::Create(e) => st.fresh.get(&e.ino).map(|a| (e.ino, a.clone())),
                    _ => None,
                })
                .collect();
            (ops, fresh)
        };
        if ops.is_empty() && !give_back {
            return Ok(None);
        }
        for op in &mut ops {
            if let HeldOp::Create(e) = op {
                // Still open here: the leader records the open with the create, so that the
                // file outlives an unlink while this mount has it open.
                e.open = self.is_open_here(e.ino);
            }
        }
        let placing = match give_back {
            true => Vec::new(),
            false => self.first_chunks_to_place(alloc, &fresh),
        };
        let files: Vec<Ino> = placing.iter().map(|(ino, _)| *ino).collect();
        let meta = self.client.meta();
        let sent = match files.is_empty() {
            false => {
                meta.commit_held_allocating(dir, self.session, ops.clone(), files)
                    .await
            }
            true => meta
                .commit_held(dir, self.session, ops.clone(), give_back)
                .await
                .map(|()| Vec::new()),
        };
        if let Err(e) = &sent {
            if e.is_retryable() && !give_back {
                // The leader cannot be reached (the client already retried for its whole
                // operation timeout). Keep the changes queued and the directory held: the
                // delegation outlives an outage, and the next commit sends them again.
                let mut st = lock(&d.state);
                ops.append(&mut st.queue);
                st.queue = ops;
                warn!(dir, error = %e, "committing a held directory failed; will retry");
                return Err(Errno::EIO);
            }
        }
        let failed = sent.is_err();
        // (inode, recorded open) of each create sent.
        let created: Vec<(Ino, bool)> = ops
            .iter()
            .filter_map(|op| match op {
                HeldOp::Create(e) => Some((e.ino, e.open)),
                _ => None,
            })
            .collect();
        {
            let mut st = lock(&d.state);
            let mut queued = lock(&self.held.queued);
            // Inodes a change queued meanwhile still has (to commit with the next batch).
            let later: HashSet<Ino> = st.queue.iter().flat_map(op_inos).collect();
            for ino in ops.iter().flat_map(op_inos) {
                let fresh = st.fresh.remove(&ino);
                if !later.contains(&ino) {
                    queued.remove(&ino);
                    st.pending.remove(&ino);
                } else if let Some(a) = fresh {
                    // Created now, changed again since: its attributes stay known here until
                    // those changes are committed too (the leader's lag behind them).
                    st.pending.entry(ino).or_insert(a);
                }
            }
            if failed || give_back {
                st.gone = true;
                self.held.names.fetch_sub(st.names.len(), Ordering::Relaxed);
                let mut files = lock(&self.held.files);
                for ino in st.names.values() {
                    if files.get(ino) == Some(&dir) {
                        files.remove(ino);
                    }
                }
                st.names.clear();
            }
        }
        if failed || give_back {
            let mut dirs = lock(&self.held.dirs);
            if dirs.get(&dir).is_some_and(|x| Arc::ptr_eq(x, &d)) {
                dirs.remove(&dir);
            }
        }
        for (ino, _) in created.iter().filter(|(_, open)| *open) {
            self.created_open_recorded(*ino, !failed);
        }
        if let Err(e) = sent {
            // The leader took the directory back (this mount did not answer a recall in
            // time) or cannot be reached: these changes are lost, like unsynced data.
            warn!(dir, changes = ops.len(), error = %e, "changes in a held directory were not committed; they are lost");
            return Err(errno::meta(e));
        }
        let mut mine = None;
        for ((ino, io), loc) in placing.into_iter().zip(sent.unwrap_or_default()) {
            let (Some(loc), Some(attr)) = (loc, fresh.get(&ino)) else {
                continue;
            };
            match io {
                None => mine = Some((loc, attr.clone())),
                Some(io) => {
                    io.learn_location(&loc);
                    self.write_behind.set_placed(ino, dir, attr.clone());
                }
            }
        }
        Ok(mine)
    }

    /// The new files of a commit (`fresh`) whose first chunks it places: `alloc`'s (no
    /// `FileIo`: the caller's), then every other one open here with data buffered (being
    /// written behind, or still being written). Their flushes find the chunk placed
    /// (`settle_to_write`) instead of costing two log entries of their own (the chunk, then
    /// the write's commit): with write-behind, commits overlap the next files' writes.
    fn first_chunks_to_place(
        &self,
        alloc: Option<Ino>,
        fresh: &HashMap<Ino, Attr>,
    ) -> Vec<(Ino, Option<Arc<FileIo>>)> {
        let mut out: Vec<(Ino, Option<Arc<FileIo>>)> = alloc
            .filter(|ino| fresh.contains_key(ino))
            .map(|ino| (ino, None))
            .into_iter()
            .collect();
        for &ino in fresh.keys() {
            if out.len() >= MAX_HELD_ALLOCATIONS {
                break;
            }
            if Some(ino) == alloc {
                continue;
            }
            let io = self.io_if_open(ino);
            if let Some(io) = io.filter(|io| io.size() > 0 && io.size() <= CHUNK_SIZE) {
                out.push((ino, Some(io)));
            }
        }
        out
    }

    /// Whether `dir` is held here with changes still to commit.
    fn has_queue(&self, dir: Ino) -> bool {
        self.held_dir(dir)
            .is_some_and(|d| !lock(&d.state).queue.is_empty())
    }

    fn take_ino(self: &Arc<Self>) -> Option<Ino> {
        let (ino, low) = {
            let mut p = lock(&self.held.pool);
            let ino = p.take();
            let low = p.left() < RESERVE_LOW && !p.refilling;
            if low {
                p.refilling = true;
            }
            (ino, low)
        };
        if low {
            let me = self.clone();
            self.tasks.spawn(async move { me.refill().await });
        }
        ino
    }

    /// Waits for inode numbers (starts a reservation unless one is on its way); false if
    /// there are still none.
    async fn reserve(&self) -> bool {
        let waiting = self.held.refilled.notified();
        tokio::pin!(waiting);
        waiting.as_mut().enable();
        let start = {
            let mut p = lock(&self.held.pool);
            if p.left() > 0 {
                return true;
            }
            !std::mem::replace(&mut p.refilling, true)
        };
        if start {
            self.refill().await;
        } else {
            waiting.await;
        }
        lock(&self.held.pool).left() > 0
    }

    async fn refill(&self) {
        let got = self.client.meta().reserve_inodes(RESERVE).await;
        {
            let mut p = lock(&self.held.pool);
            p.refilling = false;
            match got {
                Ok(first) => p.ranges.push_back((first, first + u64::from(RESERVE))),
                Err(e) => warn!(error = %e, "reserving inode numbers failed"),
            }
        }
        self.held.refilled.notify_waiters();
    }
}
