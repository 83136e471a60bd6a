//! Directories whose creates this mount makes on its own: a directory this mount makes is
//! delegated to it by the metadata leader (`mkdir_held`; see rawfs-metadata's
//! `delegation.rs`), so until it gives the delegation back, the mount alone adds entries to
//! it and knows its whole content.
//!
//! ```text
//!  mkdir ──► mkdir_held ──► HeldDir { names: {}, attr }
//!  LOOKUP(dir, x)  ──► answered here (ENOENT, or the fresh file's attributes)
//!  CREATE(dir, x)  ──► inode from a reserved range, answered here, queued
//!  GETATTR(dir | fresh file) ──► answered here
//!  every COMMIT_DELAY (or COMMIT_MAX queued) ──► commit_creates(dir, queue): one log entry
//!  anything else on a fresh file ──► its directory's queue committed first ("settle")
//!  a change in or of dir, a listing, a recall from the leader, unmount ──► give_back
//! ```
//!
//! Why a create can be answered before the leader has it: nobody else can see the
//! directory's entries without recalling the delegation first, and the recall waits for the
//! queue (see the leader's `recall.rs`). What is queued is like data in a write buffer: it
//! is on the leader once `fsync` (of the file or the directory) returns, and if the mount
//! dies before that it is gone. A mount cut off from the leader for longer than the
//! recall wait loses its delegation; its late commit is refused, the files it had shown are
//! gone, and the error is logged.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::Errno;
use rawfs_metadata_api::{Attr, Caller, FileKind, HeldCreate, Ino, Name, Timespec};
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
/// Setgid bit of a directory (new entries take its group).
const S_ISGID: u32 = 0o2000;

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
    /// Fresh (uncommitted) inode -> its directory.
    fresh: Mutex<HashMap<Ino, Ino>>,
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

struct HeldDir {
    state: Mutex<DirState>,
    /// Commits of one directory go one at a time, in order.
    commits: tokio::sync::Mutex<()>,
}

struct DirState {
    /// The directory's attributes as this mount shows them.
    attr: Attr,
    names: HashMap<Vec<u8>, Ino>,
    /// Children not committed yet, with the attributes the kernel was given.
    fresh: HashMap<Ino, Attr>,
    /// Creates not sent yet.
    queue: Vec<HeldCreate>,
    /// Being given back (or lost): nothing more is answered here.
    gone: bool,
    /// A commit of the queue is scheduled.
    commit_due: bool,
}

