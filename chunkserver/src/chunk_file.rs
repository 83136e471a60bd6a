//! One chunk on disk: a header, a block checksum table, and a sparse data region.
//!
//! The layout (header, block checksum table, data region) is
//! [`rawfs_chunkserver_api::layout`]: clients on the same host read chunk files directly
//! through descriptors this server hands them (see `local_server`), so the format is part of
//! the wire contract.

use crate::direct::DirectFile;
use crate::inflight::{InFlight, Registered};
use crate::storage::StoreError;
use bytes::Bytes;
use rawfs_chunkserver_api::layout::{
    crc_then_block, read_blocks, read_full_at, BlockEntry as Block, BlockReadError, Geometry,
    Header, Wait, ENTRY_LEN, HEADER_LEN, TABLE_OFFSET,
};
use rawfs_chunkserver_api::{written, MAX_CHUNK_SIZE};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;

/// Why a chunk file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("chunk file does not exist")]
    NotFound,
    /// The header is unreadable; `complete` is false when the file is shorter than a header
    /// (a creation that never reached the disk).
    #[error("chunk file header is invalid: {reason}")]
    BadHeader {
        reason: &'static str,
        complete: bool,
    },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// An open chunk file with its checksum table in memory.
pub struct ChunkFile {
    file: File,
    id: u64,
    version: u64,
    /// Its checksum block size and where its data starts.
    geo: Geometry,
    blocks: Vec<Block>,
    /// Data written since writeback was last started: (lowest, highest) file offsets and
    /// the number of bytes.
    unflushed: Option<(u64, u64, u64)>,
    /// Where long runs of whole blocks are written (see `direct.rs`).
    direct: DirectFile,
    /// Spans being written outside the chunk's lock (see `inflight.rs`).
    inflight: Arc<InFlight>,
}

/// Writes recorded by [`ChunkFile::finish_unlocked`] in this process (for tests).
#[cfg(test)]
pub(crate) static UNLOCKED_WRITES: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// A write of whole blocks from a page-aligned payload, planned under the chunk's lock
/// ([`ChunkFile::plan_unlocked`]), carried out without it ([`UnlockedWrite::write`]) and
/// recorded under it again ([`ChunkFile::finish_unlocked`]). Its span stays registered until
/// it is dropped.
pub struct UnlockedWrite {
    direct: Arc<File>,
    /// File offset of the data.
    at: u64,
    first: usize,
    crcs: Vec<u32>,
    _span: Registered,
}

impl UnlockedWrite {
    /// Writes the data; `Ok(false)` when direct I/O was refused before anything was written
    /// (write it the locked way then).
    pub fn write(&self, data: &[u8]) -> io::Result<bool> {
        crate::direct::write_aligned(&self.direct, data, self.at)
    }
}

/// Once this much data has been written to a chunk file since the last time, its writeback
/// to disk is started (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for
/// it). Without that the kernel keeps gigabytes dirty until the client's flush, and the
/// flush then waits for all of it at once: with three replicas on the disks, streaming
/// writes overlap the disk work with the transfer instead (as RocksDB's `bytes_per_sync`).
/// It also bounds how long a later fsync takes.
const WRITEBACK_EVERY: u64 = 8 << 20;

impl ChunkFile {
    /// Creates a new, empty chunk file at `path` in the current geometry; fails if it exists.
    pub fn create(path: &Path, id: u64, version: u64) -> io::Result<ChunkFile> {
        Self::create_in(path, id, version, Geometry::current())
    }

