//! Directory listing: opendir/readdir/readdirplus/releasedir over the metadata service's
//! cookie-paged `readdir`.
//!
//! Kernel offsets are positions: 0 is `.`, 1 is `..`, `2 + i` is the directory's i-th
//! entry. Metadata cookies are opaque, so each open directory keeps the cookie after every
//! entry it has listed (8 bytes per entry), which makes `telldir`/`seekdir` to any position
//! we handed out exact. It also keeps the rest of the last fetched page, so one metadata
//! call serves several kernel requests (a kernel buffer holds far fewer entries than a page).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileType, FopenFlags, Generation, INodeNo, ReplyDirectory, ReplyDirectoryPlus,
};
use rawfs_metadata_api::{Attr, DirEntry, FileKind, Ino, MetaError, SetAttr, Timespec};

use crate::attr::{file_type, BLKSIZE};
use crate::errno;
use crate::held_attrs::apply_set;
use crate::inner::{lock, Inner};
use crate::reply::Opened;

/// Entries fetched from the metadata service per call.
const PAGE: u32 = 512;

/// One open directory handle.
pub(crate) struct OpenDir {
    ino: Ino,
    /// Its attributes when opened: what `fstat` shows once it is removed (see
    /// [`Inner::removed_open_dir`]).
    attr: Attr,
    cursor: Arc<tokio::sync::Mutex<DirCursor>>,
}

/// One open directory's listing state.
pub(crate) struct DirCursor {
    /// `after[i]`: the cookie that continues the listing after entry `i`.
    after: Vec<u64>,
    /// Entries fetched but not yet listed, starting at entry index `buf_start`.
    buf: Vec<DirEntry>,
    buf_start: usize,
    /// The fetch that filled `buf` returned fewer than a page: nothing follows it.
    buf_is_last: bool,
    /// `Inner::removals` before that fetch (its sizes may predate this mount's writes).
    buf_token: u64,
}

/// The part of a fuser directory reply that listing needs, for both flavours.
pub(crate) trait DirSink: Send + 'static {
    /// Adds an entry; true when the buffer is full (the entry was not added).
    fn push(
        &mut self,
        ino: INodeNo,
        next: u64,
        name: &OsStr,
        kind: FileType,
        attr: &FileAttr,
        ttl: Duration,
    ) -> bool;
    fn done(self);
    fn fail(self, e: Errno);
}

impl DirSink for ReplyDirectory {
    fn push(
        &mut self,
        ino: INodeNo,
        next: u64,
        name: &OsStr,
        kind: FileType,
        _: &FileAttr,
        _: Duration,
    ) -> bool {
        self.add(ino, next, kind, name)
    }
    fn done(self) {
        self.ok();
    }
    fn fail(self, e: Errno) {
        self.error(e);
    }
}

impl DirSink for ReplyDirectoryPlus {
    fn push(
        &mut self,
        _: INodeNo,
        next: u64,
        name: &OsStr,
        _: FileType,
        attr: &FileAttr,
        ttl: Duration,
    ) -> bool {
        self.add(attr.ino, next, name, &ttl, attr, Generation(0))
    }
    fn done(self) {
        self.ok();
    }
    fn fail(self, e: Errno) {
        self.error(e);
    }
}

/// Attributes for `.` and `..` in READDIRPLUS: the kernel ignores them for these two names
/// (it never links them), but the reply format needs some.
fn dot_attr(ino: INodeNo) -> FileAttr {
    FileAttr {
        ino,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    }
}

impl Inner {
    pub(crate) async fn opendir(&self, ino: Ino) -> Result<Opened, Errno> {
        // Listing goes through the leader: a directory held here is committed first and
        // stays held; one held elsewhere is recalled by the leader.
        self.settle_for_listing(ino).await?;
        // Fail now for a non-directory or a missing inode rather than at the first readdir.
        let a = self.client.meta().getattr(ino).await.map_err(errno::meta)?;
        if a.kind != FileKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let fh = self.next_fh();
        let cursor = DirCursor {
            after: Vec::new(),
            buf: Vec::new(),
            buf_start: 0,
            buf_is_last: false,
            buf_token: 0,
        };
        let dir = OpenDir {
            ino,
            attr: a,
            cursor: Arc::new(tokio::sync::Mutex::new(cursor)),
        };
        lock(&self.dirs).insert(fh, dir);
        Ok(Opened {
            fh,
            flags: FopenFlags::empty(),
        })
    }

    pub(crate) fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    /// The attributes of `ino`, removed (the metadata service no longer has it), if it is a
    /// directory open here: a directory lives on while open, with no links, and `fstat`
    /// of a handle of it works as on local filesystems (xfstests' rename-overwrite check).
    /// The metadata service keeps no open of a directory (it would cost a log entry per
    /// `opendir`), so these are the attributes it had when opened.
    pub(crate) fn removed_open_dir(&self, ino: Ino) -> Option<Attr> {
        let dirs = lock(&self.dirs);
        let d = dirs.values().find(|d| d.ino == ino)?;
        Some(Attr {
            nlink: 0,
            ..d.attr.clone()
        })
    }

