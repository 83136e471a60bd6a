//! The `data:` line of `rawfs status`: how many chunks (and file bytes) are replicated and
//! how many are erasure coded, and the raw space RS 4+2 saves against replicas.
//!
//! ```text
//!  ChunkCounts { replicated, ec, replicated_bytes, ec_bytes }
//!     ─▶ JSON chunks.{replicated_bytes, ec_bytes, saved_bytes}
//!     ─▶ "data: 4 replicated chunks (1.0 MiB), 2 RS 4+2 chunks (128.0 MiB, saved 192.0 MiB vs 3 replicas)"
//! ```

use crate::size::Human;
use rawfs_metadata_api::ChunkCounts;
use serde_json::Value;

/// Copies of a replicated chunk, the baseline the saving is counted against.
pub const REPLICAS: u64 = 3;

/// Raw bytes that `ec_bytes` of file data in RS 4+2 (stored as 1.5x) save against
/// [`REPLICAS`] copies: `ec_bytes * (3 - 1.5)`.
pub fn saved_bytes(ec_bytes: u64) -> u64 {
    let three = u128::from(ec_bytes) * u128::from(REPLICAS);
    let rs = u128::from(ec_bytes) * 3 / 2;
    u64::try_from(three - rs).unwrap_or(u64::MAX)
}

/// The byte counts for the JSON `chunks` object.
pub fn json_fields(ch: &ChunkCounts) -> [(&'static str, u64); 3] {
    [
        ("replicated_bytes", ch.replicated_bytes),
        ("ec_bytes", ch.ec_bytes),
        ("saved_bytes", saved_bytes(ch.ec_bytes)),
    ]
}

/// Adds [`json_fields`] to the JSON `chunks` object `chunks`.
pub fn add_json(chunks: &mut Value, ch: &ChunkCounts) {
    if let Some(o) = chunks.as_object_mut() {
        for (k, n) in json_fields(ch) {
            o.insert(k.into(), n.into());
        }
    }
}

/// The table's `data:` line (with its newline), from the JSON `chunks` object.
pub fn line(ch: &Value) -> String {
    let n = |k: &str| ch[k].as_u64().unwrap_or(0);
    let ec_bytes = n("ec_bytes");
    format!(
        "data: {} replicated chunks ({}), {} RS 4+2 chunks ({}, saved {} vs {REPLICAS} replicas)\n",
        n("replicated"),
        Human(n("replicated_bytes")),
        n("ec"),
        Human(ec_bytes),
        Human(saved_bytes(ec_bytes)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rs_4_2_saves_one_and_a_half_times_its_bytes() {
        assert_eq!(saved_bytes(0), 0);
        assert_eq!(saved_bytes(64 << 20), 96 << 20);
        assert_eq!(saved_bytes(3), 5, "3 * 3 - 4 (1.5 * 3 rounded down)");
        assert!(saved_bytes(u64::MAX) > u64::MAX / 2, "no overflow");
    }

    #[test]
    fn the_line_counts_both_layouts_and_the_saving() {
        let ch = ChunkCounts {
            replicated: 4,
            ec: 2,
            replicated_bytes: 1 << 20,
            ec_bytes: 128 << 20,
            ..ChunkCounts::default()
        };
        let mut v = json!({"replicated": ch.replicated, "ec": ch.ec});
        add_json(&mut v, &ch);
        assert_eq!(v["ec_bytes"], 128u64 << 20);
        assert_eq!(v["saved_bytes"], 192u64 << 20);
        assert_eq!(
            line(&v),
            "data: 4 replicated chunks (1.0 MiB), 2 RS 4+2 chunks (128.0 MiB, saved 192.0 MiB \
             vs 3 replicas)\n"
        );
    }
}
