//! The on-disk layout of a chunk file, shared by the chunkserver that writes it and by
//! clients on the same host that read it directly (see [`crate::local`]).
//!
//! ```text
//!  file offset  contents
//!  0            header (36 bytes used of a 4 KiB page)
//!                 0  magic          b"RAWFSCHK"
//!                 8  format version u32 (1)
//!                12  block size     u32: 4096 (files this version makes) or 65536 (older)
//!                16  chunk id       u64
//!                24  chunk version  u64
//!                32  crc32c of bytes 0..32
//!  4096         block table: one 8-byte entry per block (16384 of 4 KiB, or 1024 of 64 KiB)
//!                 0  crc32c of the block (zeros past what was written)
//!                 4  flags u8 (bit 0: written)
//!                 5  reserved (zero)
//!                 6  check u16 = low 16 bits of crc32c(entry bytes 0..6)
//!               an all-zero entry is an unwritten block (the table starts as a hole)
//!  D            data region: block i at D + i * block size; D is the end of the table
//!               rounded up to 4 KiB (135168 for 4 KiB blocks, 12288 for 64 KiB blocks)
//! ```
//!
//! The checksum block is 4 KiB since this version (as BlueStore's default): a 4 KiB random
//! read then reads and hashes 4 KiB, not 64 KiB. Files made with 64 KiB blocks are read and
//! written in their own geometry ([`Geometry`]); the wire protocol's [`BLOCK_SIZE`] is
//! unrelated to either.
//!
//! All integers are big-endian. Unwritten blocks are never stored, so they take no space and
//! read as zeros. A block's bytes and its table entry are written by separate `pwrite`s: if a
//! crash tears them apart, the block fails its checksum and reads as CORRUPT rather than
//! returning wrong bytes (and a reader racing a writer sees a mismatch, never wrong data).

#[cfg(doc)]
use crate::BLOCK_SIZE;
use crate::MAX_CHUNK_SIZE;
use bytes::BytesMut;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

const MAGIC: [u8; 8] = *b"RAWFSCHK";
const FORMAT_VERSION: u32 = 1;
/// Bytes of the header that carry data (the rest of its page is reserved).
pub const HEADER_LEN: usize = 36;
/// Where the block table starts.
pub const TABLE_OFFSET: u64 = 4096;
/// Bytes of one block table entry.
pub const ENTRY_LEN: usize = 8;
/// The checksum block of the chunk files this version makes.
pub const CSUM_BLOCK: u32 = 4096;
/// The checksum block of chunk files made before 4 KiB blocks (still read and written).
pub const LEGACY_CSUM_BLOCK: u32 = 64 << 10;

/// Where things are in a chunk file with a given checksum block size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per checksummed block.
    pub block: u64,
    /// Blocks in a chunk of the largest size (entries in the table).
    pub blocks: usize,
    /// Where the data region starts.
    pub data_offset: u64,
}

impl Geometry {
    /// The geometry for checksum blocks of `block_size` bytes, if that is a supported size.
    pub const fn of(block_size: u32) -> Option<Geometry> {
        if block_size != CSUM_BLOCK && block_size != LEGACY_CSUM_BLOCK {
            return None;
        }
        let blocks = (MAX_CHUNK_SIZE / block_size as u64) as usize;
        let table = (blocks * ENTRY_LEN) as u64;
        Some(Geometry {
            block: block_size as u64,
            blocks,
            data_offset: TABLE_OFFSET + table.next_multiple_of(4096),
        })
    }

    /// The geometry of the chunk files this version makes.
    pub const fn current() -> Geometry {
        match Geometry::of(CSUM_BLOCK) {
            Some(g) => g,
            None => panic!("CSUM_BLOCK is a supported block size"),
        }
    }

    /// Bytes of the block table.
    pub fn table_len(&self) -> usize {
        self.blocks * ENTRY_LEN
    }
}

/// The checksum state of one block, as its table entry records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockEntry {
    Unwritten,
    /// Written, with the crc32c of its 64 KiB.
    Written(u32),
    /// The entry failed its own check: nothing about the block can be trusted.
    Bad,
}

impl BlockEntry {
    /// The entry's bytes in the table.
    pub fn encode(self) -> [u8; ENTRY_LEN] {
        let mut e = [0u8; ENTRY_LEN];
        if let BlockEntry::Written(crc) = self {
            e[0..4].copy_from_slice(&crc.to_be_bytes());
            e[4] = 1;
            let check = (crc32c::crc32c(&e[0..6]) & 0xffff) as u16;
            e[6..8].copy_from_slice(&check.to_be_bytes());
        }
        e
    }

    /// The entry stored in `e` (`ENTRY_LEN` bytes).
    pub fn decode(e: &[u8]) -> BlockEntry {
        if e.iter().all(|&b| b == 0) {
            return BlockEntry::Unwritten;
        }
        let check = (crc32c::crc32c(&e[0..6]) & 0xffff) as u16;
        if e.len() != ENTRY_LEN || e[4] != 1 || e[5] != 0 || be_u16(&e[6..8]) != check {
            return BlockEntry::Bad;
        }
        BlockEntry::Written(be_u32(&e[0..4]))
    }
}

