//! Tombstones: the chunks this server deleted, with the version each had, so that a late
//! write from a client holding an old location cannot bring a deleted chunk back.
//!
//! A write creates its chunk when the file is missing (that is how a newly allocated chunk
//! comes to exist). Without tombstones, a writer whose cached location predates a change of
//! the chunk map (the chunk was converted to RS 4+2, or this copy was dropped) would, once
//! this server deleted its copy, recreate it and have the write acknowledged into a file
//! nobody reads: silent loss. With them, creating a chunk at a version not above the one it
//! was deleted at is refused as a stale version, and the writer refreshes its location.
//! A legitimate new copy (the healer re-replicating onto this server) always carries a
//! higher version, because the metadata service bumps the version when a copy is dropped.
//!
//! Kept in the file `tombstones` of the data directory: fixed 24-byte records (chunk id,
//! version, unix seconds; little endian), appended and fsynced before the chunk file is
//! removed. Records older than [`RETENTION`] are dropped when the file is loaded (and the
//! file rewritten): clients refresh a location long before that.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a deleted chunk stays refused.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

const RECORD: usize = 24;

/// Deleted chunks and the versions they had.
pub(crate) struct Tombstones {
    map: Mutex<HashMap<u64, u64>>,
    file: Mutex<File>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn record(chunk: u64, version: u64, at: u64) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[0..8].copy_from_slice(&chunk.to_le_bytes());
    r[8..16].copy_from_slice(&version.to_le_bytes());
    r[16..24].copy_from_slice(&at.to_le_bytes());
    r
}

fn field(r: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&r[i * 8..i * 8 + 8]);
    u64::from_le_bytes(b)
}

impl Tombstones {
    /// Loads the tombstones under `dir`, dropping expired ones (a torn last record from a
    /// crash mid-append is ignored: its chunk file was not removed yet).
    pub(crate) fn load(dir: &Path) -> io::Result<Tombstones> {
        let path = dir.join("tombstones");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let oldest = now_secs().saturating_sub(RETENTION.as_secs());
        let mut kept: Vec<[u8; RECORD]> = Vec::new();
        let mut map = HashMap::new();
        for r in bytes.chunks_exact(RECORD) {
            let (chunk, version, at) = (field(r, 0), field(r, 1), field(r, 2));
            if at >= oldest {
                let v = map.entry(chunk).or_insert(version);
                *v = (*v).max(version);
                kept.push(record(chunk, version, at));
            }
        }
        // Rewrite without the expired records, atomically.
        let tmp = dir.join("tombstones.tmp");
        {
            let mut f = File::create(&tmp)?;
            for r in &kept {
                f.write_all(r)?;
            }
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok(Tombstones {
            map: Mutex::new(map),
            file: Mutex::new(file),
        })
    }

    /// Records that `chunk`, at `version`, is being deleted; durable on return.
    pub(crate) fn add(&self, chunk: u64, version: u64) -> io::Result<()> {
        {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(&record(chunk, version, now_secs()))?;
            f.sync_data()?;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let v = map.entry(chunk).or_insert(version);
        *v = (*v).max(version);
        Ok(())
    }

    /// `Some(deleted_version)` if creating `chunk` at `version` must be refused.
    pub(crate) fn refuses(&self, chunk: u64, version: u64) -> Option<u64> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&chunk).copied().filter(|&v| version <= v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_refuse_old_versions_and_survive_reload() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tombstones::load(dir.path()).unwrap();
        assert_eq!(t.refuses(7, 1), None);
        t.add(7, 3).unwrap();
        assert_eq!(t.refuses(7, 1), Some(3));
        assert_eq!(t.refuses(7, 3), Some(3));
        assert_eq!(t.refuses(7, 4), None, "a newer copy may be made here");
        drop(t);
        let t = Tombstones::load(dir.path()).unwrap();
        assert_eq!(t.refuses(7, 2), Some(3));
        assert_eq!(
            fs::metadata(dir.path().join("tombstones")).unwrap().len(),
            RECORD as u64
        );
    }

    #[test]
    fn expired_and_torn_records_are_dropped_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tombstones");
        let mut bytes = record(1, 5, 0).to_vec(); // 1970: long expired
        bytes.extend_from_slice(&record(2, 6, now_secs()));
        bytes.extend_from_slice(&[9u8; 10]); // a torn append
        fs::write(&path, &bytes).unwrap();
        let t = Tombstones::load(dir.path()).unwrap();
        assert_eq!(t.refuses(1, 1), None);
        assert_eq!(t.refuses(2, 6), Some(6));
        assert_eq!(fs::metadata(&path).unwrap().len(), RECORD as u64);
    }
}
