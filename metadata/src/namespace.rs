//! Namespace mutations: create, link, unlink, rmdir, setattr, opens and orphans, xattrs.
//!
//! Each operation checks everything that can fail with a filesystem error before it writes
//! anything, so a refused command leaves the (shared, batch-wide) write transaction untouched.
//! Timestamps follow Linux: a directory's mtime and ctime change when an entry is added or
//! removed, an inode's ctime when its link count or attributes change.

use rawfs_metadata_api::{
    Attr, Caller, FileKind, Ino, MetaError, NewNode, SetAttr, StorageClass, TimeSet, Timespec,
    XattrMode, NAME_MAX, PATH_MAX, ROOT_INO,
};
use redb::ReadableTable;

use crate::chunks;
use crate::classes;
use crate::store::{inode, Fail, InodeRec, Op, Tables, INODE_COUNT, NEXT_INO};

pub(crate) const S_ISUID: u32 = 0o4000;
pub(crate) const S_ISGID: u32 = 0o2000;
const S_IXGRP: u32 = 0o010;
/// Most links an inode may have (ext4's limit).
pub(crate) const LINK_MAX: u32 = 65_000;
/// Longest xattr name and value (Linux's XATTR_NAME_MAX and XATTR_SIZE_MAX).
const XATTR_NAME_MAX: usize = 255;
const XATTR_SIZE_MAX: usize = 64 * 1024;
/// Longest list of one inode's xattr names, each with its NUL (Linux's XATTR_LIST_MAX):
/// past it `listxattr(2)` fails with E2BIG, and `cp -a`, `rsync -X` and `tar --xattrs`
/// could no longer copy the file.
const XATTR_LIST_MAX: usize = 64 * 1024;
/// Most bytes of names and values one inode may hold, so that no single inode can grow
/// the metadata without bound (ext4 allows one block, CephFS 64 KiB).
const XATTR_TOTAL_MAX: usize = 1024 * 1024;

/// Rejects names that cannot be a directory entry.
pub(crate) fn check_name(name: &[u8]) -> Op<()> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong.into());
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(invalid("bad entry name"));
    }
    Ok(())
}

pub(crate) fn invalid(reason: &str) -> Fail {
    Fail::Meta(MetaError::Invalid {
        reason: reason.into(),
    })
}

/// A directory that can get new entries (exists, is a directory, is not removed).
pub(crate) fn live_dir(t: &Tables, ino: Ino) -> Op<InodeRec> {
    let rec = inode(&t.inodes, ino)?;
    if !rec.is_dir() {
        return Err(MetaError::NotDir.into());
    }
    if rec.nlink == 0 {
        return Err(MetaError::NotFound.into());
    }
    Ok(rec)
}

/// The entry `name` in `parent`: (child, seq).
pub(crate) fn entry(t: &Tables, parent: Ino, name: &[u8]) -> Op<Option<(Ino, u64)>> {
    Ok(t.dirents.get((parent, name))?.map(|g| g.value()))
}

/// Adds `name -> child` to `parent` (whose record the caller saves afterwards).
pub(crate) fn add_entry(
    t: &mut Tables,
    parent: Ino,
    prec: &mut InodeRec,
    name: &[u8],
    child: Ino,
) -> Op<()> {
    prec.last_seq += 1;
    t.dirents.insert((parent, name), (child, prec.last_seq))?;
    t.dir_order.insert((parent, prec.last_seq), name)?;
    Ok(())
}

pub(crate) fn remove_entry(t: &mut Tables, parent: Ino, name: &[u8], seq: u64) -> Op<()> {
    t.dirents.remove((parent, name))?;
    t.dir_order.remove((parent, seq))?;
    Ok(())
}