/// What a chunk file's header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u64,
    pub version: u64,
    /// The file's layout (from its checksum block size).
    pub geometry: Geometry,
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
        h[12..16].copy_from_slice(&(self.geometry.block as u32).to_be_bytes());
        h[16..24].copy_from_slice(&self.id.to_be_bytes());
        h[24..32].copy_from_slice(&self.version.to_be_bytes());
        let crc = crc32c::crc32c(&h[0..32]);
        h[32..36].copy_from_slice(&crc.to_be_bytes());
        h
    }

    /// Parses a complete header (`HEADER_LEN` bytes); the error says what is wrong.
    pub fn parse(h: &[u8]) -> Result<Header, &'static str> {
        if h.len() < HEADER_LEN {
            return Err("short header");
        }
        if h[0..8] != MAGIC {
            return Err("bad magic");
        }
        if crc32c::crc32c(&h[0..32]) != be_u32(&h[32..36]) {
            return Err("header checksum mismatch");
        }
        if be_u32(&h[8..12]) != FORMAT_VERSION {
            return Err("unsupported format version");
        }
        let geometry = Geometry::of(be_u32(&h[12..16])).ok_or("unsupported block size")?;
        Ok(Header {
            id: be_u64(&h[16..24]),
            version: be_u64(&h[24..32]),
            geometry,
        })
    }
}

/// A read at least this long is taken as part of a stream (clients read sequential data
/// in frames of 1 MiB; random readers ask for a few KiB).
const STREAM_READ: u64 = 512 << 10;
/// How far past a streaming read the kernel is asked to read ahead. A chunk file is read by
/// several requests at once, from different threads and out of order, which defeats the
/// kernel's own read-ahead on a cold disk; this keeps the disk busy meanwhile.
const READ_AHEAD_HINT: u64 = 8 << 20;

/// Why [`read_blocks`] failed.
#[derive(Debug)]
pub enum BlockReadError {
    Io(io::Error),
    /// Block `block` failed its checksum, or its table entry is damaged.
    Corrupt {
        block: usize,
    },
}

impl From<io::Error> for BlockReadError {
    fn from(e: io::Error) -> Self {
        BlockReadError::Io(e)
    }
}

/// Whether a read may wait for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    Disk,
    /// Only what the page cache holds: a read that would wait for the disk fails with
    /// `WouldBlock` instead (`RWF_NOWAIT`), so an async task can read inline when the data
    /// is cached and go to a blocking thread only when it is not.
    CacheOnly,
}

/// Reads chunk bytes `offset..offset + len` (inside the chunk, `len > 0`) from the chunk
/// file `file`, verifying every block it touches against `entry(block)`; unwritten blocks
/// read as zeros. `verified` is called with each touched block's crc, in order (the crc of
/// zeros for an unwritten block), so a caller can combine them into the data's crc.
///
/// Runs of written blocks are read with one `pread` each, straight into the buffer; a read of
/// `STREAM_READ` (512 KiB) or more first asks the kernel for it and what follows it.
pub fn read_blocks(
    file: &File,
    geo: Geometry,
    offset: u64,
    len: u64,
    wait: Wait,
    entry: impl Fn(usize) -> BlockEntry,
    mut verified: impl FnMut(u32),
) -> Result<bytes::Bytes, BlockReadError> {
    read_ahead(file, geo, offset, len);
    let end = offset + len;
    let bs = geo.block;
    let first = (offset / bs) as usize;
    let last = ((end - 1) / bs) as usize;
    let base = first as u64 * bs;
    let block = bs as usize;
    let mut buf = BytesMut::with_capacity((last - first + 1) * block);
    let mut b = first;
    while b <= last {
        match entry(b) {
            BlockEntry::Unwritten => {
                buf.resize(buf.len() + block, 0);
                verified(zero_block_crc(geo));
                b += 1;
            }
            BlockEntry::Bad => return Err(BlockReadError::Corrupt { block: b }),
            BlockEntry::Written(_) => {
                let mut run_end = b + 1;
                while run_end <= last && entry(run_end) != BlockEntry::Unwritten {
                    run_end += 1;
                }
                let from = buf.len();
                let at = geo.data_offset + b as u64 * bs;
                read_append_at(file, &mut buf, (run_end - b) * block, at, wait)?;
                for i in b..run_end {
                    let data = &buf[from + (i - b) * block..][..block];
                    match entry(i) {
                        BlockEntry::Written(stored) if crc32c::crc32c(data) == stored => {
                            verified(stored)
                        }
                        _ => return Err(BlockReadError::Corrupt { block: i }),
                    }
                }
                b = run_end;
            }
        }
    }
    let from = (offset - base) as usize;
    Ok(buf.freeze().slice(from..from + len as usize))
}