impl Inner {
    /// Makes directory `parent/name` as a held one: the leader records the delegation with
    /// the directory. Reserves inode numbers first if none are left.
    pub(crate) async fn mkdir_held(
        self: &Arc<Self>,
        parent: Ino,
        name: Name,
        node: rawfs_metadata_api::NewNode,
        caller: Caller,
    ) -> Result<Attr, Errno> {
        self.give_back(parent).await;
        self.reserve().await;
        let a = self
            .client
            .meta()
            .mkdir_held(parent, name, node, caller, self.session)
            .await
            .map_err(errno::meta)?;
        let dir = HeldDir {
            state: Mutex::new(DirState {
                attr: a.clone(),
                names: HashMap::new(),
                fresh: HashMap::new(),
                queue: Vec::new(),
                gone: false,
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

    fn held_dir(&self, dir: Ino) -> Option<Arc<HeldDir>> {
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

    /// The attributes of a held directory or of a fresh file, if `ino` is one.
    pub(crate) fn held_attr(&self, ino: Ino) -> Option<Attr> {
        if let Some(d) = self.held_dir(ino) {
            let st = lock(&d.state);
            if !st.gone {
                return Some(st.attr.clone());
            }
        }
        let dir = *lock(&self.held.fresh).get(&ino)?;
        let d = self.held_dir(dir)?;
        let st = lock(&d.state);
        st.fresh.get(&ino).cloned()
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
            let gid = if st.attr.perm & S_ISGID != 0 {
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
            };
            st.names.insert(name.to_vec(), ino);
            self.held.names.fetch_add(1, Ordering::Relaxed);
            st.fresh.insert(ino, attr.clone());
            st.queue.push(HeldCreate {
                name: name.clone(),
                ino,
                perm: attr.perm,
                uid: attr.uid,
                gid: attr.gid,
                time: now,
                open: false,
            });
            st.attr.mtime = now;
            st.attr.ctime = now;
            let schedule = !st.commit_due;
            st.commit_due = true;
            (attr, st.queue.len() >= COMMIT_MAX, schedule)
        };
        lock(&self.held.fresh).insert(ino, dir);
        if commit_now || schedule {
            let me = self.clone();
            self.tasks.spawn(async move {
                if !commit_now {
                    tokio::time::sleep(COMMIT_DELAY).await;
                }
                while me.commit_held(dir, false).await.is_err() && me.has_queue(dir) {
                    tokio::time::sleep(RETRY).await;
                }
            });
        }
        Ok(Made::Created(attr))
    }

    /// Commits the queue of `ino`'s directory if `ino` is a fresh file, so that the leader
    /// knows it before anything else is asked about it.
    pub(crate) async fn settle(&self, ino: Ino) -> Result<(), Errno> {
        let dir = lock(&self.held.fresh).get(&ino).copied();
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
        lock(&d.state).gone = true;
        if let Err(e) = self.commit_held(dir, true).await {
            warn!(dir, error = ?e, "giving a held directory back failed");
        }
    }

    /// Gives every held directory back (at unmount).
    pub(crate) async fn give_back_all(&self) {
        let dirs: Vec<Ino> = lock(&self.held.dirs).keys().copied().collect();
        for dir in dirs {
            self.give_back(dir).await;
        }
    }

    /// Sends `dir`'s queue to the leader (with `give_back`, ending the delegation).
    async fn commit_held(&self, dir: Ino, give_back: bool) -> Result<(), Errno> {
        let Some(d) = self.held_dir(dir) else {
            return Ok(());
        };
        let _one_at_a_time = d.commits.lock().await;
        if !self.held_dir(dir).is_some_and(|x| Arc::ptr_eq(&x, &d)) {
            // Given back while this waited: its queue went with it.
            return Ok(());
        }
        let mut entries = {
            let mut st = lock(&d.state);
            st.commit_due = false;
            std::mem::take(&mut st.queue)
        };
        if entries.is_empty() && !give_back {
            return Ok(());
        }
        for e in &mut entries {
            // Still open here: the leader records the open with the create, so that the
            // file outlives an unlink while this mount has it open.
            e.open = self.is_open_here(e.ino);
        }
        let sent = self
            .client
            .meta()
            .commit_creates(dir, self.session, entries.clone(), give_back)
            .await;
        if let Err(e) = &sent {
            if e.is_retryable() && !give_back {
                // The leader cannot be reached (the client already retried for its whole
                // operation timeout). Keep the creates queued and the directory held: the
                // delegation outlives an outage, and the next commit sends them again.
                let mut st = lock(&d.state);
                entries.append(&mut st.queue);
                st.queue = entries;
                warn!(dir, error = %e, "committing creates failed; will retry");
                return Err(Errno::EIO);
            }
        }
        let failed = sent.is_err();
        {
            let mut st = lock(&d.state);
            let mut fresh = lock(&self.held.fresh);
            for e in &entries {
                st.fresh.remove(&e.ino);
                fresh.remove(&e.ino);
                if failed && st.names.remove(e.name.as_slice()).is_some() {
                    self.held.names.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if failed || give_back {
                st.gone = true;
                self.held.names.fetch_sub(st.names.len(), Ordering::Relaxed);
                st.names.clear();
            }
        }
        if failed || give_back {
            let mut dirs = lock(&self.held.dirs);
            if dirs.get(&dir).is_some_and(|x| Arc::ptr_eq(x, &d)) {
                dirs.remove(&dir);
            }
        }
        for e in entries.iter().filter(|e| e.open) {
            self.created_open_recorded(e.ino, !failed);
        }
        if let Err(e) = sent {
            // The leader took the directory back (this mount did not answer a recall in
            // time) or cannot be reached: these creates are lost, like unsynced data.
            warn!(dir, files = entries.len(), error = %e, "creates in a held directory were not committed; they are lost");
            return Err(errno::meta(e));
        }
        Ok(())
    }

    /// Whether `dir` is held here with creates still to commit.
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
