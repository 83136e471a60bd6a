//! How much more a chunkserver may store: its configured capacity, and a reserve of free
//! space on the data directory's filesystem that chunk writes never take.
//!
//! Why a reserve: a chunkserver's disk is often shared, with the metadata service's log and
//! database (`rawfs up` puts every daemon on one disk), with logs, with the system. A
//! chunkserver that wrote until the filesystem was full would leave the metadata service no
//! room for its next log entry, and a replicated log that cannot append stops: the whole
//! cluster would then refuse everything, even the deletes that would free space. With the
//! reserve, chunk writes get `NoSpace` (ENOSPC to the application) while the filesystem still
//! has [`Space::reserve`] bytes free, and everything else keeps working.
//!
//! The filesystem's free space is looked up (statvfs, about a microsecond) at least every
//! [`LOOK_EVERY`], and on every write once it is within [`NEAR`] of the reserve; in between,
//! each write's length is taken off the last figure (overwrites in place count too until the
//! next look: cautious, never lax). Looking often matters because the disk is shared: the
//! other chunkservers on it write too, and only a fresh look sees what they took.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The default reserve: this fraction of the filesystem, within [`RESERVE_MIN`, `RESERVE_MAX`].
const RESERVE_PER_MILLE: u64 = 20;
const RESERVE_MIN: u64 = 64 << 20;
const RESERVE_MAX: u64 = 4 << 30;
/// Longest time between two looks at the filesystem's free space.
const LOOK_EVERY: Duration = Duration::from_millis(200);
/// Room above the reserve smaller than this is reported as none: a write of a few MiB is
/// refused there already, so the server shows as full and gets no new chunks.
const SLACK: u64 = 16 << 20;
/// Within this much of the reserve, every write looks: more than everything on the disk
/// can write in [`LOOK_EVERY`].
const NEAR: u64 = 2 << 30;

/// The space a chunkserver may still fill.
pub(crate) struct Space {
    root: PathBuf,
    capacity: Option<u64>,
    reserve: u64,
    /// The filesystem's free bytes at the last look, less what writes were admitted since.
    free: AtomicI64,
    /// When this value was made: the clock `looked_ms` counts from.
    born: Instant,
    /// Milliseconds after `born` of the last look. Atomic, not a lock, since every write
    /// reads it; two writes that look at once both store a fresh figure, which is harmless.
    looked_ms: AtomicU64,
    /// See [`disk_id`].
    disk: u64,
}

/// An id of the filesystem holding `root`: a hash of the host's identity and the
/// filesystem's device number, so equal for every chunkserver on that filesystem of this
/// host; 0 when either is unknown. FNV-1a, so that every build hashes alike.
fn disk_id(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let host = ["/etc/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty());
    let (Some(host), Ok(meta)) = (host, std::fs::metadata(root)) else {
        return 0;
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain(meta.dev().to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// (size, free bytes) of the filesystem holding `root`; free as an unprivileged user sees it
/// (root's own reserved blocks are left for the system).
fn statvfs(root: &Path) -> Option<(u64, u64)> {
    match nix::sys::statvfs::statvfs(root) {
        // The field types differ between platforms (u32 on 32-bit); widen portably.
        #[allow(clippy::useless_conversion)]
        Ok(st) => {
            let unit = u64::from(st.fragment_size());
            Some((
                u64::from(st.blocks()).saturating_mul(unit),
                u64::from(st.blocks_available()).saturating_mul(unit),
            ))
        }
        Err(e) => {
            tracing::warn!(path = %root.display(), error = %e, "statvfs failed");
            None
        }
    }
}

fn signed(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl Space {
    /// The space under `root`, keeping `reserve` bytes of its filesystem free (`None`: the
    /// default for its size).
    pub(crate) fn new(root: &Path, capacity: Option<u64>, reserve: Option<u64>) -> Space {
        let (size, free) = statvfs(root).unwrap_or((0, 0));
        let reserve = reserve
            .unwrap_or_else(|| (size / 1000 * RESERVE_PER_MILLE).clamp(RESERVE_MIN, RESERVE_MAX));
        Space {
            root: root.to_path_buf(),
            capacity,
            reserve,
            free: AtomicI64::new(signed(free)),
            born: Instant::now(),
            looked_ms: AtomicU64::new(0),
            disk: disk_id(root),
        }
    }

    /// The filesystem holding the chunks (see [`disk_id`]).
    pub(crate) fn disk_id(&self) -> u64 {
        self.disk
    }

    /// Free bytes of the filesystem that chunk writes leave alone.
    pub(crate) fn reserve(&self) -> u64 {
        self.reserve
    }

    /// Looks at the filesystem's free space now.
    pub(crate) fn look(&self) {
        if let Some((_, free)) = statvfs(&self.root) {
            self.free.store(signed(free), Ordering::Relaxed);
        }
        self.looked_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The filesystem's free bytes, looked up again if the last figure is old or near the
    /// reserve.
    fn free(&self) -> i64 {
        let free = self.free.load(Ordering::Relaxed);
        let since = self
            .now_ms()
            .saturating_sub(self.looked_ms.load(Ordering::Relaxed));
        let stale = since >= LOOK_EVERY.as_millis() as u64;
        if stale || free < signed(self.reserve.saturating_add(NEAR)) {
            self.look();
            return self.free.load(Ordering::Relaxed);
        }
        free
    }

    /// Whether a write of `bytes` may go ahead while chunks take `used` bytes; if it may,
    /// its length is counted as taken until the next look.
    pub(crate) fn admits(&self, used: u64, bytes: u64) -> bool {
        if self.capacity.is_some_and(|cap| used >= cap) {
            return false;
        }
        if self.free() - signed(bytes) < signed(self.reserve) {
            return false;
        }
        self.free.fetch_sub(signed(bytes), Ordering::Relaxed);
        true
    }

    /// Bytes chunks may still take while they take `used`: the capacity left and the free
    /// space above the reserve, whichever is less (none once that is under [`SLACK`]).
    pub(crate) fn room(&self, used: u64) -> u64 {
        let above_reserve = u64::try_from(self.free() - signed(self.reserve))
            .unwrap_or(0)
            .saturating_sub(SLACK);
        match self.capacity {
            Some(cap) => cap.saturating_sub(used).min(above_reserve),
            None => above_reserve,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_fiftieth_of_the_filesystem_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path(), None, None);
        let (size, _) = statvfs(dir.path()).unwrap();
        assert_eq!(
            space.reserve(),
            (size / 50).clamp(RESERVE_MIN, RESERVE_MAX),
            "filesystem of {size} bytes"
        );
    }

    #[test]
    fn directories_of_one_filesystem_share_a_disk_id() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir_in(a.path()).unwrap();
        assert_ne!(disk_id(a.path()), 0);
        assert_eq!(disk_id(a.path()), disk_id(b.path()));
        // /proc is another filesystem.
        assert_ne!(disk_id(a.path()), disk_id(Path::new("/proc")));
    }

    #[test]
    fn writes_stop_at_the_reserve_and_the_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path(), Some(1 << 30), None);
        let room = space.room(0);
        assert!(room > 0 && room <= 1 << 30, "room {room}");
        assert!(space.admits(0, 4096));
        // More than the filesystem has above the reserve: refused, and nothing is counted.
        let (_, free) = statvfs(dir.path()).unwrap();
        assert!(!space.admits(0, free));
        assert!(space.admits(0, 4096));
        // At the capacity: refused whatever the filesystem has.
        assert!(!space.admits(1 << 30, 1));
        assert_eq!(space.room(1 << 30), 0);
    }
}