/// Before a read of `offset..offset + len`: if it looks like part of a stream, asks the
/// kernel to read it and what follows it, so that the disk works on all of it at once.
pub(crate) fn read_ahead(file: &File, geo: Geometry, offset: u64, len: u64) {
    if len >= STREAM_READ {
        will_need(file, geo, offset, len + READ_AHEAD_HINT);
    }
}

/// Asks the kernel to start reading chunk bytes `offset..offset + len` (clipped at the
/// chunk's end) into the page cache, without waiting. Only a hint: errors are ignored.
pub fn will_need(file: &File, geo: Geometry, offset: u64, len: u64) {
    let len = len.min(MAX_CHUNK_SIZE.saturating_sub(offset));
    if len == 0 {
        return;
    }
    // SAFETY: a plain syscall on a descriptor the caller owns; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            (geo.data_offset + offset) as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

/// The crc32c of a block of zeros (an unwritten block reads as one).
pub fn zero_block_crc(geo: Geometry) -> u32 {
    static SMALL: OnceLock<u32> = OnceLock::new();
    static LEGACY: OnceLock<u32> = OnceLock::new();
    let cell = if geo.block == u64::from(CSUM_BLOCK) {
        &SMALL
    } else {
        &LEGACY
    };
    *cell.get_or_init(|| crc32c::crc32c(&vec![0u8; geo.block as usize]))
}

/// The crc32c of `a` followed by one block `b` of `geo`'s size, from `crc(a)` and `crc(b)`:
/// `crc(a)` shifted past a block of zeros, xor `crc(b)`. The shift is linear over GF(2), so
/// it is a 32x32 bit matrix, built once per block size (its columns are the shifts of each
/// single bit); applying it costs 32 steps, where `crc32c_combine` would build it again on
/// every call.
pub fn crc_then_block(geo: Geometry, crc_a: u32, crc_b: u32) -> u32 {
    static SMALL: OnceLock<[u32; 32]> = OnceLock::new();
    static LEGACY: OnceLock<[u32; 32]> = OnceLock::new();
    let cell = if geo.block == u64::from(CSUM_BLOCK) {
        &SMALL
    } else {
        &LEGACY
    };
    let columns = cell.get_or_init(|| {
        std::array::from_fn(|bit| crc32c::crc32c_combine(1 << bit, 0, geo.block as usize))
    });
    let mut shifted = 0;
    for (bit, column) in columns.iter().enumerate() {
        if crc_a >> bit & 1 == 1 {
            shifted ^= column;
        }
    }
    shifted ^ crc_b
}

/// Fills `buf` from `at`; bytes past the end of the file are left as they are (zeros in every
/// caller). Returns how many bytes came from the file.
pub fn read_full_at(file: &File, buf: &mut [u8], at: u64) -> io::Result<usize> {
    read_full_at_waiting(file, buf, at, Wait::Disk)
}

/// [`read_full_at`], waiting for the disk only if `wait` allows.
pub fn read_full_at_waiting(file: &File, buf: &mut [u8], at: u64, wait: Wait) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        match pread(
            file,
            rest.as_mut_ptr(),
            rest.len(),
            at + filled as u64,
            wait,
        )? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Appends `len` bytes of `file` at `at` to `buf`, read straight into its spare capacity (a
/// read of megabytes costs one copy, no zeroing first); bytes past the end of the file are
/// zeros.
pub fn read_append_at(
    file: &File,
    buf: &mut BytesMut,
    len: usize,
    at: u64,
    wait: Wait,
) -> io::Result<()> {
    let start = buf.len();
    buf.reserve(len);
    let mut filled = 0;
    while filled < len {
        let spare = &mut buf.spare_capacity_mut()[..len - filled];
        let n = pread(
            file,
            spare.as_mut_ptr().cast(),
            spare.len(),
            at + filled as u64,
            wait,
        )?;
        if n == 0 {
            break;
        }
        // SAFETY: pread initialized the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        filled += n;
    }
    buf.resize(start + len, 0);
    Ok(())
}

/// One `pread` (`preadv2` with `RWF_NOWAIT` for [`Wait::CacheOnly`]) of at most `len` bytes
/// into `dst`, retried on EINTR; 0 at the end of the file. A cache-only read that would wait
/// fails with `WouldBlock` (so does one on a filesystem without `RWF_NOWAIT`).
fn pread(file: &File, dst: *mut u8, len: usize, at: u64, wait: Wait) -> io::Result<usize> {
    let pos =
        libc::off_t::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: the callers pass `dst` valid for writes of `len` bytes, which the kernel
        // writes at most and never reads.
        let n = unsafe {
            match wait {
                Wait::Disk => libc::pread(file.as_raw_fd(), dst.cast(), len, pos),
                Wait::CacheOnly => {
                    let iov = libc::iovec {
                        iov_base: dst.cast(),
                        iov_len: len,
                    };
                    libc::preadv2(file.as_raw_fd(), &iov, 1, pos, libc::RWF_NOWAIT)
                }
            }
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EAGAIN | libc::EOPNOTSUPP) if wait == Wait::CacheOnly => {
                return Err(io::ErrorKind::WouldBlock.into())
            }
            _ => return Err(e),
        }
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