    /// [`ChunkFile::create`] with the given geometry (older geometries for tests).
    pub fn create_in(path: &Path, id: u64, version: u64, geo: Geometry) -> io::Result<ChunkFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let cf = ChunkFile {
            file,
            id,
            version,
            geo,
            blocks: vec![Block::Unwritten; geo.blocks],
            unflushed: None,
            direct: DirectFile::default(),
            inflight: Arc::default(),
        };
        cf.write_header()?;
        Ok(cf)
    }

    /// Opens the chunk file at `path`, checking its header and loading its table.
    pub fn open(path: &Path) -> Result<ChunkFile, OpenError> {
        let (file, header) = Self::open_header(path)?;
        let Header {
            id,
            version,
            geometry: geo,
        } = header;
        // The table may be a hole or past the end of the file: both read as zeros (unwritten).
        let mut table = vec![0u8; geo.table_len()];
        read_full_at(&file, &mut table, TABLE_OFFSET)?;
        let blocks = table.chunks_exact(ENTRY_LEN).map(Block::decode).collect();
        Ok(ChunkFile {
            file,
            id,
            version,
            geo,
            blocks,
            unflushed: None,
            direct: DirectFile::default(),
            inflight: Arc::default(),
        })
    }

    /// The header of the chunk file at `path` and the bytes the file occupies on disk,
    /// without loading its table (a startup scan needs no more).
    pub fn peek(path: &Path) -> Result<(Header, u64), OpenError> {
        let (file, header) = Self::open_header(path)?;
        Ok((header, file.metadata()?.blocks() * 512))
    }

    fn open_header(path: &Path) -> Result<(File, Header), OpenError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OpenError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let mut header = [0u8; HEADER_LEN];
        let n = read_full_at(&file, &mut header, 0)?;
        let header = Header::parse(&header).map_err(|reason| OpenError::BadHeader {
            reason,
            complete: n == HEADER_LEN,
        })?;
        Ok((file, header))
    }

    /// The chunk id recorded in the header.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The chunk version recorded in the header.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn write_header(&self) -> io::Result<()> {
        let h = Header {
            id: self.id,
            version: self.version,
            geometry: self.geo,
        };
        self.file.write_all_at(&h.encode(), 0)
    }

    /// Records a newer version durably (the header is fsynced: a replica must not forget that
    /// it moved past an older version, or a stale client could write to it again).
    pub fn set_version(&mut self, version: u64) -> io::Result<()> {
        let old = self.version;
        self.version = version;
        if let Err(e) = self.write_header().and_then(|()| self.file.sync_data()) {
            self.version = old;
            return Err(e);
        }
        Ok(())
    }

    /// Byte offsets of the blocks that hold data, in order. A block whose table entry is
    /// damaged is included, so that reading it reports the damage rather than skipping it.
    pub fn data_blocks(&self) -> Vec<u64> {
        self.blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != Block::Unwritten)
            .map(|(i, _)| i as u64 * self.geo.block)
            .collect()
    }

    /// The runs of written blocks within `offset..offset + len` (clipped to it), for a
    /// WRITTEN request. A damaged entry counts as written (see `data_blocks`).
    pub fn written(&self, offset: u64, len: u64) -> Result<Vec<Range<u32>>, StoreError> {
        let end = check_range(offset, len)?;
        let flags: Vec<bool> = self.blocks.iter().map(|b| *b != Block::Unwritten).collect();
        // Casts: check_range keeps both within a chunk, whose size fits u32.
        let range = offset as u32..end as u32;
        Ok(written::runs_of(&flags, self.geo.block as u32, range))
    }

    /// Bytes per checksummed block of this file.
    pub fn block_size(&self) -> u64 {
        self.geo.block
    }

    /// Bytes the file occupies on disk.
    pub fn allocated(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// fsyncs data, table and header.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Writes `data` at chunk offset `offset`, touching only the blocks it covers. A partially
    /// covered block that was written before is read and verified first. Returns the bytes of
    /// the blocks that held no data before (what the write added to the space stored).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<u64, StoreError> {
        self.write_with_crcs(offset, data, None)
    }

    /// [`ChunkFile::write`] with the crcs of the whole 4 KiB blocks `data` covers already
    /// computed (see `payload_crc`); used only if this file has 4 KiB blocks.
    pub fn write_with_crcs(
        &mut self,
        offset: u64,
        data: &[u8],
        known: Option<&[u32]>,
    ) -> Result<u64, StoreError> {
        let known = known.filter(|_| self.geo == Geometry::current());
        let end = check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(0);
        }
        let (bs, data_offset) = (self.geo.block, self.geo.data_offset);
        let first = (offset / bs) as usize;
        let last = ((end - 1) / bs) as usize;
        // Pieces to write, as (file offset, bytes); a run of whole blocks stays borrowed.
        let mut owned: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut whole: Option<(u64, usize, usize)> = None; // (file offset, data start, data end)
        let mut crcs = Vec::with_capacity(last - first + 1);
        let mut whole_blocks = 0;
        for b in first..=last {
            let bstart = b as u64 * bs;
            let s = offset.max(bstart);
            let e = end.min(bstart + bs);
            let piece = &data[(s - offset) as usize..(e - offset) as usize];
            if s == bstart && e == bstart + bs {
                let nth = whole_blocks;
                whole_blocks += 1;
                crcs.push(match known.and_then(|k| k.get(nth)) {
                    Some(crc) => *crc,
                    None => crc32c::crc32c(piece),
                });
                let (ds, de) = ((s - offset) as usize, (e - offset) as usize);
                whole = Some(match whole {
                    Some((fo, start, _)) => (fo, start, de),
                    None => (data_offset + s, ds, de),
                });
                continue;
            }
            let at = (s - bstart) as usize;
            match self.blocks[b] {
                Block::Written(old) => {
                    // Only the bytes being replaced are read: the block's new crc follows
                    // from the old one and the change (see `patched_crc`), so a 4 KiB write
                    // does not read and hash 64 KiB twice. Damage elsewhere in the block
                    // still fails the new crc, as it failed the old one.
                    let mut before = vec![0u8; piece.len()];
                    read_full_at(&self.file, &mut before, data_offset + s)?;
                    let after = bs as usize - at - piece.len();
                    crcs.push(patched_crc(old, &before, piece, after));
                    // Only the changed bytes go to disk; the rest are already there.
                    owned.push((data_offset + s, piece.to_vec()));
                }
                Block::Unwritten => {
                    // The whole block is written, zeros included: bytes left on disk by a
                    // write whose table entry was lost must not survive under the new crc.
                    let mut buf = vec![0u8; bs as usize];
                    buf[at..at + piece.len()].copy_from_slice(piece);
                    crcs.push(crc32c::crc32c(&buf));
                    owned.push((data_offset + bstart, buf));
                }
                Block::Bad => return Err(StoreError::Corrupt { offset: bstart }),
            }
        }
        for (at, buf) in &owned {
            self.file.write_all_at(buf, *at)?;
        }
        let mut all_direct = owned.is_empty();
        if let Some((at, ds, de)) = whole {
            let run = &data[ds..de];
            if !self.direct.write(&self.file, run, at)? {
                self.file.write_all_at(run, at)?;
                all_direct = false;
            }
        }
        let fresh = self.record(first, &crcs)?;
        // Data written direct left nothing dirty to start writing back.
        if !all_direct {
            self.start_writeback_if_due(data_offset + first as u64 * bs, data_offset + end);
        }
        Ok(fresh)
    }

    /// Makes chunk bytes `offset..offset + len` read as zeros (a ZERO request). Whole blocks
    /// become unwritten: their table entries are cleared and made durable first, then their
    /// space is punched out of the file, so a crash between the two leaves blocks that read
    /// as zeros. Blocks
    /// covered only in part get zeros written, unless they hold no data.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        let end = check_range(offset, len)?;
        let bs = self.geo.block;
        let (whole_from, whole_to) = (offset.div_ceil(bs), end / bs);
        if whole_from >= whole_to {
            return self.zero_partial(offset, end);
        }
        self.zero_partial(offset, whole_from * bs)?;
        self.zero_partial(whole_to * bs, end)?;
        // Casts: block indexes of a chunk.
        let (first, last) = (whole_from as usize, whole_to as usize);
        if self.blocks[first..last]
            .iter()
            .all(|b| *b == Block::Unwritten)
        {
            return Ok(());
        }
        let cleared = vec![0u8; (last - first) * ENTRY_LEN];
        self.file
            .write_all_at(&cleared, TABLE_OFFSET + (first * ENTRY_LEN) as u64)?;
        self.blocks[first..last].fill(Block::Unwritten);
        // The cleared entries reach the disk before the hole does: a punch is a filesystem
        // change that may be committed before our table page, and a power loss between them
        // would leave checksums over zeros (a block that reads as damaged on every replica).
        self.file.sync_data()?;
        let (at, n) = (
            self.geo.data_offset + whole_from * bs,
            (whole_to - whole_from) * bs,
        );
        // SAFETY: fallocate on a descriptor this file owns; it only frees blocks of the range.
        let punched = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as libc::off_t,
                n as libc::off_t,
            )
        };
        if punched != 0 {
            // The blocks read as zeros all the same (their entries say unwritten); only the
            // space stays taken, on a filesystem that cannot punch holes.
            tracing::debug!(chunk = self.id, error = %io::Error::last_os_error(), "punching a hole failed");
        }
        Ok(())
    }

    /// Writes zeros over `from..to` (parts of at most two blocks, none of them whole) where
    /// the block holds data; an unwritten block reads as zeros already.
    fn zero_partial(&mut self, from: u64, to: u64) -> Result<(), StoreError> {
        let bs = self.geo.block;
        let mut at = from;
        while at < to {
            let stop = to.min((at / bs + 1) * bs);
            if self.blocks[(at / bs) as usize] != Block::Unwritten {
                self.write(at, &vec![0u8; (stop - at) as usize])?;
            }
            at = stop;
        }
        Ok(())
    }

    /// Records the checksums of the blocks from `first` on, in the table on disk and here.
    /// Returns the bytes of those blocks that were unwritten before.
    fn record(&mut self, first: usize, crcs: &[u32]) -> Result<u64, StoreError> {
        let mut table = Vec::with_capacity(crcs.len() * ENTRY_LEN);
        for crc in crcs {
            table.extend_from_slice(&Block::Written(*crc).encode());
        }
        self.file
            .write_all_at(&table, TABLE_OFFSET + (first * ENTRY_LEN) as u64)?;
        let mut fresh = 0;
        for (i, crc) in crcs.iter().enumerate() {
            let block = &mut self.blocks[first + i];
            if *block == Block::Unwritten {
                fresh += self.geo.block;
            }
            *block = Block::Written(*crc);
        }
        Ok(fresh)
    }

    /// The spans being written outside the lock.
    pub(crate) fn inflight(&self) -> &Arc<InFlight> {
        &self.inflight
    }

    /// Plans writing `data` at `offset` without the chunk's lock, when it can be: whole
    /// 4 KiB blocks whose crcs are `known`, a page-aligned payload, long enough to go direct.
    /// Registers the span (the caller has made sure nothing registered overlaps it). Not
    /// while an operation waits for spans to end (see `inflight.rs`).
    pub fn plan_unlocked(
        &mut self,
        offset: u64,
        data: &[u8],
        known: Option<&[u32]>,
    ) -> Option<UnlockedWrite> {
        let known = known.filter(|_| self.geo == Geometry::current())?;
        let (bs, len) = (self.geo.block, data.len() as u64);
        let end = check_range(offset, len).ok()?;
        if len == 0
            || offset % bs != 0
            || len % bs != 0
            || known.len() as u64 != len / bs
            || self.inflight.has_waiters()
        {
            return None;
        }
        let at = self.geo.data_offset + offset;
        let direct = self.direct.for_aligned(&self.file, data, at)?;
        Some(UnlockedWrite {
            direct,
            at,
            first: (offset / bs) as usize,
            crcs: known.to_vec(),
            _span: self.inflight.begin(offset, end),
        })
    }

    /// Records a write done by [`UnlockedWrite::write`] (call with the chunk's lock again).
    pub fn finish_unlocked(&mut self, w: UnlockedWrite) -> Result<u64, StoreError> {
        let fresh = self.record(w.first, &w.crcs)?;
        #[cfg(test)]
        UNLOCKED_WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(fresh)
    }

    /// Notes that file bytes `from..to` were written, and starts their writeback once
    /// [`WRITEBACK_EVERY`] bytes are pending (see there). Only a hint to the kernel: an error
    /// here is reported again by the fsync that durability actually rests on.
    fn start_writeback_if_due(&mut self, from: u64, to: u64) {
        let (lo, hi, bytes) = match self.unflushed {
            Some((lo, hi, bytes)) => (lo.min(from), hi.max(to), bytes + (to - from)),
            None => (from, to, to - from),
        };
        if bytes < WRITEBACK_EVERY {
            self.unflushed = Some((lo, hi, bytes));
            return;
        }
        self.unflushed = None;
        // SAFETY: a plain syscall on a descriptor this ChunkFile owns; no memory is passed.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                lo as libc::off64_t,
                (hi - lo) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc != 0 {
            tracing::debug!(chunk = self.id, error = %io::Error::last_os_error(), "sync_file_range failed");
        }
    }

    /// Reads `len` bytes at chunk offset `offset`; every touched written block is verified.
    pub fn read(&self, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        self.read_checked(offset, len).map(|(data, _)| data)
    }

    /// [`ChunkFile::read`], with the data's crc32c when `offset` and `len` are whole blocks:
    /// combined from the block checksums just verified, so that the frame carrying the data
    /// needs no second pass over it.
    pub fn read_checked(&self, offset: u64, len: u64) -> Result<(Bytes, Option<u32>), StoreError> {
        let end = check_range(offset, len)?;
        if len == 0 {
            return Ok((Bytes::new(), None));
        }
        // The crc of the blocks read, block by block (32 steps each); it is the data's crc
        // only if the data is exactly those blocks.
        let mut crc: Option<u32> = None;
        let add_block = |block_crc: u32| {
            crc = Some(match crc {
                None => block_crc,
                Some(c) => crc_then_block(self.geo, c, block_crc),
            });
        };
        let (geo, bs) = (self.geo, self.geo.block);
        let data = read_blocks(
            &self.file,
            geo,
            offset,
            len,
            Wait::Disk,
            |b| self.blocks[b],
            add_block,
        )
        .map_err(|e| match e {
            BlockReadError::Io(e) => StoreError::from(e),
            BlockReadError::Corrupt { block } => StoreError::Corrupt {
                offset: block as u64 * bs,
            },
        })?;
        let whole_blocks = offset % bs == 0 && end % bs == 0;
        Ok((data, crc.filter(|_| whole_blocks)))
    }
}

