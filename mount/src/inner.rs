//! The state one mount shares between its callbacks: the client, the open-file table (one
//! [`FileIo`] per open inode, shared by every handle), directory cursors, and small caches.
//! Every lock here is a short synchronous critical section, never held across an `.await`.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuser::{Errno, FileAttr};
use rawfs_client::{Client, FileIo};
use rawfs_metadata_api::{Attr, Caller, FileKind, Ino, Name, NAME_MAX};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::attr::{file_attr, InoMap};
use crate::coherence::Coherence;
use crate::errno;
use crate::ops_dir::DirCursor;

/// How long the releaser gathers releases before sending them.
const RELEASE_DELAY: Duration = Duration::from_millis(10);
/// Most releases in one call.
const RELEASE_MAX: usize = 4096;
/// Caches of "this inode has no `security.capability`" are dropped past this many inodes.
const NO_CAPS_LIMIT: usize = 100_000;

/// What `lookup`, `mknod`, `link` and friends answer: attributes plus cache lifetimes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) attr: FileAttr,
    pub(crate) attr_ttl: Duration,
    pub(crate) entry_ttl: Duration,
}

/// One open inode: the shared I/O object and how many kernel handles use it. The mount holds
/// one server-side open per inode for all of them (taken by `open` or `create`).
struct OpenFile {
    io: Arc<FileIo>,
    handles: u32,
    /// The metadata service has this mount's open of it recorded (false for a file created
    /// in a held directory until its create is committed with the open; see `held`).
    server_open: bool,
}

/// Per-mount state shared by all callbacks and their tasks.
pub(crate) struct Inner {
    pub(crate) client: Client,
    /// This mount's session id at the metadata service (keeps unlinked open files alive).
    pub(crate) session: u64,
    pub(crate) map: InoMap,
    pub(crate) attr_ttl: Duration,
    pub(crate) entry_ttl: Duration,
    files: Mutex<HashMap<Ino, OpenFile>>,
    pub(crate) dirs: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<DirCursor>>>>,
    /// Parent of each directory seen, for the `..` entry of `readdir` (cosmetic: the kernel
    /// resolves `..` itself).
    parents: Mutex<HashMap<Ino, Ino>>,
    /// Inodes known to have no `security.capability`. The kernel asks for it before every
    /// write (to strip capabilities); caching the negative answer saves a metadata round trip
    /// per write. Invalidated by this mount's own xattr changes.
    no_caps: Mutex<HashSet<Ino>>,
    next_fh: AtomicU64,
    /// Every task of this mount, so that unmount can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Takes back what the kernel caches when other clients change it.
    pub(crate) coherence: Arc<Coherence>,
    /// Server-side opens to give back, sent in batches by the releaser task.
    releases: Mutex<Option<mpsc::UnboundedSender<Ino>>>,
    /// Directories whose creates this mount makes itself.
    pub(crate) held: crate::held::Held,
    /// New directories are made held (`-o delegate`).
    pub(crate) delegate: bool,
    /// Which files' kernel page cache survives the next open.
    pub(crate) page_cache: crate::page_cache::PageCache,
    /// New small files whose data goes out after their `close` returned.
    pub(crate) write_behind: crate::write_behind::WriteBehind,
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: the tables stay
/// consistent between statements, so the data is still good.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A directory-entry name from the kernel, checked against `NAME_MAX`.
pub(crate) fn name(n: &OsStr) -> Result<Name, Errno> {
    let b = n.as_bytes();
    if b.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    Ok(ByteBuf::from(b.to_vec()))
}

impl Inner {
    pub(crate) fn new(
        client: Client,
        session: u64,
        root: Ino,
        attr_ttl: Duration,
        entry_ttl: Duration,
    ) -> Self {
        Inner {
            client,
            session,
            map: InoMap { root },
            coherence: Arc::new(Coherence::new(InoMap { root }, entry_ttl, attr_ttl)),
            attr_ttl,
            entry_ttl,
            files: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            parents: Mutex::new(HashMap::new()),
            no_caps: Mutex::new(HashSet::new()),
            next_fh: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            releases: Mutex::new(None),
            held: crate::held::Held::default(),
            delegate: true,
            page_cache: Default::default(),
            write_behind: Default::default(),
        }
    }

