//! `rename`, including `RENAME_NOREPLACE` and `RENAME_EXCHANGE` (Linux renameat2).
//!
//! Rules, as Linux applies them: a directory may replace only an empty directory and a
//! non-directory only a non-directory (`NotDir` / `IsDir` / `NotEmpty`); a directory cannot
//! move into its own subtree (`Invalid`); renaming onto another link of the same inode does
//! nothing. Both parents get new mtime and ctime, the moved inode a new ctime, a replaced
//! inode loses a link. A directory moving between parents moves its `..` link count too.

use rawfs_metadata_api::{Ino, MetaError, RenameFlags, Timespec, ROOT_INO};

use crate::namespace::{
    add_entry, after_unlink, check_name, dir_is_empty, entry, invalid, remove_entry,
};
use crate::store::{inode, Fail, InodeRec, Op, Tables};

/// Fails with `Invalid` if `dir` is `ancestor` or lies below it.
fn check_not_below(t: &Tables, dir: Ino, ancestor: Ino) -> Op<()> {
    let mut cur = dir;
    // A bound on the walk so that a corrupt parent chain cannot loop forever.
    for _ in 0..1_000_000 {
        if cur == ancestor {
            return Err(invalid("cannot move a directory into itself"));
        }
        if cur == ROOT_INO {
            return Ok(());
        }
        let rec = inode(&t.inodes, cur)?;
        if rec.parent == cur || rec.parent == 0 {
            return Ok(());
        }
        cur = rec.parent;
    }
    Err(invalid("directory chain too deep"))
}

fn dir_rec(t: &Tables, ino: Ino) -> Op<InodeRec> {
    let rec = inode(&t.inodes, ino)?;
    if !rec.is_dir() {
        return Err(MetaError::NotDir.into());
    }
    Ok(rec)
}

/// The two parent records; `new` is `None` when both parents are the same directory.
struct Parents {
    old: InodeRec,
    new: Option<InodeRec>,
}

impl Parents {
    fn new_mut(&mut self) -> &mut InodeRec {
        match &mut self.new {
            Some(n) => n,
            None => &mut self.old,
        }
    }

    fn touch(&mut self, now: Timespec) {
        self.old.mtime = now;
        self.old.ctime = now;
        if let Some(n) = &mut self.new {
            n.mtime = now;
            n.ctime = now;
        }
    }

    fn save(&self, t: &mut Tables, parent: Ino, newparent: Ino) -> Op<()> {
        t.put_inode(parent, &self.old)?;
        if let Some(n) = &self.new {
            t.put_inode(newparent, n)?;
        }
        Ok(())
    }
}

pub(crate) fn rename(
    t: &mut Tables,
    parent: Ino,
    name: &[u8],
    newparent: Ino,
    newname: &[u8],
    flags: RenameFlags,
    now: Timespec,
) -> Op<()> {
    if flags.noreplace && flags.exchange {
        return Err(invalid("RENAME_NOREPLACE with RENAME_EXCHANGE"));
    }
    check_name(name)?;
    check_name(newname)?;
    let old = dir_rec(t, parent)?;
    let new = if newparent == parent {
        None
    } else {
        let n = dir_rec(t, newparent)?;
        if n.nlink == 0 {
            return Err(MetaError::NotFound.into());
        }
        Some(n)
    };
    let mut parents = Parents { old, new };
    let (src, sseq) = entry(t, parent, name)?.ok_or(Fail::Meta(MetaError::NotFound))?;
    let mut srec = inode(&t.inodes, src)?;
    let target = entry(t, newparent, newname)?;
    let moves = parent != newparent;

    if flags.exchange {
        let (dst, dseq) = target.ok_or(Fail::Meta(MetaError::NotFound))?;
        if dst == src {
            return Ok(());
        }
        let mut drec = inode(&t.inodes, dst)?;
        if moves && srec.is_dir() {
            check_not_below(t, newparent, src)?;
        }
        if moves && drec.is_dir() {
            check_not_below(t, parent, dst)?;
        }
        // Each name keeps its place (and readdir cookie); only the inode behind it changes.
        t.dirents.insert((parent, name), (dst, sseq))?;
        t.dirents.insert((newparent, newname), (src, dseq))?;
        if moves {
            if srec.is_dir() {
                srec.parent = newparent;
                parents.old.nlink = parents.old.nlink.saturating_sub(1);
                parents.new_mut().nlink += 1;
            }
            if drec.is_dir() {
                drec.parent = parent;
                parents.new_mut().nlink = parents.new_mut().nlink.saturating_sub(1);
                parents.old.nlink += 1;
            }
        }
        srec.ctime = now;
        drec.ctime = now;
        t.put_inode(src, &srec)?;
        t.put_inode(dst, &drec)?;
        parents.touch(now);
        return parents.save(t, parent, newparent);
    }

    let mut replaced = None;
    if let Some((dst, dseq)) = target {
        if flags.noreplace {
            return Err(MetaError::Exists.into());
        }
        if dst == src {
            // Two links to the same inode: POSIX says rename does nothing.
            return Ok(());
        }
        let drec = inode(&t.inodes, dst)?;
        if srec.is_dir() {
            if !drec.is_dir() {
                return Err(MetaError::NotDir.into());
            }
            if !dir_is_empty(&t.dirents, dst)? {
                return Err(MetaError::NotEmpty.into());
            }
        } else if drec.is_dir() {
            return Err(MetaError::IsDir.into());
        }
        replaced = Some((dst, dseq, drec));
    }
    if moves && srec.is_dir() {
        check_not_below(t, newparent, src)?;
    }

    // Every check passed: from here on only writes.
    remove_entry(t, parent, name, sseq)?;
    if let Some((dst, dseq, mut drec)) = replaced {
        remove_entry(t, newparent, newname, dseq)?;
        if drec.is_dir() {
            drec.nlink = 0;
            let np = parents.new_mut();
            np.nlink = np.nlink.saturating_sub(1);
        } else {
            drec.nlink = drec.nlink.saturating_sub(1);
        }
        drec.ctime = now;
        after_unlink(t, dst, &drec)?;
    }
    add_entry(t, newparent, parents.new_mut(), newname, src)?;
    if moves && srec.is_dir() {
        srec.parent = newparent;
        parents.old.nlink = parents.old.nlink.saturating_sub(1);
        parents.new_mut().nlink += 1;
    }
    srec.ctime = now;
    t.put_inode(src, &srec)?;
    parents.touch(now);
    parents.save(t, parent, newparent)
}
