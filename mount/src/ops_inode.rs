//! Namespace and attribute operations: lookup, getattr/setattr, node creation and removal,
//! links, rename, statfs and access.

use std::sync::Arc;
use std::time::Duration;

use fuser::{AccessFlags, Errno, FileAttr, RenameFlags, TimeOrNow};
use rawfs_metadata_api::{
    Attr, Caller, Consistency, FileKind, Ino, MetaError, Name, NewNode,
    RenameFlags as MetaRenameFlags, SetAttr, PATH_MAX, REPLICAS,
};
use serde_bytes::ByteBuf;

use crate::attr::{kind_from_mode, to_time_set};
use crate::errno;
use crate::held::Found;
use crate::inner::{Entry, Inner};
use crate::reply::StatfsOut;

/// Block size reported by `statfs` (`df` counts in these).
const STATFS_BSIZE: u64 = 4096;

/// The metadata change a kernel `setattr` asks for.
pub(crate) fn set_attr(
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
) -> SetAttr {
    SetAttr {
        perm: mode.map(|m| m & 0o7777),
        uid,
        gid,
        size,
        atime: atime.map(to_time_set),
        mtime: mtime.map(to_time_set),
        stamp_ctime: false,
    }
}

/// `statfs` figures from the cluster's raw totals: every byte is stored `replicas` times,
/// so usable space is the raw space divided by that.
pub(crate) fn statfs_out(s: &rawfs_metadata_api::StatFs) -> StatfsOut {
    let replicas = u64::from(s.replicas.max(1));
    let blocks = s.total_bytes / replicas / STATFS_BSIZE;
    let bfree = (s.free_bytes / replicas / STATFS_BSIZE).min(blocks);
    // Inodes are not a fixed pool; report one free inode per free block, like most
    // dynamic-inode filesystems, so `df -i` shows something sensible.
    StatfsOut {
        blocks,
        bfree,
        bavail: bfree,
        files: s.files.saturating_add(bfree),
        ffree: bfree,
        bsize: STATFS_BSIZE as u32,
        namelen: rawfs_metadata_api::NAME_MAX as u32,
        frsize: STATFS_BSIZE as u32,
    }
}

/// Whether `caller` may access an inode with these attributes for `mask` (R/W/X bits), by
/// the classic owner/group/other rule. Supplementary groups are not known here; with
/// `default_permissions` (always set) the kernel does the real check before we are asked.
pub(crate) fn may_access(
    caller: Caller,
    perm: u32,
    uid: u32,
    gid: u32,
    kind: FileKind,
    mask: i32,
) -> bool {
    let want = (mask & 0o7) as u32;
    if want == 0 {
        return true;
    }
    if caller.uid == 0 {
        // Root may do anything except execute a file with no execute bit at all.
        return want & 0o1 == 0 || kind == FileKind::Dir || perm & 0o111 != 0;
    }
    let bits = if caller.uid == uid {
        (perm >> 6) & 0o7
    } else if caller.gid == gid {
        (perm >> 3) & 0o7
    } else {
        perm & 0o7
    };
    want & !bits == 0
}

impl Inner {
    pub(crate) async fn getattr(&self, ino: Ino) -> Result<(FileAttr, Duration), Errno> {
        // Kept attributes already carry times set while the data is written behind.
        if let Some(a) = self.held_attr(ino) {
            return Ok((self.attr(&a), self.attr_ttl));
        }
        self.times_settled(ino).await;
        // An unlink or rename of it still queued here: the leader must have it first.
        self.settle(ino).await?;
        let a = match self.fetch_attr(ino).await {
            Ok(a) => a,
            Err(MetaError::NotFound) => self.removed_open_dir(ino).ok_or(Errno::ENOENT)?,
            Err(e) => return Err(errno::meta(e)),
        };
        Ok((self.attr(&a), self.attr_ttl))
    }

    /// The metadata service's attributes of `ino`. If it is open here, its `FileIo` learns
    /// the size other clients' writes and truncates made (see
    /// [`rawfs_client::FileIo::learn_size`]), but only from the leader: a replica that may
    /// lag (`consistency=local`) may answer with a size from before this client's own
    /// truncate or writes. Nor while the commit of this mount's own data is being written
    /// behind or queued in a held directory: the leader's size is from before it.
    pub(crate) async fn fetch_attr(&self, ino: Ino) -> Result<Attr, MetaError> {
        let meta = self.client.meta();
        let open = self
            .io_if_open(ino)
            .filter(|_| meta.consistency() == Consistency::Linearizable)
            .filter(|_| !self.unpublished(ino))
            .map(|io| (io.size_changes(), io));
        let token = self.settled_token_or_not(ino).await;
        let a = meta.getattr(ino).await?;
        if let Some((changes, io)) = open.filter(|_| !self.unpublished(ino)) {
            io.learn_size(a.size, changes);
        }
        self.current(a, token).await
    }