/// What one [`ChunkFile::verify`] call covered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Bytes of written blocks read and checked (whole blocks).
    pub bytes: u64,
    /// Chunk offset of the next block holding data, if any is left.
    pub next: Option<u64>,
}

impl ChunkFile {
    /// Verifies the blocks holding data from chunk offset `from` on, up to `budget` bytes of
    /// them (at least one block), through [`ChunkFile::read`]: the scrub checks exactly what a
    /// read checks. The first bad block is returned as [`StoreError::Corrupt`].
    pub fn verify(&self, from: u64, budget: u64) -> Result<Verified, StoreError> {
        let (bs, blocks) = (self.geo.block, self.geo.blocks);
        let want = (budget / bs).max(1) as usize;
        let mut b = (from / bs) as usize;
        let mut done = 0usize;
        while b < blocks && done < want {
            if self.blocks[b] == Block::Unwritten {
                b += 1;
                continue;
            }
            // One read per run of blocks with data, as a client read would do.
            let mut end = b + 1;
            while end < blocks && end - b < want - done && self.blocks[end] != Block::Unwritten {
                end += 1;
            }
            self.read(b as u64 * bs, (end - b) as u64 * bs)?;
            done += end - b;
            b = end;
        }
        let next = (b..blocks)
            .find(|&i| self.blocks[i] != Block::Unwritten)
            .map(|i| i as u64 * bs);
        Ok(Verified {
            bytes: done as u64 * bs,
            next,
        })
    }
}

/// Checks that `offset..offset + len` lies within a chunk; returns the end.
fn check_range(offset: u64, len: u64) -> Result<u64, StoreError> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_CHUNK_SIZE => Ok(end),
        _ => Err(StoreError::BadRequest {
            reason: format!("range {offset}+{len} exceeds the chunk size {MAX_CHUNK_SIZE}"),
        }),
    }
}

/// The crc32c of a block whose crc was `old` after `before` (followed by `after` more bytes
/// of the block) is replaced by `now` (as long as `before`).
///
/// CRC is affine: for equal-length messages, `crc(A ^ B ^ C) = crc(A) ^ crc(B) ^ crc(C)`.
/// With `B`, `C` the block zeroed but for `before` and `now`, the zero runs cancel, and
/// what is left is the difference of the two pieces' crcs shifted over the `after` bytes
/// that follow them (`crc32c_combine` with a zero second crc is that shift).
fn patched_crc(old: u32, before: &[u8], now: &[u8], after: usize) -> u32 {
    let diff = crc32c::crc32c(before) ^ crc32c::crc32c(now);
    old ^ crc32c::crc32c_combine(diff, 0, after)
}

#[cfg(test)]
#[path = "chunk_file_tests.rs"]
mod tests;
