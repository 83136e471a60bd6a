//! Draining a chunkserver (issue 6): `rawfs chunkserver drain ID --wait` moves every copy
//! and shard off the server while the data stays at full redundancy, and returns once the
//! server holds nothing; its chunk files are then deleted.

use anyhow::{ensure, Context, Result};
use rawfs_integration::fsutil::{chunk_files, verify_pattern, write_pattern};
use rawfs_integration::harness::{busiest_chunkserver, wait_until};
use rawfs_integration::{Cluster, Options};
use std::path::PathBuf;
use std::time::Duration;

const MIB: usize = 1 << 20;

#[test]
fn a_drained_chunkserver_ends_empty_with_everything_at_full_redundancy() -> Result<()> {
    // 7 chunkservers: without the drained one, 6 are left for the shards of an RS chunk.
    let c = Cluster::start_with(Options::new(
        7,
        &["--metadata-replicas", "1", "--healer-scan-interval", "1s"],
    ))?;
    let (hot, cold) = (c.path("hot"), c.path("cold"));
    std::fs::create_dir(&hot)?;
    std::fs::create_dir(&cold)?;
    let set = c.rawfs(&["class", "set", &cold.to_string_lossy(), "cold"])?;
    ensure!(set.status.success(), "rawfs class set: {set:?}");
    let mut files: Vec<(PathBuf, u64, usize)> = Vec::new();
    for (i, len) in [1, 3 * MIB, 9 * MIB + 7].into_iter().enumerate() {
        files.push((hot.join(format!("h{i}")), 700 + i as u64, len));
        files.push((cold.join(format!("c{i}")), 800 + i as u64, len));
    }
    for (path, seed, len) in &files {
        write_pattern(path, *seed, *len)?;
    }
    let r = wait_until(
        "the cold chunks erasure coded",
        Duration::from_secs(180),
        || {
            let s = c.status()?;
            Ok(s["chunks"]["ec"] == 3 && s["chunks"]["healthy"] == 6)
        },
    );
    c.diagnose(r)?;

    // The server holding the most copies and shards.
    let s = c.status()?;
    let victim = busiest_chunkserver(&s)?;
    let id = victim.to_string();
    let out = c.rawfs_ok(&["chunkserver", "drain", &id, "--wait", "--timeout", "3m"]);
    let out = c.diagnose(out)?;
    ensure!(out.contains("is empty"), "drain --wait said: {out}");

    let s = c.status()?;
    let cs = s["chunkservers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|cs| cs["id"] == victim)
        .context("drained server missing from status")?;
    ensure!(cs["chunks"] == 0 && cs["draining"] == true, "{cs}");
    let ch = &s["chunks"];
    ensure!(
        ch["healthy"] == 6 && ch["under_replicated"] == 0 && ch["degraded"] == 0,
        "not at full redundancy after the drain: {ch}"
    );
    // Its files go with its next heartbeats.
    let r = wait_until(
        "the drained server's files deleted",
        Duration::from_secs(30),
        || Ok(chunk_files(&c.dir, 0)?.iter().all(|(id, _)| *id != victim)),
    );
    c.diagnose(r)?;
    std::fs::write("/proc/sys/vm/drop_caches", b"3").context("drop_caches (needs root)")?;
    for (path, seed, len) in &files {
        verify_pattern(path, *seed, *len)?;
    }
    // New data avoids it while it stays drained.
    write_pattern(&hot.join("after"), 900, 2 * MIB)?;
    let s = c.status()?;
    let cs = s["chunkservers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|cs| cs["id"] == victim)
        .context("drained server missing from status")?;
    ensure!(
        cs["chunks"] == 0,
        "a new chunk landed on the drained server: {cs}"
    );
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
