//! Reading a chunk range back from whatever shards are at hand: copied from the data shards
//! when they are healthy, decoded from any 4 of the 6 where they are not.

use super::codec::block_crc;
use super::{Codec, ErasureError, BLOCK, DATA_SHARDS, TOTAL_SHARDS};

/// How the bytes of a [`ShardData`] are known to be intact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockCheck<'a> {
    /// Check each 64 KiB block against these crc32c values (one per block of the data, the
    /// first for the block at `offset`, a partial last block zero-padded as the chunkserver
    /// does). A block that fails is treated as missing and reported in
    /// [`Reconstructed::bad_blocks`]; it is never used. Needs a block-aligned `offset`.
    Crcs(&'a [u32]),
    /// The source already verified every block: bytes from `DataClient::read`, which the
    /// chunkserver checks block by block before answering and which arrive under a frame crc.
    VerifiedBySource,
}

/// Bytes of one shard starting at shard offset `offset`, as fetched (see
/// [`Layout::plan_fetch`](super::Layout::plan_fetch)). May stop at the shard's stored length:
/// past it the shard is zero by definition.
#[derive(Clone, Copy, Debug)]
pub struct ShardData<'a> {
    /// Shard offset of `bytes[0]`.
    pub offset: u64,
    pub bytes: &'a [u8],
    pub check: BlockCheck<'a>,
}

/// A shard block that failed its crc32c: report it so the shard gets repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadBlock {
    pub shard: usize,
    /// Shard offset of the block (a multiple of 64 KiB).
    pub shard_offset: u64,
}

/// The result of [`Codec::reconstruct`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reconstructed {
    /// The requested chunk bytes.
    pub data: Vec<u8>,
    /// Blocks that failed their crc and were not used.
    pub bad_blocks: Vec<BadBlock>,
    /// How many of the returned bytes were decoded from other shards rather than copied from
    /// their own data shard (0 on a healthy read).
    pub decoded: u64,
}

/// What [`Codec::reconstruct_into`] found besides the bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebuildReport {
    /// Blocks that failed their crc and were not used.
    pub bad_blocks: Vec<BadBlock>,
    /// Bytes decoded from other shards rather than copied from their own data shard.
    pub decoded: u64,
}

/// One shard's data with its per-block verdicts.
struct Source<'a> {
    offset: u64,
    bytes: &'a [u8],
    /// Usable blocks, indexed from block `offset / BLOCK`.
    ok: Vec<bool>,
}

/// Whether a shard can supply a segment (part of one block) of shard offsets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Avail {
    /// Past the shard's stored length: zeros, whatever the shard's state.
    Zero,
    /// In hand and verified.
    Data,
    Missing,
}

