//! A WRITE's payload crc, checked from the block checksums the chunk file needs anyway.
//!
//! A WRITE frame carries the crc32c of its payload, and the chunk file records the crc32c of
//! every 4 KiB block the write covers: computed separately, every byte is hashed twice (a
//! sixth of a chunkserver's CPU in sequential writes). Here the block crcs are computed once
//! and the payload's crc is derived from them (`crc_then_block`: 32 steps per block instead
//! of hashing 4 KiB again); the block table then takes them as they are. The check runs
//! before the chunk is opened or created, so a damaged payload changes nothing.

use crate::storage::StoreError;
use rawfs_chunkserver_api::layout::{crc_then_block, Geometry, CSUM_BLOCK};

/// The crcs of the whole [`CSUM_BLOCK`] blocks that `data` (to be stored at chunk offset
/// `offset`) covers, in order, once the crc32c of all of `data` is found to be `payload_crc`.
pub(crate) fn whole_block_crcs(
    offset: u64,
    data: &[u8],
    payload_crc: u32,
) -> Result<Vec<u32>, StoreError> {
    let geo = Geometry::current();
    let block = CSUM_BLOCK as usize;
    let mut whole = Vec::with_capacity(data.len() / block + 1);
    let mut crc = 0u32; // the crc32c of no bytes
    let mut at = 0;
    while at < data.len() {
        let into_block = ((offset + at as u64) % block as u64) as usize;
        let piece = &data[at..(at + block - into_block).min(data.len())];
        if piece.len() == block {
            let c = crc32c::crc32c(piece);
            whole.push(c);
            crc = crc_then_block(geo, crc, c);
        } else {
            crc = crc32c::crc32c_append(crc, piece);
        }
        at += piece.len();
    }
    if crc != payload_crc {
        return Err(StoreError::BadRequest {
            reason: "payload checksum mismatch".to_string(),
        });
    }
    Ok(whole)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_crc_follows_from_the_blocks_wherever_the_write_starts() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let block = CSUM_BLOCK as u64;
        for (offset, len) in [
            (0, 40_000),
            (4096, 8192),
            (100, 9000),
            (4000, 96),
            (8192, 0),
        ] {
            let d = &data[..len];
            let good = crc32c::crc32c(d);
            let whole = whole_block_crcs(offset, d, good).unwrap();
            let expect: Vec<u32> = (0..d.len())
                .filter(|i| (offset + *i as u64) % block == 0 && i + block as usize <= d.len())
                .map(|i| crc32c::crc32c(&d[i..i + block as usize]))
                .collect();
            assert_eq!(whole, expect, "offset {offset}, {len} bytes");
            assert!(matches!(
                whole_block_crcs(offset, d, good ^ 1),
                Err(StoreError::BadRequest { .. })
            ));
        }
    }
}
