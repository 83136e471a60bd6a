//! The NBD server's connected clients, for `rawfs status`: a small JSON file that
//! `rawfs nbd --status-file PATH` keeps current and `rawfs status --dir` reads.
//!
//! ```text
//!  rawfs nbd: every 500 ms VolumeCatalog::in_use() ─(changed?)─> write tmp, rename ─> PATH
//!  rawfs status --dir DIR: cluster.json (nbd entry: pid alive?) ─> DIR/nbd-1/clients.json
//!                          {"pid": P, "volumes": {"vm1": 2}}  (pid must match the live server)
//! ```
//!
//! A file rather than an endpoint: the counts are only ever read on the same machine as
//! `rawfs up`, a file needs no port, no protocol and no server code in the NBD crate, and
//! a stale file is recognized by its pid (a server that was killed -9 cannot clear it).
//! The file is replaced atomically by rename, so a reader sees a whole file or the old one;
//! it is not fsynced (it describes live connections, which a crash ends anyway).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How often the server compares the connections with what the file says.
const PUBLISH_EVERY: Duration = Duration::from_millis(500);

/// What the file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdClients {
    /// The NBD server that wrote it.
    pub pid: u32,
    /// Connections per volume (export) name; volumes without clients are absent.
    pub volumes: BTreeMap<String, usize>,
}

/// The status file in the NBD server's directory under `rawfs up`.
pub fn path(nbd_dir: &Path) -> PathBuf {
    nbd_dir.join("clients.json")
}

/// Replaces `path` with `c` (write a temporary file beside it, rename).
fn store(path: &Path, c: &NbdClients) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let text = serde_json::to_vec(c).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Keeps `path` equal to the catalog's connections until the task is dropped or aborted.
/// Write errors are logged once per kind of failure, never fatal: serving volumes matters
/// more than reporting on them.
pub async fn publish(catalog: Arc<rawfs_nbd::VolumeCatalog>, path: PathBuf) {
    let mut last: Option<NbdClients> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = NbdClients {
            pid: std::process::id(),
            volumes: catalog.in_use().await.into_iter().collect(),
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        match store(&path, &now) {
            Ok(()) => {
                failing = false;
                last = Some(now);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the NBD status file");
                }
                failing = true;
            }
        }
    }
}

/// Marks the server as having no clients (at a clean shutdown).
pub fn clear(path: &Path) {
    let empty = NbdClients {
        pid: std::process::id(),
        volumes: BTreeMap::new(),
    };
    if let Err(e) = store(path, &empty) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the NBD status file");
    }
}

/// Connections per volume as written by the NBD server `pid`; `None` when the file is
/// missing, unreadable, or was written by another (earlier) server process.
pub fn read(path: &Path, pid: u32) -> Option<BTreeMap<String, usize>> {
    let text = std::fs::read(path).ok()?;
    let c: NbdClients = serde_json::from_slice(&text).ok()?;
    (c.pid == pid).then_some(c.volumes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_is_read_only_for_the_server_that_wrote_it() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = path(d.path());
        assert_eq!(read(&p, 1), None, "no file yet");
        let c = NbdClients {
            pid: 42,
            volumes: [("vm1".to_string(), 2)].into_iter().collect(),
        };
        store(&p, &c).expect("store");
        assert_eq!(read(&p, 42).and_then(|v| v.get("vm1").copied()), Some(2));
        assert_eq!(read(&p, 43), None, "a stale file from another server");
        std::fs::write(&p, b"{not json").expect("write");
        assert_eq!(read(&p, 42), None);
        clear(&p);
        assert_eq!(read(&p, std::process::id()), Some(BTreeMap::new()));
    }
}
