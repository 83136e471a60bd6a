//! Property tests of the erasure-coding core: seeded (`RAWFS_SEED` replays a run; the seed is
//! printed and shown with any failure), fast, no I/O.

use super::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The test seed: `$RAWFS_SEED` or a fresh one, printed so a failure can be reproduced.
fn rng(test: &str) -> StdRng {
    let seed = std::env::var("RAWFS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {seed} (reproduce with RAWFS_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// 64 KiB cells in a 1 MiB chunk: many stripes and whole chunks at little cost.
fn small() -> Layout {
    Layout::new(64 << 10, 1 << 20).unwrap()
}

/// All 15 ways to lose 2 of the 6 shards.
fn missing_pairs() -> Vec<[usize; 2]> {
    let mut v = Vec::new();
    for a in 0..TOTAL_SHARDS {
        for b in a + 1..TOTAL_SHARDS {
            v.push([a, b]);
        }
    }
    v
}

/// The shards of `enc` as verified-by-source inputs, with `missing` left out.
fn inputs<'a>(enc: &'a EncodedChunk, missing: &[usize]) -> [Option<ShardData<'a>>; TOTAL_SHARDS] {
    std::array::from_fn(|k| {
        (!missing.contains(&k)).then(|| ShardData {
            offset: 0,
            bytes: &enc.shards[k],
            check: BlockCheck::Crcs(&enc.crcs[k]),
        })
    })
}

/// Lengths worth testing for a layout: empty, one byte, around one and two stripes, the full
/// chunk, and a few random ones.
fn lengths(l: &Layout, rng: &mut StdRng, max: u64) -> Vec<u64> {
    let s = l.stripe_size();
    let mut v = vec![0, 1, s - 1, s, s + 1, 2 * s + 1, l.cell_size() + 7];
    for _ in 0..3 {
        v.push(rng.gen_range(0..=max));
    }
    v.retain(|&n| n <= max);
    v
}

#[test]
fn every_four_of_six_shards_rebuild_the_original_bytes() {
    let mut rng = rng("every_four_of_six_shards_rebuild_the_original_bytes");
    for (layout, max) in [
        (Layout::DEFAULT, 3 * Layout::DEFAULT.stripe_size()),
        (small(), 1 << 20),
    ] {
        let codec = Codec::new(layout).unwrap();
        let mut ns = lengths(&layout, &mut rng, max);
        if layout != Layout::DEFAULT {
            ns.push(layout.chunk_size());
        }
        for n in ns {
            let data = random_bytes(&mut rng, n as usize);
            let enc = codec.encode_chunk(&data).unwrap();
            for missing in missing_pairs() {
                let shards = inputs(&enc, &missing);
                let whole = codec.reconstruct(n, 0, n, &shards).unwrap();
                assert!(
                    whole.data == data,
                    "n={n} missing={missing:?}: whole chunk differs"
                );
                assert!(whole.bad_blocks.is_empty());
                // A random sub-range, possibly running past the logical length (zeros there).
                let off = rng.gen_range(0..=n.min(layout.chunk_size() - 1));
                let len =
                    rng.gen_range(0..=(layout.chunk_size() - off).min(3 * layout.cell_size()));
                let got = codec.reconstruct(n, off, len, &shards).unwrap();
                let mut want = vec![0u8; len as usize];
                let have = (n.saturating_sub(off)).min(len) as usize;
                want[..have].copy_from_slice(&data[off as usize..off as usize + have]);
                assert!(
                    got.data == want,
                    "n={n} missing={missing:?} range {off}+{len} differs"
                );
            }
        }
    }
}

#[test]
fn healthy_small_read_touches_one_data_shard_and_decodes_nothing() {
    let mut rng = rng("healthy_small_read_touches_one_data_shard_and_decodes_nothing");
    let l = Layout::DEFAULT;
    let codec = Codec::new(l).unwrap();
    let n = l.chunk_size();
    let c = l.cell_size();
    for _ in 0..200 {
        let cell = rng.gen_range(0..n / c);
        let off = cell * c + rng.gen_range(0..c);
        let len = rng.gen_range(1..=(cell + 1) * c - off);
        let fetch = l.plan_fetch(off, len, n, [false; TOTAL_SHARDS]).unwrap();
        assert_eq!(fetch.len(), 1, "{off}+{len}: {fetch:?}");
        assert_eq!(fetch[0].shard as u64, cell % 4);
        assert!(fetch[0].len <= len + 2 * BLOCK);
    }
    let data = random_bytes(&mut rng, (3 * l.stripe_size()) as usize);
    let enc = codec.encode_chunk(&data).unwrap();
    let got = codec
        .reconstruct(enc.logical_len, 5, 3 << 20, &inputs(&enc, &[]))
        .unwrap();
    assert_eq!(got.decoded, 0);
    assert!(got.data == data[5..5 + (3 << 20)]);
    // Parity shards alone missing: still nothing to decode.
    let got = codec
        .reconstruct(enc.logical_len, 0, 1 << 20, &inputs(&enc, &[4, 5]))
        .unwrap();
    assert_eq!(got.decoded, 0);
}

#[test]
fn corrupt_shard_block_is_detected_and_never_used() {
    let mut rng = rng("corrupt_shard_block_is_detected_and_never_used");
    let l = small();
    let codec = Codec::new(l).unwrap();
    let n = rng.gen_range(l.stripe_size() + 1..=l.chunk_size());
    let data = random_bytes(&mut rng, n as usize);
    let enc = codec.encode_chunk(&data).unwrap();
    let lens = l.shard_lens(n);
    // A block of a shard with data: flip one byte in it.
    let corrupt = |enc: &mut EncodedChunk, rng: &mut StdRng, k: usize, block: u64| {
        let start = block * BLOCK;
        let end = (start + BLOCK).min(lens[k]);
        let at = rng.gen_range(start..end) as usize;
        enc.shards[k][at] ^= 1 << rng.gen_range(0..8);
    };
    for _ in 0..20 {
        let k = rng.gen_range(0..TOTAL_SHARDS);
        let block = rng.gen_range(0..lens[k].div_ceil(BLOCK));
        let mut bad = enc.clone();
        corrupt(&mut bad, &mut rng, k, block);
        // With one more shard missing (not k), the bad block leaves exactly 4 in its row.
        let other = (k + rng.gen_range(1..TOTAL_SHARDS)) % TOTAL_SHARDS;
        let got = codec.reconstruct(n, 0, n, &inputs(&bad, &[other])).unwrap();
        assert!(
            got.data == data,
            "shard {k} block {block} corrupt, {other} missing"
        );
        assert_eq!(
            got.bad_blocks,
            vec![BadBlock {
                shard: k,
                shard_offset: block * BLOCK
            }]
        );
        // Corrupt the same row in a second shard too: 2 bad + 1 missing. The row can still be
        // rebuilt only if no data shard with bytes there is among them, or if shards whose
        // stored data ends before the row (known zeros) make up the count; otherwise a clear
        // error. Never wrong bytes.
        let k2 = (0..TOTAL_SHARDS)
            .find(|&j| j != k && j != other && lens[j] > block * BLOCK)
            .unwrap();
        corrupt(&mut bad, &mut rng, k2, block);
        let row = block * BLOCK;
        let lost = [k, k2, other];
        let must_rebuild = lost.iter().any(|&t| t < DATA_SHARDS && lens[t] > row);
        let usable = (0..TOTAL_SHARDS)
            .filter(|&j| !lost.contains(&j) || lens[j] <= row)
            .count();
        match codec.reconstruct(n, 0, n, &inputs(&bad, &[other])) {
            Ok(got) => {
                assert!(got.data == data, "{lost:?} lost at row {row}: wrong bytes");
                assert!(
                    !must_rebuild || usable >= DATA_SHARDS,
                    "{lost:?} at row {row}: rebuilt from {usable}?"
                );
            }
            Err(e) => {
                assert!(
                    must_rebuild && usable < DATA_SHARDS,
                    "{lost:?} at row {row}: {e}"
                );
                assert!(
                    matches!(
                        e,
                        ErasureError::TooFewShards {
                            have: 3,
                            need: 4,
                            ..
                        }
                    ),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn verified_by_source_data_and_partial_fetches_rebuild_any_range() {
    let mut rng = rng("verified_by_source_data_and_partial_fetches_rebuild_any_range");
    for layout in [Layout::DEFAULT, small()] {
        let codec = Codec::new(layout).unwrap();
        let max = if layout == Layout::DEFAULT {
            2 * layout.stripe_size() + 12345
        } else {
            layout.chunk_size()
        };
        for n in lengths(&layout, &mut rng, max) {
            let data = random_bytes(&mut rng, n as usize);
            let enc = codec.encode_chunk(&data).unwrap();
            for _ in 0..30 {
                let off = rng.gen_range(0..layout.chunk_size());
                let len =
                    rng.gen_range(0..=(layout.chunk_size() - off).min(2 * layout.stripe_size()));
                let mut down = [false; TOTAL_SHARDS];
                for _ in 0..rng.gen_range(0..=2) {
                    down[rng.gen_range(0..TOTAL_SHARDS)] = true;
                }
                let fetch = layout.plan_fetch(off, len, n, down).unwrap();
                let mut shards: [Option<ShardData<'_>>; TOTAL_SHARDS] = Default::default();
                for f in &fetch {
                    assert!(!down[f.shard], "fetch from a down shard: {f:?}");
                    assert_eq!(f.shard_offset % BLOCK, 0);
                    let r = f.range();
                    assert!(r.end <= layout.shard_len(f.shard, n));
                    // Verified by the chunkserver: what DataClient::read returns.
                    shards[f.shard] = Some(ShardData {
                        offset: r.start,
                        bytes: &enc.shards[f.shard][r.start as usize..r.end as usize],
                        check: BlockCheck::VerifiedBySource,
                    });
                }
                let got = codec.reconstruct(n, off, len, &shards).unwrap();
                let mut want = vec![0u8; len as usize];
                let have = n.saturating_sub(off).min(len) as usize;
                if have > 0 {
                    want[..have].copy_from_slice(&data[off as usize..off as usize + have]);
                }
                assert!(got.data == want, "n={n} {off}+{len} down={down:?}");
                if !down[..DATA_SHARDS].iter().any(|&d| d) {
                    assert_eq!(got.decoded, 0);
                }
            }
        }
    }
}

#[test]
fn too_few_shards_is_a_clear_error() {
    let mut rng = rng("too_few_shards_is_a_clear_error");
    let l = small();
    let codec = Codec::new(l).unwrap();
    let data = random_bytes(&mut rng, l.chunk_size() as usize);
    let enc = codec.encode_chunk(&data).unwrap();
    for a in 0..TOTAL_SHARDS {
        for b in a + 1..TOTAL_SHARDS {
            for c in b + 1..TOTAL_SHARDS {
                let missing = [a, b, c];
                let err =
                    codec.reconstruct(enc.logical_len, 0, enc.logical_len, &inputs(&enc, &missing));
                // Three losses including a data shard cannot be rebuilt; three parity-free
                // combinations always include one.
                assert!(
                    matches!(
                        err,
                        Err(ErasureError::TooFewShards {
                            have: 3,
                            need: 4,
                            ..
                        })
                    ),
                    "{missing:?}: {err:?}"
                );
                let mut down = [false; TOTAL_SHARDS];
                missing.iter().for_each(|&k| down[k] = true);
                assert!(matches!(
                    l.plan_fetch(0, l.chunk_size(), enc.logical_len, down),
                    Err(ErasureError::TooFewShards {
                        have: 3,
                        need: 4,
                        ..
                    })
                ));
            }
        }
    }
}

#[test]
fn range_mapping_covers_exactly_the_requested_bytes() {
    let mut rng = rng("range_mapping_covers_exactly_the_requested_bytes");
    for l in [Layout::DEFAULT, small()] {
        let size = l.chunk_size();
        let c = l.cell_size();
        let mut ranges = vec![
            (0, 0),
            (0, 1),
            (0, size),
            (size - 1, 1),
            (size, 0),
            (c - 1, 2),
            (l.stripe_size() - 1, 2),
        ];
        for _ in 0..500 {
            let off = rng.gen_range(0..=size);
            ranges.push((off, rng.gen_range(0..=size - off)));
        }
        for (off, len) in ranges {
            let pieces = l.plan_read(off, len).unwrap();
            let mut at = off;
            for p in &pieces {
                assert_eq!(p.chunk_offset, at, "pieces must tile {off}+{len} in order");
                assert!(p.len > 0 && p.shard < DATA_SHARDS);
                // Inside one cell, and the shard bytes are those of the chunk bytes.
                assert_eq!(p.shard_offset / c, (p.shard_offset + p.len - 1) / c);
                assert_eq!(l.locate(p.chunk_offset), (p.shard, p.shard_offset));
                assert_eq!(l.chunk_offset(p.shard, p.shard_offset), p.chunk_offset);
                assert_eq!(
                    l.locate(p.chunk_offset + p.len - 1),
                    (p.shard, p.shard_offset + p.len - 1)
                );
                at += p.len;
            }
            assert_eq!(at, off + len, "pieces must end at the range end");
        }
        assert!(matches!(
            l.plan_read(size, 1),
            Err(ErasureError::RangeOutOfChunk { .. })
        ));
        assert!(matches!(
            l.plan_read(1, u64::MAX),
            Err(ErasureError::RangeOutOfChunk { .. })
        ));
    }
    // Every chunk byte has exactly one home: the map is a bijection onto data shard bytes.
    let l = small();
    let mut seen = vec![false; l.chunk_size() as usize];
    for k in 0..DATA_SHARDS {
        for so in 0..l.max_shard_size() {
            let co = l.chunk_offset(k, so) as usize;
            assert!(!seen[co]);
            seen[co] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn shard_lengths_and_crcs_follow_the_chunkserver_convention() {
    let mut rng = rng("shard_lengths_and_crcs_follow_the_chunkserver_convention");
    let l = Layout::DEFAULT;
    let codec = Codec::new(l).unwrap();
    let mib = 1 << 20;
    assert_eq!(l.shard_lens(0), [0; 6]);
    assert_eq!(l.shard_lens(1), [1, 0, 0, 0, 1, 1]);
    assert_eq!(
        l.shard_lens(l.stripe_size() + mib + 5),
        [2 * mib, mib + 5, mib, mib, 2 * mib, 2 * mib]
    );
    assert_eq!(l.shard_lens(l.chunk_size()), [16 * mib; 6]);
    assert_eq!(
        l.shard_lens(l.chunk_size()).iter().sum::<u64>(),
        l.chunk_size() * 3 / 2
    );
    assert_eq!(l.locate(5 * mib + 3), (1, mib + 3));

    let n = rng.gen_range(1..3 * l.stripe_size());
    let data = random_bytes(&mut rng, n as usize);
    let enc = codec.encode_chunk(&data).unwrap();
    for k in 0..TOTAL_SHARDS {
        assert_eq!(enc.shards[k].len() as u64, l.shard_len(k, n));
        // The chunkserver's crc: crc32c of the whole 64 KiB block, zeros past the data.
        let want: Vec<u32> = enc.shards[k]
            .chunks(BLOCK as usize)
            .map(|b| {
                let mut full = b.to_vec();
                full.resize(BLOCK as usize, 0);
                crc32c::crc32c(&full)
            })
            .collect();
        assert_eq!(enc.crcs[k], want);
    }
    // Stripe by stripe gives the same shards as the whole chunk.
    for (s, part) in data.chunks(l.stripe_size() as usize).enumerate() {
        let cells = codec.encode_stripe(part).unwrap();
        let at = s * l.cell_size() as usize;
        for (k, (cell, shard)) in cells.iter().zip(&enc.shards).enumerate() {
            assert!(
                cell[..] == shard[at..at + cell.len()],
                "stripe {s} shard {k}"
            );
        }
    }
    assert_eq!(codec.encode_stripe(&[]).unwrap(), <[Vec<u8>; 6]>::default());
    assert!(matches!(
        codec.encode_stripe(&vec![0; l.stripe_size() as usize + 1]),
        Err(ErasureError::StripeTooLarge { .. })
    ));
    assert!(matches!(
        codec.encode_chunk(&vec![0; l.chunk_size() as usize + 1]),
        Err(ErasureError::ChunkTooLarge { .. })
    ));
}

/// The parity of a fixed input, pinned: shards on disk must decode with every future build,
/// so a change of the RS matrix (a crate upgrade) or of the layout must fail here first.
#[test]
fn encoding_is_stable_on_disk_format() {
    let l = small();
    let codec = Codec::new(l).unwrap();
    let data: Vec<u8> = (0..l.stripe_size() + 1000)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let enc = codec.encode_chunk(&data).unwrap();
    let sums: Vec<u32> = enc.shards.iter().map(|s| crc32c::crc32c(s)).collect();
    assert_eq!(sums, PINNED, "got {sums:#x?}");
}

const PINNED: [u32; 6] = [
    0x4d45038e, 0xa6e27c68, 0x943ba64f, 0xb1ffd482, 0x7e3ade4c, 0xcdb4f66a,
];

#[test]
fn bad_inputs_are_typed_errors() {
    assert!(matches!(
        Layout::new(1000, 1 << 20),
        Err(ErasureError::InvalidLayout { .. })
    ));
    assert!(matches!(
        Layout::new(64 << 10, (1 << 20) + (64 << 10)),
        Err(ErasureError::InvalidLayout { .. })
    ));
    assert!(matches!(
        Layout::new(0, 0),
        Err(ErasureError::InvalidLayout { .. })
    ));
    assert!(matches!(
        Layout::new(u64::MAX / 2 + 1, u64::MAX),
        Err(ErasureError::InvalidLayout { .. })
    ));
    let l = small();
    let codec = Codec::new(l).unwrap();
    let enc = codec.encode_chunk(&vec![7u8; 300_000]).unwrap();
    let mut shards = inputs(&enc, &[]);
    shards[2] = Some(ShardData {
        offset: 100,
        bytes: &enc.shards[2][100..],
        check: BlockCheck::Crcs(&enc.crcs[2]),
    });
    assert!(matches!(
        codec.reconstruct(enc.logical_len, 0, 10, &shards),
        Err(ErasureError::UnalignedShardData {
            shard: 2,
            offset: 100
        })
    ));
    shards[2] = Some(ShardData {
        offset: 0,
        bytes: &enc.shards[2],
        check: BlockCheck::Crcs(&enc.crcs[2][1..]),
    });
    assert!(matches!(
        codec.reconstruct(enc.logical_len, 0, 10, &shards),
        Err(ErasureError::CrcCountMismatch { shard: 2, .. })
    ));
    assert!(matches!(
        codec.reconstruct(l.chunk_size() + 1, 0, 10, &inputs(&enc, &[])),
        Err(ErasureError::ChunkTooLarge { .. })
    ));
    // A truncated fetch (not to the shard's end) can't be checked: unusable, not "bad".
    let short = &enc.shards[0][..1000];
    let crc = [block_crcs(short)[0]];
    shards = inputs(&enc, &[]);
    shards[0] = Some(ShardData {
        offset: 0,
        bytes: short,
        check: BlockCheck::Crcs(&crc),
    });
    let got = codec.reconstruct(enc.logical_len, 0, 10, &shards).unwrap();
    assert_eq!(got.data, vec![7u8; 10]);
    assert!(got.bad_blocks.is_empty());
    assert_eq!(got.decoded, 10);
}

#[test]
fn cpu_check_agrees_with_the_codec() {
    // On this project's machines (x86-64 with AVX2) both succeed; elsewhere both refuse alike.
    assert_eq!(check_cpu().is_ok(), Codec::new(Layout::DEFAULT).is_ok());
    #[cfg(target_arch = "x86_64")]
    if !std::arch::is_x86_feature_detected!("avx2") {
        assert!(matches!(
            check_cpu(),
            Err(ErasureError::UnsupportedCpu { .. })
        ));
    }
}

#[test]
fn codec_and_layout_can_be_shared_across_tasks() {
    fn shared<T: Send + Sync + Clone + 'static>() {}
    shared::<Codec>();
    shared::<Layout>();
    shared::<ErasureError>();
}
