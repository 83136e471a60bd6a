//! The healer: a killed chunkserver's chunks are copied back to full redundancy by the
//! healer `rawfs up` starts, and every file still reads identical.

use anyhow::Result;
use rawfs_integration::fsutil::{verify_pattern, write_pattern};
use rawfs_integration::harness::{busiest_chunkserver, wait_until};
use rawfs_integration::{Cluster, Options};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

#[test]
fn killed_chunkserver_is_re_replicated() -> Result<()> {
    let mut c = Cluster::start_with(Options::healing(4))?;
    // Five chunks: a two-chunk file and three small ones.
    let files: Vec<(String, u64, usize)> = vec![
        ("a".into(), 1, 66 * MIB),
        ("b".into(), 2, 3 * MIB),
        ("c".into(), 3, 5 * MIB + 123),
        ("d".into(), 4, 1),
    ];
    for (name, seed, len) in &files {
        write_pattern(&c.path(name), *seed, *len)?;
    }
    // The chunkserver holding the most chunks.
    let s = c.status()?;
    let victim = busiest_chunkserver(&s)?;
    let total = s["chunks"]["replicated"].as_u64().unwrap_or(0);
    assert_eq!(total, 5, "{s}");
    c.kill9("chunkserver", victim)?;
    let killed = Instant::now();
    let r = wait_until(
        "every chunk back at 3 live copies",
        Duration::from_secs(60),
        || {
            let s = c.status()?;
            // Down for the metadata service (not just a dead pid, which `status` shows at
            // once): silent for longer than --chunkserver-timeout.
            let down = s["chunkservers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|cs| cs["id"] == victim && cs["last_seen_ms"].as_u64() > Some(2500));
            let ch = &s["chunks"];
            Ok(down
                && ch["under_replicated"] == 0
                && ch["lost"] == 0
                && ch["healthy"].as_u64() == Some(total))
        },
    );
    c.diagnose(r)?;
    eprintln!(
        "re-replicated {total} chunks {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    // The active healer logged each copy with its danger level (two copies were left).
    let mut logged = 0;
    for id in [1, 2] {
        if let Some(log) = c.process("healer", id)?.log {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            logged += text
                .lines()
                .filter(|l| l.contains("repaired chunk") && l.contains("copies_left=2"))
                .count();
        }
    }
    assert!(logged >= 1, "no repair logged by a healer");
    for (name, seed, len) in &files {
        verify_pattern(&c.path(name), *seed, *len)?;
    }
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
