//! Storage classes and RS 4+2 (issue 5): files in a `cold` directory are erasure coded by
//! the healer, read back identical through the mount, and still do with any 2 of the 6
//! chunkservers killed (degraded reads decode from the 4 left).

use anyhow::{ensure, Context, Result};
use rawfs_integration::fsutil::{
    getxattr, listxattr, pattern, setxattr, verify_pattern, write_pattern,
};
use rawfs_integration::harness::wait_until;
use rawfs_integration::{Cluster, Options};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

const MIB: usize = 1 << 20;
/// One RS stripe: 4 data cells of 1 MiB.
const STRIPE: usize = 4 * MIB;

/// Bytes all chunkservers hold, from their heartbeats (`rawfs status`).
fn stored_bytes(c: &Cluster) -> Result<u64> {
    let s = c.status()?;
    Ok(s["chunkservers"]
        .as_array()
        .context("status lists chunkservers")?
        .iter()
        .filter_map(|cs| cs["used_bytes"].as_u64())
        .sum())
}

/// Compares `path` with `pattern(seed, ..)` overwritten by `patch` at `at`.
fn verify_patched(path: &Path, seed: u64, len: usize, at: u64, patch: &[u8]) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    rawfs_integration::fsutil::drop_cache(&f);
    let mut buf = vec![0u8; 4 * MIB];
    let mut off = 0usize;
    while off < len {
        let n = (len - off).min(4 * MIB);
        f.read_exact(&mut buf[..n])?;
        let mut want = pattern(seed, off as u64, n);
        for (i, &b) in patch.iter().enumerate() {
            let p = at as usize + i;
            if (off..off + n).contains(&p) {
                want[p - off] = b;
            }
        }
        ensure!(
            buf[..n] == want[..],
            "{}: wrong bytes in the piece at {off}",
            path.display()
        );
        off += n;
    }
    Ok(())
}

/// Chunks a file of `len` bytes has (64 MiB each).
fn chunks_of(len: usize) -> u64 {
    len.div_ceil(64 * MIB) as u64
}

