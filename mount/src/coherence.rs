//! Cache coherence between mounts: the kernel keeps names and attributes for the mount's
//! `entry_timeout`/`attr_timeout`, and this module takes them back as soon as another client
//! changes them.
//!
//! ```text
//!  metadata leader: every applied change ──► event log (seq, origin client, Inval)
//!        ▲ watch(epoch, from) long poll                     │
//!        │                                                   ▼
//!  watch task (metadata thread) ── skip own name changes ──► notice channel
//!                                                             │
//!  invalidation thread: Notifier::inval_entry / inval_inode ◄─┘ ──► kernel caches
//! ```
//!
//! The mount remembers which names and inodes it handed to the kernel, and until when the
//! kernel may keep them. Whenever events may have been missed — the watch failed, the leader
//! changed (a new epoch), or the log moved past us — it takes back everything still cached,
//! so staleness is bounded by the time to notice that, not by the cache lifetimes.
//!
//! Name changes made through this mount are skipped: the kernel already applied them to its
//! own dentries (and taking back a name this mount just created would cost a lookup per
//! `stat`). The leader does not even send them, nor the attribute changes of the directories
//! they touched (the kernel drops those itself), so a mount creating many files is not woken
//! once per file. Other attribute changes are never skipped: the kernel does not know, for
//! example, the mtime a background flush stamped.
//!
//! The kernel calls run on their own thread: invalidating a name takes the directory's lock,
//! which a request of ours may hold while it waits for an answer from the metadata thread.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fuser::{INodeNo, Notifier};
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{Attr, FileKind, Ino, Inval, Name};
use tracing::{debug, info, warn};

use crate::attr::InoMap;
use crate::inner::lock;

/// How long the leader may hold a watch call open when nothing happens.
const WATCH_WAIT_MS: u32 = 1000;
/// Pause between failed watch calls.
const RETRY: Duration = Duration::from_millis(200);
/// How often expired records are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// After an inode's attributes change, attributes of it that arrive within this time may
/// have been read before the change, so their "no xattrs" is not believed.
const SPOIL: Duration = Duration::from_secs(1);

/// What the kernel may have cached, with when its lifetime ends.
#[derive(Default)]
struct Handed {
    entries: HashMap<(Ino, Name), Instant>,
    inodes: HashMap<Ino, Instant>,
    /// Inodes last reported to have no xattrs, until when that may be believed (the
    /// attribute lifetime): `getxattr` and `listxattr` of them are answered here.
    no_xattrs: HashMap<Ino, Instant>,
    /// Permission bits and group of regular files as handed to the kernel, until when they
    /// may be believed: a write that would not drop setuid or setgid is answered without
    /// asking.
    modes: HashMap<Ino, (u32, u32, Instant)>,
    /// When each inode last changed (an event, or this mount's own xattr change).
    spoiled: HashMap<Ino, Instant>,
    /// When every cached attribute was last taken back.
    spoiled_all: Option<Instant>,
    /// Inodes this mount opened for writing with `O_DIRECT`, until the kernel forgets them:
    /// such writes bypass the kernel's pages, which only kernels from 6.6 on drop for them,
    /// so this mount's own changes to these take back the pages too.
    direct: HashSet<Ino>,
}

impl Handed {
    fn spoiled_lately(&self, ino: Ino, now: Instant) -> bool {
        let lately = |t: &Instant| now.saturating_duration_since(*t) < SPOIL;
        self.spoiled_all.as_ref().is_some_and(lately) || self.spoiled.get(&ino).is_some_and(lately)
    }

    fn spoil(&mut self, ino: Ino, now: Instant) {
        self.no_xattrs.remove(&ino);
        self.modes.remove(&ino);
        self.spoiled.insert(ino, now);
    }
}