    /// Applies `set` to `ino` if it is a directory removed while open here (see
    /// [`Inner::removed_open_dir`]): `fchmod` or `futimens` of its handle works as on local
    /// filesystems, and only its handles can see the result. `None`: no such directory.
    pub(crate) fn set_removed_open_dir(&self, ino: Ino, set: &SetAttr) -> Option<Attr> {
        let now = Timespec::now();
        let mut dirs = lock(&self.dirs);
        // From what `fstat` shows (the first handle's), so that every handle agrees after.
        let before = dirs.values().find(|d| d.ino == ino)?.attr.clone();
        let after = apply_set(before, set, now);
        for d in dirs.values_mut().filter(|d| d.ino == ino) {
            d.attr = after.clone();
        }
        Some(Attr { nlink: 0, ..after })
    }

    /// Fills one kernel readdir(plus) buffer starting at position `offset`.
    pub(crate) async fn readdir<S: DirSink>(&self, ino: Ino, fh: u64, offset: u64, mut sink: S) {
        match self.fill(ino, fh, offset, &mut sink).await {
            Ok(()) => sink.done(),
            Err(e) => sink.fail(e),
        }
    }

    async fn fill<S: DirSink>(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        sink: &mut S,
    ) -> Result<(), Errno> {
        let cursor = lock(&self.dirs)
            .get(&fh)
            .map(|d| d.cursor.clone())
            .ok_or(Errno::EBADF)?;
        // The kernel serializes readdir on one open directory; the lock only guards against
        // a misbehaving caller.
        let mut cur = cursor.lock().await;
        let me = self.map.fuse(ino);
        let mut pos = offset;
        if pos == 0 {
            // A listing from the start (opendir or rewinddir) must see current contents.
            cur.after.clear();
            cur.buf.clear();
            cur.buf_start = 0;
            cur.buf_is_last = false;
            if sink.push(
                me,
                1,
                OsStr::new("."),
                FileType::Directory,
                &dot_attr(me),
                Duration::ZERO,
            ) {
                return Ok(());
            }
            pos = 1;
        }
        if pos == 1 {
            let parent = self.map.fuse(self.parent(ino).unwrap_or(self.map.root));
            if sink.push(
                parent,
                2,
                OsStr::new(".."),
                FileType::Directory,
                &dot_attr(parent),
                Duration::ZERO,
            ) {
                return Ok(());
            }
            pos = 2;
        }
        let mut i = usize::try_from(pos - 2).map_err(|_| Errno::EINVAL)?;
        loop {
            let in_buf = i >= cur.buf_start && i < cur.buf_start + cur.buf.len();
            if !in_buf {
                if i == cur.buf_start + cur.buf.len() && cur.buf_is_last && !cur.buf.is_empty() {
                    return Ok(()); // end of directory, known from the last fetch
                }
                let cookie = match i {
                    0 => 0,
                    _ => *cur.after.get(i - 1).ok_or(Errno::EINVAL)?,
                };
                let meta = self.client.meta();
                let token = self.removals();
                let page = if self.settle_for_listing(ino).await? {
                    meta.readdir_held(ino, self.session, cookie, PAGE).await
                } else {
                    meta.readdir(ino, cookie, PAGE).await
                };
                let page = match page {
                    Ok(page) => page,
                    // Removed while open: it lists as empty, as on local filesystems.
                    Err(MetaError::NotFound) => Vec::new(),
                    Err(e) => return Err(errno::meta(e)),
                };
                cur.buf_is_last = page.len() < PAGE as usize;
                cur.buf_token = token;
                cur.buf = page;
                cur.buf_start = i;
                if cur.buf.is_empty() {
                    return Ok(());
                }
            }
            let e = &cur.buf[i - cur.buf_start];
            if e.attr.kind == FileKind::Dir {
                self.set_parent(e.attr.ino, ino);
            }
            let attr = match self.current(e.attr.clone(), cur.buf_token).await {
                Ok(a) => self.attr(&a),
                // Removed since the fetch: listed as fetched, like any entry removed since.
                Err(MetaError::NotFound) => self.attr(&e.attr),
                Err(e) => return Err(errno::meta(e)),
            };
            self.coherence.handed_entry(ino, &e.name, e.attr.ino);
            let next = i as u64 + 3;
            let name = OsStr::from_bytes(&e.name);
            if sink.push(
                attr.ino,
                next,
                name,
                file_type(e.attr.kind),
                &attr,
                self.entry_ttl,
            ) {
                return Ok(());
            }
            let cookie = e.cookie;
            if i < cur.after.len() {
                cur.after[i] = cookie;
            } else {
                cur.after.push(cookie);
            }
            i += 1;
        }
    }
}