#[test]
fn cold_files_read_back_with_two_chunkservers_dead() -> Result<()> {
    let mut c = Cluster::start_with(Options::new(
        6,
        &["--metadata-replicas", "1", "--healer-scan-interval", "1s"],
    ))?;
    let cold = c.path("cold");
    let hot = c.path("hot");
    std::fs::create_dir(&cold)?;
    std::fs::create_dir(&hot)?;
    // The class by the CLI on one directory and by the xattr on the other.
    let set = c.rawfs(&["class", "set", &cold.to_string_lossy(), "cold"])?;
    ensure!(
        set.status.success(),
        "rawfs class set: {}",
        String::from_utf8_lossy(&set.stderr)
    );
    setxattr(&hot, "rawfs.class", b"hot", 0)?;
    let got = c.rawfs(&["class", "get", &cold.to_string_lossy()])?;
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "cold");
    assert_eq!(getxattr(&hot, "rawfs.class")?, b"hot");
    assert!(
        !listxattr(&cold)?.iter().any(|n| n == "rawfs.class"),
        "the class xattr is not listed"
    );

    let sizes = [0, 1, STRIPE - 1, STRIPE + 1, 200 * MIB];
    let files: Vec<(std::path::PathBuf, u64, usize)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| (cold.join(format!("f{len}")), 100 + i as u64, len))
        .collect();
    for (path, seed, len) in &files {
        write_pattern(path, *seed, *len)?;
        // Inherited from the directory.
        assert_eq!(getxattr(path, "rawfs.class")?, b"cold");
    }
    let hot_file = hot.join("h");
    write_pattern(&hot_file, 7, 3 * MIB)?;
    let ec_wanted: u64 = sizes.iter().map(|&l| chunks_of(l)).sum();

    // Written as RS 4+2 directly: erasure coded as soon as the writes returned. A chunk whose
    // writes reached the client out of order (kernel writeback) or whose shard write failed
    // went to replicas instead, and the healer converts it.
    let direct = c.status()?["chunks"]["ec"].as_u64().unwrap_or(0);
    ensure!(direct >= 1, "nothing was written as RS 4+2 directly");
    let r = wait_until(
        "every cold chunk erasure coded",
        Duration::from_secs(240),
        || Ok(c.status()?["chunks"]["ec"].as_u64() == Some(ec_wanted)),
    );
    c.diagnose(r)?;
    eprintln!(
        "{direct} of {ec_wanted} cold chunks written as RS 4+2 directly, {} converted by the healer",
        c.log_lines("healer", "converted chunk to RS 4+2")?
    );
    let s = c.status()?;
    assert_eq!(
        s["chunks"]["replicated"], 1,
        "the hot file stays replicated: {s}"
    );
    for (path, seed, len) in &files {
        verify_pattern(path, *seed, *len)?;
    }
    // Space: once the replicas of converted chunks are deleted, the cold data takes about
    // 1.5x its size (plus the hot file's 3 copies and the chunk files' headers).
    let cold_bytes: u64 = sizes.iter().map(|&l| l as u64).sum();
    let hot_bytes = 3 * (3 * MIB as u64);
    let limit = cold_bytes * 16 / 10 + hot_bytes + 4 * MIB as u64;
    let r = wait_until(
        "the converted chunks' replicas deleted",
        Duration::from_secs(60),
        || Ok(stored_bytes(&c)? <= limit),
    );
    c.diagnose(r)?;
    let stored = stored_bytes(&c)?;
    eprintln!(
        "space: {stored} bytes on the chunkservers for {cold_bytes} cold bytes ({:.2}x) and 3 MiB hot",
        stored.saturating_sub(hot_bytes) as f64 / cold_bytes as f64
    );

    // Any two of the six: every chunk keeps 4 shards.
    for id in [2, 5] {
        c.kill9("chunkserver", id)?;
    }
    for (path, seed, len) in &files {
        c.diagnose(verify_pattern(path, *seed, *len))?;
    }
    verify_pattern(&hot_file, 7, 3 * MIB)?;

    // A small overwrite in the middle of a cold file, still with two servers down: the
    // chunk is decoded into replicas first, and the file reads right.
    let (big, big_seed, big_len) = files.last().context("files")?.clone();
    let at = 100 * MIB as u64 + 12345;
    let patch = b"rawfs was here";
    let f = OpenOptions::new().write(true).open(&big)?;
    f.write_all_at(patch, at)?;
    f.sync_all()?;
    drop(f);
    verify_patched(&big, big_seed, big_len, at, patch)?;
    let s = c.status()?;
    assert_eq!(
        s["chunks"]["replicated"], 2,
        "the rewritten chunk is replicated again: {s}"
    );
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}

/// Chunk counts of `rawfs status`: (replicated, erasure coded, lost).
fn layout_counts(c: &Cluster) -> Result<(u64, u64, u64)> {
    let s = c.status()?;
    let ch = &s["chunks"];
    let n = |k: &str| ch[k].as_u64().unwrap_or(0);
    Ok((n("replicated"), n("ec"), n("lost")))
}

/// Kills both healers (so whichever converts dies mid-way) after a random delay, and starts
/// them again; the new lease holder takes over once the old lease lapses.
fn kill_healers(c: &mut Cluster, rng: &mut impl rand::Rng) -> Result<()> {
    // A random point inside whatever conversion is running: this is the fault injection,
    // not a wait for readiness.
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
    for id in [1, 2] {
        c.kill9("healer", id)?;
    }
    for id in [1, 2] {
        c.restart_process("healer", id)?;
    }
    Ok(())
}