/// One kernel cache invalidation, in kernel inode numbers.
enum Notice {
    Entry(INodeNo, Name),
    /// An inode's attributes, and its cached pages too when `pages`.
    Inode {
        ino: INodeNo,
        pages: bool,
    },
    /// Answered once every notice before it is done.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// The mount's side of cache coherence (see the module docs).
pub(crate) struct Coherence {
    map: InoMap,
    entry_ttl: Duration,
    attr_ttl: Duration,
    handed: Mutex<Handed>,
    notices: Mutex<Option<std_mpsc::Sender<Notice>>>,
    /// Where recalls of this mount's delegations go: (its session, the channel).
    recalls: Mutex<Option<(u64, tokio::sync::mpsc::UnboundedSender<Recalled>)>>,
    /// The leader's epoch the watch follows (0 before the first answer).
    epoch: AtomicU64,
    /// Told of each new epoch (leased opens are sent to the new leader).
    epochs: Mutex<Option<tokio::sync::mpsc::UnboundedSender<()>>>,
    /// Called with an inode another client changed (`None`: any may have changed), before
    /// the change is acknowledged, to drop what open files read ahead of it.
    foreign_data: Mutex<Option<DataHook>>,
}

/// A delegation the leader takes back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recalled {
    /// A held directory (`held.rs`).
    Dir(Ino),
    /// The locks of an inode (`locks.rs`).
    Locks(Ino),
}

/// See [`Coherence::on_foreign_data`].
pub(crate) type DataHook = Arc<dyn Fn(Option<Ino>) + Send + Sync>;

impl Coherence {
    pub(crate) fn new(map: InoMap, entry_ttl: Duration, attr_ttl: Duration) -> Self {
        Coherence {
            map,
            entry_ttl,
            attr_ttl,
            handed: Mutex::new(Handed::default()),
            notices: Mutex::new(None),
            recalls: Mutex::new(None),
            epoch: AtomicU64::new(0),
            epochs: Mutex::new(None),
            foreign_data: Mutex::new(None),
        }
    }

    /// Calls `hook` for every inode whose data or size another client changes (`None`
    /// when events were missed), before the change is acknowledged to the leader.
    pub(crate) fn on_foreign_data(&self, hook: DataHook) {
        *lock(&self.foreign_data) = Some(hook);
    }

    fn foreign_data(&self, ino: Option<Ino>) {
        let hook = lock(&self.foreign_data).clone();
        if let Some(hook) = hook {
            hook(ino);
        }
    }

    /// Tells `tx` whenever the watch reaches a leader of a new epoch.
    pub(crate) fn on_new_epoch(&self, tx: tokio::sync::mpsc::UnboundedSender<()>) {
        *lock(&self.epochs) = Some(tx);
    }

