//! The open-file table and the mount's opens at the metadata service.
//!
//! One entry per open inode, shared by every kernel handle of it, holding the one
//! server-side open that keeps the inode alive if another client unlinks it. A writer's
//! open is logged (`open`, or `create`); a reader's is leased (`open_leased`): the leader
//! keeps it in memory and logs it only when a link may go, so opening a file to read it
//! costs no log entry.
//!
//! ```text
//!  open (read-only) ──► open_leased ──► entry { leased: epoch of that leader }
//!  open (write)     ──► open        ──► entry { server_open }   (a writer joining a
//!                                        reader's entry adds a logged open to it)
//!  last close ──► releaser: release_many (logged) / release_leased, batched for 10 ms
//!  watch sees a new epoch ──► reopener: releases queued so far go first, then
//!                             reopen(every leased open of another epoch)
//! ```
//!
//! A new leader removes no link until its mounts had time to reopen (5 s after it takes
//! office), so a reader keeps an unlinked file across a failover.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Weak};
use std::time::Duration;

use fuser::Errno;
use rawfs_client::FileIo;
use rawfs_metadata_api::{Attr, FileKind, Ino, MetaError, OPEN_CHUNKS};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::errno;
use crate::inner::{lock, Inner};

/// How long the releaser gathers releases before sending them.
const RELEASE_DELAY: Duration = Duration::from_millis(10);
/// Most releases (or reopens) in one call.
const RELEASE_MAX: usize = 4096;
/// Pause before sending leased opens to a new leader again after a failure.
const REOPEN_RETRY: Duration = Duration::from_millis(300);

/// One open inode: the shared I/O object and how many kernel handles use it.
pub(crate) struct OpenFile {
    pub(crate) io: Arc<FileIo>,
    handles: u32,
    /// The metadata service has a logged open of it by this mount (false for a file
    /// created in a held directory until its create is committed with the open; see
    /// `held`, and for a file only read).
    server_open: bool,
    /// The epoch of the leader holding this mount's leased open of it, if it has one.
    leased: Option<u64>,
}

/// Most inodes whose last removal `OpenFiles` remembers; past that it forgets them all.
const REMOVALS_KEPT: usize = 4096;

/// The open-file table, and when each inode's entry was last removed.
///
/// While a file is open here, its `FileIo` has the size the kernel is told. Once the last
/// handle's flush is committed the entry goes, and the metadata service's answers have it,
/// but an answer asked for before that commit and arriving after the removal has the file
/// shorter than this mount's writes made it: a new entry made with it would report that
/// size, the kernel would take it from that reply or the next (`getattr`, a lookup, a
/// listing), and an `O_APPEND` write would land on the last one (seen with four processes
/// appending to one file). So whoever asks notes `removals()` first, and asks again if the
/// inode's entry went meanwhile (`removed_since`; see `Inner::insert`, `Inner::current`).
#[derive(Default)]
pub(crate) struct OpenFiles {
    map: HashMap<Ino, OpenFile>,
    /// How many entries were removed so far.
    removals: u64,
    /// The value of `removals` after each inode's last removal (bounded).
    removed: HashMap<Ino, u64>,
    /// `removed` forgot every removal up to this one.
    forgotten: u64,
}

impl OpenFiles {
    /// A token for `removed_since`: take it before asking the metadata service.
    pub(crate) fn removals(&self) -> u64 {
        self.removals
    }

    /// Whether `ino`'s entry was removed after `token` was taken (or may have been).
    fn removed_since(&self, ino: Ino, token: u64) -> bool {
        token < self.forgotten || self.removed.get(&ino).is_some_and(|&r| r > token)
    }

    pub(crate) fn get_mut(&mut self, ino: &Ino) -> Option<&mut OpenFile> {
        self.map.get_mut(ino)
    }

    fn remove(&mut self, ino: Ino) -> Option<OpenFile> {
        let f = self.map.remove(&ino)?;
        if self.removed.len() >= REMOVALS_KEPT {
            self.removed.clear();
            self.forgotten = self.removals;
        }
        self.removals += 1;
        self.removed.insert(ino, self.removals);
        Some(f)
    }
}

