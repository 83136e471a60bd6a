//! A second mount of a test cluster, with its own `-o` options (for example
//! `consistency=local`), run in the foreground by the test and unmounted on drop.
//!
//! ```text
//!  Cluster::mount_extra("local", "consistency=local")
//!     └─ mount.rawfs ADDR,ADDR,ADDR:/ SCRATCH/local -f -o ... (child; log SCRATCH/local.log)
//!          polled until /proc/self/mountinfo lists it; Drop: umount (lazy if busy), kill
//! ```

use crate::harness::{bin_dir, is_mountpoint, tail, wait_until, Cluster};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A mount started by the test; unmounted and stopped when dropped.
pub struct ExtraMount {
    path: PathBuf,
    log: PathBuf,
    child: Child,
}

impl ExtraMount {
    /// The mountpoint.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `rel` under the mountpoint.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// The mount process's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The end of the mount's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log, 20)
    }
}

impl Drop for ExtraMount {
    fn drop(&mut self) {
        if is_mountpoint(&self.path) {
            let ok = Command::new("umount")
                .arg(&self.path)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
        }
        // Unmounted, the helper ends by itself; a kill covers one that is stuck.
        let ended = wait_until("the extra mount to end", Duration::from_secs(10), || {
            Ok(self.child.try_wait()?.is_some())
        });
        if ended.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Cluster {
    /// Mounts the cluster a second time at `SCRATCH/name` with `options` and waits until
    /// the mount is live.
    pub fn mount_extra(&self, name: &str, options: &str) -> Result<ExtraMount> {
        let path = self.scratch().join(name);
        std::fs::create_dir_all(&path)?;
        let log = self.scratch().join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let addrs: Vec<String> = self
            .metadata_ids()?
            .into_iter()
            .map(|id| self.metadata_addr(id))
            .collect::<Result<_>>()?;
        let child = Command::new(bin_dir().join("mount.rawfs"))
            .arg(format!("{}:/", addrs.join(",")))
            .arg(&path)
            .args(["-f", "-o", options])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot run mount.rawfs")?;
        let mut m = ExtraMount { path, log, child };
        let live = wait_until(
            &format!("the {name} mount"),
            Duration::from_secs(30),
            || {
                if let Some(st) = m.child.try_wait()? {
                    bail!("mount.rawfs exited with {st}");
                }
                Ok(is_mountpoint(&m.path))
            },
        );
        if let Err(e) = live {
            bail!("{e:#}; its log ends:\n{}", m.log_tail());
        }
        Ok(m)
    }
}
