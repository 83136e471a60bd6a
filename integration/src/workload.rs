//! A model-checked namespace workload for failover tests: worker threads create (write,
//! fsync), rename and unlink small files through the mount, each in its own directory, and
//! record every acknowledged operation in a model that [`verify`] checks against the
//! metadata service and the file contents.
//!
//! ```text
//!  Workload::start ──> worker k (thread, own dir wK, seeded rng)
//!     │                  loop: create fN (pattern bytes, fsync) | rename -> rN | unlink
//!     │                  Ok  -> model[name] = File{seed, len} / moved / removed
//!     │                  Err -> model[name] = Unknown, error recorded
//!     └─ stop() -> models ──> verify(): readdir (leader, linearizable) == model names,
//!                                       contents read through the mount (cache dropped)
//! ```
//!
//! An operation counts as acknowledged when its syscall returned success (for a create:
//! `create_new`, `write_all` and `fsync` all succeeded). A failure marks the names it touched
//! `Unknown`, so the check stays exact for everything else, and is reported.

use crate::fsutil::{drop_cache, pattern};
use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{Name, ROOT_INO};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the model expects of one name in a worker's directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A file with content `pattern(seed, 0, len)`.
    File {
        /// Seed of its content.
        seed: u64,
        /// Its length in bytes.
        len: usize,
    },
    /// An operation on it failed: present or absent, any content.
    Unknown,
}

/// One worker's directory and model.
#[derive(Clone, Debug)]
pub struct WorkerModel {
    /// Directory name under the mount root.
    pub dir: String,
    /// Expected entries (a name absent from the map must not exist).
    pub files: BTreeMap<String, Expect>,
    /// Next unique name number.
    next: u64,
    /// Acknowledged operations so far.
    pub acked: u64,
    /// Operations that failed, with their errors.
    pub errors: Vec<String>,
}

impl WorkerModel {
    fn path(&self, mnt: &Path, name: &str) -> PathBuf {
        mnt.join(&self.dir).join(name)
    }

    fn present(&self) -> Vec<String> {
        self.files
            .iter()
            .filter(|(_, e)| matches!(e, Expect::File { .. }))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// One random operation through the mount, recorded in the model.
    fn step(&mut self, mnt: &Path, rng: &mut StdRng) {
        let present = self.present();
        let pick = rng.gen_range(0..100);
        if pick < 50 || present.len() < 3 {
            let name = format!("f{}", self.next);
            self.next += 1;
            let (seed, len) = (rng.gen::<u64>(), rng.gen_range(1..=16 * 1024));
            let path = self.path(mnt, &name);
            let r = File::create_new(&path).and_then(|mut f| {
                f.write_all(&pattern(seed, 0, len))?;
                f.sync_all()
            });
            match r {
                Ok(()) => {
                    self.files.insert(name, Expect::File { seed, len });
                }
                Err(e) => self.fail(&[&name], format!("create {}: {e}", path.display())),
            }
            return;
        }
        let src = present[rng.gen_range(0..present.len())].clone();
        if pick < 75 {
            let dst = format!("r{}", self.next);
            self.next += 1;
            let r = fs::rename(self.path(mnt, &src), self.path(mnt, &dst));
            match r {
                Ok(()) => {
                    if let Some(e) = self.files.remove(&src) {
                        self.files.insert(dst, e);
                    }
                }
                Err(e) => self.fail(&[&src, &dst], format!("rename {src} -> {dst}: {e}")),
            }
        } else {
            match fs::remove_file(self.path(mnt, &src)) {
                Ok(()) => {
                    self.files.remove(&src);
                }
                Err(e) => self.fail(&[&src], format!("unlink {src}: {e}")),
            }
        }
    }

    fn fail(&mut self, names: &[&str], error: String) {
        for n in names {
            self.files.insert((*n).to_string(), Expect::Unknown);
        }
        self.errors.push(format!("{}: {error}", self.dir));
    }
}

/// Worker threads running [`WorkerModel::step`] until stopped.
pub struct Workload {
    stop: Arc<AtomicBool>,
    acked: Vec<Arc<AtomicU64>>,
    handles: Vec<JoinHandle<WorkerModel>>,
}

impl Workload {
    /// Creates `workers` empty directories `w0..` under `mnt` and their empty models.
    pub fn prepare(mnt: &Path, workers: usize) -> Result<Vec<WorkerModel>> {
        (0..workers)
            .map(|k| {
                let dir = format!("w{k}");
                fs::create_dir(mnt.join(&dir)).with_context(|| format!("mkdir {dir}"))?;
                Ok(WorkerModel {
                    dir,
                    files: BTreeMap::new(),
                    next: 0,
                    acked: 0,
                    errors: Vec::new(),
                })
            })
            .collect()
    }