    /// Starts the task that gives server-side opens back. A release only ends the protection
    /// of an unlinked inode, so nobody waits for it: the task gathers the releases of up to
    /// `RELEASE_DELAY` and sends them in one call, which the metadata service commits as one
    /// log entry instead of one per closed file.
    pub(crate) fn start_releaser(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Ino>();
        *lock(&self.releases) = Some(tx);
        // Weak: the task must not keep the mount's state alive; it ends with the channel.
        let me = Arc::downgrade(self);
        rt.spawn(async move {
            while let Some(first) = rx.recv().await {
                tokio::time::sleep(RELEASE_DELAY).await;
                let mut batch = vec![first];
                while let Ok(ino) = rx.try_recv() {
                    batch.push(ino);
                }
                let Some(me) = me.upgrade() else { return };
                for piece in batch.chunks(RELEASE_MAX) {
                    if let Err(e) = me
                        .client
                        .meta()
                        .release_many(piece.to_vec(), me.session)
                        .await
                    {
                        // The opens stay recorded until end_session; unlinked inodes live that long.
                        warn!(inodes = piece.len(), error = %e, "metadata release failed");
                    }
                }
            }
        });
    }

    /// Starts the task that gives held directories back when the leader recalls them.
    pub(crate) fn start_recalls(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Ino>();
        self.coherence.on_recall(self.session, tx);
        let me = Arc::downgrade(self);
        rt.spawn(async move {
            while let Some(dir) = rx.recv().await {
                let Some(me) = me.upgrade() else { return };
                me.give_back(dir).await;
            }
        });
    }

    pub(crate) fn next_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn caller(req: &fuser::Request) -> Caller {
        Caller {
            uid: req.uid(),
            gid: req.gid(),
        }
    }

    /// The size this mount knows for `ino` if it has it open (includes buffered writes).
    pub(crate) fn open_size(&self, ino: Ino) -> Option<u64> {
        lock(&self.files).get(&ino).map(|f| f.io.size())
    }

    /// Kernel attributes for `a`, with the size of buffered writes if the file is open here.
    pub(crate) fn attr(&self, a: &Attr) -> FileAttr {
        self.coherence.handed_attr(a);
        let size = if a.kind == FileKind::File {
            self.open_size(a.ino)
        } else {
            None
        };
        file_attr(&self.map, a, size)
    }

    /// An entry reply for `a`; remembers the parent of directories.
    pub(crate) fn entry(&self, parent: Ino, name: &[u8], a: &Attr) -> Entry {
        if a.kind == FileKind::Dir {
            self.set_parent(a.ino, parent);
        }
        self.coherence.handed_entry(parent, name, a.ino);
        Entry {
            attr: self.attr(a),
            attr_ttl: self.attr_ttl,
            entry_ttl: self.entry_ttl,
        }
    }

    pub(crate) fn set_parent(&self, dir: Ino, parent: Ino) {
        lock(&self.parents).insert(dir, parent);
    }

    pub(crate) fn parent(&self, dir: Ino) -> Option<Ino> {
        if dir == self.map.root {
            return Some(dir);
        }
        lock(&self.parents).get(&dir).copied()
    }

    pub(crate) fn forget(&self, ino: Ino) {
        lock(&self.parents).remove(&ino);
        lock(&self.no_caps).remove(&ino);
        self.coherence.forget(ino);
        self.page_cache.forget(ino);
    }

    pub(crate) fn knows_no_caps(&self, ino: Ino) -> bool {
        lock(&self.no_caps).contains(&ino)
    }

    pub(crate) fn set_no_caps(&self, ino: Ino, absent: bool) {
        let mut s = lock(&self.no_caps);
        if absent {
            if s.len() >= NO_CAPS_LIMIT {
                s.clear();
            }
            s.insert(ino);
        } else {
            s.remove(&ino);
        }
    }

    /// The shared I/O object of an open inode.
    pub(crate) fn io(&self, ino: Ino) -> Result<Arc<FileIo>, Errno> {
        self.io_if_open(ino).ok_or(Errno::EBADF)
    }

    pub(crate) fn io_if_open(&self, ino: Ino) -> Option<Arc<FileIo>> {
        lock(&self.files).get(&ino).map(|f| f.io.clone())
    }

    /// Takes one handle on `ino`: reuses the inode's `FileIo` if it is open here, else
    /// registers the open with the metadata service (which keeps an unlinked inode alive
    /// until we release it; the reply also gives the size) and creates one. Returns the
    /// attributes the metadata service gave for a new entry (None when it reused one).
    pub(crate) async fn open_file(&self, ino: Ino) -> Result<Option<Attr>, Errno> {
        if self.attach(ino) {
            return Ok(None);
        }
        let attr = self
            .client
            .meta()
            .open(ino, self.session)
            .await
            .map_err(errno::meta)?;
        if attr.kind == FileKind::Dir {
            // Not reached through the kernel (it uses opendir), but never cache a directory.
            self.release_server_open(ino).await;
            return Err(Errno::EISDIR);
        }
        if !self.insert(&attr, true) {
            // Another open of the same inode won; it holds the one server-side open this
            // mount keeps per inode, so give ours back.
            self.release_server_open(ino).await;
            return Ok(None);
        }
        Ok(Some(attr))
    }

