//! Randomized data integrity: thousands of writes, truncates, reads and mmap accesses on
//! several files, every read compared with an in-memory reference. Seeded and printed;
//! `RAWFS_SEED=N` reproduces a run.

use anyhow::{ensure, Result};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rawfs_integration::fsutil::{drop_cache, seed};
use rawfs_integration::Cluster;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// One file under test and what it must contain.
struct Subject {
    path: PathBuf,
    file: File,
    reference: Vec<u8>,
    /// Operations stay inside `lo..hi` (one file works across the 64 MiB chunk boundary).
    lo: u64,
    hi: u64,
}

impl Subject {
    fn open(path: PathBuf, lo: u64, hi: u64) -> Result<Subject> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        Ok(Subject {
            path,
            file,
            reference: Vec::new(),
            lo,
            hi,
        })
    }

    fn reopen(&mut self) -> Result<()> {
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        Ok(())
    }

    fn pick_range(&self, rng: &mut StdRng, max_len: u64) -> (u64, usize) {
        let off = rng.gen_range(self.lo..self.hi);
        let len = if rng.gen_bool(0.2) {
            rng.gen_range(1..=16)
        } else {
            rng.gen_range(1..=max_len)
        };
        (off, len.min(self.hi - off).max(1) as usize)
    }

    fn write(&mut self, rng: &mut StdRng) -> Result<()> {
        let (off, len) = self.pick_range(rng, 64 << 10);
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        self.file.write_all_at(&data, off)?;
        let end = off as usize + len;
        if self.reference.len() < end {
            self.reference.resize(end, 0);
        }
        self.reference[off as usize..end].copy_from_slice(&data);
        Ok(())
    }

    fn truncate(&mut self, rng: &mut StdRng) -> Result<()> {
        let size = rng.gen_range(self.lo..self.hi);
        self.file.set_len(size)?;
        self.reference.resize(size as usize, 0);
        Ok(())
    }

    fn read_check(&self, rng: &mut StdRng, op: usize) -> Result<()> {
        let (off, len) = self.pick_range(rng, 128 << 10);
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = self.file.read_at(&mut buf[got..], off + got as u64)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let start = (off as usize).min(self.reference.len());
        let end = (off as usize + len).min(self.reference.len());
        ensure!(
            got == end - start,
            "op {op}: read of {len} at {off} returned {got} bytes, want {}",
            end - start
        );
        ensure!(
            buf[..got] == self.reference[start..end],
            "op {op}: data mismatch at {off}+{len} in {:?}",
            self.path
        );
        Ok(())
    }

    /// Maps a window of the file; reads it against the reference, or writes into it and msyncs.
    fn mmap_access(&mut self, rng: &mut StdRng, op: usize) -> Result<()> {
        let size = self.reference.len() as u64;
        let page = 4096u64;
        let first = self.lo / page * page;
        if size <= first + page {
            return Ok(());
        }
        let start = rng.gen_range(first / page..size / page) * page;
        let len = ((size - start).min(256 << 10)) as usize;
        // SAFETY: shared mapping of an open file, inside its current size; unmapped below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                start as libc::off_t,
            )
        };
        ensure!(
            ptr != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the mapping is `len` bytes long and nothing else aliases it here.
        let map = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        let result = if rng.gen_bool(0.5) {
            let s = start as usize;
            if map[..] == self.reference[s..s + len] {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "op {op}: mmap read mismatch at {start}+{len} in {:?}",
                    self.path
                ))
            }
        } else {
            let at = rng.gen_range(0..len);
            let n = rng.gen_range(1..=(len - at).min(8192));
            let mut data = vec![0u8; n];
            rng.fill_bytes(&mut data);
            map[at..at + n].copy_from_slice(&data);
            let s = start as usize + at;
            self.reference[s..s + n].copy_from_slice(&data);
            // SAFETY: syncing our own mapping.
            if unsafe { libc::msync(ptr, len, libc::MS_SYNC) } == 0 {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "msync: {}",
                    std::io::Error::last_os_error()
                ))
            }
        };
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(ptr, len) };
        result
    }

    fn verify_whole(&self) -> Result<()> {
        drop_cache(&self.file);
        let got = std::fs::read(&self.path)?;
        ensure!(
            got.len() == self.reference.len(),
            "{:?}: size {} want {}",
            self.path,
            got.len(),
            self.reference.len()
        );
        if let Some(i) = (0..got.len()).find(|i| got[*i] != self.reference[*i]) {
            anyhow::bail!("{:?}: first difference at byte {i}", self.path);
        }
        Ok(())
    }
}

#[test]
fn random_ops_match_in_memory_reference() -> Result<()> {
    let seed = seed("random_ops_match_in_memory_reference");
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Cluster::start()?;
    let chunk = 64u64 << 20;
    let mut files = vec![
        Subject::open(c.path("a"), 0, 2 << 20)?,
        Subject::open(c.path("b"), 0, 512 << 10)?,
        Subject::open(c.path("c"), chunk - (1 << 20), chunk + (1 << 20))?,
    ];
    let ops = 3000;
    for op in 0..ops {
        let f = &mut files[rng.gen_range(0..3)];
        match rng.gen_range(0..100) {
            0..=39 => f.write(&mut rng)?,
            40..=69 => f.read_check(&mut rng, op)?,
            70..=76 => f.truncate(&mut rng)?,
            77..=88 => f.mmap_access(&mut rng, op)?,
            89..=93 => {
                f.file.sync_all()?;
                f.reopen()?;
            }
            94..=97 => f.file.sync_data()?,
            _ => {
                drop_cache(&f.file);
                f.read_check(&mut rng, op)?;
            }
        }
    }
    for f in &mut files {
        f.file.sync_all()?;
        f.reopen()?;
        f.verify_whole()?;
    }
    Ok(())
}