    /// Whether the leader may lack the commit of data this mount wrote to `ino`: a flush
    /// behind of it is running, or its commit is queued in a held directory.
    fn unpublished(&self, ino: Ino) -> bool {
        self.write_behind.is_pending(ino) || self.kept_size(ino).is_some()
    }

    pub(crate) async fn lookup(&self, parent: Ino, name: Name) -> Result<Entry, Errno> {
        match self.held_lookup(parent, &name) {
            None => {}
            Some(Found::Missing) => return Err(Errno::ENOENT),
            Some(Found::Fresh(a)) => return Ok(self.entry(parent, &name, &a)),
            Some(Found::Committed(ino)) => {
                self.times_settled(ino).await;
                self.settle(ino).await?;
                let a = self.fetch_attr(ino).await.map_err(errno::meta)?;
                return Ok(self.entry(parent, &name, &a));
            }
        }
        let token = self.removals();
        let a = self.client.meta().lookup(parent, name.clone()).await;
        let a = self.current(a.map_err(errno::meta)?, token).await;
        Ok(self.entry(parent, &name, &a.map_err(errno::meta)?))
    }

    pub(crate) async fn setattr(
        self: &Arc<Self>,
        ino: Ino,
        mut set: SetAttr,
    ) -> Result<(FileAttr, Duration), Errno> {
        if set == SetAttr::default() {
            // Nothing to set: `chown(2)` to -1, -1, which Linux filesystems answer by
            // stamping the change time (the kernel sends no ctime without writeback cache).
            set.stamp_ctime = true;
        }
        if let Some(done) = self.held_dir_setattr(ino, &set) {
            return done.map(|a| (self.attr(&a), self.attr_ttl));
        }
        if let Some(done) = self.held_setattr(ino, &set).await {
            return done.map(|a| (self.attr(&a), self.attr_ttl));
        }
        // Through the leader: after a flush behind of the file, whose commit would otherwise
        // show its attributes from before this change here (see `held_wrote`).
        self.behind_done(ino).await;
        match self.io_if_open(ino) {
            Some(io) => {
                self.settle_to_write(ino, &io).await?;
            }
            None => self.settle(ino).await?,
        }
        self.give_back(ino).await;
        let Some(size) = set.size else {
            if set.mtime.is_some() || set.atime.is_some() {
                // Buffered data flushed later would stamp mtime with the flush time, undoing
                // `cp -p`'s futimens before close: send it first.
                if let Some(io) = self.io_if_open(ino) {
                    io.flush().await.map_err(|e| self.data_errno(e))?;
                }
            }
            let token = self.removals();
            let a = match self.client.meta().setattr(ino, set.clone()).await {
                Ok(a) => self.current(a, token).await.map_err(errno::meta)?,
                Err(MetaError::NotFound) => {
                    self.set_removed_open_dir(ino, &set).ok_or(Errno::ENOENT)?
                }
                Err(e) => return Err(errno::meta(e)),
            };
            self.held_took_leaders(&a, Some(&set));
            return Ok((self.attr(&a), self.attr_ttl));
        };
        let a = self.truncate(ino, size, set.clone()).await?;
        self.held_took_leaders(&a, Some(&set));
        Ok((self.attr(&a), self.attr_ttl))
    }

    pub(crate) async fn readlink(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let t = self
            .client
            .meta()
            .readlink(ino)
            .await
            .map_err(errno::meta)?;
        Ok(t.into_vec())
    }

    /// mknod and mkdir. With `default_permissions` and no `FUSE_DONT_MASK` the kernel has
    /// already applied the umask to `mode`; applying it again is harmless and keeps us right
    /// if that ever changes.
    pub(crate) async fn mknod(
        self: &Arc<Self>,
        parent: Ino,
        name: Name,
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Entry, Errno> {
        let kind = kind_from_mode(mode).ok_or(Errno::EINVAL)?;
        if kind == FileKind::Symlink {
            return Err(Errno::EINVAL);
        }
        let node = NewNode {
            kind,
            perm: mode & 0o7777 & !umask,
            rdev: if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                rdev
            } else {
                0
            },
            exclusive: true,
        };
        let a = if kind == FileKind::Dir && self.delegate {
            self.mkdir_held(parent, name.clone(), node, caller).await?
        } else {
            self.give_back(parent).await;
            self.client
                .meta()
                .mknod(parent, name.clone(), node, caller)
                .await
                .map_err(errno::meta)?
        };
        Ok(self.entry(parent, &name, &a))
    }

    pub(crate) async fn unlink(self: &Arc<Self>, parent: Ino, name: Name) -> Result<(), Errno> {
        if let Some(done) = self.held_unlink(parent, &name) {
            return done;
        }
        self.give_back(parent).await;
        self.client
            .meta()
            .unlink(parent, name)
            .await
            .map_err(errno::meta)
    }

