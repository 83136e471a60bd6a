//! The RS 4+2 codec: CPU check, encoding of chunks and stripes, shard block checksums.

use super::{ErasureError, Layout, BLOCK, DATA_SHARDS, PARITY_SHARDS, TOTAL_SHARDS};
use reed_solomon_erasure::galois_8::ReedSolomon;
use std::borrow::Cow;

/// An RS 4+2 encoder/decoder for one [`Layout`]. Create one at start-up with [`Codec::new`]
/// (it refuses a CPU the SIMD kernel cannot run on) and share it: it is `Send + Sync`, and
/// cheap to clone.
#[derive(Clone, Debug)]
pub struct Codec {
    layout: Layout,
    rs: ReedSolomon,
}

/// A chunk encoded as 6 shards, each with its per-block crc32c.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedChunk {
    /// The chunk's length before padding; shard lengths follow from it ([`Layout::shard_len`]).
    pub logical_len: u64,
    /// Shards 0..4 hold data, 4 and 5 parity; shard `k` is `layout.shard_len(k, logical_len)`
    /// bytes long and is written at shard offset 0.
    pub shards: [Vec<u8>; TOTAL_SHARDS],
    /// `crcs[k][b]` is the crc32c of 64 KiB block `b` of shard `k`, zero-padded: exactly what a
    /// chunkserver stores after writing the shard, so a copy can be verified against it.
    pub crcs: [Vec<u32>; TOTAL_SHARDS],
}

/// The x86-64 features `-march=haswell` (what the crate's build script compiles its C kernel
/// with) lets the C compiler use. Checking only AVX2 would leave BMI/FMA/MOVBE/LZCNT
/// instructions the compiler may emit anywhere in that object.
#[cfg(target_arch = "x86_64")]
fn missing_cpu_feature() -> Option<&'static str> {
    macro_rules! need {
        ($($f:tt),*) => {$(
            if !std::arch::is_x86_feature_detected!($f) {
                return Some($f);
            }
        )*};
    }
    // AVX2 first: it is the one a CPU is most likely to lack, and names the problem best.
    need!(
        "avx2",
        "avx",
        "fma",
        "bmi1",
        "bmi2",
        "lzcnt",
        "movbe",
        "f16c",
        "popcnt",
        "sse4.2",
        "pclmulqdq"
    );
    None
}

/// aarch64 builds the C kernel with NEON, which every aarch64 CPU has; other targets use the
/// crate's portable Rust.
#[cfg(not(target_arch = "x86_64"))]
fn missing_cpu_feature() -> Option<&'static str> {
    None
}

/// Checks that this CPU can run the erasure-coding kernel compiled into this binary. Call it
/// (or [`Codec::new`]) at start-up: the `simd-accel` kernel has no run-time dispatch, so
/// without this check a CPU lacking AVX2 would die of SIGILL in the middle of a write.
pub fn check_cpu() -> Result<(), ErasureError> {
    match missing_cpu_feature() {
        Some(feature) => Err(ErasureError::UnsupportedCpu { feature }),
        None => Ok(()),
    }
}

/// crc32c of every 64 KiB block of `shard` (stored from shard offset 0), the last block
/// zero-padded to 64 KiB as the chunkserver does.
pub fn block_crcs(shard: &[u8]) -> Vec<u32> {
    shard.chunks(BLOCK as usize).map(block_crc).collect()
}

/// crc32c of one block's bytes followed by zeros up to 64 KiB.
pub(super) fn block_crc(bytes: &[u8]) -> u32 {
    static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    let crc = crc32c::crc32c(bytes);
    let pad = (BLOCK as usize).saturating_sub(bytes.len());
    crc32c::crc32c_append(crc, &ZEROS[..pad])
}

impl Codec {
    /// A codec for `layout`, after checking the CPU ([`check_cpu`]).
    pub fn new(layout: Layout) -> Result<Codec, ErasureError> {
        check_cpu()?;
        let rs = ReedSolomon::new(DATA_SHARDS, PARITY_SHARDS)?;
        Ok(Codec { layout, rs })
    }

