//! Dropping privileges on write, truncate and chown, which the mount does itself: it asks
//! the kernel for `FUSE_HANDLE_KILLPRIV_V2`, so the kernel no longer reads
//! `security.capability` before every write (a round trip per `write(2)`, about a fifth of
//! a 4 KiB random write's cost here) and leaves these rules to the filesystem:
//!
//! - a write by a caller without `CAP_FSETID` (the kernel flags it) drops setuid, and
//!   setgid where it means "execute as group" or the caller is not in the file's group;
//! - a truncate, fallocate or copy_file_range by such a caller does the same (fuser hides
//!   the kernel's flag for truncates, and the others carry none, so "without `CAP_FSETID`"
//!   is taken as "not root");
//! - a chown (even to the same owner, even by root) of anything but a directory drops
//!   setuid, and setgid as above;
//! - each of them removes `security.capability` (file capabilities), whoever the caller.
//!
//! The bits are dropped with an ordinary setattr of the mode, as the kernel did before. A
//! write checks the mode the kernel was last given ([`Coherence::mode`]), so a file with no
//! such bits and no capability costs nothing more per write.
//!
//! [`Coherence::mode`]: crate::coherence::Coherence::mode

use std::sync::Arc;

use fuser::Errno;
use rawfs_metadata_api::{Attr, Caller, FileKind, Ino, SetAttr};

use crate::errno;
use crate::inner::Inner;
use crate::ops_xattr::CAPABILITY;

/// Setuid: the file runs as its owner.
pub(crate) const S_ISUID: u32 = 0o4000;
/// Setgid: on a directory new entries take its group; on a file with group-execute, the
/// file runs as its group (without it, it marks mandatory locking).
pub(crate) const S_ISGID: u32 = 0o2000;
pub(crate) const S_IXGRP: u32 = 0o010;

/// The permission bits left once `caller` drops the privileges of a file with `perm` and
/// group `gid` (Linux's `should_remove_suid` and `setattr_should_drop_sgid`), or `None`
/// if nothing changes. Root counts as in every group.
pub(crate) fn dropped(perm: u32, gid: u32, caller: Caller) -> Option<u32> {
    let mut left = perm & !S_ISUID;
    let in_group = caller.uid == 0 || caller.gid == gid;
    if perm & S_ISGID != 0 && (perm & S_IXGRP != 0 || !in_group) {
        left &= !S_ISGID;
    }
    (left != perm).then_some(left)
}

impl Inner {
    /// True if a write to `ino` by `caller` drops nothing: `ino` surely has no capability
    /// and, when the kernel asks to drop setuid and setgid (`kill_suid`), the mode the
    /// kernel was given has none that this caller would drop.
    pub(crate) fn write_keeps_privs(&self, ino: Ino, kill_suid: bool, caller: Caller) -> bool {
        self.surely_no_xattr(ino, CAPABILITY)
            && (!kill_suid
                || self
                    .coherence
                    .mode(ino)
                    .is_some_and(|(perm, gid)| dropped(perm, gid, caller).is_none()))
    }

    /// Drops what a write to `ino` by `caller` drops (see the module docs); `kill_suid`:
    /// the kernel asked for setuid and setgid to go.
    pub(crate) async fn drop_privs_for_write(
        self: &Arc<Self>,
        ino: Ino,
        kill_suid: bool,
        caller: Caller,
    ) -> Result<(), Errno> {
        if kill_suid {
            let a = self.current_attr(ino).await?;
            // The kernel does not ask for attributes while a file is written: without this,
            // once the mode it was given expires, every later write would come here.
            self.coherence.handed_attr(&a);
            if let Some(perm) = dropped(a.perm, a.gid, caller).filter(|_| a.kind == FileKind::File)
            {
                let set = SetAttr {
                    perm: Some(perm),
                    ..SetAttr::default()
                };
                self.setattr(ino, set).await?;
            }
        }
        self.drop_capability(ino).await
    }