    /// Starts one thread per model, each continuing its model; `seed` seeds their choices.
    pub fn start(mnt: &Path, models: Vec<WorkerModel>, seed: u64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut acked = Vec::new();
        let mut handles = Vec::new();
        for (k, mut m) in models.into_iter().enumerate() {
            let counter = Arc::new(AtomicU64::new(m.acked));
            acked.push(counter.clone());
            let (stop, mnt) = (stop.clone(), mnt.to_path_buf());
            let mut rng = StdRng::seed_from_u64(seed ^ (k as u64).wrapping_mul(0x9E37_79B9));
            handles.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let errors = m.errors.len();
                    m.step(&mnt, &mut rng);
                    if m.errors.len() == errors {
                        m.acked += 1;
                        counter.store(m.acked, Ordering::Relaxed);
                    }
                }
                m
            }));
        }
        Workload {
            stop,
            acked,
            handles,
        }
    }

    /// Acknowledged operations per worker so far.
    pub fn acked(&self) -> Vec<u64> {
        self.acked
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every worker has acknowledged at least `more` operations beyond `since`.
    pub fn wait_progress(&self, since: &[u64], more: u64, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let now = self.acked();
            if now.iter().zip(since).all(|(n, s)| *n >= s + more) {
                return Ok(());
            }
            if self.handles.iter().any(|h| h.is_finished()) {
                bail!("a worker stopped unexpectedly");
            }
            if Instant::now() > end {
                bail!("workers made no progress in {timeout:?}: acked {now:?}, before {since:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the workers (each finishes its current operation) and returns their models.
    pub fn stop(mut self) -> Result<Vec<WorkerModel>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for h in self.handles.drain(..) {
            match h.join() {
                Ok(m) => out.push(m),
                Err(_) => bail!("a worker thread panicked"),
            }
        }
        Ok(out)
    }
}

impl Drop for Workload {
    /// A test that fails with workers running stops them before the cluster goes away.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Every entry of directory `ino`, by name, with its size, read from the leader.
fn list_dir(meta: &MetadataClient, ino: u64) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut cookie = 0;
    loop {
        let page = crate::replicas::block_on(meta.readdir(ino, cookie, 512))?;
        let Some(last) = page.last() else { break };
        cookie = last.cookie;
        for e in &page {
            out.insert(String::from_utf8_lossy(&e.name).into_owned(), e.attr.size);
        }
    }
    Ok(out)
}

/// Checks every worker's directory against its model: the names the leader lists are
/// exactly the model's (an `Unknown` name may be either way), and each expected file has its
/// size in the metadata and its content through the mount (page cache dropped first).
pub fn verify(meta: &MetadataClient, mnt: &Path, models: &[WorkerModel]) -> Result<()> {
    for m in models {
        let dir = crate::replicas::block_on(meta.lookup(ROOT_INO, Name::from(m.dir.clone())))
            .with_context(|| format!("lookup {}", m.dir))?;
        let listed = list_dir(meta, dir.ino)?;
        for name in listed.keys() {
            if !m.files.contains_key(name) {
                bail!(
                    "{}/{name} exists but no acknowledged operation created it",
                    m.dir
                );
            }
        }
        for (name, e) in &m.files {
            let Expect::File { seed, len } = *e else {
                continue;
            };
            let Some(size) = listed.get(name) else {
                bail!("{}/{name}: acknowledged but missing", m.dir);
            };
            if *size != len as u64 {
                bail!(
                    "{}/{name}: size {size} in the metadata, {len} acknowledged",
                    m.dir
                );
            }
            let path = m.path(mnt, name);
            let mut f = File::open(&path).with_context(|| path.display().to_string())?;
            drop_cache(&f);
            let mut data = Vec::with_capacity(len);
            f.read_to_end(&mut data)?;
            if data != pattern(seed, 0, len) {
                bail!(
                    "{}/{name}: content differs from what was acknowledged",
                    m.dir
                );
            }
        }
    }
    Ok(())
}