/// True when the directory has no entries.
pub(crate) fn dir_is_empty(
    t: &impl ReadableTable<(u64, &'static [u8]), (u64, u64)>,
    ino: Ino,
) -> Op<bool> {
    let empty: &[u8] = &[];
    let mut r = t.range((ino, empty)..(ino + 1, empty))?;
    Ok(r.next().is_none())
}

pub(crate) fn touch_dir(prec: &mut InodeRec, now: Timespec) {
    prec.mtime = now;
    prec.ctime = now;
}

pub(crate) fn alloc_ino(t: &mut Tables) -> Op<Ino> {
    let ino = t.counter(NEXT_INO)?;
    t.set_counter(NEXT_INO, ino + 1)?;
    let n = t.counter(INODE_COUNT)?;
    t.set_counter(INODE_COUNT, n + 1)?;
    Ok(ino)
}

pub(crate) fn new_rec(
    kind: FileKind,
    perm: u32,
    caller: Caller,
    gid: u32,
    now: Timespec,
) -> InodeRec {
    InodeRec {
        kind,
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
        parent: 0,
        last_seq: 0,
        snapshot_of: None,
        class: StorageClass::Auto,
        xattrs: Some(0),
    }
}

/// Creates the root directory if missing.
pub(crate) fn init(t: &mut Tables, now: Timespec) -> Op<()> {
    if t.inodes.get(ROOT_INO)?.is_some() {
        return Ok(());
    }
    let mut rec = new_rec(FileKind::Dir, 0o755, Caller { uid: 0, gid: 0 }, 0, now);
    rec.nlink = 2;
    rec.parent = ROOT_INO;
    t.put_inode(ROOT_INO, &rec)?;
    let n = t.counter(INODE_COUNT)?;
    t.set_counter(INODE_COUNT, n + 1)?;
    Ok(())
}

/// The group a new node in `prec` gets: the directory's if it is setgid (BSD semantics).
fn inherit_gid(prec: &InodeRec, caller: Caller) -> u32 {
    if prec.perm & S_ISGID != 0 {
        prec.gid
    } else {
        caller.gid
    }
}

pub(crate) fn mknod(
    t: &mut Tables,
    parent: Ino,
    name: &[u8],
    node: &NewNode,
    caller: Caller,
    now: Timespec,
) -> Op<Attr> {
    check_name(name)?;
    let mut prec = live_dir(t, parent)?;
    if let Some((child, _)) = entry(t, parent, name)? {
        if node.exclusive {
            return Err(MetaError::Exists.into());
        }
        return Ok(inode(&t.inodes, child)?.attr(child));
    }
    if node.kind == FileKind::Symlink {
        return Err(invalid("symlinks are made by symlink"));
    }
    let is_dir = node.kind == FileKind::Dir;
    if is_dir && prec.nlink >= LINK_MAX {
        return Err(MetaError::TooManyLinks.into());
    }
    let mut rec = new_rec(
        node.kind,
        node.perm,
        caller,
        inherit_gid(&prec, caller),
        now,
    );
    // Every new inode takes its directory's class (link and rename keep the inode's own).
    rec.class = prec.class;
    if matches!(node.kind, FileKind::CharDevice | FileKind::BlockDevice) {
        rec.rdev = node.rdev;
    }
    if is_dir {
        rec.nlink = 2;
        rec.parent = parent;
        if prec.perm & S_ISGID != 0 {
            rec.perm |= S_ISGID;
        }
        prec.nlink += 1;
    }
    let ino = alloc_ino(t)?;
    t.put_inode(ino, &rec)?;
    add_entry(t, parent, &mut prec, name, ino)?;
    touch_dir(&mut prec, now);
    t.put_inode(parent, &prec)?;
    Ok(rec.attr(ino))
}

pub(crate) fn symlink(
    t: &mut Tables,
    parent: Ino,
    name: &[u8],
    target: &[u8],
    caller: Caller,
    now: Timespec,
) -> Op<Attr> {
    check_name(name)?;
    if target.is_empty() {
        return Err(MetaError::NotFound.into());
    }
    if target.len() >= PATH_MAX || target.contains(&0) {
        return Err(MetaError::NameTooLong.into());
    }
    let mut prec = live_dir(t, parent)?;
    if entry(t, parent, name)?.is_some() {
        return Err(MetaError::Exists.into());
    }
    let mut rec = new_rec(
        FileKind::Symlink,
        0o777,
        caller,
        inherit_gid(&prec, caller),
        now,
    );
    rec.size = target.len() as u64;
    rec.class = prec.class;
    let ino = alloc_ino(t)?;
    t.put_inode(ino, &rec)?;
    t.symlinks.insert(ino, target)?;
    add_entry(t, parent, &mut prec, name, ino)?;
    touch_dir(&mut prec, now);
    t.put_inode(parent, &prec)?;
    Ok(rec.attr(ino))
}

pub(crate) fn link(
    t: &mut Tables,
    ino: Ino,
    newparent: Ino,
    newname: &[u8],
    now: Timespec,
) -> Op<Attr> {
    check_name(newname)?;
    let mut rec = inode(&t.inodes, ino)?;
    if rec.is_dir() {
        return Err(MetaError::NotPermitted.into());
    }
    if rec.nlink == 0 {
        return Err(MetaError::NotFound.into());
    }
    if rec.nlink >= LINK_MAX {
        return Err(MetaError::TooManyLinks.into());
    }
    let mut prec = live_dir(t, newparent)?;
    if entry(t, newparent, newname)?.is_some() {
        return Err(MetaError::Exists.into());
    }
    rec.nlink += 1;
    rec.ctime = now;
    t.put_inode(ino, &rec)?;
    add_entry(t, newparent, &mut prec, newname, ino)?;
    touch_dir(&mut prec, now);
    t.put_inode(newparent, &prec)?;
    Ok(rec.attr(ino))
}

/// True when some session has `ino` open.
pub(crate) fn is_open(t: &Tables, ino: Ino) -> Op<bool> {
    let mut r = t.opens.range((ino, 0)..=(ino, u64::MAX))?;
    Ok(r.next().is_some())
}

/// Saves an inode that just lost a link: kept while linked or open, else freed.
pub(crate) fn after_unlink(t: &mut Tables, ino: Ino, rec: &InodeRec) -> Op<()> {
    if rec.nlink > 0 {
        t.put_inode(ino, rec)?;
    } else if is_open(t, ino)? {
        t.put_inode(ino, rec)?;
        t.orphans.insert(ino, ())?;
    } else {
        free_inode(t, ino, rec.kind)?;
    }
    Ok(())
}

/// Deletes an inode of `kind` with no links and no opens: its record, xattrs, target and
/// chunks. (Only symlinks have targets and only directories delegations: a file's unlink
/// skips those two lookups.)
pub(crate) fn free_inode(t: &mut Tables, ino: Ino, kind: FileKind) -> Op<()> {
    chunks::release_range(t, ino, 0, u64::MAX)?;
    let empty: &[u8] = &[];
    t.xattrs
        .retain_in((ino, empty)..(ino + 1, empty), |_, _| false)?;
    match kind {
        FileKind::Symlink => drop(t.symlinks.remove(ino)?),
        // A removed directory's delegation (if its holder removed it) goes with it.
        FileKind::Dir => drop(t.delegations.remove(ino)?),
        _ => {}
    }
    t.orphans.remove(ino)?;
    if t.inodes.remove(ino)?.is_some() {
        let n = t.counter(INODE_COUNT)?;
        t.set_counter(INODE_COUNT, n.saturating_sub(1))?;
    }
    Ok(())
}

pub(crate) fn unlink(t: &mut Tables, parent: Ino, name: &[u8], now: Timespec) -> Op<()> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong.into());
    }
    let mut prec = inode(&t.inodes, parent)?;
    if !prec.is_dir() {
        return Err(MetaError::NotDir.into());
    }
    unlink_in(t, (parent, &mut prec), name, now)?;
    t.put_inode(parent, &prec)?;
    Ok(())
}

