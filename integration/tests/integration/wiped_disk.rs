//! A chunkserver that comes back with an empty disk (issue 6, detection): the chunk map still
//! lists copies on it that it no longer has. Its inventory shows them missing, a second
//! inventory confirms it, the copies are taken out of the map, and the healer restores full
//! redundancy, without anything having read those chunks.

use anyhow::{Context, Result};
use rawfs_integration::fsutil::{chunk_files, verify_pattern, write_pattern};
use rawfs_integration::harness::{busiest_chunkserver, wait_until};
use rawfs_integration::{Cluster, Options};
use std::collections::BTreeMap;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// Chunk files on disk per chunkserver (every size: an empty chunk is a copy too).
fn files_on_disk(c: &Cluster) -> Result<BTreeMap<u64, u64>> {
    let mut n = BTreeMap::new();
    for (id, _) in chunk_files(&c.dir, 0)? {
        *n.entry(id).or_default() += 1;
    }
    Ok(n)
}

#[test]
fn copies_missing_from_a_wiped_disk_are_found_and_restored() -> Result<()> {
    let mut c = Cluster::start_with(Options::healing(4))?;
    let files: Vec<(String, u64, usize)> = (0..6)
        .map(|i| (format!("f{i}"), 70 + i as u64, MIB + 4096 * i))
        .collect();
    for (name, seed, len) in &files {
        write_pattern(&c.path(name), *seed, *len)?;
    }
    let s = c.status()?;
    let total = s["chunks"]["replicated"]
        .as_u64()
        .context("no chunk count")?;
    let victim = busiest_chunkserver(&s)?;

    // The disk is replaced while the server is down, and it comes back before the metadata
    // service has even marked it down: only its inventory can tell.
    c.kill9("chunkserver", victim)?;
    let data_dir = c.process("chunkserver", victim)?.data_dir;
    std::fs::remove_dir_all(&data_dir)?;
    std::fs::create_dir_all(&data_dir)?;
    c.restart_process("chunkserver", victim)?;

    // Every copy the map lists exists on its server's disk again, and all chunks are healthy.
    let r = wait_until(
        "every listed copy on disk and every chunk at 3 copies",
        Duration::from_secs(120),
        || {
            let s = c.status()?;
            let ch = &s["chunks"];
            if ch["healthy"].as_u64() != Some(total) || ch["under_replicated"] != 0 {
                return Ok(false);
            }
            let on_disk = files_on_disk(&c)?;
            Ok(s["chunkservers"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|cs| {
                    let id = cs["id"].as_u64().unwrap_or(0);
                    cs["chunks"].as_u64() == Some(on_disk.get(&id).copied().unwrap_or(0))
                }))
        },
    );
    c.diagnose(r)?;
    let log = c.process("metadata", 1)?.log.context("no metadata log")?;
    let text = std::fs::read_to_string(log)?;
    anyhow::ensure!(
        text.contains("listed copy missing on its server"),
        "the metadata service did not log the missing copies"
    );
    for (name, seed, len) in &files {
        verify_pattern(&c.path(name), *seed, *len)?;
    }
    Ok(())
}
