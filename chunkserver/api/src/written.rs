//! The answer to a WRITTEN request: which parts of a chunk hold data.
//!
//! A chunkserver knows, per checksummed block, whether the block was ever written; a block
//! never written reads as zeros and takes no disk space. WRITTEN reports the written blocks of
//! a range as runs, so that a client can answer `SEEK_DATA`/`SEEK_HOLE` and NBD block status
//! at block granularity instead of chunk granularity (a chunk is 64 MiB).
//!
//! Payload: one 8-byte entry per run, in increasing order, none overlapping or touching:
//!
//! ```text
//!  off size field
//!    0    4 start   chunk byte offset of the run's first byte
//!    4    4 len     bytes in the run (> 0)
//! ```
//!
//! Runs are whole blocks clipped to the range asked about. A block whose table entry is
//! damaged counts as written: whoever reads it should hear of the damage, not skip it.

use bytes::{BufMut, Bytes, BytesMut};
use std::ops::Range;

/// Bytes per run in the payload.
const RUN_LEN: usize = 8;

/// The payload for `runs` (chunk byte ranges, ascending, disjoint).
pub fn encode(runs: &[Range<u32>]) -> Bytes {
    let mut b = BytesMut::with_capacity(runs.len() * RUN_LEN);
    for r in runs {
        b.put_u32(r.start);
        b.put_u32(r.end - r.start);
    }
    b.freeze()
}

/// The runs of a payload, checked to lie in `asked` (the range the request named), in
/// order, non-empty and disjoint; `Err` says what is wrong.
pub fn decode(payload: &[u8], asked: Range<u32>) -> Result<Vec<Range<u32>>, String> {
    if payload.len() % RUN_LEN != 0 {
        return Err(format!(
            "{} bytes is not a whole number of runs",
            payload.len()
        ));
    }
    let mut runs: Vec<Range<u32>> = Vec::with_capacity(payload.len() / RUN_LEN);
    for e in payload.chunks_exact(RUN_LEN) {
        let start = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
        let end = start.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(format!("bad run {start}+{len}"));
        };
        if start < asked.start || end > asked.end || runs.last().is_some_and(|l| l.end >= start) {
            return Err(format!(
                "run {start}..{end} out of order or outside {asked:?}"
            ));
        }
        runs.push(start..end);
    }
    Ok(runs)
}

/// The runs of consecutive written blocks among `written` (one flag per block of `block`
/// bytes, the first at chunk offset 0), clipped to `range`.
pub fn runs_of(written: &[bool], block: u32, range: Range<u32>) -> Vec<Range<u32>> {
    let mut runs: Vec<Range<u32>> = Vec::new();
    if range.is_empty() || block == 0 {
        return runs;
    }
    let first = (range.start / block) as usize;
    let last = ((range.end - 1) / block) as usize;
    let blocks = written.iter().enumerate().take(last + 1).skip(first);
    for (b, _) in blocks.filter(|(_, w)| **w) {
        // Casts: b < written.len() blocks of a chunk, whose bytes fit u32.
        let start = (b as u32 * block).max(range.start);
        let end = (b as u32 * block).saturating_add(block).min(range.end);
        match runs.last_mut() {
            Some(l) if l.end == start => l.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_neighbours_and_are_clipped_to_the_range() {
        let w = [true, true, false, true, false, false, true, true];
        assert_eq!(runs_of(&w, 10, 0..80), vec![0..20, 30..40, 60..80]);
        assert_eq!(runs_of(&w, 10, 5..65), vec![5..20, 30..40, 60..65]);
        assert_eq!(runs_of(&w, 10, 20..30), Vec::<Range<u32>>::new());
        assert_eq!(runs_of(&w, 10, 0..0), Vec::<Range<u32>>::new());
        // Past the last block: nothing written there.
        assert_eq!(runs_of(&w, 10, 75..200), vec![75..80]);
        assert_eq!(runs_of(&[], 10, 0..80), Vec::<Range<u32>>::new());
    }

    #[test]
    fn decoding_checks_what_encoding_promises() {
        let runs = vec![5..20, 30..40, 60..65];
        assert_eq!(decode(&encode(&runs), 0..100).unwrap(), runs);
        assert!(
            decode(&encode(&runs), 10..100).is_err(),
            "outside the range"
        );
        assert!(
            decode(&encode(&[30..40, 5..20]), 0..100).is_err(),
            "out of order"
        );
        assert!(
            decode(&encode(&[5..20, 20..30]), 0..100).is_err(),
            "touching"
        );
        assert!(decode(&[0u8; 8], 0..100).is_err(), "empty run");
        assert!(decode(&[0u8; 7], 0..100).is_err(), "torn");
        assert_eq!(decode(&[], 0..100).unwrap(), Vec::<Range<u32>>::new());
    }
}
