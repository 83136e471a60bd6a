//! The small records next to the segments: the vote, the purge point and the committed hint.
//!
//! ```text
//!  file = crc32c u32 | len u32 | MessagePack value (len bytes)      crc covers len and value
//!  vote, purged : written to <name>.tmp, fsync, rename, fsync dir   (durable before use)
//!  committed    : overwritten in place, never fsynced               (a hint, see mod docs)
//! ```

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::LogStoreError;
use crate::types::LogId;

/// What the sync thread records after each fsync, in the [`COMMITTED`] file (not fsynced).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct Hint {
    /// The committed log id openraft had reported before that fsync.
    pub committed: Option<LogId>,
    /// The segment (first index) that fsync covered and its length then: its bytes up to
    /// there are on disk, so damage before that offset is no torn write.
    pub synced: Option<(u64, u64)>,
}

/// File of the last vote.
pub(super) const VOTE: &str = "vote";
/// File of the last purged log id.
pub(super) const PURGED: &str = "purged";
/// File of the [`Hint`] (committed log id, synced position).
pub(super) const COMMITTED: &str = "committed";
/// Suffix of the temporary files of atomic writes.
pub(super) const TMP_SUFFIX: &str = ".tmp";

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, LogStoreError> {
    let payload = rmp_serde::to_vec(value).map_err(|e| LogStoreError::Encode {
        what,
        reason: e.to_string(),
    })?;
    let len = u32::try_from(payload.len()).map_err(|_| LogStoreError::Encode {
        what,
        reason: format!("{} bytes", payload.len()),
    })?;
    let mut out = Vec::with_capacity(8 + payload.len());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32c::crc32c(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn decode<T: DeserializeOwned>(path: &Path, raw: &[u8]) -> Result<T, LogStoreError> {
    let corrupt = |reason: String| LogStoreError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        reason,
    };
    let (Some(crc), Some(len)) = (raw.get(..4), raw.get(4..8)) else {
        return Err(corrupt(format!("{} bytes is too short", raw.len())));
    };
    let mut b = [0u8; 4];
    b.copy_from_slice(len);
    let len = u32::from_le_bytes(b) as usize;
    let Some(body) = raw.get(4..8 + len) else {
        return Err(corrupt(format!("length {len} beyond the end of the file")));
    };
    b.copy_from_slice(crc);
    if crc32c::crc32c(body) != u32::from_le_bytes(b) {
        return Err(corrupt("checksum mismatch".to_string()));
    }
    rmp_serde::from_slice(&body[4..]).map_err(|e| corrupt(e.to_string()))
}

/// Reads the record `name` in `dir`; `None` if the file does not exist.
pub(super) fn read<T: DeserializeOwned>(
    dir: &Path,
    name: &str,
) -> Result<Option<T>, LogStoreError> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(raw) => decode(&path, &raw).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LogStoreError::io("read", &path)(e)),
    }
}

/// Replaces the record `name` in `dir` crash-safely: after a crash the file holds either
/// the old or the new value, and the new one is on disk when this returns.
pub(super) fn write_durable<T: Serialize>(
    dir: &Path,
    name: &str,
    what: &'static str,
    value: &T,
) -> Result<(), LogStoreError> {
    let bytes = encode(what, value)?;
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(LogStoreError::io("create", &tmp))?;
    f.write_all(&bytes)
        .map_err(LogStoreError::io("write", &tmp))?;
    f.sync_all().map_err(LogStoreError::io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &dst).map_err(LogStoreError::io("rename", &dst))?;
    sync_dir(dir)
}

/// fsyncs a directory, making the creation, renaming and removal of its entries durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), LogStoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(LogStoreError::io("fsync", dir))
}

/// The committed hint file, overwritten in place without fsync.
pub(super) struct HintFile {
    file: File,
    path: std::path::PathBuf,
}

impl HintFile {
    /// Opens (or creates) the hint file `name` in `dir`.
    pub(super) fn open(dir: &Path, name: &str) -> Result<HintFile, LogStoreError> {
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(LogStoreError::io("open", &path))?;
        Ok(HintFile { file, path })
    }

    /// Reads the hint; a missing, empty or damaged one (a torn in-place write) is `None`.
    pub(super) fn read<T: DeserializeOwned>(dir: &Path, name: &str) -> Option<T> {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(raw) if raw.is_empty() => None,
            Ok(raw) => decode(&path, &raw)
                .inspect_err(|e| tracing::warn!(error = %e, "ignoring the log hint"))
                .ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "ignoring the log hint");
                None
            }
        }
    }

    /// Overwrites the hint in place (a few dozen bytes: one sector, not torn in practice, and
    /// the checksum catches it if it is). Stale bytes past the new record are ignored by
    /// the length field.
    pub(super) fn write<T: Serialize>(
        &self,
        what: &'static str,
        value: &T,
    ) -> Result<(), LogStoreError> {
        let bytes = encode(what, value)?;
        self.file
            .write_all_at(&bytes, 0)
            .map_err(LogStoreError::io("write", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read::<u64>(dir.path(), VOTE).expect("read"), None);
        write_durable(dir.path(), VOTE, "vote", &42u64).expect("write");
        assert_eq!(read::<u64>(dir.path(), VOTE).expect("read"), Some(42));
        assert!(!dir.path().join(format!("{VOTE}{TMP_SUFFIX}")).exists());

        let path = dir.path().join(VOTE);
        let mut raw = std::fs::read(&path).expect("raw");
        let last = raw.len() - 1;
        raw[last] ^= 0x40;
        std::fs::write(&path, &raw).expect("damage");
        assert!(matches!(
            read::<u64>(dir.path(), VOTE),
            Err(LogStoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn hint_overwrites_in_place_and_damage_reads_as_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(HintFile::read::<Vec<u8>>(dir.path(), COMMITTED), None);
        let h = HintFile::open(dir.path(), COMMITTED).expect("open");
        assert_eq!(HintFile::read::<Vec<u8>>(dir.path(), COMMITTED), None);
        h.write("hint", &vec![1u8; 40]).expect("write long");
        h.write("hint", &vec![2u8; 3]).expect("write short");
        assert_eq!(
            HintFile::read::<Vec<u8>>(dir.path(), COMMITTED),
            Some(vec![2u8; 3])
        );
        std::fs::write(dir.path().join(COMMITTED), b"\x01\x02\x03\x04\x05").expect("damage");
        assert_eq!(HintFile::read::<Vec<u8>>(dir.path(), COMMITTED), None);
    }
}