/// `unlink` of `name` in `parent` whose record `prec` the caller has read and will write
/// back (so a batch of changes to one directory reads and writes its record once).
pub(crate) fn unlink_in(
    t: &mut Tables,
    (parent, prec): (Ino, &mut InodeRec),
    name: &[u8],
    now: Timespec,
) -> Op<()> {
    let (child, seq) = entry(t, parent, name)?.ok_or(Fail::Meta(MetaError::NotFound))?;
    let mut rec = inode(&t.inodes, child)?;
    if rec.is_dir() {
        return Err(MetaError::IsDir.into());
    }
    remove_entry(t, parent, name, seq)?;
    touch_dir(prec, now);
    rec.nlink = rec.nlink.saturating_sub(1);
    rec.ctime = now;
    after_unlink(t, child, &rec)
}

pub(crate) fn rmdir(t: &mut Tables, parent: Ino, name: &[u8], now: Timespec) -> Op<()> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong.into());
    }
    if name == b"." {
        return Err(invalid("rmdir of ."));
    }
    if name == b".." {
        return Err(MetaError::NotEmpty.into());
    }
    let mut prec = inode(&t.inodes, parent)?;
    if !prec.is_dir() {
        return Err(MetaError::NotDir.into());
    }
    let (child, seq) = entry(t, parent, name)?.ok_or(Fail::Meta(MetaError::NotFound))?;
    let mut rec = inode(&t.inodes, child)?;
    if !rec.is_dir() {
        return Err(MetaError::NotDir.into());
    }
    if !dir_is_empty(&t.dirents, child)? {
        return Err(MetaError::NotEmpty.into());
    }
    remove_entry(t, parent, name, seq)?;
    prec.nlink = prec.nlink.saturating_sub(1);
    touch_dir(&mut prec, now);
    t.put_inode(parent, &prec)?;
    rec.nlink = 0;
    rec.ctime = now;
    after_unlink(t, child, &rec)
}

