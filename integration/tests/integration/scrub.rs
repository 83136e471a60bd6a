//! The background scrub (issue 6): bitrot in a chunk file nobody reads is found by the
//! chunkserver's scrub, reported in its heartbeat, and repaired by the healer from a good
//! replica, all before any client reads the file.

use anyhow::{bail, Context, Result};
use rawfs_integration::fsutil::{chunk_files, pattern, setxattr, verify_pattern};
use rawfs_integration::harness::wait_until;
use rawfs_integration::{Cluster, Options};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Where a chunk file's data region starts (header page and block table before it).
const DATA_OFFSET: u64 = rawfs_chunkserver_api::layout::Geometry::current().data_offset;

#[test]
fn scrub_finds_bitrot_in_an_unread_replica_and_the_healer_repairs_it() -> Result<()> {
    let rate = 256 * MIB;
    // A fourth server, so the healer has somewhere to put the new copy.
    let mut opts = Options::healing(4);
    opts.up_args
        .extend(["--scrub-rate".to_string(), rate.to_string()]);
    let c = Cluster::start_with(opts)?;
    // `rawfs up --scrub-rate` reached every chunkserver.
    for id in 1..=4 {
        assert_eq!(c.scrub_status(id)?.rate, rate as u64, "chunkserver {id}");
    }
    let hot = c.path("hot");
    fs::create_dir(&hot)?;
    setxattr(&hot, "rawfs.class", b"hot", 0)?;
    let path = hot.join("f");
    let len = 4 * MIB;
    let mut f = File::create(&path)?;
    f.write_all(&pattern(11, 0, len))?;
    f.sync_all()?;
    drop(f);

    let total = 1;
    wait_until("one healthy chunk", Duration::from_secs(20), || {
        Ok(c.status()?["chunks"]["healthy"].as_u64() == Some(total))
    })?;
    let files = chunk_files(&c.dir, 2 * MIB as u64)?;
    assert_eq!(files.len(), 3, "three replicas of one chunk: {files:?}");
    let (victim, bad_path) = files[0].clone();
    let bad_before = c.scrub_status(victim)?.bad_found;

    // Bitrot in block 32 (chunk offset 2 MiB + 1000), behind the chunkserver's back.
    let at = DATA_OFFSET + 2 * MIB as u64 + 1000;
    let file = OpenOptions::new().read(true).write(true).open(&bad_path)?;
    let mut original = vec![0u8; 512];
    file.read_exact_at(&mut original, at)?;
    let rotten: Vec<u8> = original.iter().map(|b| b ^ 0x5a).collect();
    file.write_all_at(&rotten, at)?;
    file.sync_all()?;
    drop(file);
    let rotted = Instant::now();

    // No read of the file until the copy is repaired: only the scrub can have found it.
    let r = wait_until(
        "the scrub to find the bad replica and the healer to repair it",
        Duration::from_secs(60),
        || {
            let found = c.scrub_status(victim)?.bad_found > bad_before;
            let s = c.status()?;
            let ch = &s["chunks"];
            let healthy = ch["healthy"].as_u64() == Some(total)
                && ch["under_replicated"] == 0
                && ch["degraded"].as_u64().unwrap_or(0) == 0
                && ch["lost"] == 0;
            // The damaged copy is deleted, or the chunk file there was rewritten good.
            let gone = match OpenOptions::new().read(true).open(&bad_path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(e.into()),
                Ok(f) => {
                    let mut now = vec![0u8; original.len()];
                    f.read_exact_at(&mut now, at).is_ok() && now == original
                }
            };
            // With the damaged copy gone or good, three good copies are on disk again.
            let copies = chunk_files(&c.dir, 2 * MIB as u64)?.len();
            Ok(found && healthy && gone && copies >= 3)
        },
    );
    c.diagnose(r)?;
    eprintln!(
        "bitrot found and repaired {:.1} s after it happened",
        rotted.elapsed().as_secs_f64()
    );
    let log = c
        .process("chunkserver", victim)?
        .log
        .context("no chunkserver log")?;
    let text = fs::read_to_string(&log)?;
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("scrub found a bad block"))
        .collect();
    if !findings.iter().any(|l| l.contains("offset=2097152")) {
        bail!(
            "chunkserver {victim} did not log the scrub's finding (block at 2 MiB): {findings:?}"
        );
    }
    verify_pattern(&path, 11, len)?;
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
