//! Where the bytes of an erasure-coded chunk live: cells, stripes and shard offsets.
//! Pure arithmetic, no I/O; see the module docs for the picture.

use super::{ErasureError, BLOCK, DATA_SHARDS, TOTAL_SHARDS};
use std::ops::Range;

/// Cell size of [`Layout::DEFAULT`]: 1 MiB.
pub const DEFAULT_CELL_SIZE: u64 = 1 << 20;

/// The stripe geometry of an RS 4+2 chunk: `cell_size` bytes of the chunk go to one data shard,
/// four consecutive cells make a stripe, and each stripe adds one cell to each parity shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    cell: u64,
    chunk: u64,
}

/// A piece of a chunk range that lives contiguously in one data shard (never crosses a cell).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardRead {
    /// Data shard index, `0..4`.
    pub shard: usize,
    /// Byte offset within the shard.
    pub shard_offset: u64,
    /// Length in bytes (> 0).
    pub len: u64,
    /// Byte offset within the chunk of the piece's first byte.
    pub chunk_offset: u64,
}

/// A contiguous range of one shard to fetch from its chunkserver: see [`Layout::plan_fetch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardFetch {
    /// Shard index, `0..6` (4 and 5 are parity).
    pub shard: usize,
    /// Byte offset within the shard; a multiple of the 64 KiB crc block.
    pub shard_offset: u64,
    /// Length in bytes (> 0); ends on a block boundary or at the shard's stored length.
    pub len: u64,
}

impl ShardFetch {
    /// The shard byte range.
    pub fn range(&self) -> Range<u64> {
        self.shard_offset..self.shard_offset + self.len
    }
}

impl Layout {
    /// The layout rawfs uses: 1 MiB cells in a 64 MiB chunk (16 stripes of 4 MiB, 16 MiB shards).
    pub const DEFAULT: Layout = Layout {
        cell: DEFAULT_CELL_SIZE,
        chunk: rawfs_chunkserver_api::MAX_CHUNK_SIZE,
    };

    /// A layout with `cell_size`-byte cells in a `chunk_size`-byte chunk. The cell must be a
    /// positive multiple of the 64 KiB crc block (so a block never straddles two cells) and the
    /// chunk a positive multiple of a stripe (4 cells).
    pub fn new(cell_size: u64, chunk_size: u64) -> Result<Layout, ErasureError> {
        if cell_size == 0 || cell_size % BLOCK != 0 {
            return Err(ErasureError::InvalidLayout {
                reason: "the cell size must be a positive multiple of the 64 KiB crc block",
            });
        }
        let stripe =
            cell_size
                .checked_mul(DATA_SHARDS as u64)
                .ok_or(ErasureError::InvalidLayout {
                    reason: "the cell size is too large",
                })?;
        if chunk_size == 0 || chunk_size % stripe != 0 {
            return Err(ErasureError::InvalidLayout {
                reason: "the chunk size must be a positive multiple of the stripe (4 cells)",
            });
        }
        Ok(Layout {
            cell: cell_size,
            chunk: chunk_size,
        })
    }

    /// Bytes of the chunk per cell.
    pub fn cell_size(&self) -> u64 {
        self.cell
    }

    /// Bytes of chunk data per stripe (4 cells).
    pub fn stripe_size(&self) -> u64 {
        self.cell * DATA_SHARDS as u64
    }

    /// Largest chunk this layout holds.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Largest shard: `chunk_size / 4`.
    pub fn max_shard_size(&self) -> u64 {
        self.chunk / DATA_SHARDS as u64
    }

    /// Number of stripes that hold `logical_len` bytes (the last one may be partial).
    pub fn stripes(&self, logical_len: u64) -> u64 {
        logical_len.div_ceil(self.stripe_size())
    }

    /// Bytes stored in shard `shard` for a chunk of `logical_len` bytes. Full stripes add a
    /// whole cell to every shard; in a partial last stripe a data shard stores only its part
    /// of the data and a parity shard as much as the longest data cell (cell 0). Everything
    /// past the stored length is zero by definition, so it is neither stored nor fetched.
    pub fn shard_len(&self, shard: usize, logical_len: u64) -> u64 {
        let len = logical_len.min(self.chunk);
        let full = len / self.stripe_size();
        let rest = len % self.stripe_size();
        let tail = if shard < DATA_SHARDS {
            rest.saturating_sub(shard as u64 * self.cell).min(self.cell)
        } else {
            rest.min(self.cell)
        };
        full * self.cell + tail
    }

    /// Stored lengths of all six shards for a chunk of `logical_len` bytes.
    pub fn shard_lens(&self, logical_len: u64) -> [u64; TOTAL_SHARDS] {
        std::array::from_fn(|k| self.shard_len(k, logical_len))
    }

