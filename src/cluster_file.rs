//! `DIR/cluster.json`: the processes of a cluster started by `rawfs up`.
//!
//! Other tools (tests, `rawfs status --dir`, operators with `jq`) read it, so its keys are
//! stable: `{"mount", "processes": [{"role", "id", "pid", "addr", "data_dir"}]}`; the extra keys
//! (`raft_addr`, `control_addr`, `args`, `log`, `ready`, ...) let a harness restart one daemon with
//! exactly its original command line. It is replaced atomically (write, fsync, rename).

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// File name inside the cluster directory.
pub const FILE_NAME: &str = "cluster.json";

/// What a process does in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Metadata,
    Chunkserver,
    Healer,
    Nbd,
    Mount,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Metadata => "metadata",
            Role::Chunkserver => "chunkserver",
            Role::Healer => "healer",
            Role::Nbd => "nbd",
            Role::Mount => "mount",
        })
    }
}

/// One process of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessEntry {
    pub role: Role,
    pub id: u64,
    pub pid: u32,
    /// The client-facing address: the metadata client port, the chunkserver data port, or (for
    /// the mount) the metadata address it uses.
    pub addr: String,
    /// Data directory (for the mount: the mountpoint).
    pub data_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_addr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_addr: Option<String>,
    /// The executable that was started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<PathBuf>,
    /// Its arguments (without the executable), to restart exactly this process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Where its stdout and stderr go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

/// The whole file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterFile {
    pub mount: PathBuf,
    pub processes: Vec<ProcessEntry>,
    /// Pid of the `rawfs up` process that owns the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_pid: Option<u32>,
    /// True once every daemon answered and the mount is live.
    #[serde(default)]
    pub ready: bool,
}

/// Reading or writing `cluster.json` failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid cluster file: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ClusterFile {
    /// Path of the cluster file in `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Reads `dir/cluster.json`; `Ok(None)` when there is none.
    pub fn load(dir: &Path) -> Result<Option<ClusterFile>, ClusterFileError> {
        let path = Self::path(dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ClusterFileError::Read { path, source }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| ClusterFileError::Parse { path, source })
    }

    /// Replaces `dir/cluster.json` atomically: readers see the old or the new file, never half.
    pub fn store(&self, dir: &Path) -> Result<(), ClusterFileError> {
        let path = Self::path(dir);
        let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
        let werr = |source| ClusterFileError::Write {
            path: path.clone(),
            source,
        };
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| werr(e.into()))?;
        text.push(b'\n');
        let mut f = std::fs::File::create(&tmp).map_err(werr)?;
        f.write_all(&text).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(werr)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The processes with `role`.
    pub fn by_role(&self, role: Role) -> impl Iterator<Item = &ProcessEntry> {
        self.processes.iter().filter(move |p| p.role == role)
    }

    /// The metadata client addresses.
    pub fn metadata_addrs(&self) -> Vec<String> {
        self.by_role(Role::Metadata)
            .map(|p| p.addr.clone())
            .collect()
    }

    /// The entry for `role`/`id`.
    pub fn find(&self, role: Role, id: u64) -> Option<&ProcessEntry> {
        self.processes.iter().find(|p| p.role == role && p.id == id)
    }

    /// True if the process recorded with `pid` runs: that pid, or the same daemon restarted
    /// (by hand, or by a test harness, from the recorded `exe` and `args`) under another pid,
    /// which `rawfs status` must not show as down.
    pub fn runs(&self, pid: u32) -> bool {
        if pid_alive(pid) {
            return true;
        }
        self.processes
            .iter()
            .find(|p| p.pid == pid)
            .is_some_and(|p| !p.args.is_empty() && running_with_args(&p.args))
    }
}

/// True if a live process has exactly `args` after its executable (whatever path it was
/// started by).
fn running_with_args(args: &[String]) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .filter_map(|d| d.file_name().to_str()?.parse::<u32>().ok())
        .any(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            // NUL-terminated arguments: argv[0], then the ones to compare.
            let mut parts: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            if parts.last().is_some_and(|p| p.is_empty()) {
                parts.pop();
            }
            parts.len() == args.len() + 1
                && parts[1..].iter().zip(args).all(|(a, b)| *a == b.as_bytes())
                && pid_alive(pid)
        })
}

/// True if `pid` names a running process (not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks that the process exists; it sends nothing.
    let rc = unsafe { libc::kill(raw, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // A dead child not yet reaped still answers kill(0); its state in /proc is 'Z'.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
            .map_or(true, |state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_file_round_trips_in_the_documented_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cf = ClusterFile {
            mount: "/mnt/rawfs".into(),
            processes: vec![ProcessEntry {
                role: Role::Chunkserver,
                id: 3,
                pid: 42,
                addr: "127.0.0.1:7104".into(),
                data_dir: "/d/chunkserver-3".into(),
                raft_addr: None,
                control_addr: Some("127.0.0.1:7105".into()),
                exe: None,
                args: vec!["chunkserver".into()],
                log: None,
            }],
            up_pid: Some(1),
            ready: true,
        };
        cf.store(dir.path()).expect("store");
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ClusterFile::path(dir.path())).expect("read"))
                .expect("json");
        assert_eq!(v["mount"], "/mnt/rawfs");
        let p = &v["processes"][0];
        assert_eq!(p["role"], "chunkserver");
        assert_eq!(p["id"], 3);
        assert_eq!(p["pid"], 42);
        assert_eq!(p["addr"], "127.0.0.1:7104");
        assert_eq!(p["data_dir"], "/d/chunkserver-3");
        assert_eq!(ClusterFile::load(dir.path()).expect("load"), Some(cf));
    }

    #[test]
    fn liveness_of_pids() {
        assert!(pid_alive(std::process::id()));
        // A process restarted from the recorded arguments runs under another pid.
        let unique = format!(
            "{}.{}",
            9000 + std::process::id() % 1000,
            std::process::id()
        );
        let mut restarted = std::process::Command::new("sleep")
            .arg(&unique)
            .spawn()
            .expect("sleep");
        let entry = |pid: u32, args: Vec<String>| ProcessEntry {
            role: Role::Chunkserver,
            id: 1,
            pid,
            addr: String::new(),
            data_dir: PathBuf::new(),
            raft_addr: None,
            control_addr: None,
            exe: None,
            args,
            log: None,
        };
        let cf = ClusterFile {
            mount: PathBuf::new(),
            processes: vec![
                entry(u32::MAX - 1, vec![unique.clone()]),
                entry(u32::MAX - 2, vec![unique, "x".into()]),
            ],
            up_pid: None,
            ready: true,
        };
        // The child shows its own arguments once it has exec'd (under load, a moment).
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut running = cf.runs(u32::MAX - 1);
        while !running && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
            running = cf.runs(u32::MAX - 1);
        }
        restarted.kill().expect("kill");
        restarted.wait().expect("wait");
        assert!(running, "found by its arguments");
        assert!(!cf.runs(u32::MAX - 1), "gone once it ended");
        assert!(!cf.runs(u32::MAX - 2) && !cf.runs(u32::MAX - 3));
        assert!(!pid_alive(0));
        assert!(!pid_alive(u32::MAX));
    }
}