fn resolve(ts: TimeSet, now: Timespec) -> Timespec {
    match ts {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    }
}

pub(crate) fn setattr(t: &mut Tables, ino: Ino, set: &SetAttr, now: Timespec) -> Op<Attr> {
    let mut rec = inode(&t.inodes, ino)?;
    if let Some(size) = set.size {
        match rec.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(MetaError::IsDir.into()),
            _ => return Err(invalid("size of a non-regular file")),
        }
        if size != rec.size {
            crate::shares::check_writable(&rec)?;
        }
        if size > i64::MAX as u64 {
            return Err(invalid("size too large"));
        }
    }
    let mut changed = false;
    if let Some(perm) = set.perm {
        rec.perm = perm & 0o7777;
        changed = true;
    }
    let chown = (set.uid.is_some_and(|u| u != rec.uid)) || (set.gid.is_some_and(|g| g != rec.gid));
    if set.uid.is_some() || set.gid.is_some() {
        rec.uid = set.uid.unwrap_or(rec.uid);
        rec.gid = set.gid.unwrap_or(rec.gid);
        // Like Linux: a chown of a non-directory drops setuid, and setgid when it means
        // "execute as group" (setgid without group-execute marks mandatory locking instead).
        if chown && set.perm.is_none() && !rec.is_dir() {
            rec.perm &= !S_ISUID;
            if rec.perm & S_IXGRP != 0 {
                rec.perm &= !S_ISGID;
            }
        }
        changed = true;
    }
    if let Some(size) = set.size {
        if size != rec.size {
            if size < rec.size {
                chunks::truncate(t, ino, size)?;
                rec.stored = rec.stored.min(size);
            }
            rec.size = size;
        }
        // Like Linux filesystems: truncate(2), ftruncate(2) and open(O_TRUNC) stamp mtime
        // even when the size stays (the kernel sends no mtime for the last two).
        rec.mtime = now;
        changed = true;
    }
    if let Some(a) = set.atime {
        rec.atime = resolve(a, now);
        changed = true;
    }
    if let Some(m) = set.mtime {
        rec.mtime = resolve(m, now);
        changed = true;
    }
    if changed || set.stamp_ctime {
        rec.ctime = now;
        t.put_inode(ino, &rec)?;
    }
    Ok(rec.attr(ino))
}

/// One open in an OPENS count: opens logged by `open` count in the low 32 bits, leased
/// opens the leader logged (`OpenMany`, see `open_table.rs`) in the high 32 bits. Each kind
/// is given back by its own release, so that a reader's leased open is never taken for a
/// writer's logged one (which would leave the reader unprotected after a failover).
#[derive(Clone, Copy)]
pub(crate) enum OpenKind {
    Logged,
    Leased,
}

impl OpenKind {
    fn one(self) -> u64 {
        match self {
            OpenKind::Logged => 1,
            OpenKind::Leased => 1 << 32,
        }
    }

    /// How many opens of this kind `count` (an OPENS value) holds.
    pub(crate) fn of(self, count: u64) -> u64 {
        match self {
            OpenKind::Logged => count & 0xffff_ffff,
            OpenKind::Leased => count >> 32,
        }
    }
}

pub(crate) fn open(t: &mut Tables, ino: Ino, session: u64) -> Op<Attr> {
    let rec = inode(&t.inodes, ino)?;
    add_open(t, ino, session, OpenKind::Logged)?;
    Ok(rec.attr(ino))
}

fn add_open(t: &mut Tables, ino: Ino, session: u64, kind: OpenKind) -> Op<()> {
    let n = t.opens.get((ino, session))?.map(|g| g.value()).unwrap_or(0);
    t.opens.insert((ino, session), n + kind.one())?;
    t.sessions.insert((session, ino), ())?;
    Ok(())
}

/// Logs a leased open, if the inode still exists (the leader logs them when a link may go,
/// when the inode may be gone already): nothing to record otherwise.
pub(crate) fn open_leased(t: &mut Tables, ino: Ino, session: u64) -> Op<()> {
    if crate::store::get_inode(&t.inodes, ino)?.is_some() {
        add_open(t, ino, session, OpenKind::Leased)?;
    }
    Ok(())
}