#[test]
fn a_directory_goes_cold_and_back_through_kills() -> Result<()> {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rawfs_integration::fsutil::seed(
        "cold and back through kills",
    ));
    let mut c = Cluster::start_with(Options::new(
        6,
        &[
            "--metadata-replicas",
            "1",
            "--healer-scan-interval",
            "1s",
            "--chunkserver-timeout",
            "3s",
        ],
    ))?;
    let dir = c.path("data");
    std::fs::create_dir(&dir)?;
    let files: Vec<(std::path::PathBuf, u64, usize)> = [70 * MIB, 5 * MIB, 1, 130 * MIB]
        .iter()
        .enumerate()
        .map(|(i, &len)| (dir.join(format!("f{i}")), 200 + i as u64, len))
        .collect();
    for (path, seed, len) in &files {
        write_pattern(path, *seed, *len)?;
    }
    let chunks: u64 = files.iter().map(|f| chunks_of(f.2)).sum();
    let file_bytes: u64 = files.iter().map(|f| f.2 as u64).sum();
    // Space as replicas: 3 copies (heartbeats report it within seconds).
    let r = wait_until("3 copies counted", Duration::from_secs(30), || {
        Ok(stored_bytes(&c)? >= file_bytes * 29 / 10)
    });
    c.diagnose(r)?;
    let dir_s = dir.to_string_lossy().into_owned();
    let to = |c: &Cluster, class: &str| -> Result<()> {
        let out = c.rawfs(&["class", "set", "--recursive", &dir_s, class])?;
        ensure!(
            out.status.success(),
            "rawfs class set -r {class}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };

    // Hot to cold, the converting healer killed at random points twice.
    to(&c, "cold")?;
    for _ in 0..2 {
        kill_healers(&mut c, &mut rng)?;
    }
    let r = wait_until("every chunk RS 4+2", Duration::from_secs(240), || {
        Ok(layout_counts(&c)? == (0, chunks, 0))
    });
    c.diagnose(r)?;
    for (path, seed, len) in &files {
        verify_pattern(path, *seed, *len)?;
    }
    // Converted: within 1.6x once the replicas are deleted (and no copy left over).
    let r = wait_until("the replicas deleted", Duration::from_secs(60), || {
        Ok(stored_bytes(&c)? <= file_bytes * 16 / 10)
    });
    c.diagnose(r)?;
    eprintln!(
        "space after conversion: {:.2}x the file bytes",
        stored_bytes(&c)? as f64 / file_bytes as f64
    );

    // And back to replicas, with a healer kill and a chunkserver kill on the way.
    to(&c, "hot")?;
    kill_healers(&mut c, &mut rng)?;
    c.kill9("chunkserver", 3)?;
    let r = wait_until(
        "every chunk replicated again",
        Duration::from_secs(240),
        || Ok(layout_counts(&c)? == (chunks, 0, 0)),
    );
    c.diagnose(r)?;
    for (path, seed, len) in &files {
        c.diagnose(verify_pattern(path, *seed, *len))?;
    }
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}

/// A cold file is being written as RS 4+2 when one of the 6 chunkservers dies: the shard
/// appends that fail go to replicas instead, every acknowledged byte reads back, and no
/// chunk is lost.
#[test]
fn a_chunkserver_killed_during_a_cold_write_loses_nothing() -> Result<()> {
    let mut c = Cluster::start_with(Options::new(6, &["--metadata-replicas", "1"]))?;
    let cold = c.path("cold");
    std::fs::create_dir(&cold)?;
    setxattr(&cold, "rawfs.class", b"cold", 0)?;
    let path = cold.join("big");
    let total = 200 * MIB;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    // Write until some of it is RS 4+2: a shard write that misses its deadline (this test may
    // share the machine with another) sends its chunk to replicas, as designed, and the next
    // chunk is allocated erasure coded again; one chunk and a piece of the next at the least,
    // three at the most.
    let mut off = 0;
    loop {
        f.write_all(&pattern(31, off as u64, MIB))?;
        off += MIB;
        if off < 72 * MIB || off % (32 * MIB) != 8 * MIB {
            continue;
        }
        f.sync_all()?;
        let s = c.status()?;
        if s["chunks"]["ec"].as_u64() >= Some(1) {
            break;
        }
        ensure!(
            off < 136 * MIB,
            "nothing written as RS 4+2 before the kill: {s}"
        );
        eprintln!("no chunk is RS 4+2 after {} MiB; writing on", off / MIB);
    }
    c.kill9("chunkserver", 3)?;
    // The write goes on across the dead shard server, with a sync in the middle.
    while off < total {
        f.write_all(&pattern(31, off as u64, MIB))?;
        off += MIB;
        if off == 136 * MIB {
            f.sync_data()?;
        }
    }
    f.sync_all()?;
    drop(f);
    c.diagnose(verify_pattern(&path, 31, total))?;
    let s = c.status()?;
    assert_eq!(s["chunks"]["lost"], 0, "{s}");
    // One more loss is still survivable for every chunk.
    c.kill9("chunkserver", 5)?;
    c.diagnose(verify_pattern(&path, 31, total))?;
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