    /// The data shard and shard offset holding chunk byte `offset` (which must be < chunk size).
    pub fn locate(&self, offset: u64) -> (usize, u64) {
        let cell = offset / self.cell;
        let stripe = cell / DATA_SHARDS as u64;
        let shard = (cell % DATA_SHARDS as u64) as usize;
        (shard, stripe * self.cell + offset % self.cell)
    }

    /// The chunk offset of shard offset `shard_offset` in data shard `shard`.
    pub fn chunk_offset(&self, shard: usize, shard_offset: u64) -> u64 {
        let stripe = shard_offset / self.cell;
        stripe * self.stripe_size() + shard as u64 * self.cell + shard_offset % self.cell
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64, ErasureError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.chunk => Ok(end),
            _ => Err(ErasureError::RangeOutOfChunk {
                offset,
                len,
                chunk_size: self.chunk,
            }),
        }
    }

    /// Splits chunk range `offset..offset + len` into pieces, one per cell touched, in chunk
    /// order. When all shards are healthy these are exactly the reads to make: a range inside
    /// one cell is one read of one data shard.
    pub fn plan_read(&self, offset: u64, len: u64) -> Result<Vec<ShardRead>, ErasureError> {
        let end = self.check_range(offset, len)?;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let cell_end = (at / self.cell + 1) * self.cell;
            let piece_end = cell_end.min(end);
            let (shard, shard_offset) = self.locate(at);
            out.push(ShardRead {
                shard,
                shard_offset,
                len: piece_end - at,
                chunk_offset: at,
            });
            at = piece_end;
        }
        Ok(out)
    }

    /// What to fetch to serve chunk range `offset..offset + len` of a chunk holding
    /// `logical_len` bytes, when the shards marked in `unavailable` cannot be used (down, slow,
    /// or already failed a checksum). At most one fetch per shard, sorted by shard; ranges
    /// are widened to whole 64 KiB blocks (so every block can be checked against its crc) and
    /// clipped to the shard's stored length (past it everything is zero and nothing is read).
    ///
    /// Healthy pieces are read from their own data shard. For a piece whose shard is
    /// unavailable, the same rows (shard offsets) are fetched from the first four other usable
    /// shards, data shards first. A shard's fetch is the span of all it must supply, so when
    /// two distant rows of one shard are needed (a read across two cells with both their
    /// shards down) it may read up to one cell more than strictly needed; that costs bandwidth
    /// only in a rare, already degraded case and keeps one request per shard.
    ///
    /// Returns [`ErasureError::TooFewShards`] if fewer than 4 shards are usable while some
    /// piece needs rebuilding. After a fetch fails, mark its shard unavailable and plan again.
    pub fn plan_fetch(
        &self,
        offset: u64,
        len: u64,
        logical_len: u64,
        unavailable: [bool; TOTAL_SHARDS],
    ) -> Result<Vec<ShardFetch>, ErasureError> {
        let lens = self.shard_lens(logical_len);
        let mut want: [Option<Range<u64>>; TOTAL_SHARDS] = Default::default();
        let add = |want: &mut [Option<Range<u64>>; TOTAL_SHARDS], k: usize, r: Range<u64>| {
            let r = r.start..r.end.min(lens[k]);
            if r.start < r.end {
                want[k] = Some(match want[k].take() {
                    Some(w) => w.start.min(r.start)..w.end.max(r.end),
                    None => r,
                });
            }
        };
        for p in self.plan_read(offset, len)? {
            let rows = p.shard_offset..p.shard_offset + p.len;
            if rows.start >= lens[p.shard] {
                continue; // past the stored data: zeros, nothing to read
            }
            if !unavailable[p.shard] {
                add(&mut want, p.shard, rows);
                continue;
            }
            // Sources for the rebuild: shards whose stored data ends before these rows are
            // known zeros there and cost nothing, so they come first (even if their server is
            // down); then usable data shards, then parity.
            let mut sources: Vec<usize> = (0..TOTAL_SHARDS)
                .filter(|&k| k != p.shard && rows.start >= lens[k])
                .collect();
            sources.extend(
                (0..TOTAL_SHARDS)
                    .filter(|&k| k != p.shard && rows.start < lens[k] && !unavailable[k]),
            );
            if sources.len() < DATA_SHARDS {
                return Err(ErasureError::TooFewShards {
                    have: sources.len(),
                    need: DATA_SHARDS,
                    shard: p.shard,
                    shard_offset: p.shard_offset,
                });
            }
            for &k in sources.iter().take(DATA_SHARDS) {
                add(&mut want, k, rows.clone());
            }
        }
        Ok(want
            .into_iter()
            .enumerate()
            .filter_map(|(k, r)| {
                let r = r?;
                let start = r.start / BLOCK * BLOCK;
                let end = r.end.div_ceil(BLOCK) * BLOCK;
                let end = end.min(lens[k]);
                Some(ShardFetch {
                    shard: k,
                    shard_offset: start,
                    len: end - start,
                })
            })
            .collect())
    }
}

impl Default for Layout {
    fn default() -> Self {
        Layout::DEFAULT
    }
}