/// Drops one open of `kind`; frees the inode if that was the last open of an unlinked inode.
pub(crate) fn release(t: &mut Tables, ino: Ino, session: u64, kind: OpenKind) -> Op<()> {
    let n = t.opens.get((ino, session))?.map(|g| g.value()).unwrap_or(0);
    if kind.of(n) == 0 {
        return Ok(());
    }
    let left = n - kind.one();
    if left > 0 {
        t.opens.insert((ino, session), left)?;
        return Ok(());
    }
    t.opens.remove((ino, session))?;
    t.sessions.remove((session, ino))?;
    collect_orphan(t, ino)
}

/// Frees `ino` if it is unlinked and nobody has it open any more.
fn collect_orphan(t: &mut Tables, ino: Ino) -> Op<()> {
    if is_open(t, ino)? {
        return Ok(());
    }
    if let Some(rec) = crate::store::get_inode(&t.inodes, ino)? {
        if rec.nlink == 0 {
            free_inode(t, ino, rec.kind)?;
        }
    }
    Ok(())
}

pub(crate) fn end_session(t: &mut Tables, session: u64) -> Op<()> {
    let mut inos = Vec::new();
    for item in t.sessions.range((session, 0)..=(session, u64::MAX))? {
        let (k, _) = item?;
        inos.push(k.value().1);
    }
    for ino in inos {
        t.sessions.remove((session, ino))?;
        t.opens.remove((ino, session))?;
        collect_orphan(t, ino)?;
    }
    Ok(())
}

fn check_xattr_name(name: &[u8]) -> Op<()> {
    if name.is_empty() || name.contains(&0) {
        return Err(invalid("bad xattr name"));
    }
    if name.len() > XATTR_NAME_MAX {
        return Err(MetaError::NameTooLong.into());
    }
    Ok(())
}

pub(crate) fn setxattr(
    t: &mut Tables,
    ino: Ino,
    name: &[u8],
    value: &[u8],
    mode: XattrMode,
    now: Timespec,
) -> Op<()> {
    check_xattr_name(name)?;
    if value.len() > XATTR_SIZE_MAX {
        return Err(invalid("xattr value too large"));
    }
    if classes::is_class_xattr(name) {
        return classes::set_class_xattr(t, ino, value, mode, now);
    }
    let mut rec = inode(&t.inodes, ino)?;
    let exists = t.xattrs.get((ino, name))?.is_some();
    match mode {
        XattrMode::Create if exists => return Err(MetaError::Exists.into()),
        XattrMode::Replace if !exists => return Err(MetaError::NoAttr.into()),
        _ => {}
    }
    check_xattr_room(t, ino, name, value.len())?;
    t.xattrs.insert((ino, name), value)?;
    if !exists {
        rec.xattrs = rec.xattrs.map(|n| n.saturating_add(1));
    }
    rec.ctime = now;
    t.put_inode(ino, &rec)?;
    Ok(())
}

/// Refuses with ENOSPC a set that would take `ino`'s names past XATTR_LIST_MAX or its
/// names and values past XATTR_TOTAL_MAX. A replaced value counts at its new size.
fn check_xattr_room(t: &Tables, ino: Ino, name: &[u8], value_len: usize) -> Op<()> {
    let (mut list, mut total) = (name.len() + 1, name.len() + value_len);
    let empty: &[u8] = &[];
    for item in t.xattrs.range((ino, empty)..(ino + 1, empty))? {
        let (k, v) = item?;
        let other = k.value().1;
        if other != name {
            list += other.len() + 1;
            total += other.len() + v.value().len();
        }
    }
    if list > XATTR_LIST_MAX || total > XATTR_TOTAL_MAX {
        return Err(MetaError::NoSpace {
            reason: format!(
                "no room for another xattr: names {list} of {XATTR_LIST_MAX} bytes, \
                 names and values {total} of {XATTR_TOTAL_MAX}"
            ),
        }
        .into());
    }
    Ok(())
}

pub(crate) fn removexattr(t: &mut Tables, ino: Ino, name: &[u8], now: Timespec) -> Op<()> {
    check_xattr_name(name)?;
    if classes::is_class_xattr(name) {
        return classes::set_class(t, ino, StorageClass::Auto, now).map(|_| ());
    }
    let mut rec = inode(&t.inodes, ino)?;
    if t.xattrs.remove((ino, name))?.is_none() {
        return Err(MetaError::NoAttr.into());
    }
    rec.xattrs = rec.xattrs.map(|n| n.saturating_sub(1));
    rec.ctime = now;
    t.put_inode(ino, &rec)?;
    Ok(())
}