impl Deref for OpenFiles {
    type Target = HashMap<Ino, OpenFile>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

/// What `insert` did with an open the metadata service recorded for us.
enum Inserted {
    /// A new entry holds it.
    New,
    /// An entry with only a leased open took it (a writer's open must be logged).
    Adopted,
    /// The inode was open here already: it is one too many.
    Extra,
}

/// A server-side open to give back, of either kind.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Release {
    Logged(Ino),
    Leased(Ino),
}

/// What the releaser task is sent.
pub(crate) enum ReleaseMsg {
    Give(Release),
    /// Answered once every release queued before it was sent.
    Barrier(oneshot::Sender<()>),
}

impl Inner {
    /// Starts the task that gives server-side opens back. A release only ends the protection
    /// of an unlinked inode, so nobody waits for it: the task gathers the releases of up to
    /// `RELEASE_DELAY` and sends them in one call per kind, which the metadata service
    /// commits as one log entry (none for leased opens still in its memory).
    pub(crate) fn start_releaser(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let (tx, mut rx) = mpsc::unbounded_channel::<ReleaseMsg>();
        *lock(&self.releases) = Some(tx);
        // Weak: the task must not keep the mount's state alive; it ends with the channel.
        let me = Arc::downgrade(self);
        rt.spawn(async move {
            while let Some(first) = rx.recv().await {
                if let ReleaseMsg::Give(_) = first {
                    tokio::time::sleep(RELEASE_DELAY).await;
                }
                let mut batch = vec![first];
                while let Ok(m) = rx.try_recv() {
                    batch.push(m);
                }
                let Some(me) = me.upgrade() else { return };
                let (mut logged, mut leased, mut barriers) = (Vec::new(), Vec::new(), Vec::new());
                for m in batch {
                    match m {
                        ReleaseMsg::Give(Release::Logged(ino)) => logged.push(ino),
                        ReleaseMsg::Give(Release::Leased(ino)) => leased.push(ino),
                        ReleaseMsg::Barrier(done) => barriers.push(done),
                    }
                }
                me.release_all(logged, leased).await;
                for done in barriers {
                    let _ = done.send(());
                }
            }
        });
    }

    async fn release_all(&self, logged: Vec<Ino>, leased: Vec<Ino>) {
        let meta = self.client.meta();
        for piece in logged.chunks(RELEASE_MAX) {
            if let Err(e) = meta.release_many(piece.to_vec(), self.session).await {
                // The opens stay recorded until end_session; unlinked inodes live that long.
                warn!(inodes = piece.len(), error = %e, "metadata release failed");
            }
        }
        for piece in leased.chunks(RELEASE_MAX) {
            if let Err(e) = meta.release_leased(piece.to_vec(), self.session).await {
                warn!(inodes = piece.len(), error = %e, "metadata release failed");
            }
        }
    }

    /// Drops what files open here read ahead (and where their chunks are) whenever another
    /// client changes them, so that a read after such a change sees it: after another
    /// mount's lock was handed over, say, with the file open here all along.
    pub(crate) fn watch_foreign_writes(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.coherence.on_foreign_data(Arc::new(move |ino| {
            let Some(inner) = me.upgrade() else { return };
            let ios: Vec<_> = match ino {
                Some(ino) => inner.io_if_open(ino).into_iter().collect(),
                None => lock(&inner.files).values().map(|f| f.io.clone()).collect(),
            };
            for io in ios {
                io.changed_elsewhere();
            }
        }));
    }

    /// Starts the task that sends this mount's leased opens to each new leader (which
    /// starts with none of them).
    pub(crate) fn start_reopener(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        self.coherence.on_new_epoch(tx.clone());
        *lock(&self.reopens) = Some(tx);
        let me = Arc::downgrade(self);
        rt.spawn(async move {
            while rx.recv().await.is_some() {
                while rx.try_recv().is_ok() {}
                if !reopen_leased(&me).await {
                    return;
                }
            }
        });
    }