    /// The layout this codec encodes for.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub(super) fn rs(&self) -> &ReedSolomon {
        &self.rs
    }

    /// Encodes a whole chunk (`data.len()` ≤ chunk size) into 6 shards with their block crcs.
    /// A partial last stripe is padded with zeros for the parity computation; the padding is
    /// not stored (see [`Layout::shard_len`]).
    pub fn encode_chunk(&self, data: &[u8]) -> Result<EncodedChunk, ErasureError> {
        let mut out = EncodedChunk {
            logical_len: 0,
            shards: Default::default(),
            crcs: Default::default(),
        };
        self.encode_chunk_into(data, &mut out)?;
        Ok(out)
    }

    /// [`Codec::encode_chunk`] into `out`, reusing its buffers (a writer that encodes chunk
    /// after chunk saves allocating and faulting in 96 MiB each time).
    pub fn encode_chunk_into(
        &self,
        data: &[u8],
        out: &mut EncodedChunk,
    ) -> Result<(), ErasureError> {
        self.encode_shards_into(data, &mut out.shards)?;
        for (crcs, shard) in out.crcs.iter_mut().zip(out.shards.iter()) {
            crcs.clear();
            crcs.extend(shard.chunks(BLOCK as usize).map(block_crc));
        }
        out.logical_len = data.len() as u64;
        Ok(())
    }

    /// The 6 shards of `data` (≤ chunk size) into `shards`, without their crcs: for a writer
    /// whose chunkservers compute the crcs as they store the shards. `data` may also be the
    /// stripes appended at a stripe boundary of a chunk: the shards are then the bytes that
    /// go at shard offset `first_stripe * cell_size`.
    pub fn encode_shards_into(
        &self,
        data: &[u8],
        shards: &mut [Vec<u8>; TOTAL_SHARDS],
    ) -> Result<(), ErasureError> {
        let l = &self.layout;
        let n = data.len() as u64;
        if n > l.chunk_size() {
            return Err(ErasureError::ChunkTooLarge {
                len: n,
                chunk_size: l.chunk_size(),
            });
        }
        let lens = l.shard_lens(n);
        // Data shards are appended stripe by stripe; parity is computed into place.
        for (k, s) in shards.iter_mut().enumerate() {
            s.clear();
            if k >= DATA_SHARDS {
                s.resize(lens[k] as usize, 0);
            } else {
                s.reserve(lens[k] as usize);
            }
        }
        let cell = l.cell_size() as usize;
        let stripe = l.stripe_size() as usize;
        for (s, stripe_data) in data.chunks(stripe).enumerate() {
            let at = s * cell;
            if stripe_data.len() < stripe {
                let cells = self.encode_stripe(stripe_data)?;
                for (k, c) in cells.iter().enumerate() {
                    if k < DATA_SHARDS {
                        shards[k].extend_from_slice(c);
                    } else {
                        shards[k][at..at + c.len()].copy_from_slice(c);
                    }
                }
                continue;
            }
            // A full stripe: parity straight from the caller's bytes into the parity shards.
            let inputs: Vec<&[u8]> = stripe_data.chunks(cell).collect();
            for (k, c) in inputs.iter().enumerate() {
                shards[k].extend_from_slice(c);
            }
            let (p, q) = shards[DATA_SHARDS..].split_at_mut(1);
            self.rs.encode_sep(
                &inputs,
                &mut [&mut p[0][at..at + cell], &mut q[0][at..at + cell]],
            )?;
        }
        debug_assert!((0..TOTAL_SHARDS).all(|k| shards[k].len() as u64 == lens[k]));
        Ok(())
    }

    /// Encodes one stripe (`data.len()` ≤ stripe size, > 0 for any output) into its 6 cells,
    /// which go to shard offset `stripe_index * cell_size` of each shard. For a full stripe every
    /// cell is `cell_size` bytes; for a partial (last) stripe data cell `k` holds only its part
    /// of `data` (possibly nothing) and the parity cells are as long as data cell 0.
    /// Lets a writer encode and send stripe by stripe instead of buffering a whole chunk.
    /// Cells start on 64 KiB block boundaries, so `block_crcs(cell)` are the crcs of shard
    /// blocks `stripe_index * cell_size / 64 KiB` onwards.
    pub fn encode_stripe(&self, data: &[u8]) -> Result<[Vec<u8>; TOTAL_SHARDS], ErasureError> {
        let l = &self.layout;
        if data.len() as u64 > l.stripe_size() {
            return Err(ErasureError::StripeTooLarge {
                len: data.len() as u64,
                stripe_size: l.stripe_size(),
            });
        }
        let cell = l.cell_size() as usize;
        let mut cells: [Vec<u8>; TOTAL_SHARDS] = Default::default();
        for (k, c) in data.chunks(cell).enumerate() {
            cells[k] = c.to_vec();
        }
        // Parity cells are as long as the longest data cell (cell 0); the kernel needs equal
        // lengths (and panics on empty slices), so shorter data cells are zero-padded in a
        // scratch copy, which is what the zeros past their stored end mean anyway.
        let row = cells[0].len();
        if row == 0 {
            return Ok(cells);
        }
        let inputs: Vec<Cow<'_, [u8]>> = cells[..DATA_SHARDS]
            .iter()
            .map(|c| {
                if c.len() == row {
                    Cow::Borrowed(c.as_slice())
                } else {
                    let mut v = c.clone();
                    v.resize(row, 0);
                    Cow::Owned(v)
                }
            })
            .collect();
        let mut parity = [vec![0u8; row], vec![0u8; row]];
        {
            let [p, q] = &mut parity;
            self.rs
                .encode_sep(&inputs, &mut [p.as_mut_slice(), q.as_mut_slice()])?;
        }
        let [p, q] = parity;
        cells[4] = p;
        cells[5] = q;
        Ok(cells)
    }
}