    /// Takes a handle on a file this mount just created with `create`, which also recorded
    /// the server-side open (so no other client's unlink can free it from under us).
    pub(crate) async fn open_created(&self, attr: &Attr) {
        if !self.insert(attr, true) {
            // It was already open here: the mount keeps one server-side open per inode.
            self.release_server_open(attr.ino).await;
        }
    }

    /// Takes the first handle on a file created in a held directory: its open is recorded
    /// by the leader only when the create is committed (`created_open_recorded`).
    pub(crate) fn open_fresh(&self, attr: &Attr) {
        self.insert(attr, false);
        self.set_no_caps(attr.ino, true);
    }

    /// Whether this mount has `ino` open.
    pub(crate) fn is_open_here(&self, ino: Ino) -> bool {
        lock(&self.files).contains_key(&ino)
    }

    /// A committed create recorded this mount's open of `ino` (if `recorded`): the file's
    /// last close releases it, or, if it is closed already, it is released now.
    pub(crate) fn created_open_recorded(&self, ino: Ino, recorded: bool) {
        if !recorded {
            return;
        }
        let closed = match lock(&self.files).get_mut(&ino) {
            Some(f) => {
                f.server_open = true;
                false
            }
            None => true,
        };
        if closed {
            self.queue_release(ino);
        }
    }

    /// Adds a new entry for `attr`'s inode, or a handle to the existing one (returns false).
    fn insert(&self, attr: &Attr, server_open: bool) -> bool {
        let mut files = lock(&self.files);
        match files.entry(attr.ino) {
            MapEntry::Occupied(mut e) => {
                e.get_mut().handles += 1;
                false
            }
            MapEntry::Vacant(v) => {
                v.insert(OpenFile {
                    io: Arc::new(self.client.file(attr.ino, attr.size)),
                    handles: 1,
                    server_open,
                });
                true
            }
        }
    }

    /// Adds a handle to an inode already open here; false if it is not.
    fn attach(&self, ino: Ino) -> bool {
        match lock(&self.files).get_mut(&ino) {
            Some(f) => {
                f.handles += 1;
                true
            }
            None => false,
        }
    }

    /// Drops one handle of `ino`. The last one flushes the buffer, forgets the `FileIo` and
    /// releases the server-side open (which frees an unlinked inode).
    pub(crate) async fn close_file(self: &Arc<Self>, ino: Ino) -> Result<(), Errno> {
        let io = {
            let mut files = lock(&self.files);
            let Some(f) = files.get_mut(&ino) else {
                return Ok(());
            };
            f.handles = f.handles.saturating_sub(1);
            if f.handles > 0 {
                return Ok(());
            }
            f.io.clone()
        };
        self.behind_done(ino).await;
        let flushed = if !io.has_unwritten() {
            // Nothing to write: a queued change of the file (a held setattr) stays queued.
            Ok(())
        } else {
            self.flush_file(ino, &io).await
        };
        // An open that arrived during the flush reuses the entry; only remove it if nobody did.
        let last = {
            let mut files = lock(&self.files);
            match files.get(&ino) {
                Some(f) if f.handles == 0 && Arc::ptr_eq(&f.io, &io) => {
                    // A chunk placed for data that never went out (see `write_behind`).
                    self.write_behind.take_placed(ino);
                    files.remove(&ino).is_some_and(|f| f.server_open)
                }
                _ => false,
            }
        };
        if last {
            self.queue_release(ino);
        }
        flushed.map(|_| ())
    }

    /// Gives this mount's server-side open of `ino` back. It only ends the protection of an
    /// unlinked inode: nobody waits on it, so it leaves the close path (batched by the
    /// releaser; unmount ends the session, which drops whatever is still queued).
    fn queue_release(&self, ino: Ino) {
        let queued = lock(&self.releases)
            .as_ref()
            .is_some_and(|tx| tx.send(ino).is_ok());
        if !queued {
            let client = self.client.clone();
            let session = self.session;
            self.tasks.spawn(async move {
                if let Err(e) = client.meta().release(ino, session).await {
                    warn!(ino, error = %e, "metadata release failed");
                }
            });
        }
    }

    async fn release_server_open(&self, ino: Ino) {
        if let Err(e) = self.client.meta().release(ino, self.session).await {
            // The open stays recorded until end_session; an unlinked inode lives that long.
            warn!(ino, error = %e, "metadata release failed");
        }
    }

    /// Flushes every open file (on unmount), returning how many failed.
    pub(crate) async fn flush_all(&self) -> usize {
        let open: Vec<(Ino, Arc<FileIo>)> = lock(&self.files)
            .iter()
            .map(|(ino, f)| (*ino, f.io.clone()))
            .collect();
        let mut failed = 0;
        for (ino, io) in open {
            if let Err(e) = io.flush().await {
                warn!(ino, error = %e, "flush at unmount failed; buffered data is lost");
                failed += 1;
            }
        }
        failed
    }
}