    /// Takes one handle on `ino`: reuses the inode's `FileIo` if it is open here, else
    /// registers the open with the metadata service (which keeps an unlinked inode alive
    /// until we release it; the reply also gives the size) and creates one. Returns the
    /// attributes the metadata service gave for a new entry (None when it reused one).
    pub(crate) async fn open_file(&self, ino: Ino, read_only: bool) -> Result<Option<Attr>, Errno> {
        if self.attach(ino, read_only) {
            return Ok(None);
        }
        let token = self.settled_token(ino).await?;
        let meta = self.client.meta();
        let (mut attr, leased, chunks) = if read_only {
            let o = meta
                .open_leased(ino, self.session)
                .await
                .map_err(errno::meta)?;
            (o.attr, Some(o.epoch), Some(o.chunks))
        } else {
            let attr = meta.open(ino, self.session).await.map_err(errno::meta)?;
            (attr, None, None)
        };
        let ours = match leased {
            Some(_) => Release::Leased(ino),
            None => Release::Logged(ino),
        };
        if attr.kind == FileKind::Dir {
            // Not reached through the kernel (it uses opendir), but never cache a directory.
            self.release_now(ours).await;
            return Err(Errno::EISDIR);
        }
        match self
            .insert(&mut attr, leased.is_none(), leased, token)
            .await?
        {
            Inserted::New => {
                if let (Some(found), Some(io)) = (chunks, self.io_if_open(ino)) {
                    io.learn_chunks(0, OPEN_CHUNKS, found);
                }
                let known = self.coherence.epoch();
                if leased.is_some_and(|e| known != 0 && e != known) {
                    // Perhaps leased from a leader the watch has left behind already.
                    if let Some(tx) = lock(&self.reopens).as_ref() {
                        let _ = tx.send(());
                    }
                }
                Ok(Some(attr))
            }
            Inserted::Adopted => Ok(None),
            Inserted::Extra => {
                // Another open of the same inode won; it holds the server-side open this
                // mount keeps per inode, so give ours back.
                self.release_now(ours).await;
                Ok(None)
            }
        }
    }

    /// Takes a handle on a file this mount just created with `create`, which also recorded
    /// the server-side open (so no other client's unlink can free it from under us). `token`
    /// is `removals` from before the create was sent (it may have found the file existing,
    /// with a size from before writes made here: see `insert`, which refreshes `attr`).
    pub(crate) async fn open_created(&self, attr: &mut Attr, token: u64) -> Result<(), Errno> {
        if let Inserted::Extra = self.insert(attr, true, None, token).await? {
            // It was already open here: the mount keeps one server-side open per inode.
            self.release_now(Release::Logged(attr.ino)).await;
        }
        Ok(())
    }

    /// Takes the first handle on a file created in a held directory: its open is recorded
    /// by the leader only when the create is committed (`created_open_recorded`).
    pub(crate) fn open_fresh(&self, attr: &Attr) {
        // A new inode: no entry of it was ever removed here.
        self.insert_sized(attr.ino, attr.size, false, None, u64::MAX);
        self.set_no_caps(attr.ino, true);
    }

    /// A token for `insert` and `current`: take it before asking the metadata service for
    /// attributes.
    pub(crate) fn removals(&self) -> u64 {
        lock(&self.files).removals()
    }

    /// `a` as the kernel may take it, asked for after `token` was taken (see `removals`).
    /// The kernel takes the size from every reply (`getattr`, lookups, listings), and one
    /// from before the commit of this mount's writes would undo them there (an `O_APPEND`
    /// write would then land on the last one): so a file open here has the size its
    /// `FileIo` knows, and one whose entry went since the token is asked for again.
    pub(crate) async fn current(&self, mut a: Attr, mut token: u64) -> Result<Attr, MetaError> {
        if a.kind != FileKind::File {
            return Ok(a);
        }
        loop {
            {
                let files = lock(&self.files);
                if let Some(f) = files.get(&a.ino) {
                    a.size = f.io.size();
                    return Ok(a);
                }
                if !files.removed_since(a.ino, token) {
                    return Ok(a);
                }
            }
            token = self.settled_token_or_not(a.ino).await;
            a = self.client.meta().getattr(a.ino).await?;
        }
    }