    /// The epoch of the leader the watch last reached (0: none yet).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn new_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::SeqCst);
        if let Some(tx) = lock(&self.epochs).as_ref() {
            let _ = tx.send(());
        }
    }

    /// Sends the delegations the leader recalls from mount session `session` to `tx`.
    pub(crate) fn on_recall(&self, session: u64, tx: tokio::sync::mpsc::UnboundedSender<Recalled>) {
        *lock(&self.recalls) = Some((session, tx));
    }

    /// Records that the kernel was given `parent/name` (and the attributes of `ino`).
    pub(crate) fn handed_entry(&self, parent: Ino, name: &[u8], ino: Ino) {
        let now = Instant::now();
        let mut h = lock(&self.handed);
        h.entries
            .insert((parent, Name::from(name.to_vec())), now + self.entry_ttl);
        h.inodes.insert(ino, now + self.attr_ttl);
    }

    /// Records that the kernel was given the attributes `a`, and whether `a.ino` has no
    /// xattrs.
    pub(crate) fn handed_attr(&self, a: &Attr) {
        let now = Instant::now();
        let until = now + self.attr_ttl;
        let mut h = lock(&self.handed);
        h.inodes.insert(a.ino, until);
        if a.kind != FileKind::File || h.spoiled_lately(a.ino, now) {
            h.modes.remove(&a.ino);
        } else {
            h.modes.insert(a.ino, (a.perm, a.gid, until));
        }
        if a.no_xattrs && !h.spoiled_lately(a.ino, now) {
            h.no_xattrs.insert(a.ino, until);
        } else {
            h.no_xattrs.remove(&a.ino);
        }
    }

    /// True if `ino` is known to have no xattrs (as coherent as the kernel's attributes).
    pub(crate) fn knows_no_xattrs(&self, ino: Ino) -> bool {
        let now = Instant::now();
        lock(&self.handed)
            .no_xattrs
            .get(&ino)
            .is_some_and(|until| *until > now)
    }

    /// The permission bits and group of `ino`, a regular file, as the kernel has them, if
    /// still believed (`None` for other kinds of inode).
    pub(crate) fn mode(&self, ino: Ino) -> Option<(u32, u32)> {
        let now = Instant::now();
        match lock(&self.handed).modes.get(&ino) {
            Some(&(perm, gid, until)) if until > now => Some((perm, gid)),
            _ => None,
        }
    }

    /// Forgets what is known of `ino`'s xattrs (before and after this mount changes them).
    pub(crate) fn xattrs_changed(&self, ino: Ino) {
        lock(&self.handed).spoil(ino, Instant::now());
    }

    /// The kernel forgot `ino`.
    pub(crate) fn forget(&self, ino: Ino) {
        let mut h = lock(&self.handed);
        h.no_xattrs.remove(&ino);
        h.modes.remove(&ino);
        h.direct.remove(&ino);
    }

    /// This mount opened `ino` for writing with `O_DIRECT` (see `Handed::direct`).
    pub(crate) fn direct_writer(&self, ino: Ino) {
        lock(&self.handed).direct.insert(ino);
    }

    /// Starts the invalidation thread and the watch task (on `rt`, the metadata runtime).
    pub(crate) fn start(
        self: &Arc<Self>,
        notifier: Notifier,
        meta: MetadataClient,
        rt: &tokio::runtime::Handle,
    ) -> std::io::Result<()> {
        let (tx, rx) = std_mpsc::channel::<Notice>();
        std::thread::Builder::new()
            .name("rawfs-inval".into())
            .spawn(move || invalidate_loop(notifier, rx))?;
        *lock(&self.notices) = Some(tx);
        rt.spawn(watch_loop(Arc::downgrade(self), meta));
        Ok(())
    }

    fn send(&self, n: Notice) {
        if let Some(tx) = lock(&self.notices).as_ref() {
            let _ = tx.send(n);
        }
    }

    /// Takes back what `inval` names; `foreign`: another client's change.
    fn apply(&self, inval: Inval, foreign: bool) {
        match inval {
            Inval::Inode(ino) => {
                let pages = {
                    let mut h = lock(&self.handed);
                    h.inodes.remove(&ino);
                    // This mount's own xattr changes spoil the inode themselves; its other
                    // changes leave the xattrs as they were.
                    if foreign {
                        h.spoil(ino, Instant::now());
                    }
                    foreign || h.direct.contains(&ino)
                };
                if foreign {
                    self.foreign_data(Some(ino));
                }
                // This mount's own content changes came through the kernel, which updated
                // (or, for truncates, punches and copies, dropped) the pages itself: only
                // the attributes are stale (the leader stamped the times). Dropping the pages
                // too cost a sequential writer its whole page cache at every flush.
                self.send(Notice::Inode {
                    ino: self.map.fuse(ino),
                    pages,
                });
            }
            Inval::Entry { parent, name } => {
                lock(&self.handed).entries.remove(&(parent, name.clone()));
                self.send(Notice::Entry(self.map.fuse(parent), name));
            }
            Inval::Recall { dir, holder } => self.recalled(holder, Recalled::Dir(dir)),
            Inval::RecallLocks { ino, holder } => self.recalled(holder, Recalled::Locks(ino)),
        }
    }

    fn recalled(&self, holder: u64, what: Recalled) {
        if let Some((session, tx)) = lock(&self.recalls).as_ref() {
            if *session == holder {
                let _ = tx.send(what);
            }
        }
    }

    /// Takes back everything the kernel may still hold; `missed`: events were lost (not the
    /// first sync), so attributes read before now are suspect a while longer.
    fn invalidate_all(&self, missed: bool) {
        let now = Instant::now();
        let (entries, inodes) = {
            let mut h = lock(&self.handed);
            h.no_xattrs.clear();
            h.modes.clear();
            h.spoiled.clear();
            if missed {
                h.spoiled_all = Some(now);
            }
            let entries: Vec<(Ino, Name)> = h
                .entries
                .drain()
                .filter(|(_, until)| *until > now)
                .map(|(k, _)| k)
                .collect();
            let inodes: Vec<Ino> = h
                .inodes
                .drain()
                .filter(|(_, until)| *until > now)
                .map(|(k, _)| k)
                .collect();
            (entries, inodes)
        };
        debug!(
            entries = entries.len(),
            inodes = inodes.len(),
            "taking back every cached name and attribute"
        );
        self.foreign_data(None);
        for (parent, name) in entries {
            self.send(Notice::Entry(self.map.fuse(parent), name));
        }
        for ino in inodes {
            self.send(Notice::Inode {
                ino: self.map.fuse(ino),
                pages: true,
            });
        }
    }

    /// Waits until the invalidation thread has handled every notice sent so far.
    async fn applied(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Notice::Barrier(tx));
        let _ = rx.await;
    }

    fn sweep(&self) {
        let now = Instant::now();
        let mut h = lock(&self.handed);
        h.entries.retain(|_, until| *until > now);
        h.inodes.retain(|_, until| *until > now);
        h.no_xattrs.retain(|_, until| *until > now);
        h.modes.retain(|_, (_, _, until)| *until > now);
        h.spoiled
            .retain(|_, t| now.saturating_duration_since(*t) < SPOIL);
    }
}

