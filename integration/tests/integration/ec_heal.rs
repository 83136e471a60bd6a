//! Shard rebuilds (issue 6): when a chunkserver holding shards of RS 4+2 chunks dies, the
//! healer decodes the lost shards from 4 others, writes them to chunkservers holding no shard
//! of the chunk, and every chunk is back at 6 shards on live servers; twice in a row.

use anyhow::{ensure, Context, Result};
use rawfs_integration::fsutil::{verify_pattern, write_pattern};
use rawfs_integration::harness::wait_until;
use rawfs_integration::{Cluster, Options};
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// One RS stripe: 4 data cells of 1 MiB.
const STRIPE: usize = 4 * MIB;
/// `--chunkserver-timeout`: how long a silent chunkserver stays up for the metadata service.
const TIMEOUT_MS: u64 = 2000;

/// The live chunkserver holding the most chunks and shards.
fn busiest(c: &Cluster, dead: &HashSet<u64>) -> Result<u64> {
    let s = c.status()?;
    s["chunkservers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|cs| cs["id"].as_u64().is_some_and(|id| !dead.contains(&id)))
        .max_by_key(|cs| cs["chunks"].as_u64().unwrap_or(0))
        .and_then(|cs| cs["id"].as_u64())
        .context("no live chunkserver in status")
}

/// Drops the kernel's page cache, so that reads through the mount reach the chunkservers.
fn drop_caches() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", b"3").context("drop_caches (needs root)")
}

/// Kills chunkserver `victim` and waits until the metadata service sees it down and every
/// chunk is back at full redundancy (RS: 6 shards on live servers); then reads every file.
fn kill_and_heal(
    c: &mut Cluster,
    victim: u64,
    total: u64,
    files: &[(PathBuf, u64, usize)],
) -> Result<()> {
    let before = c.log_lines("healer", "rebuilt shard")?;
    c.kill9("chunkserver", victim)?;
    let killed = Instant::now();
    let r = wait_until(
        "every chunk back at 6 live shards",
        Duration::from_secs(120),
        || {
            let s = c.status()?;
            // Down for the metadata service, not just a dead pid.
            let down = s["chunkservers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|cs| {
                    cs["id"] == victim && cs["last_seen_ms"].as_u64() > Some(TIMEOUT_MS + 500)
                });
            let ch = &s["chunks"];
            Ok(down
                && ch["degraded"] == 0
                && ch["lost"] == 0
                && ch["ec"].as_u64() == Some(total)
                && ch["healthy"].as_u64() == Some(total))
        },
    );
    c.diagnose(r)?;
    eprintln!(
        "chunkserver {victim} killed: {total} RS chunks healthy again {:.1} s later",
        killed.elapsed().as_secs_f64()
    );
    let rebuilt = c.log_lines("healer", "rebuilt shard")? - before;
    ensure!(rebuilt >= 1, "no shard rebuild logged by a healer");
    drop_caches()?;
    for (path, seed, len) in files {
        verify_pattern(path, *seed, *len)?;
    }
    Ok(())
}

#[test]
fn killed_chunkservers_shards_are_rebuilt_twice() -> Result<()> {
    // 8 chunkservers: after two deaths 6 are left, enough for 6 distinct shards.
    let mut c = Cluster::start_with(Options::healing(8))?;
    let cold = c.path("cold");
    std::fs::create_dir(&cold)?;
    let set = c.rawfs(&["class", "set", &cold.to_string_lossy(), "cold"])?;
    ensure!(
        set.status.success(),
        "rawfs class set: {}",
        String::from_utf8_lossy(&set.stderr)
    );
    // Partial stripes, a shard that stores nothing, and a file of two chunks.
    let sizes = [1, STRIPE - 1, STRIPE + 1, 5 * MIB + 123, 70 * MIB];
    let files: Vec<(PathBuf, u64, usize)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| (cold.join(format!("f{len}")), 600 + i as u64, len))
        .collect();
    for (path, seed, len) in &files {
        write_pattern(path, *seed, *len)?;
    }
    let total: u64 = sizes.iter().map(|&l| l.div_ceil(64 * MIB) as u64).sum();
    let r = wait_until(
        "every cold chunk erasure coded and healthy",
        Duration::from_secs(240),
        || {
            let s = c.status()?;
            let ch = &s["chunks"];
            Ok(ch["ec"].as_u64() == Some(total)
                && ch["replicated"] == 0
                && ch["healthy"].as_u64() == Some(total))
        },
    );
    c.diagnose(r)?;

    let mut dead = HashSet::new();
    for _ in 0..2 {
        let victim = busiest(&c, &dead)?;
        dead.insert(victim);
        kill_and_heal(&mut c, victim, total, &files)?;
    }
    // Every shard is listed on a live server: the 6 left hold 6 per chunk.
    let s = c.status()?;
    let per_server: u64 = s["chunkservers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|cs| cs["id"].as_u64().is_some_and(|id| !dead.contains(&id)))
        .map(|cs| cs["chunks"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(per_server, 6 * total, "{s}");
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
