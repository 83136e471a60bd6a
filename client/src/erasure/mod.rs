//! Reed-Solomon 4+2 erasure coding of chunks (issue 5): the stripe layout, encoding, the read
//! plan, and reconstruction of any byte range from any 4 of the 6 shards. Pure computation,
//! no I/O: the read and write paths fetch and store shards and call in here.
//!
//! # Layout
//!
//! A chunk (64 MiB) is cut into **cells** of 1 MiB. Cell `i` goes to data shard `i % 4` at
//! shard offset `(i / 4) MiB`; four consecutive cells form a **stripe**, and each stripe adds
//! one cell of parity to shards 4 (P) and 5 (Q), computed position by position across the
//! stripe's four data cells.
//!
//! ```text
//!  chunk:   | c0 | c1 | c2 | c3 | c4 | c5 | c6 | c7 | ... | c60 | c61 | c62 | c63 |   (1 MiB cells)
//!           '----- stripe 0 ----'----- stripe 1 ----'     '------ stripe 15 ------'
//!
//!  shard:       0      1      2      3      4 (P)  5 (Q)     shard offset
//!  stripe 0   [ c0 ] [ c1 ] [ c2 ] [ c3 ] [ P0 ] [ Q0 ]      0
//!  stripe 1   [ c4 ] [ c5 ] [ c6 ] [ c7 ] [ P1 ] [ Q1 ]      1 MiB
//!   ...
//!  stripe 15  [ c60] [ c61] [ c62] [ c63] [ P15] [ Q15]      15 MiB   → 6 shards of 16 MiB
//!                                                                      (1.5x the chunk)
//!  each cell = 16 crc blocks of 64 KiB; block b of a shard ⇄ shard bytes b·64K..(b+1)·64K
//! ```
//!
//! Why this shape:
//! - **A small read touches one data shard when healthy.** Chunk bytes are contiguous inside a
//!   cell, so any read that does not cross a 1 MiB boundary is one read of one shard, with no
//!   decoding. A FUSE read (≤ 1 MiB, usually 128 KiB) crosses a boundary with probability
//!   about `len / 1 MiB`; with 64 KiB cells nearly every read would touch several shards.
//! - **Large reads still fan out.** A sequential 4 MiB read hits all four data shards, on four
//!   chunkservers, in parallel.
//! - **crc blocks never straddle cells.** Cells are a multiple of the 64 KiB crc block and
//!   start on block boundaries in their shard, so each shard block belongs to one stripe and
//!   a bad block costs one block row of one stripe, decoded from the other shards' same rows.
//! - **Encoding streams.** A writer needs one 4 MiB stripe in hand, not the whole chunk
//!   ([`Codec::encode_stripe`]); the client's 8 MiB write buffer holds two. One stripe per
//!   chunk (16 MiB cells) would need the whole chunk in hand before any parity exists, and a
//!   sequential read would stay on one server for 16 MiB at a time.
//! - **Degraded reads are narrow.** Rebuilding bytes `x..y` of a lost cell needs only the same
//!   shard offsets (rounded to blocks) from 4 other shards, not whole cells.
//!
//! **Partial last stripe.** The caller records the chunk's logical length `n` with the chunk's
//! EC layout (e.g. in the chunk map) and passes it to every read. For the parity computation a partial last stripe is
//! padded with zeros, but the padding is not stored: data shard `k` stores only its part of
//! the data and P/Q only as much as data cell 0 (parity of all-zero columns is zero). Past its
//! stored length ([`Layout::shard_len`]) a shard is zero by definition, is never fetched, and
//! counts as a known source in reconstruction. A 1-byte chunk is thus 1 + 0 + 0 + 0 + 1 + 1
//! bytes, not 6 MiB.
//!
//! # Checksums
//!
//! Shards carry the same per-block crc32c as replicas: one crc per 64 KiB block, the last block
//! zero-padded, computed exactly as the chunkserver's chunk file does (`crc32c::crc32c` of the
//! whole block, so [`EncodedChunk::crcs`] equal the table a chunkserver builds when the shard is
//! written). The chunkserver verifies blocks on every read; [`BlockCheck::Crcs`] lets a caller
//! verify again against known crcs (e.g. after conversion). A block that fails is treated as
//! missing, never used, and reported ([`Reconstructed::bad_blocks`]).
//!
//! # SIMD: decision
//!
//! The workspace enables `reed-solomon-erasure`'s `simd-accel` feature. Its build script
//! compiles a C kernel with `-march=haswell` (AVX2, plus BMI1/2, FMA, LZCNT, MOVBE, F16C that
//! the compiler may use anywhere in that object) and the crate has no run-time dispatch: on a
//! CPU without them the first encode dies of SIGILL. A cargo feature cannot be switched at run
//! time, and the crate has no portable entry point in a `simd-accel` build, so we keep the
//! kernel and **refuse clearly at start**: [`Codec::new`] (and [`check_cpu`]) check those
//! features with `is_x86_feature_detected!` and return [`ErasureError::UnsupportedCpu`]
//! naming the missing one. A site with such CPUs builds without the feature (drop
//! `features = ["simd-accel"]` from the workspace dependency) and gets the portable Rust path.
//! This machine (AMD EPYC) has AVX2.
//!
//! Checked with qemu-user: under `qemu-x86_64 -cpu SandyBridge` (no AVX2) `Codec::new` returns
//! "this CPU lacks avx2 ..." while a bare `ReedSolomon::encode` dies of SIGILL; under
//! `-cpu Haswell` both run. Shards are identical with and without `simd-accel` (the pinned
//! parity test passes on both builds), so mixed clusters interoperate.
//!
//! Measured here, one thread, release build, 1 MiB cells, 64 MiB chunks, on the shared 2-core
//! AMD EPYC VM with a load average of 3–5 from other builds, so these are lower bounds (ranges
//! over runs; MB/s = 10^6 bytes of chunk data per second):
//!
//! | operation                                          | simd-accel (AVX2) | portable Rust |
//! |----------------------------------------------------|-------------------|---------------|
//! | raw `encode_sep`, 4 × 1 MiB → P, Q                  | 4 000 – 4 850     | 750 – 900     |
//! | raw `reconstruct_data`, data shards 0 and 1 lost    | 4 100 – 5 350     | 760 – 890     |
//! | [`Codec::encode_chunk_into`] (reused buffers)       | 1 070 – 1 100     | 600           |
//! | [`Codec::encode_chunk`] (fresh 96 MiB of shards)    | 600 – 700         | 365 – 476     |
//! | [`Codec::reconstruct_into`] healthy, verified source| 2 600 – 4 400     | ≈ same (copy) |
//! | [`Codec::reconstruct_into`] healthy, [`BlockCheck::Crcs`] | 1 300 – 1 800 | ≈ same     |
//! | [`Codec::reconstruct_into`] 2 data shards down      | 1 050 – 1 600     | 670           |
//! | [`Codec::reconstruct_into`] 2 down, crcs            | 770 – 1 200       | 590           |
//! | baselines: crc32c of 64 KiB blocks / copy into a fresh 64 MiB `Vec` | 3 200 – 4 500 / 1 000 – 1 500 | |
//!
//! The RS kernel alone is 5x the portable code. On a quieter run (2026-12-04, same VM):
//! raw `encode_sep` 21 100 MB/s, raw `reconstruct_data` with 2 data shards lost 23 600 MB/s,
//! `encode_chunk_into` 2 600, `reconstruct_into` with 2 down 3 500 (2 300 with crcs), crc32c
//! 5 900: the kernel is well above the issue's 5 GB/s per core, and the whole-chunk calls
//! stay bounded by crc32c and memory traffic. The whole-chunk calls are
//! bounded by crc32c (1.5 crc bytes per data byte on encode) and by first-touch page faults on
//! fresh buffers, hence the `_into` variants. Reproduce with
//! `RUSTFLAGS="--cfg rawfs_bench" cargo test --release -p rawfs-client erasure_throughput -- --nocapture`
//! (a separate `CARGO_TARGET_DIR` avoids rebuilding the shared target with other flags).
//!
//! # Use
//!
//! ```text
//!  write:  Codec::new(Layout::DEFAULT)?  (at start: CPU check)
//!          encode_chunk[_into](bytes) or encode_stripe(4 MiB) ──▶ 6 shards + block crcs
//!  read:   layout.plan_read(off, len)           where the bytes live (one piece per cell)
//!          layout.plan_fetch(off, len, n, down) what to fetch (≤ 1 range per shard)
//!          ── fetch; a failed fetch → mark down, plan again ──
//!          codec.reconstruct[_into](n, off, len, [Option<ShardData>; 6]) ──▶ bytes + bad blocks
//! ```

