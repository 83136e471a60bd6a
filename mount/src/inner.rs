//! The state one mount shares between its callbacks: the client, the open-file table (one
//! [`FileIo`] per open inode, shared by every handle; kept by `opens.rs`), directory
//! cursors, and small caches.
//! Every lock here is a short synchronous critical section, never held across an `.await`.

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
use crate::coherence::{Coherence, Recalled};
use crate::opens::{OpenFiles, ReleaseMsg};
use crate::ops_dir::OpenDir;

/// Caches of "this inode has no `security.capability`" are dropped past this many inodes.
const NO_CAPS_LIMIT: usize = 100_000;

/// What `lookup`, `mknod`, `link` and friends answer: attributes plus cache lifetimes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) attr: FileAttr,
    pub(crate) attr_ttl: Duration,
    pub(crate) entry_ttl: Duration,
}

/// Per-mount state shared by all callbacks and their tasks.
pub(crate) struct Inner {
    pub(crate) client: Client,
    /// This mount's session id at the metadata service (keeps unlinked open files alive).
    pub(crate) session: u64,
    pub(crate) map: InoMap,
    pub(crate) attr_ttl: Duration,
    pub(crate) entry_ttl: Duration,
    pub(crate) files: Mutex<OpenFiles>,
    pub(crate) dirs: Mutex<HashMap<u64, OpenDir>>,
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
    pub(crate) releases: Mutex<Option<mpsc::UnboundedSender<ReleaseMsg>>>,
    /// Wakes the task that sends leased opens to a new leader.
    pub(crate) reopens: Mutex<Option<mpsc::UnboundedSender<()>>>,
    /// Directories whose creates this mount makes itself.
    pub(crate) held: crate::held::Held,
    /// New directories are made held (`-o delegate`).
    pub(crate) delegate: bool,
    /// Which locks the kernel keeps local (`-o local_lock=`); the others are the cluster's.
    pub(crate) local_lock: crate::options::LocalLock,
    /// Which files' kernel page cache survives the next open.
    pub(crate) page_cache: crate::page_cache::PageCache,
    /// New small files whose data goes out after their `close` returned.
    pub(crate) write_behind: crate::write_behind::WriteBehind,
    /// Byte-range locks this mount may hold at the leader.
    pub(crate) locks: crate::locks::Locks,
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
            files: Mutex::new(OpenFiles::default()),
            dirs: Mutex::new(HashMap::new()),
            parents: Mutex::new(HashMap::new()),
            no_caps: Mutex::new(HashSet::new()),
            next_fh: AtomicU64::new(1),
            tasks: TaskTracker::new(),
            releases: Mutex::new(None),
            reopens: Mutex::new(None),
            held: crate::held::Held::default(),
            delegate: true,
            local_lock: Default::default(),
            page_cache: Default::default(),
            write_behind: Default::default(),
            locks: Default::default(),
        }
    }

    /// Starts the task that gives held directories and locks back when the leader recalls
    /// them.
    pub(crate) fn start_recalls(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Recalled>();
        self.coherence.on_recall(self.session, tx);
        let me = Arc::downgrade(self);
        rt.spawn(async move {
            while let Some(what) = rx.recv().await {
                let Some(me) = me.upgrade() else { return };
                match what {
                    Recalled::Dir(dir) => me.give_back(dir).await,
                    // Not behind a directory's commit: a lock waiter on another mount waits.
                    Recalled::Locks(ino) => drop(tokio::spawn(async move {
                        me.return_locks(ino).await;
                    })),
                }
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
        // A directory held here is what this mount says it is: the leader's answer (a
        // lookup from its parent, a listing) lacks what is still queued, its own mode and
        // times included, and the kernel would take that over the fresher reply it had.
        let held;
        let a = match a.kind {
            FileKind::Dir => match self.held_attr(a.ino) {
                Some(h) => {
                    held = h;
                    &held
                }
                None => a,
            },
            _ => a,
        };
        self.coherence.handed_attr(a);
        // Once its entry is gone, a file with changes queued in a held directory has the size
        // its last close left in the attributes kept there (`held_closing` runs before the
        // entry goes): an answer made from kept attributes, or from the leader, read before
        // that close may have the create's size.
        let size = if a.kind == FileKind::File {
            self.open_size(a.ino).or_else(|| self.kept_size(a.ino))
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
