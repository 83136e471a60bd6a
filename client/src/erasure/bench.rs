//! Throughput numbers for the module docs. A benchmark, not a check (prints, asserts only
//! correctness): `RUSTFLAGS="--cfg rawfs_bench" cargo test --release -p rawfs-client
//! erasure_throughput -- --nocapture`.

use super::*;
use std::time::Instant;

fn mbps(bytes: u64, t: Instant) -> f64 {
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

#[test]
fn erasure_throughput() {
    let l = Layout::DEFAULT;
    let codec = Codec::new(l).unwrap();
    let cell = l.cell_size() as usize;
    let data: Vec<u8> = (0..l.chunk_size())
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let rounds = 16u64; // 16 x 64 MiB = 1 GiB of chunk data per measurement

    // Baselines on this box: a copy into a fresh buffer and crc32c of a whole chunk.
    let t = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(std::hint::black_box(&data).clone());
    }
    println!(
        "baseline: copy 64 MiB to a fresh Vec:  {:8.0} MB/s",
        mbps(rounds * l.chunk_size(), t)
    );
    let t = Instant::now();
    for _ in 0..rounds {
        assert_ne!(block_crcs(&data).len(), 0);
    }
    println!(
        "baseline: crc32c per 64 KiB block:     {:8.0} MB/s",
        mbps(rounds * l.chunk_size(), t)
    );

    // Raw library calls on 1 MiB shards.
    let inputs: Vec<&[u8]> = data[..4 * cell].chunks(cell).collect();
    let mut p = vec![0u8; cell];
    let mut q = vec![0u8; cell];
    let t = Instant::now();
    for _ in 0..rounds * 16 {
        codec
            .rs()
            .encode_sep(&inputs, &mut [&mut p[..], &mut q[..]])
            .unwrap();
    }
    println!(
        "raw encode 4x1 MiB -> 2 parity:        {:8.0} MB/s",
        mbps(rounds * 16 * 4 * cell as u64, t)
    );
    let mut shards: Vec<Vec<u8>> = inputs
        .iter()
        .map(|s| s.to_vec())
        .chain([p.clone(), q.clone()])
        .collect();
    let t = Instant::now();
    for _ in 0..rounds * 16 {
        let mut v: Vec<(&mut [u8], bool)> = shards
            .iter_mut()
            .enumerate()
            .map(|(j, s)| (s.as_mut_slice(), j >= 2))
            .collect();
        codec.rs().reconstruct_data(&mut v).unwrap();
    }
    println!(
        "raw reconstruct, data shards 0+1 lost: {:8.0} MB/s",
        mbps(rounds * 16 * 4 * cell as u64, t)
    );
    assert!(shards[0] == inputs[0] && shards[1] == inputs[1]);

    // The module's entry points on whole 64 MiB chunks.
    let t = Instant::now();
    for _ in 0..rounds / 4 {
        std::hint::black_box(codec.encode_chunk(&data).unwrap());
    }
    println!(
        "encode_chunk 64 MiB (fresh buffers):   {:8.0} MB/s",
        mbps(rounds / 4 * l.chunk_size(), t)
    );
    let mut enc = codec.encode_chunk(&data).unwrap();
    let t = Instant::now();
    for _ in 0..rounds {
        codec.encode_chunk_into(&data, &mut enc).unwrap();
    }
    println!(
        "encode_chunk_into 64 MiB (reused):     {:8.0} MB/s",
        mbps(rounds * l.chunk_size(), t)
    );
    let n = enc.logical_len;
    for (what, missing, check) in [
        ("reconstruct_into 64 MiB healthy, verified", vec![], false),
        ("reconstruct_into 64 MiB healthy, crcs    ", vec![], true),
        (
            "reconstruct_into 64 MiB, shards 0+1 down  ",
            vec![0, 1],
            false,
        ),
        (
            "reconstruct_into 64 MiB, 0+1 down, crcs   ",
            vec![0, 1],
            true,
        ),
    ] {
        let shards: [Option<ShardData<'_>>; TOTAL_SHARDS] = std::array::from_fn(|k| {
            (!missing.contains(&k)).then(|| ShardData {
                offset: 0,
                bytes: &enc.shards[k],
                check: if check {
                    BlockCheck::Crcs(&enc.crcs[k])
                } else {
                    BlockCheck::VerifiedBySource
                },
            })
        });
        let mut out = vec![0u8; n as usize];
        let t = Instant::now();
        for _ in 0..rounds / 2 {
            codec.reconstruct_into(n, 0, &mut out, &shards).unwrap();
        }
        assert!(out == data);
        println!("{what}: {:8.0} MB/s", mbps(rounds / 2 * n, t));
    }
}