#[cfg(all(test, rawfs_bench))]
mod bench;
mod codec;
mod layout;
mod reconstruct;
#[cfg(test)]
mod tests;

pub use codec::{block_crcs, check_cpu, Codec, EncodedChunk};
pub use layout::{Layout, ShardFetch, ShardRead, DEFAULT_CELL_SIZE};
pub use reconstruct::{BadBlock, BlockCheck, RebuildReport, Reconstructed, ShardData};

/// Data shards per chunk.
pub const DATA_SHARDS: usize = 4;
/// Parity shards per chunk.
pub const PARITY_SHARDS: usize = 2;
/// All shards of a chunk: 4 data (indices 0..4) then 2 parity (4, 5).
pub const TOTAL_SHARDS: usize = DATA_SHARDS + PARITY_SHARDS;

/// The crc32c block, as on the chunkservers.
const BLOCK: u64 = rawfs_chunkserver_api::BLOCK_SIZE as u64;

/// Why an erasure-coding call failed.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum ErasureError {
    /// Fewer than 4 usable shards (present and passing their crc, or known zeros) for some
    /// block row: the range cannot be rebuilt from what was given. Fetch more shards, or the
    /// data is lost.
    #[error("only {have} of the {need} shards needed to rebuild shard {shard} at offset {shard_offset} are usable")]
    TooFewShards {
        have: usize,
        need: usize,
        /// The data shard being rebuilt.
        shard: usize,
        /// The shard offset where the shortage starts.
        shard_offset: u64,
    },
    /// This CPU cannot run the SIMD kernel compiled in (see the module docs).
    #[error("this CPU lacks {feature}, which the erasure-coding kernel (reed-solomon-erasure simd-accel, built for AVX2/Haswell) needs; rebuild rawfs without simd-accel for the portable path")]
    UnsupportedCpu { feature: &'static str },
    /// A byte range that does not fit in the chunk.
    #[error("range {offset}+{len} is outside the {chunk_size}-byte chunk")]
    RangeOutOfChunk {
        offset: u64,
        len: u64,
        chunk_size: u64,
    },
    /// More data (or a logical length greater) than a chunk holds.
    #[error("{len} bytes do not fit in a {chunk_size}-byte chunk")]
    ChunkTooLarge { len: u64, chunk_size: u64 },
    /// More data than one stripe given to [`Codec::encode_stripe`].
    #[error("{len} bytes do not fit in a {stripe_size}-byte stripe")]
    StripeTooLarge { len: u64, stripe_size: u64 },
    /// Cell or chunk size that does not make a layout.
    #[error("invalid erasure-coding layout: {reason}")]
    InvalidLayout { reason: &'static str },
    /// Shard data to be checked against block crcs must start on a block boundary.
    #[error("shard {shard} data at offset {offset} is not aligned to the 64 KiB crc block")]
    UnalignedShardData { shard: usize, offset: u64 },
    /// Shard data given with the wrong number of block crcs.
    #[error("shard {shard} data comes with {have} block crcs, it spans {need} blocks")]
    CrcCountMismatch {
        shard: usize,
        have: usize,
        need: usize,
    },
    /// The RS library refused its input; a bug here, not bad data.
    #[error("reed-solomon: {0}")]
    Codec(#[from] reed_solomon_erasure::Error),
}