    /// A token for `insert` and `current`, taken before what this mount queued for `ino`
    /// is committed (`settle`): a file closed here may have its data's commit queued in a
    /// held directory (`HeldOp::Wrote`, from a flush behind) when its entry goes, so the
    /// leader has that commit once this returns if the entry went before the token, and
    /// `insert` and `current` ask again if it goes after.
    pub(crate) async fn settled_token(&self, ino: Ino) -> Result<u64, Errno> {
        let token = self.removals();
        self.settle(ino).await?;
        Ok(token)
    }

    /// [`Inner::settled_token`] where a failed commit cannot be reported: it is logged
    /// where it fails, and the leader's answer is then what there is.
    pub(crate) async fn settled_token_or_not(&self, ino: Ino) -> u64 {
        let token = self.removals();
        let _ = self.settle(ino).await;
        token
    }

    /// Whether every handle of `ino` open here was opened read-only (its entry holds only a
    /// leased open: a writer's open is logged, see `open_file`).
    pub(crate) fn only_read_here(&self, ino: Ino) -> bool {
        lock(&self.files)
            .get(&ino)
            .is_some_and(|f| f.leased.is_some() && !f.server_open)
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
            self.queue_release(Release::Logged(ino));
        }
    }

    /// Adds a new entry for `attr`'s inode, or a handle to the existing one. `token` is
    /// `OpenFiles::removals` from before `attr` was asked for: if the inode's entry went
    /// since, `attr.size` may predate writes made through it, and it is asked again (from
    /// the leader, which has their commits) before a new entry takes it.
    async fn insert(
        &self,
        attr: &mut Attr,
        server_open: bool,
        leased: Option<u64>,
        mut token: u64,
    ) -> Result<Inserted, Errno> {
        loop {
            if let Some(done) = self.insert_sized(attr.ino, attr.size, server_open, leased, token) {
                return Ok(done);
            }
            token = self.settled_token_or_not(attr.ino).await;
            *attr = match self.client.meta().getattr(attr.ino).await {
                Ok(a) => a,
                Err(e) => {
                    if server_open || leased.is_some() {
                        self.release_now(match leased {
                            Some(_) => Release::Leased(attr.ino),
                            None => Release::Logged(attr.ino),
                        })
                        .await;
                    }
                    return Err(errno::meta(e));
                }
            };
        }
    }

    /// `insert` with the size known; None if that size may be stale (see `insert`).
    fn insert_sized(
        &self,
        ino: Ino,
        size: u64,
        server_open: bool,
        leased: Option<u64>,
        token: u64,
    ) -> Option<Inserted> {
        let mut files = lock(&self.files);
        let stale = files.removed_since(ino, token);
        match files.map.entry(ino) {
            MapEntry::Occupied(mut e) => {
                let f = e.get_mut();
                f.handles += 1;
                if server_open && !f.server_open && f.leased.is_some() {
                    f.server_open = true;
                    return Some(Inserted::Adopted);
                }
                Some(Inserted::Extra)
            }
            MapEntry::Vacant(_) if stale => None,
            MapEntry::Vacant(v) => {
                v.insert(OpenFile {
                    io: Arc::new(self.client.file(ino, size)),
                    handles: 1,
                    server_open,
                    leased,
                });
                Some(Inserted::New)
            }
        }
    }

    /// Adds a handle to an inode already open here; false if it is not, or if a writer
    /// would share a reader's leased open (it logs one: see `open_file`).
    fn attach(&self, ino: Ino, read_only: bool) -> bool {
        match lock(&self.files).get_mut(&ino) {
            Some(f) if read_only || f.server_open || f.leased.is_none() => {
                f.handles += 1;
                true
            }
            _ => false,
        }
    }

    /// Drops one handle of `ino`. The last one flushes the buffer, forgets the `FileIo` and
    /// releases the server-side opens (which frees an unlinked inode).
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
        if flushed.is_ok() {
            self.held_closing(ino, io.size());
        }
        // An open that arrived during the flush reuses the entry; only remove it if nobody did.
        let gone = {
            let mut files = lock(&self.files);
            match files.get(&ino) {
                Some(f) if f.handles == 0 && Arc::ptr_eq(&f.io, &io) => {
                    // A chunk placed for data that never went out (see `write_behind`).
                    self.write_behind.take_placed(ino);
                    files.remove(ino)
                }
                _ => None,
            }
        };
        if let Some(f) = gone {
            if f.server_open {
                self.queue_release(Release::Logged(ino));
            }
            if f.leased.is_some() {
                self.queue_release(Release::Leased(ino));
            }
        }
        flushed.map(|_| ())
    }

    /// Gives a server-side open back. It only ends the protection of an unlinked inode:
    /// nobody waits on it, so it leaves the close path (batched by the releaser; unmount
    /// ends the session, which drops whatever is still queued).
    fn queue_release(&self, r: Release) {
        let queued = lock(&self.releases)
            .as_ref()
            .is_some_and(|tx| tx.send(ReleaseMsg::Give(r)).is_ok());
        if !queued {
            let me = (self.client.clone(), self.session);
            self.tasks
                .spawn(async move { release(&me.0, me.1, r).await });
        }
    }

    /// Gives a server-side open back at once.
    async fn release_now(&self, r: Release) {
        release(&self.client, self.session, r).await;
    }

    /// Returns once the releases queued so far were sent.
    async fn releases_sent(&self) {
        let (tx, rx) = oneshot::channel();
        let sent = lock(&self.releases)
            .as_ref()
            .is_some_and(|q| q.send(ReleaseMsg::Barrier(tx)).is_ok());
        if sent {
            let _ = rx.await;
        }
    }
}