impl Codec {
    /// Returns chunk bytes `offset..offset + len` of a chunk of `logical_len` bytes from the
    /// shards given (`None` for a shard that is missing). Each piece is copied from its data
    /// shard where that shard's bytes are present and pass their check; elsewhere, block row
    /// by block row, it is decoded from any 4 usable shards. Bytes past `logical_len` read as
    /// zeros.
    ///
    /// Errors: [`ErasureError::TooFewShards`] when some block row has fewer than 4 usable
    /// shards; [`ErasureError::RangeOutOfChunk`] / [`ErasureError::ChunkTooLarge`] for bad
    /// arguments; [`ErasureError::UnalignedShardData`] / [`ErasureError::CrcCountMismatch`]
    /// for a [`BlockCheck::Crcs`] input that does not line up with the blocks.
    pub fn reconstruct(
        &self,
        logical_len: u64,
        offset: u64,
        len: u64,
        shards: &[Option<ShardData<'_>>; TOTAL_SHARDS],
    ) -> Result<Reconstructed, ErasureError> {
        // Checked here too so a huge `len` is refused before allocating.
        self.layout().plan_read(offset, len)?;
        let mut data = vec![0u8; len as usize];
        let report = self.reconstruct_into(logical_len, offset, &mut data, shards)?;
        Ok(Reconstructed {
            data,
            bad_blocks: report.bad_blocks,
            decoded: report.decoded,
        })
    }

    /// [`Codec::reconstruct`] into the caller's buffer: fills all of `out` with chunk bytes
    /// `offset..offset + out.len()` (saves allocating and faulting in a fresh buffer per read).
    pub fn reconstruct_into(
        &self,
        logical_len: u64,
        offset: u64,
        out: &mut [u8],
        shards: &[Option<ShardData<'_>>; TOTAL_SHARDS],
    ) -> Result<RebuildReport, ErasureError> {
        let l = self.layout();
        let len = out.len() as u64;
        if logical_len > l.chunk_size() {
            return Err(ErasureError::ChunkTooLarge {
                len: logical_len,
                chunk_size: l.chunk_size(),
            });
        }
        let plan = l.plan_read(offset, len)?;
        let lens = l.shard_lens(logical_len);
        let mut bad_blocks = Vec::new();
        let mut sources: [Option<Source<'_>>; TOTAL_SHARDS] = Default::default();
        for (k, d) in shards.iter().enumerate() {
            if let Some(d) = d {
                sources[k] = Some(verify(k, d, lens[k], &mut bad_blocks)?);
            }
        }
        let avail = |j: usize, a: u64, b: u64| -> Avail {
            if a >= lens[j] {
                return Avail::Zero;
            }
            let e = b.min(lens[j]);
            match &sources[j] {
                Some(s)
                    if s.offset <= a
                        && s.offset + s.bytes.len() as u64 >= e
                        && s.ok[((a / BLOCK) - s.offset / BLOCK) as usize] =>
                {
                    Avail::Data
                }
                _ => Avail::Missing,
            }
        };
        // Copies shard `j`'s bytes `a..a + dst.len()` into `dst` (zeros past its stored end).
        let fill = |dst: &mut [u8], j: usize, a: u64| {
            let e = (a + dst.len() as u64).min(lens[j]).max(a);
            let n = (e - a) as usize;
            match &sources[j] {
                Some(s) if n > 0 => {
                    let from = (a - s.offset) as usize;
                    dst[..n].copy_from_slice(&s.bytes[from..from + n]);
                }
                _ => {}
            }
            dst[n..].fill(0);
        };

        let data = out;
        let mut decoded = 0u64;
        let mut scratch: [Vec<u8>; TOTAL_SHARDS] = Default::default();
        // The rows and source set whose decode `scratch` holds.
        let mut decoded_rows: Option<(u64, u64, u8)> = None;
        for p in plan {
            let t = p.shard;
            let out_at = (p.chunk_offset - offset) as usize;
            // Segments of the piece split at block boundaries, merged into runs that need the
            // same treatment: copy/zero from the target, or decode from the same shard set.
            let mut runs: Vec<(u64, u64, Option<u8>)> = Vec::new();
            let end = p.shard_offset + p.len;
            let mut a = p.shard_offset;
            while a < end {
                let b = ((a / BLOCK + 1) * BLOCK).min(end);
                let how = match avail(t, a, b) {
                    Avail::Zero | Avail::Data => None,
                    Avail::Missing => Some(
                        (0..TOTAL_SHARDS)
                            .filter(|&j| j != t && avail(j, a, b) != Avail::Missing)
                            .fold(0u8, |m, j| m | 1 << j),
                    ),
                };
                match runs.last_mut() {
                    Some(r) if r.2 == how && r.1 == a => r.1 = b,
                    _ => runs.push((a, b, how)),
                }
                a = b;
            }
            for (a, b, how) in runs {
                let dst_at = out_at + (a - p.shard_offset) as usize;
                let dst = &mut data[dst_at..dst_at + (b - a) as usize];
                let Some(mask) = how else {
                    fill(dst, t, a);
                    continue;
                };
                let have = mask.count_ones() as usize;
                if have < DATA_SHARDS {
                    return Err(ErasureError::TooFewShards {
                        have,
                        need: DATA_SHARDS,
                        shard: t,
                        shard_offset: a,
                    });
                }
                let n = (b - a) as usize;
                // One decode rebuilds every missing data shard of these rows: when the next
                // piece is another lost cell of the same stripe rows, reuse it.
                if decoded_rows == Some((a, b, mask)) {
                    dst.copy_from_slice(&scratch[t]);
                    decoded += n as u64;
                    continue;
                }
                for (j, buf) in scratch.iter_mut().enumerate() {
                    buf.resize(n, 0);
                    if mask & (1 << j) != 0 {
                        fill(buf, j, a);
                    }
                }
                let mut rs_shards: Vec<(&mut [u8], bool)> = scratch
                    .iter_mut()
                    .enumerate()
                    .map(|(j, v)| (v.as_mut_slice(), mask & (1 << j) != 0))
                    .collect();
                self.rs().reconstruct_data(&mut rs_shards)?;
                decoded_rows = Some((a, b, mask));
                dst.copy_from_slice(&scratch[t]);
                decoded += n as u64;
            }
        }
        Ok(RebuildReport {
            bad_blocks,
            decoded,
        })
    }
}

/// Checks shard `k`'s data block by block; failing blocks go to `bad`.
fn verify<'a>(
    k: usize,
    d: &ShardData<'a>,
    shard_len: u64,
    bad: &mut Vec<BadBlock>,
) -> Result<Source<'a>, ErasureError> {
    let first = d.offset / BLOCK;
    // Blocks touched by the data, from the block holding `offset`.
    let blocks = (d.offset + d.bytes.len() as u64)
        .div_ceil(BLOCK)
        .saturating_sub(first) as usize;
    let ok = match d.check {
        BlockCheck::VerifiedBySource => vec![true; blocks],
        BlockCheck::Crcs(crcs) => {
            if d.offset % BLOCK != 0 {
                return Err(ErasureError::UnalignedShardData {
                    shard: k,
                    offset: d.offset,
                });
            }
            if crcs.len() != blocks {
                return Err(ErasureError::CrcCountMismatch {
                    shard: k,
                    have: crcs.len(),
                    need: blocks,
                });
            }
            d.bytes
                .chunks(BLOCK as usize)
                .zip(crcs)
                .enumerate()
                .map(|(i, (bytes, &crc))| {
                    let start = d.offset + i as u64 * BLOCK;
                    // A short last block can be checked only if it runs to the shard's end
                    // (the rest is zeros); otherwise it is unusable, but not known bad.
                    if bytes.len() as u64 != BLOCK && start + (bytes.len() as u64) < shard_len {
                        return false;
                    }
                    let good = block_crc(bytes) == crc;
                    if !good {
                        bad.push(BadBlock {
                            shard: k,
                            shard_offset: start,
                        });
                    }
                    good
                })
                .collect()
        }
    };
    Ok(Source {
        offset: d.offset,
        bytes: d.bytes,
        ok,
    })
}
