//! The kernel's page cache across opens: a file read again is read from memory while it is
//! unchanged, and an open after another client's change (or this mount's own) sees it.

use anyhow::{ensure, Result};
use rawfs_integration::fsutil::*;
use rawfs_integration::harness::wait_until;
use rawfs_integration::Cluster;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;

/// How many of the first `len` bytes of `f` are in the page cache, in pages.
fn resident_pages(f: &File, len: usize) -> Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: maps `len` bytes of an open file read-only, asks the kernel which of its pages
    // are cached (nothing is read), and unmaps them again.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        let mut vec = vec![0u8; len.div_ceil(4096)];
        let r = libc::mincore(p, len, vec.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(p, len);
        ensure!(r == 0, "mincore: {err}");
        Ok(vec.iter().filter(|b| **b & 1 != 0).count())
    }
}

#[test]
fn an_unchanged_file_is_read_again_from_the_page_cache() -> Result<()> {
    let c = Cluster::start()?;
    let len = 6 << 20;
    let data = pattern(7, 0, len);
    fs::write(c.path("kept"), &data)?;
    // Read it (the first open after a write drops what the writes left), then open it again:
    // the open keeps what the read cached. Another test's drop_caches may empty the cache in
    // between, so a few tries; an open that drops the cache fails every one.
    let mut kept = 0;
    for _ in 0..3 {
        ensure!(fs::read(c.path("kept"))? == data);
        kept = resident_pages(&File::open(c.path("kept"))?, len)?;
        if kept == len / 4096 {
            break;
        }
    }
    ensure!(
        kept == len / 4096,
        "a read-only open of an unchanged file dropped its pages ({kept} left)"
    );
    // Opened for writing (and written), it is no longer trusted: the next open drops it.
    OpenOptions::new()
        .write(true)
        .open(c.path("kept"))?
        .write_all_at(b"new", 0)?;
    let f = File::open(c.path("kept"))?;
    ensure!(
        resident_pages(&f, len)? == 0,
        "the open after a write kept the pages"
    );
    let mut want = data;
    want[..3].copy_from_slice(b"new");
    ensure!(fs::read(c.path("kept"))? == want);
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

#[test]
fn a_writer_keeps_the_pages_it_wrote() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::write(c.path("marker"), b"m")?;
    let mode =
        |p: &std::path::Path| -> Result<u32> { Ok(fs::metadata(p)?.permissions().mode() & 0o777) };
    ensure!(mode(&c.path("marker"))? == 0o644, "marker starts at 0644");
    let len = 8 << 20;
    let data = pattern(3, 0, len);
    let f = OpenOptions::new()
        .create(true)
        .read(true)
        .write(true)
        .truncate(true)
        .open(c.path("written"))?;
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        f.write_all_at(piece, (i << 20) as u64)?;
    }
    f.sync_all()?;
    // A change from the other mount, seen here once the events before it (the writer's own
    // commits) have been handled: the order of the change events is the leader's.
    fs::set_permissions(a.join("marker"), fs::Permissions::from_mode(0o600))?;
    wait_until(
        "the other mount's chmod to show here",
        std::time::Duration::from_secs(10),
        || Ok(mode(&c.path("marker"))? == 0o600),
    )?;
    // The kernel cached what it wrote; the commits of this mount's own writes must not have
    // thrown it away (a sequential writer lost its whole page cache at every flush).
    let kept = resident_pages(&f, len)?;
    ensure!(
        kept == len / 4096,
        "the writer's own commits dropped its pages ({kept} of {} left)",
        len / 4096
    );
    let mut back = vec![0u8; len];
    f.read_exact_at(&mut back, 0)?;
    ensure!(back == data, "read back differs");
    Ok(())
}

#[test]
fn a_handle_open_here_sees_another_mounts_append() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let first = pattern(4, 0, 100_000);
    fs::write(c.path("log"), &first)?;
    // Open on mount a before the append, and read to the end there.
    let reader = File::open(a.join("log"))?;
    let mut got = vec![0u8; first.len()];
    reader.read_exact_at(&mut got, 0)?;
    ensure!(got == first, "first part");
    let more = pattern(5, first.len() as u64, 70_000);
    {
        let mut w = OpenOptions::new().append(true).open(c.path("log"))?;
        std::io::Write::write_all(&mut w, &more)?;
        w.sync_all()?;
    }
    let total = (first.len() + more.len()) as u64;
    // The handle opened before the append sees the new size and reads the new bytes (it
    // kept the size it opened with for good).
    wait_until(
        "the append's size to show on the open handle",
        std::time::Duration::from_secs(10),
        || Ok(reader.metadata()?.len() == total),
    )?;
    let mut tail = vec![0u8; more.len()];
    reader.read_exact_at(&mut tail, first.len() as u64)?;
    ensure!(tail == more, "appended bytes read through the old handle");
    drop(reader);

    // Cut into another mount's appended bytes through a handle opened before them (and
    // never asked for the size since), then extend: what was past the cut reads as zeros,
    // so the truncate zeroed the other mount's bytes too.
    fs::write(c.path("cut"), &first)?;
    let writer = OpenOptions::new().write(true).open(a.join("cut"))?;
    {
        let mut w = OpenOptions::new().append(true).open(c.path("cut"))?;
        std::io::Write::write_all(&mut w, &more)?;
        w.sync_all()?;
    }
    let cut = first.len() + 10;
    writer.set_len(cut as u64)?;
    writer.set_len(total)?;
    drop(writer);
    let back = fs::read(c.path("cut"))?;
    ensure!(back.len() as u64 == total, "size {}", back.len());
    ensure!(
        back[..cut] == [&first[..], &more[..10]].concat()[..],
        "bytes before the cut"
    );
    ensure!(
        back[cut..].iter().all(|b| *b == 0),
        "bytes past the cut came back"
    );
    Ok(())
}

#[test]
fn a_file_kept_open_here_reads_another_mounts_overwrite() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let len = 300_000;
    fs::write(c.path("f"), pattern(6, 0, len))?;
    // Mount a keeps the file open (as flock(1) does around its command) and has read it, so
    // it has data read ahead; each round overwrites the file from the main mount in place.
    let keeper = File::open(a.join("f"))?;
    let mut got = vec![0u8; len];
    keeper.read_exact_at(&mut got, 0)?;
    for round in 0..5u64 {
        let want = pattern(10 + round, 0, len);
        {
            let w = OpenOptions::new().write(true).open(c.path("f"))?;
            w.write_all_at(&want, 0)?;
            w.sync_all()?;
        }
        // Through the handle kept open, and through a new open beside it.
        keeper.read_exact_at(&mut got, 0)?;
        ensure!(got == want, "round {round}: the handle kept open");
        ensure!(fs::read(a.join("f"))? == want, "round {round}: a new open");
    }
    Ok(())
}

/// A file kept open on one mount is truncated on another: the open handle sees the new
/// size (and no bytes past it), as on a local filesystem.
#[test]
fn a_file_kept_open_here_sees_another_mounts_truncate() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::write(c.path("f"), pattern(7, 0, 100_000))?;
    let keeper = File::open(a.join("f"))?;
    let mut got = vec![0u8; 100_000];
    keeper.read_exact_at(&mut got, 0)?;
    OpenOptions::new()
        .write(true)
        .open(c.path("f"))?
        .set_len(1_000)?;
    ensure!(
        keeper.metadata()?.len() == 1_000,
        "fstat on the handle kept open"
    );
    let mut back = Vec::new();
    (&keeper).read_to_end(&mut back)?;
    ensure!(back == pattern(7, 0, 1_000), "read {} bytes", back.len());
    Ok(())
}