async fn release(client: &rawfs_client::Client, session: u64, r: Release) {
    let meta = client.meta();
    let done = match r {
        Release::Logged(ino) => meta.release(ino, session).await,
        Release::Leased(ino) => meta.release_leased(vec![ino], session).await,
    };
    if let Err(e) = done {
        // The open stays recorded until end_session; an unlinked inode lives that long.
        warn!(release = ?r, error = %e, "metadata release failed");
    }
}

/// Sends the leased opens this mount took from leaders of other epochs than the one the
/// watch follows to the current leader; retries until that works. False once the mount
/// is gone.
async fn reopen_leased(me: &Weak<Inner>) -> bool {
    loop {
        let Some(inner) = me.upgrade() else {
            return false;
        };
        // Releases queued before go first: a leased open of an inode released after its
        // successor's reopen could be taken for the successor's.
        inner.releases_sent().await;
        let epoch = inner.coherence.epoch();
        let stale: Vec<(Ino, u64)> = lock(&inner.files)
            .iter()
            .filter_map(|(ino, f)| f.leased.filter(|e| *e != epoch).map(|e| (*ino, e)))
            .collect();
        let mut failed = false;
        for piece in stale.chunks(RELEASE_MAX) {
            match inner
                .client
                .meta()
                .reopen(piece.to_vec(), inner.session)
                .await
            {
                Ok(now) => {
                    let mut files = lock(&inner.files);
                    for (ino, from) in piece {
                        // (Not a later entry of the inode, whose open may be of another epoch.)
                        if let Some(f) = files.get_mut(ino).filter(|f| f.leased == Some(*from)) {
                            f.leased = Some(now);
                        }
                    }
                }
                Err(e) => {
                    warn!(opens = piece.len(), error = %e, "sending leased opens to the new leader failed");
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            return true;
        }
        drop(inner);
        tokio::time::sleep(REOPEN_RETRY).await;
    }
}
