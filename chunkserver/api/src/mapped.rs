//! Large local reads through a memory map of the chunk file: the bytes are checked where the
//! page cache holds them and handed on from there, so a sequential read costs the checksum
//! and the one copy into the caller's destination (the FUSE reply), not a `pread` copy into
//! a fresh buffer first.
//!
//! A map is only made of blocks that are all written and wholly inside the file, and it is
//! populated with `MADV_POPULATE_READ` before anything touches it: an I/O error then comes
//! back as an error (the read goes to the data port) rather than as SIGBUS. Chunk files never
//! shrink (the chunkserver only writes, renames and unlinks them), so a populated map stays
//! valid while it lives. What it does not survive is a chunk file cut short by hand while a
//! read has it mapped: the check then faults (SIGBUS), and a FUSE reply made from it fails
//! with EIO to the reader. Measured on a 1 GiB sequential read from the page cache through
//! the mount: 1,500-1,600 MiB/s with `pread`, 1,900-2,050 with maps.
//!
//! A map is advised `MADV_HUGEPAGE` before it is populated, so that the faults read the file
//! the way the kernel reads a file for `read(2)`: in large (2 MiB) page-cache folios, with
//! readahead past the map. `posix_fadvise(WILLNEED)`, used before, fills the page cache one
//! 4 KiB page at a time, and that page-by-page work (allocation, LRU, cgroup charge) was a
//! quarter of all CPU time in a cold sequential read through the mount. Measured on this
//! 2-core VM, 1 GiB through the mount with dropped caches: 1,170-1,390 MiB/s with the
//! advice, 1,930-2,030 MiB/s with huge-page maps. A kernel without transparent huge pages
//! refuses the advice, and the read then asks for its range and what follows it the old way.
//!
//! Bytes handed out may change after the check if the chunkserver writes the same blocks
//! later (a map shows the file as it is); a window cached by a client is dropped when that
//! client writes, and another client's concurrent write is a race either way.

use crate::layout::{BlockEntry, BlockReadError, Geometry};
use bytes::Bytes;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// `MADV_POPULATE_READ` (Linux 5.14); the libc crate does not name it yet.
const MADV_POPULATE_READ: libc::c_int = 22;

/// Set once the kernel refuses `MADV_POPULATE_READ`: maps are not used from then on.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// A read-only shared map of part of a file, unmapped when the last [`Bytes`] made from it
/// goes.
struct Map {
    at: NonNull<u8>,
    len: usize,
}

// SAFETY: the map is read-only and owned by this value alone; reading it from any thread is
// as safe as reading any immutable byte slice.
unsafe impl Send for Map {}
unsafe impl Sync for Map {}

impl AsRef<[u8]> for Map {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `at..at + len` is a live PROT_READ mapping until drop.
        unsafe { std::slice::from_raw_parts(self.at.as_ptr(), self.len) }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped, once.
        unsafe { libc::munmap(self.at.as_ptr().cast(), self.len) };
    }
}

/// Maps `len` bytes of `file` at `at` (page aligned) and faults them in; `None` if that fails.
/// `read_ahead` runs before the faults if the kernel cannot read through huge pages.
fn map(file: &File, at: u64, len: usize, read_ahead: impl FnOnce()) -> Option<Map> {
    let offset = libc::off_t::try_from(at).ok()?;
    // SAFETY: a fresh read-only shared mapping chosen by the kernel; nothing aliases it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return None;
    }
    let map = Map {
        at: NonNull::new(ptr.cast())?,
        len,
    };
    // SAFETY: advice on the mapping just made (only a hint: it may be refused).
    if unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) } != 0 {
        read_ahead();
    }
    // SAFETY: advice on the mapping just made.
    if unsafe { libc::madvise(ptr, len, MADV_POPULATE_READ) } != 0 {
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        return None;
    }
    Some(map)
}

/// Chunk bytes `offset..offset + len` of `file` (geometry `geo`, blocks as `entry` says),
/// every block checked, read through a map. `Ok(None)` when a map does not apply (a block
/// not written or past the file's end, no kernel support, a failed map or I/O error): the
/// caller then reads with `pread`, which reports what went wrong.
pub fn read_blocks_mapped(
    file: &File,
    geo: Geometry,
    offset: u64,
    len: u64,
    entry: impl Fn(usize) -> BlockEntry,
) -> Result<Option<Bytes>, BlockReadError> {
    if UNSUPPORTED.load(Ordering::Relaxed) || len == 0 {
        return Ok(None);
    }
    let bs = geo.block;
    let (first, last) = ((offset / bs) as usize, ((offset + len - 1) / bs) as usize);
    let start = geo.data_offset + first as u64 * bs;
    let map_len = (last - first + 1) as u64 * bs;
    let page = 4096;
    if start % page != 0 || file.metadata()?.len() < start + map_len {
        return Ok(None);
    }
    let mut crcs = Vec::with_capacity(last - first + 1);
    for b in first..=last {
        match entry(b) {
            BlockEntry::Written(crc) => crcs.push(crc),
            BlockEntry::Unwritten => return Ok(None),
            BlockEntry::Bad => return Err(BlockReadError::Corrupt { block: b }),
        }
    }
    let read_ahead = || crate::layout::read_ahead(file, geo, offset, len);
    let Some(map) = map(file, start, map_len as usize, read_ahead) else {
        return Ok(None);
    };
    for (i, block) in map.as_ref().chunks_exact(bs as usize).enumerate() {
        if crc32c::crc32c(block) != crcs[i] {
            return Err(BlockReadError::Corrupt { block: first + i });
        }
    }
    let from = (offset - first as u64 * bs) as usize;
    Ok(Some(
        Bytes::from_owner(map).slice(from..from + len as usize),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn mapped_reads_check_every_block_and_step_aside_for_holes_and_short_files() {
        let geo = Geometry::current();
        let bs = geo.block as usize;
        let data = pattern(256 * bs);
        let path = std::env::temp_dir().join(format!("rawfs-mapped-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.write_all_at(&data, geo.data_offset).unwrap();
        let crcs: Vec<u32> = data.chunks(bs).map(crc32c::crc32c).collect();
        let written = |b: usize| BlockEntry::Written(crcs[b]);

        let (offset, len) = (1000u64, 700_000u64);
        let got = read_blocks_mapped(&file, geo, offset, len, written)
            .unwrap()
            .expect("a map");
        assert_eq!(&got[..], &data[1000..701_000]);

        // A hole, a range past the file's end, a damaged entry: not mapped / refused.
        let holed = |b: usize| match b {
            5 => BlockEntry::Unwritten,
            _ => written(b),
        };
        assert!(read_blocks_mapped(&file, geo, 0, 10 * bs as u64, holed)
            .unwrap()
            .is_none());
        assert!(
            read_blocks_mapped(&file, geo, 250 * bs as u64, 8 * bs as u64, written)
                .unwrap()
                .is_none()
        );
        let bad = |b: usize| match b {
            3 => BlockEntry::Bad,
            _ => written(b),
        };
        assert!(matches!(
            read_blocks_mapped(&file, geo, 0, 10 * bs as u64, bad),
            Err(BlockReadError::Corrupt { block: 3 })
        ));

        // Rot in a block's bytes is caught.
        file.write_all_at(b"rot", geo.data_offset + 7 * bs as u64 + 11)
            .unwrap();
        assert!(matches!(
            read_blocks_mapped(&file, geo, 0, 10 * bs as u64, written),
            Err(BlockReadError::Corrupt { block: 7 })
        ));
    }
}
