//! Faults: a chunkserver killed mid-write, a corrupted chunk file, a killed metadata service.

use anyhow::{Context, Result};
use rawfs_integration::fsutil::{chunk_files, drop_cache, pattern, verify_pattern};
use rawfs_integration::harness::wait_until;
use rawfs_integration::Cluster;
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// Whether a healer of `c` has re-replicated a chunk already (its log says so): the
/// under-replicated state a test waits for may be over before the test looks.
fn healed(c: &Cluster) -> bool {
    let Ok(logs) = fs::read_dir(c.dir.join("logs")) else {
        return false;
    };
    logs.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("healer"))
        .any(|e| fs::read_to_string(e.path()).is_ok_and(|t| t.contains("repaired chunk")))
}

fn chunk_counts(s: &Value) -> (u64, u64, u64) {
    let c = &s["chunks"];
    (
        c["under_replicated"].as_u64().unwrap_or(0),
        c["degraded"].as_u64().unwrap_or(0),
        c["lost"].as_u64().unwrap_or(0),
    )
}

#[test]
fn killed_chunkserver_loses_no_acked_write() -> Result<()> {
    let mut c = Cluster::start()?;
    let path = c.path("big");
    let total = 200 * MIB;
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut off = 0;
    while off < 48 * MIB {
        f.write_all(&pattern(9, off as u64, MIB))?;
        off += MIB;
    }
    f.sync_all()?;
    // Kill a chunkserver that holds some of this file.
    let mut victim = None;
    wait_until(
        "a chunkserver to report stored bytes",
        Duration::from_secs(20),
        || {
            let s = c.status()?;
            victim = s["chunkservers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|cs| cs["used_bytes"].as_u64().unwrap_or(0) >= 16 * MIB as u64)
                .and_then(|cs| cs["id"].as_u64());
            Ok(victim.is_some())
        },
    )?;
    let victim = victim.context("victim")?;
    c.kill9("chunkserver", victim)?;
    // The write goes on, across the killed replica and past the first chunk, and is acked.
    while off < total {
        f.write_all(&pattern(9, off as u64, MIB))?;
        off += MIB;
        if off == 128 * MIB {
            f.sync_data()?;
        }
    }
    f.sync_all()?;
    drop(f);
    verify_pattern(&path, 9, total)?;
    wait_until("status to show the loss", Duration::from_secs(30), || {
        let s = c.status()?;
        let down = s["chunkservers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|cs| cs["id"] == victim && cs["up"] == false);
        Ok(down && (chunk_counts(&s).0 > 0 || healed(&c)))
    })?;
    let (_, _, lost) = chunk_counts(&c.status()?);
    assert_eq!(lost, 0, "no chunk may be lost with one chunkserver down");
    Ok(())
}

#[test]
fn corrupted_chunk_file_is_detected_and_read_from_another_replica() -> Result<()> {
    let c = Cluster::start()?;
    let path = c.path("f");
    let len = 4 * MIB;
    let mut f = File::create(&path)?;
    f.write_all(&pattern(5, 0, len))?;
    f.sync_all()?;
    drop(f);
    let files: Vec<PathBuf> = chunk_files(&c.dir, 2 * MIB as u64)?
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(files.len(), 3, "three replicas of one chunk: {files:?}");
    // Reads try one replica first (which one depends on the chunk), so damage one replica at
    // a time, restoring it if it was not the one read, until the damage is met: within 3 tries.
    let at = MIB as u64 + 1234;
    let mut reported = false;
    for p in &files {
        let f = OpenOptions::new().read(true).write(true).open(p)?;
        let mut original = vec![0u8; 4096];
        f.read_exact_at(&mut original, at)?;
        f.write_all_at(&[0xA5; 4096], at)?;
        f.sync_all()?;
        verify_pattern(&path, 5, len)?;
        // The client reports the bad copy once another replica has served the read.
        let seen = wait_until(
            "the corruption to be reported",
            Duration::from_secs(5),
            || {
                let (under, degraded, _) = chunk_counts(&c.status()?);
                Ok(under + degraded > 0 || healed(&c))
            },
        );
        if seen.is_ok() {
            reported = true;
            break;
        }
        f.write_all_at(&original, at)?;
        f.sync_all()?;
    }
    assert!(
        reported,
        "a read met the damaged replica, but status shows no under-replicated chunk"
    );
    verify_pattern(&path, 5, len)?;
    Ok(())
}

#[test]
fn killed_metadata_restarts_with_every_acked_op() -> Result<()> {
    let mut c = Cluster::start()?;
    let m = c.mnt.clone();
    for i in 0..40 {
        let d = m.join(format!("dir{}", i % 4));
        fs::create_dir_all(&d)?;
        let mut f = File::create(d.join(format!("f{i}")))?;
        f.write_all(&pattern(i, 0, 1000 + i as usize * 100))?;
        f.sync_all()?;
    }
    fs::rename(m.join("dir0/f0"), m.join("dir1/renamed"))?;
    fs::remove_file(m.join("dir2/f2"))?;
    std::os::unix::fs::symlink("dir3/f3", m.join("sym"))?;
    fs::create_dir(m.join("empty"))?;

    c.kill9("metadata", 1)?;
    c.restart_process("metadata", 1)?;

    for i in 0..40u64 {
        let p = match i {
            0 => m.join("dir1/renamed"),
            2 => {
                assert!(!m.join("dir2/f2").exists(), "an acked unlink came back");
                continue;
            }
            _ => m.join(format!("dir{}/f{i}", i % 4)),
        };
        let data = fs::read(&p).with_context(|| p.display().to_string())?;
        assert!(
            data == pattern(i, 0, 1000 + i as usize * 100),
            "{} content",
            p.display()
        );
    }
    assert!(!m.join("dir0/f0").exists());
    assert_eq!(fs::read_link(m.join("sym"))?.to_string_lossy(), "dir3/f3");
    assert!(m.join("empty").is_dir());
    fs::write(m.join("after"), b"new op after the restart")?;
    assert_eq!(fs::read(m.join("after"))?, b"new op after the restart");
    Ok(())
}

/// The chunkserver whose chunk files the process `pid` holds open (local reads keep the
/// descriptors the chunkserver passed), if any.
fn chunkserver_read_locally(c: &Cluster, pid: u32) -> Result<Option<u64>> {
    let held: Vec<PathBuf> = fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .collect();
    for p in c.info()?.processes {
        if p.role == "chunkserver" && held.iter().any(|h| h.starts_with(&p.data_dir)) {
            return Ok(Some(p.id));
        }
    }
    Ok(None)
}

/// Local reads go through chunk file descriptors that stay readable while their chunkserver
/// is stopped (SIGSTOP), so a reader could return a replica's old bytes after a writer
/// dropped that replica and moved on. The reader asks the chunkserver again once it has
/// been silent for a second, gets no answer, and reads another replica: it sees the new data.
#[test]
fn a_reader_does_not_read_a_stopped_chunkservers_old_copy() -> Result<()> {
    let mut c = Cluster::start()?;
    let writer = c.mount_extra("writer", "io_timeout=2s")?;
    let reader = c.mount_extra("reader", "io_timeout=2s")?;
    let (old, new) = (pattern(31, 0, MIB), pattern(32, 0, MIB));
    let mut w = File::create(writer.join("f"))?;
    w.write_all(&old)?;
    w.sync_all()?;
    // The reader keeps the file open: its cached location names the replica it reads.
    let r = File::open(reader.join("f"))?;
    let mut got = vec![0u8; MIB];
    r.read_exact_at(&mut got, 0)?;
    assert!(got == old, "first read");
    let victim = chunkserver_read_locally(&c, reader.pid())?
        .context("the reader holds no chunk file open: local reads are off")?;
    c.sigstop("chunkserver", victim)?;
    // The write to the stopped replica times out; the writer drops it and goes on.
    w.write_all_at(&new, 0)?;
    w.sync_all()?;
    drop_cache(&r);
    r.read_exact_at(&mut got, 0)?;
    c.sigcont("chunkserver", victim)?;
    assert!(
        got == new,
        "the reader returned the stopped chunkserver's old copy; reader log:\n{}",
        reader.log_tail()
    );
    Ok(())
}
