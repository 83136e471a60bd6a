//! Which files keep the kernel's page cache across opens (`FOPEN_KEEP_CACHE`).
//!
//! Without the flag the kernel drops a file's cached pages at every open, so a file read
//! again is read again through the mount and the chunkservers. With it, a re-read of an
//! unchanged file is served by the kernel at memory speed, with no request to us. The flag
//! may only be set while the cached pages are still the file's content, because an open
//! after another client's close must see that client's writes (close-to-open):
//!
//! - The first open of a file in this mount asks the leader, and the reply's size, mtime
//!   and ctime are the file's [`Version`]. Every change of the content (a write's commit, a
//!   truncate, a punch) sets ctime to the leader's clock, and no client can set ctime.
//! - A version is remembered at an open that drops the cache: every page cached after that
//!   was read at that version or a later one. A later open that finds the same version knows
//!   nothing changed since, so every cached page is current: the cache is kept. Any other
//!   version drops the cache and is remembered instead.
//! - An open that finds the file already open here does not ask the leader: it drops the
//!   cache and leaves the remembered version alone (pages read after it are still at that
//!   version or later).
//! - This mount's own writes go through the cache but are not tracked: an open for
//!   writing and a truncate forget the version, so the next open drops the cache.
//! - Other clients' changes while the file stays cached are taken back by the coherence
//!   events (`inval_inode`), as before.

use std::collections::HashMap;
use std::sync::Mutex;

use rawfs_metadata_api::{Attr, Ino, Timespec};

use crate::inner::lock;

/// Versions kept at most; past it they are all forgotten (the next opens drop their caches).
const LIMIT: usize = 100_000;

/// What identifies a file's content: any change of it moves ctime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    size: u64,
    mtime: Timespec,
    ctime: Timespec,
}

impl Version {
    fn of(a: &Attr) -> Self {
        Version {
            size: a.size,
            mtime: a.mtime,
            ctime: a.ctime,
        }
    }
}

/// The version of each file whose pages the kernel may hold.
#[derive(Default)]
pub(crate) struct PageCache {
    versions: Mutex<HashMap<Ino, Version>>,
}

impl PageCache {
    /// A read-only open that asked the leader found `a`: true if the kernel may keep the
    /// pages it has (the version is the one remembered). Remembers `a`'s version.
    pub(crate) fn reopened(&self, a: &Attr) -> bool {
        let now = Version::of(a);
        let mut v = lock(&self.versions);
        if v.len() >= LIMIT && !v.contains_key(&a.ino) {
            v.clear();
        }
        v.insert(a.ino, now) == Some(now)
    }

    /// `ino`'s content is changed by this mount (an open for writing, a truncate), or the
    /// kernel forgot the inode and its pages: the next open drops the cache.
    pub(crate) fn forget(&self, ino: Ino) {
        lock(&self.versions).remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rawfs_metadata_api::FileKind;

    fn attr(ino: Ino, size: u64, ctime: i64) -> Attr {
        let t = Timespec { sec: 1, nsec: 0 };
        Attr {
            ino,
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size,
            rdev: 0,
            atime: t,
            mtime: t,
            ctime: Timespec {
                sec: ctime,
                nsec: 0,
            },
            crtime: t,
            stored: size,
            no_xattrs: true,
        }
    }

    #[test]
    fn keeps_only_an_unchanged_version_remembered_at_an_earlier_open() {
        let pc = PageCache::default();
        assert!(!pc.reopened(&attr(1, 10, 5)), "nothing cached yet");
        assert!(pc.reopened(&attr(1, 10, 5)), "same version");
        assert!(!pc.reopened(&attr(1, 10, 6)), "ctime moved");
        assert!(!pc.reopened(&attr(1, 11, 6)), "size moved");
        assert!(pc.reopened(&attr(1, 11, 6)));
        pc.forget(1);
        assert!(!pc.reopened(&attr(1, 11, 6)), "forgotten: written here");
        assert!(!pc.reopened(&attr(2, 11, 6)), "another inode");
    }
}
