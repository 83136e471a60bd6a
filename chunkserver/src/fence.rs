//! The term fence: the highest metadata term this chunkserver has seen, kept on disk.
//!
//! A write carrying a lower term comes from a client of a deposed metadata leader and is
//! refused. The term only grows; each increase is written to `data_dir/term` atomically (write
//! a temporary file, fsync, rename, fsync the directory) *before* it is acted upon, so a
//! restart never forgets a fence.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const FILE_NAME: &str = "term";
const TMP_NAME: &str = "term.tmp";

/// Why the fence file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("cannot read term file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("term file {path} does not hold a term: {content:?}")]
    Malformed { path: PathBuf, content: String },
}

/// The persisted highest term.
pub struct TermFence {
    dir: PathBuf,
    current: AtomicU64,
    /// Serializes writers of the file; readers use `current`.
    write: Mutex<()>,
}

impl TermFence {
    /// Loads the fence from `dir` (a missing file means term 0).
    pub fn load(dir: &Path) -> Result<TermFence, FenceError> {
        let path = dir.join(FILE_NAME);
        let term = match fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().map_err(|_| FenceError::Malformed {
                path: path.clone(),
                content: s.chars().take(64).collect(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(FenceError::Io { path, source }),
        };
        Ok(TermFence {
            dir: dir.to_path_buf(),
            current: AtomicU64::new(term),
            write: Mutex::new(()),
        })
    }

    /// The highest term seen.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    /// Raises the fence to `term` if it is higher, persisting it first. Returns the fence after
    /// the call. Blocking: call from a blocking context.
    pub fn advance(&self, term: u64) -> io::Result<u64> {
        if term <= self.current() {
            return Ok(self.current());
        }
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current();
        if term <= current {
            return Ok(current);
        }
        self.persist(term)?;
        self.current.store(term, Ordering::Release);
        tracing::info!(term, "term fence raised");
        Ok(term)
    }

    fn persist(&self, term: u64) -> io::Result<()> {
        let tmp = self.dir.join(TMP_NAME);
        let mut f = File::create(&tmp)?;
        writeln!(f, "{term}")?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join(FILE_NAME))?;
        File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_only_grows_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let f = TermFence::load(dir.path()).unwrap();
        assert_eq!(f.current(), 0);
        assert_eq!(f.advance(5).unwrap(), 5);
        assert_eq!(f.advance(3).unwrap(), 5);
        drop(f);
        let f = TermFence::load(dir.path()).unwrap();
        assert_eq!(f.current(), 5);
    }

    #[test]
    fn malformed_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), "garbage").unwrap();
        assert!(matches!(
            TermFence::load(dir.path()),
            Err(FenceError::Malformed { .. })
        ));
    }
}