    pub(crate) async fn rmdir(&self, parent: Ino, name: Name) -> Result<(), Errno> {
        if let Some(done) = self.held_rmdir(parent, &name).await {
            return done;
        }
        self.give_back(parent).await;
        self.client
            .meta()
            .rmdir(parent, name)
            .await
            .map_err(errno::meta)
    }

    pub(crate) async fn symlink(
        &self,
        parent: Ino,
        name: Name,
        target: Vec<u8>,
        caller: Caller,
    ) -> Result<Entry, Errno> {
        if target.len() >= PATH_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        self.give_back(parent).await;
        let a = self
            .client
            .meta()
            .symlink(parent, name.clone(), ByteBuf::from(target), caller)
            .await
            .map_err(errno::meta)?;
        Ok(self.entry(parent, &name, &a))
    }

    pub(crate) async fn rename(
        self: &Arc<Self>,
        parent: Ino,
        name: Name,
        newparent: Ino,
        newname: Name,
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        let known = RenameFlags::RENAME_NOREPLACE | RenameFlags::RENAME_EXCHANGE;
        if !known.contains(flags) {
            // RENAME_WHITEOUT is for overlay filesystems' upper layers.
            return Err(Errno::EINVAL);
        }
        let f = MetaRenameFlags {
            noreplace: flags.contains(RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(RenameFlags::RENAME_EXCHANGE),
        };
        if f.noreplace && f.exchange {
            return Err(Errno::EINVAL);
        }
        if parent == newparent && !f.exchange {
            if let Some(done) = self.held_rename(parent, &name, &newname, f.noreplace) {
                return done;
            }
        }
        self.give_back(parent).await;
        self.give_back(newparent).await;
        self.client
            .meta()
            .rename(parent, name, newparent, newname, f)
            .await
            .map_err(errno::meta)
    }

    pub(crate) async fn link(
        &self,
        ino: Ino,
        newparent: Ino,
        newname: Name,
    ) -> Result<Entry, Errno> {
        // After a flush behind of the file (see `setattr`).
        self.behind_done(ino).await;
        self.settle(ino).await?;
        self.give_back(newparent).await;
        let token = self.removals();
        let a = self
            .client
            .meta()
            .link(ino, newparent, newname.clone())
            .await
            .map_err(errno::meta)?;
        let a = self.current(a, token).await.map_err(errno::meta)?;
        Ok(self.entry(newparent, &newname, &a))
    }

    pub(crate) async fn statfs(&self) -> Result<StatfsOut, Errno> {
        let mut s = self.client.meta().statfs().await.map_err(errno::meta)?;
        if s.replicas == 0 {
            s.replicas = REPLICAS as u32;
        }
        Ok(statfs_out(&s))
    }

    /// `access(2)`. Not called while `default_permissions` is set (the kernel checks
    /// itself), but answers sensibly if it is.
    pub(crate) async fn access(
        &self,
        ino: Ino,
        caller: Caller,
        mask: AccessFlags,
    ) -> Result<(), Errno> {
        let a = match self.held_attr(ino) {
            Some(a) => a,
            None => self.client.meta().getattr(ino).await.map_err(errno::meta)?,
        };
        if may_access(caller, a.perm, a.uid, a.gid, a.kind, mask.bits()) {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rawfs_metadata_api::StatFs;

    #[test]
    fn statfs_divides_raw_space_by_replicas() {
        let s = statfs_out(&StatFs {
            total_bytes: 3 * 4096 * 1000,
            free_bytes: 3 * 4096 * 400,
            files: 7,
            replicas: 3,
        });
        assert_eq!((s.blocks, s.bfree, s.bavail), (1000, 400, 400));
        assert_eq!((s.files, s.ffree), (407, 400));
        assert_eq!((s.bsize, s.frsize, s.namelen), (4096, 4096, 255));
    }

    #[test]
    fn access_follows_owner_group_other() {
        let user = Caller {
            uid: 1000,
            gid: 1000,
        };
        let f = FileKind::File;
        assert!(may_access(user, 0o600, 1000, 5, f, libc::R_OK | libc::W_OK));
        assert!(!may_access(user, 0o600, 1, 1000, f, libc::R_OK));
        assert!(may_access(user, 0o640, 1, 1000, f, libc::R_OK));
        assert!(!may_access(user, 0o640, 1, 1000, f, libc::W_OK));
        assert!(may_access(user, 0o004, 1, 1, f, libc::R_OK));
        assert!(may_access(user, 0, 1, 1, f, libc::F_OK));
        let root = Caller { uid: 0, gid: 0 };
        assert!(may_access(root, 0, 1, 1, f, libc::R_OK | libc::W_OK));
        assert!(!may_access(root, 0o644, 1, 1, f, libc::X_OK));
        assert!(may_access(root, 0o100, 1, 1, f, libc::X_OK));
        assert!(may_access(root, 0, 1, 1, FileKind::Dir, libc::X_OK));
    }
}
