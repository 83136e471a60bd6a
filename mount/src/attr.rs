//! Conversions between rawfs attributes and fuser's, and between inode numbers as the
//! kernel sees them and as the metadata service keeps them (they differ only for the root
//! when a subdirectory is mounted).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use rawfs_metadata_api::{Attr, FileKind, Ino, TimeSet, Timespec, ROOT_INO};

/// `st_blksize` reported by `stat`: one FUSE write, so that tools that size their buffers
/// from it (cp, dd with defaults, stdio) send full-size writes.
pub(crate) const BLKSIZE: u32 = 1 << 20;

/// Translates inode numbers: the kernel always calls the mount's root `1`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InoMap {
    /// The metadata inode mounted as the root (ROOT_INO unless a subdirectory is mounted).
    pub(crate) root: Ino,
}

impl InoMap {
    /// The metadata inode for a kernel inode.
    pub(crate) fn meta(&self, ino: INodeNo) -> Ino {
        if ino.0 == ROOT_INO {
            self.root
        } else {
            ino.0
        }
    }

    /// The kernel inode for a metadata inode. The filesystem's own root cannot be reached
    /// from inside a mounted subdirectory, so the two never collide.
    pub(crate) fn fuse(&self, ino: Ino) -> INodeNo {
        if ino == self.root {
            INodeNo(ROOT_INO)
        } else {
            INodeNo(ino)
        }
    }
}

pub(crate) fn to_system_time(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec.min(999_999_999))
    } else {
        // Before 1970: go back whole seconds, then forward the nanoseconds.
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nsec.min(999_999_999)))
    }
}

pub(crate) fn to_timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        },
        Err(e) => {
            // Before the epoch: floor to whole seconds with a positive nanosecond part.
            let d = e.duration();
            let mut sec = -(d.as_secs() as i64);
            let mut nsec = 0;
            if d.subsec_nanos() > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - d.subsec_nanos();
            }
            Timespec { sec, nsec }
        }
    }
}

/// A time the kernel asked `setattr` for, as fuser 0.18 hands it over.
pub(crate) fn to_time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(from_kernel(t)),
    }
}

/// Undoes fuser 0.18's conversion of a kernel time before 1970: it turns (-s, ns) into
/// `UNIX_EPOCH - (s + ns)` where `UNIX_EPOCH - s + ns` is meant, so -1.5 s (-2 s + 0.5 s)
/// would arrive as -2.5 s. Times from 1970 on convert right.
fn from_kernel(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => to_timespec(t),
        Err(e) => Timespec {
            sec: -(e.duration().as_secs() as i64),
            nsec: e.duration().subsec_nanos(),
        },
    }
}

pub(crate) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// The kind encoded in the `S_IFMT` bits of a mode, as `mknod` receives it.
pub(crate) fn kind_from_mode(mode: u32) -> Option<FileKind> {
    match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Some(FileKind::File),
        libc::S_IFDIR => Some(FileKind::Dir),
        libc::S_IFLNK => Some(FileKind::Symlink),
        libc::S_IFIFO => Some(FileKind::Fifo),
        libc::S_IFSOCK => Some(FileKind::Socket),
        libc::S_IFCHR => Some(FileKind::CharDevice),
        libc::S_IFBLK => Some(FileKind::BlockDevice),
        _ => None,
    }
}

/// Converts metadata attributes for the kernel. `size` overrides the stored size for files
/// with buffered writes in this mount.
pub(crate) fn file_attr(map: &InoMap, a: &Attr, size: Option<u64>) -> FileAttr {
    let size = size.unwrap_or(a.size);
    FileAttr {
        ino: map.fuse(a.ino),
        size,
        blocks: a.stored.div_ceil(512),
        atime: to_system_time(a.atime),
        mtime: to_system_time(a.mtime),
        ctime: to_system_time(a.ctime),
        crtime: to_system_time(a.crtime),
        kind: file_type(a.kind),
        perm: (a.perm & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_times_before_1970_keep_their_nanoseconds() {
        // fuser 0.18 hands (-2 s, 0.5 s), which is -1.5 s, over as EPOCH - 2.5 s.
        let fuser_made = UNIX_EPOCH - Duration::new(2, 500_000_000);
        let set = to_time_set(TimeOrNow::SpecificTime(fuser_made));
        assert_eq!(
            set,
            TimeSet::At(Timespec {
                sec: -2,
                nsec: 500_000_000
            })
        );
        let whole = UNIX_EPOCH - Duration::from_secs(7);
        let set = to_time_set(TimeOrNow::SpecificTime(whole));
        assert_eq!(set, TimeSet::At(Timespec { sec: -7, nsec: 0 }));
        let after = UNIX_EPOCH + Duration::new(5, 6);
        let set = to_time_set(TimeOrNow::SpecificTime(after));
        assert_eq!(set, TimeSet::At(Timespec { sec: 5, nsec: 6 }));
    }

    #[test]
    fn times_round_trip_including_before_epoch() {
        for ts in [
            Timespec { sec: 0, nsec: 0 },
            Timespec {
                sec: 1_700_000_000,
                nsec: 123_456_789,
            },
            Timespec {
                sec: -1,
                nsec: 500_000_000,
            },
            Timespec {
                sec: -86400,
                nsec: 0,
            },
        ] {
            assert_eq!(to_timespec(to_system_time(ts)), ts);
        }
    }

    #[test]
    fn root_inode_is_remapped_for_subdir_mounts() {
        let m = InoMap { root: 42 };
        assert_eq!(m.meta(INodeNo(1)), 42);
        assert_eq!(m.fuse(42), INodeNo(1));
        assert_eq!(m.meta(INodeNo(7)), 7);
        assert_eq!(m.fuse(7), INodeNo(7));
    }

    #[test]
    fn mode_kinds() {
        assert_eq!(kind_from_mode(libc::S_IFIFO | 0o644), Some(FileKind::Fifo));
        assert_eq!(kind_from_mode(libc::S_IFSOCK), Some(FileKind::Socket));
        assert_eq!(kind_from_mode(libc::S_IFCHR), Some(FileKind::CharDevice));
        assert_eq!(kind_from_mode(0o644), Some(FileKind::File));
        assert_eq!(kind_from_mode(0o170000), None);
    }
}
