//! Chunks written through a file's [`crate::FileIo`] and not synced yet, kept by the client
//! after that `FileIo` is gone (the file's last close), so that an `fsync` of the file through
//! a later open still makes them durable: `fsync` covers every write to the file, through any
//! descriptor (`cp f /mnt/x && sync /mnt/x` opens the file again only to sync it).
//!
//! Bounded: the files closed longest ago are forgotten first once [`LIMIT`] files are kept.
//! A forgotten file's chunks are still written out by the chunkservers' own page-cache
//! writeback (30 s on Linux by default); only the promise of an `fsync` that comes after
//! that many other files were closed is lost.

use crate::write_path::Dirty;
use lru::LruCache;
use rawfs_metadata_api::Ino;
use std::num::NonZeroUsize;
use std::sync::Mutex;

/// Files whose unsynced chunks are kept at most.
pub const LIMIT: usize = 65_536;

/// Unsynced chunks of closed files, by inode.
pub(crate) struct Unsynced {
    files: Mutex<LruCache<Ino, Vec<Dirty>>>,
}

impl Default for Unsynced {
    fn default() -> Self {
        let cap = NonZeroUsize::new(LIMIT).expect("LIMIT is not zero");
        Unsynced {
            files: Mutex::new(LruCache::new(cap)),
        }
    }
}

impl Unsynced {
    /// Keeps `dirty`, the unsynced chunks of `ino` whose `FileIo` is going away.
    pub(crate) fn park(&self, ino: Ino, dirty: Vec<Dirty>) {
        if dirty.is_empty() {
            return;
        }
        let mut files = crate::file_io::lock(&self.files);
        match files.get_mut(&ino) {
            Some(kept) => {
                for d in dirty {
                    crate::file_io::merge_dirty(kept, d);
                }
            }
            None => {
                files.put(ino, dirty);
            }
        }
    }

    /// Takes the unsynced chunks kept for `ino` (for its new `FileIo`).
    pub(crate) fn take(&self, ino: Ino) -> Vec<Dirty> {
        crate::file_io::lock(&self.files)
            .pop(&ino)
            .unwrap_or_default()
    }
}