    /// Drops what changing `ino`'s content by other means than a write drops (fallocate,
    /// copy_file_range): as a write, with "without `CAP_FSETID`" taken as "not root".
    pub(crate) async fn drop_privs_as_modified(
        self: &Arc<Self>,
        ino: Ino,
        caller: Caller,
    ) -> Result<(), Errno> {
        let kill_suid = caller.uid != 0;
        if self.write_keeps_privs(ino, kill_suid, caller) {
            return Ok(());
        }
        self.drop_privs_for_write(ino, kill_suid, caller).await
    }

    /// `set` as a truncate or chown by `caller` makes it: with the mode that drops setuid
    /// and setgid where Linux does, and with `ino`'s capability removed first.
    pub(crate) async fn with_privs_dropped(
        &self,
        ino: Ino,
        mut set: SetAttr,
        caller: Caller,
    ) -> Result<SetAttr, Errno> {
        // A chown(2) to -1, -1 comes as a SETATTR with nothing set; it drops them too. So
        // does the kernel's own forced removal before some writes, which looks the same:
        // this cannot refuse another user's chown to -1, -1 of a setuid file as Linux
        // filesystems do (EPERM), it drops the bits instead.
        let chown = set.uid.is_some() || set.gid.is_some() || set == SetAttr::default();
        let truncate = set.size.is_some();
        if !chown && !truncate {
            return Ok(set);
        }
        let kill_suid = chown || caller.uid != 0;
        if kill_suid && set.perm.is_none() {
            // Linux drops them on a chown of anything but a directory (a FIFO or device node
            // too; a symlink has none); only regular files have their mode recorded here.
            let file = match self.coherence.mode(ino) {
                Some(mode) => Some(mode),
                None => {
                    let a = self.current_attr(ino).await?;
                    (a.kind != FileKind::Dir).then_some((a.perm, a.gid))
                }
            };
            if let Some(left) = file.and_then(|(perm, gid)| dropped(perm, gid, caller)) {
                set.perm = Some(left);
            }
        }
        self.drop_capability(ino).await?;
        Ok(set)
    }

    /// Removes `ino`'s `security.capability`, if it may have one.
    async fn drop_capability(&self, ino: Ino) -> Result<(), Errno> {
        if self.surely_no_xattr(ino, CAPABILITY) {
            return Ok(());
        }
        // A read first: most files with xattrs have no capability, and a removal is a
        // log entry even when there is nothing to remove. It also caches "none".
        match self.getxattr(ino, CAPABILITY.to_vec(), 0).await {
            Err(e) if e == Errno::NO_XATTR => Ok(()),
            Err(e) => Err(e),
            Ok(_) => match self.removexattr(ino, CAPABILITY.to_vec()).await {
                Err(e) if e == Errno::NO_XATTR => Ok(()),
                other => other,
            },
        }
    }

    /// `ino`'s attributes as this mount can know them best: from its held directory, or
    /// from the leader once what is queued for it here is committed.
    async fn current_attr(&self, ino: Ino) -> Result<Attr, Errno> {
        if let Some(a) = self.held_attr(ino) {
            return Ok(a);
        }
        self.settle(ino).await?;
        self.fetch_attr(ino).await.map_err(errno::meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: Caller = Caller {
        uid: 1000,
        gid: 100,
    };
    const ROOT: Caller = Caller { uid: 0, gid: 0 };

    #[test]
    fn setuid_always_goes_and_setgid_when_it_means_execute_or_the_caller_is_outside() {
        assert_eq!(dropped(0o4755, 100, USER), Some(0o755));
        assert_eq!(dropped(0o6755, 100, USER), Some(0o755), "g+x: setgid goes");
        assert_eq!(
            dropped(0o2745, 100, USER),
            None,
            "in the group, no g+x: kept"
        );
        assert_eq!(dropped(0o2745, 5, USER), Some(0o745), "outside the group");
        assert_eq!(dropped(0o2745, 5, ROOT), None, "root is in every group");
        assert_eq!(dropped(0o6777, 0, ROOT), Some(0o777));
        assert_eq!(dropped(0o755, 100, USER), None);
        assert_eq!(dropped(0o1777, 100, USER), None, "sticky stays");
    }
}