async fn watch_loop(me: std::sync::Weak<Coherence>, meta: MetadataClient) {
    let own = meta.client_id();
    let mut epoch = 0u64;
    let mut next = 0u64;
    let mut in_sync = false;
    let mut swept = Instant::now();
    loop {
        let reply = meta.watch(own, epoch, next, WATCH_WAIT_MS).await;
        let Some(c) = me.upgrade() else { return };
        match reply {
            Ok(r) if r.lost || r.epoch != epoch => {
                // A new leader, or events we can no longer get: start over from its log.
                if in_sync {
                    info!(
                        epoch = r.epoch,
                        "cache events missed; dropping the kernel caches"
                    );
                }
                c.invalidate_all(in_sync);
                if r.epoch != epoch {
                    c.new_epoch(r.epoch);
                }
                epoch = r.epoch;
                next = r.next;
                in_sync = true;
            }
            Ok(r) => {
                let any = !r.events.is_empty();
                for ev in r.events {
                    if ev.origin == own && matches!(ev.inval, Inval::Entry { .. }) {
                        continue;
                    }
                    c.apply(ev.inval, ev.origin != own);
                }
                if any {
                    // The next call acknowledges these events: only once the kernel has
                    // dropped what they name.
                    c.applied().await;
                }
                next = r.next;
            }
            Err(e) => {
                if in_sync {
                    warn!(error = %e, "cache event watch failed; dropping the kernel caches");
                    c.invalidate_all(true);
                    in_sync = false;
                }
                epoch = 0;
                drop(c);
                tokio::time::sleep(RETRY).await;
                continue;
            }
        }
        if swept.elapsed() >= SWEEP_EVERY {
            c.sweep();
            swept = Instant::now();
        }
    }
}

fn invalidate_loop(notifier: Notifier, rx: std_mpsc::Receiver<Notice>) {
    for n in rx {
        let r = match n {
            Notice::Entry(parent, name) => notifier.inval_entry(parent, OsStr::from_bytes(&name)),
            // A negative offset takes back the attributes only.
            Notice::Inode { ino, pages } => {
                notifier.inval_inode(ino, if pages { 0 } else { -1 }, 0)
            }
            Notice::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
        };
        match r {
            Ok(()) => {}
            // Not in the kernel's cache (any more): nothing to take back.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return, // unmounted
            Err(e) => debug!(error = %e, "kernel cache invalidation failed"),
        }
    }
}
