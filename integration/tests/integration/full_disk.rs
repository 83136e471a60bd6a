//! A full disk: the whole cluster (metadata replicas, chunkservers, logs) on one small
//! filesystem, as `rawfs up` on a small disk puts it. Writes that do not fit fail with
//! ENOSPC and everything else keeps working; a disk filled by something else stops the
//! metadata replicas' logs, and they start again by themselves once it has room.

use anyhow::{bail, ensure, Context, Result};
use rawfs_integration::fsutil::{errno, fallocate, verify_pattern, write_pattern};
use rawfs_integration::harness::{pid_alive, wait_until};
use rawfs_integration::{Cluster, Options};
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// An ext4 filesystem in a file, loop-mounted for one test; unmounted and removed on drop.
struct SmallFs {
    image: PathBuf,
    mnt: PathBuf,
}

impl SmallFs {
    fn new(scratch: &Path, mib: u64) -> Result<SmallFs> {
        let image = scratch.join("small.img");
        let mnt = scratch.join("small");
        std::fs::create_dir_all(&mnt)?;
        std::fs::File::create(&image)?.set_len(mib << 20)?;
        let run = |cmd: &mut Command| -> Result<()> {
            let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
            ensure!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt))?;
        Ok(SmallFs { image, mnt })
    }

    /// Takes every block still free, root's reserved ones too (as another program filling
    /// the disk would), with the file `name`.
    fn fill(&self, name: &str) -> Result<PathBuf> {
        let path = self.mnt.join(name);
        let mut f = std::fs::File::create(&path)?;
        // Most of it at once, the last blocks one by one until the disk refuses.
        let free = free_bytes(&self.mnt)?.for_root;
        let _ = fallocate(&f, 0, 0, free.saturating_sub(4 * MIB as u64));
        f.seek(std::io::SeekFrom::End(0))?;
        let block = [0u8; 4096];
        while f.write_all(&block).and_then(|()| f.sync_data()).is_ok() {}
        Ok(path)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// A cluster of 3 metadata replicas and 6 chunkservers kept on `fs`.
fn cluster_on(fs: &SmallFs, up_args: &[&str]) -> Result<Cluster> {
    Cluster::start_with(Options {
        dir: Some(fs.mnt.join("cluster")),
        ..Options::new(6, up_args)
    })
}

/// Free bytes of a filesystem.
struct Free {
    /// For root, the filesystem's reserved blocks included.
    for_root: u64,
    /// For anyone else: what a chunkserver counts.
    for_users: u64,
}

fn free_bytes(path: &Path) -> Result<Free> {
    // SAFETY: statvfs fills the struct it is given; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let p = rawfs_integration::fsutil::cpath(path);
    ensure!(
        unsafe { libc::statvfs(p.as_ptr(), &mut st) } == 0,
        "statvfs failed"
    );
    Ok(Free {
        for_root: st.f_bfree * st.f_frsize,
        for_users: st.f_bavail * st.f_frsize,
    })
}

/// Every daemon of the cluster still runs.
fn all_alive(c: &Cluster) -> Result<()> {
    for p in c.info()?.processes {
        ensure!(
            pid_alive(p.pid),
            "{} {} died:\n{}",
            p.role,
            p.id,
            c.diagnostics()
        );
    }
    Ok(())
}

/// Writes 1 MiB pieces to `path` until the mount refuses one (or `limit` bytes went in), then
/// fsyncs; the errno of the first refusal.
fn write_until_refused(path: &Path, limit: usize) -> Result<i32> {
    let mut f = std::fs::File::create(path)?;
    let piece = vec![0x5au8; MIB];
    for _ in 0..limit / MIB {
        if let Err(e) = f.write_all(&piece) {
            return Ok(errno::<()>(Err(e)));
        }
    }
    match f.sync_all() {
        Err(e) => Ok(errno::<()>(Err(e))),
        Ok(()) => bail!("{limit} bytes fit on a disk that should not hold them"),
    }
}

#[test]
fn writes_past_a_full_disk_fail_with_enospc_and_the_cluster_keeps_serving() -> Result<()> {
    let scratch = tempfile::tempdir_in("/var/tmp")?;
    let fs = SmallFs::new(scratch.path(), 1024)?;
    // A reserve above the default (64 MiB on this disk), to see that the flag reaches the
    // chunkservers.
    let mut c = cluster_on(&fs, &["--reserve", "200M"])?;
    let r = (|| -> Result<()> {
        write_pattern(&c.path("keep"), 91, 8 * MIB)?;
        // New small files while the cluster has room.
        std::fs::create_dir(c.path("pre"))?;
        for i in 0..3 {
            let p = c.path(&format!("pre/f{i}"));
            rawfs_integration::fsutil::write_and_close(&p, &[i; 100_000])?;
        }
        // Three copies of 1 GiB cannot fit on a 1 GiB disk.
        let refused = write_until_refused(&c.path("big"), 1024 * MIB)?;
        ensure!(
            refused == libc::ENOSPC,
            "a full disk gave errno {refused}, not ENOSPC"
        );
        let left = free_bytes(&fs.mnt)?.for_users;
        ensure!(
            left > 150 << 20,
            "only {left} bytes left free with a 200 MiB reserve"
        );

        // The chunkservers stopped short of the disk's end: the metadata replicas kept room
        // for their logs, and the namespace still changes. Status says why writes fail.
        all_alive(&c)?;
        wait_until("a chunkserver shown full", Duration::from_secs(30), || {
            Ok(c.status()?["chunkservers"].as_array().is_some_and(|cs| {
                cs.iter().any(|s| {
                    s["healthy"] == false && s["used_bytes"].as_u64() >= s["total_bytes"].as_u64()
                })
            }))
        })?;
        let table = rawfs_integration::fsutil::sh(
            &c.dir,
            &format!(
                "{} status --dir .",
                rawfs_integration::harness::rawfs_bin().display()
            ),
        )?;
        ensure!(table.contains(" full "), "status table:\n{table}");
        let s = c.status()?;
        ensure!(s["metadata"]["leader"].is_u64(), "no leader once full: {s}");
        std::fs::create_dir(c.path("d"))?;
        std::fs::File::create(c.path("d/empty"))?.sync_all()?;
        // A new small file's close reports a refusal too (nothing is written behind a close
        // then); if it took the data, an fsync says it is stored.
        let small = c.path("d/small");
        match rawfs_integration::fsutil::write_and_close(&small, &[3; 100_000]) {
            Err(e) => ensure!(
                e.raw_os_error() == Some(libc::ENOSPC),
                "close of a new file on a full cluster: {e}"
            ),
            Ok(()) => std::fs::File::open(&small)?
                .sync_all()
                .context("fsync of a new file whose close returned 0 on a full cluster")?,
        }
        verify_pattern(&c.path("keep"), 91, 8 * MIB)?;

        // Deleting the big file gives its space back and writes go in again.
        std::fs::remove_file(c.path("big"))?;
        let piece = vec![7u8; 32 * MIB];
        wait_until("32 MiB to fit again", Duration::from_secs(60), || {
            let f = std::fs::File::create(c.path("again"))?;
            Ok(f.write_all_at(&piece, 0)
                .and_then(|()| f.sync_all())
                .is_ok())
        })?;
        ensure!(
            std::fs::read(c.path("again"))? == piece,
            "data written after the full disk differs"
        );
        all_alive(&c)?;
        ensure!(c.panics().is_empty(), "panics: {:?}", c.panics());
        Ok(())
    })();
    c.diagnose(r)?;
    c.stop()
}

#[test]
fn metadata_replicas_stopped_by_a_disk_filled_by_others_come_back_when_it_has_room() -> Result<()> {
    let scratch = tempfile::tempdir_in("/var/tmp")?;
    let fs = SmallFs::new(scratch.path(), 512)?;
    let mut c = cluster_on(&fs, &[])?;
    let r = (|| -> Result<()> {
        write_pattern(&c.path("keep"), 92, 4 * MIB)?;
        std::fs::create_dir(c.path("before"))?;
        let filler = fs.fill("filler")?;
        // Directory changes need log entries, which no longer fit: within a few hundred
        // one fails (each waits for the replicas up to the mount's call deadline).
        let mut failed = None;
        for i in 0..400 {
            if let Err(e) = std::fs::create_dir(c.path(&format!("full-{i}"))) {
                failed = Some(e);
                break;
            }
        }
        let failed = failed.context("every mkdir went in on a disk with no free block")?;
        eprintln!("mkdir on the full disk: {failed}");

        // Room again: the replicas start again on their own and the cluster serves.
        std::fs::remove_file(&filler)?;
        wait_until("a mkdir to go in again", Duration::from_secs(120), || {
            Ok(std::fs::create_dir(c.path("after")).is_ok() || c.path("after").is_dir())
        })?;
        all_alive(&c)?;
        ensure!(
            c.path("before").is_dir(),
            "a directory made before the disk filled is gone"
        );
        verify_pattern(&c.path("keep"), 92, 4 * MIB)?;
        write_pattern(&c.path("later"), 93, 4 * MIB)?;
        verify_pattern(&c.path("later"), 93, 4 * MIB)?;
        Ok(())
    })();
    c.diagnose(r)?;
    c.stop()
}
