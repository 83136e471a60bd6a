//! The kernel's page cache across opens: a file read again is read from memory while it is
//! unchanged, and an open after another client's change (or this mount's own) sees it.

use anyhow::{ensure, Result};
use rawfs_integration::fsutil::*;
use rawfs_integration::Cluster;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

#[test]
fn an_unchanged_file_is_read_again_from_the_page_cache() -> Result<()> {
    let mut c = Cluster::start()?;
    let data = pattern(7, 0, 6 << 20);
    fs::write(c.path("kept"), &data)?;
    fs::write(c.path("never-read"), &data)?;
    // Read it once (the first open after the write drops whatever the writes left).
    ensure!(fs::read(c.path("kept"))? == data);
    ensure!(fs::read(c.path("kept"))? == data);
    // With every chunkserver gone, only pages kept by the kernel can answer.
    let ids: Vec<u64> = c
        .info()?
        .processes
        .iter()
        .filter(|p| p.role == "chunkserver")
        .map(|p| p.id)
        .collect();
    for id in ids {
        c.kill9("chunkserver", id)?;
    }
    ensure!(
        fs::read(c.path("never-read")).is_err(),
        "a file never read must need the chunkservers"
    );
    ensure!(
        fs::read(c.path("kept"))? == data,
        "the re-read was not served from the page cache"
    );
    Ok(())
}

#[test]
fn an_open_after_another_mounts_change_reads_the_change() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let size = 256 << 10;
    fs::write(c.path("f"), pattern(1, 0, size))?;
    let mut want = pattern(1, 0, size);
    for round in 0..20u8 {
        // Mount a caches the file (twice: the second open may keep the pages).
        ensure!(
            fs::read(a.join("f"))? == want,
            "round {round}: a's first read"
        );
        ensure!(fs::read(a.join("f"))? == want, "round {round}: a's re-read");
        // Another client changes it in place (same size), or punches a hole, and closes.
        let w = OpenOptions::new().write(true).open(c.path("f"))?;
        let off = 4096 * (1 + u64::from(round) * 3);
        if round % 4 == 3 {
            fallocate(
                &w,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                4096,
            )?;
            want[off as usize..off as usize + 4096].fill(0);
        } else {
            let new = vec![round + 1; 4096];
            w.write_all_at(&new, off)?;
            want[off as usize..off as usize + 4096].copy_from_slice(&new);
        }
        drop(w);
        // An open after that close sees it at once: no waiting for change events.
        ensure!(
            fs::read(a.join("f"))? == want,
            "round {round}: a read stale pages after the other mount's close"
        );
    }
    // This mount's own truncate and rewrite through a path are seen as well.
    fs::write(a.join("f"), b"short")?;
    ensure!(fs::read(a.join("f"))? == b"short");
    ensure!(fs::read(c.path("f"))? == b"short");
    Ok(())
}
