//! `rawfs class set|get PATH`: the storage class of a file or directory, through the mount.
//!
//! ```text
//!  rawfs class get PATH        ─▶ getxattr(PATH, "rawfs.class") ─▶ FUSE ─▶ metadata: "hot"
//!  rawfs class set PATH cold   ─▶ setxattr(PATH, "rawfs.class", "cold") ─▶ FUSE ─▶ set_class
//! ```
//!
//! The class is a virtual xattr ([`CLASS_XATTR`]) that the metadata service answers itself,
//! so the command needs no cluster address: PATH names the file, and the mount it lives on
//! names the cluster. Elsewhere the kernel refuses the name (no filesystem but FUSE accepts an
//! xattr outside the `user.`/`trusted.`/`security.`/`system.` namespaces), which is how a
//! PATH off a rawfs mount is recognised.

use rawfs_metadata_api::{StorageClass, CLASS_XATTR};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `rawfs class`: set or show a storage class.
#[derive(clap::Args, Debug)]
pub struct ClassCmd {
    #[command(subcommand)]
    pub verb: ClassVerb,
}

/// The verbs of `rawfs class`.
#[derive(clap::Subcommand, Debug)]
pub enum ClassVerb {
    /// Set the storage class of a file or directory on a rawfs mount (new children of a
    /// directory inherit it; existing files keep theirs unless --recursive).
    Set {
        /// A file or directory on a rawfs mount.
        path: PathBuf,
        /// The class.
        #[arg(value_enum)]
        class: ClassName,
        /// Also every file and directory below PATH (symbolic links are not followed): the
        /// healer then converts their data to the new class.
        #[arg(long, short = 'r')]
        recursive: bool,
    },
    /// Print the storage class of a file or directory on a rawfs mount.
    Get {
        /// A file or directory on a rawfs mount.
        path: PathBuf,
    },
}

/// A storage class as the command line spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClassName {
    /// Three replicas, always.
    Hot,
    /// RS 4+2 (1.5x the file's bytes) as soon as the data is written or the healer gets to it.
    Cold,
    /// Replicas, converted to RS 4+2 once the file has been quiet for the healers'
    /// --cold-after (the default class).
    Auto,
}

impl From<ClassName> for StorageClass {
    fn from(c: ClassName) -> StorageClass {
        match c {
            ClassName::Hot => StorageClass::Hot,
            ClassName::Cold => StorageClass::Cold,
            ClassName::Auto => StorageClass::Auto,
        }
    }
}

/// Why a class could not be set or read.
#[derive(Debug, thiserror::Error)]
pub enum ClassError {
    #[error("{0} is not on a rawfs mount")]
    NotRawfs(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: the path contains a NUL byte")]
    Nul(PathBuf),
    #[error("{path}: the filesystem answered {value:?}, not a storage class")]
    Unknown { path: PathBuf, value: String },
}

/// `rawfs class`.
pub fn run(cmd: ClassCmd) -> ExitCode {
    let res = match cmd.verb {
        ClassVerb::Set {
            path,
            class,
            recursive: false,
        } => set_class(&path, class.into()),
        ClassVerb::Set {
            path,
            class,
            recursive: true,
        } => set_class_tree(&path, class.into()).map(|n| {
            println!(
                "{n} files and directories set to {}",
                StorageClass::from(class)
            )
        }),
        ClassVerb::Get { path } => get_class(&path).map(|c| println!("{c}")),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rawfs class: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets the storage class of `path` and of everything below it (not following symbolic
/// links, which have no class). Returns how many files and directories were set.
pub fn set_class_tree(path: &Path, class: StorageClass) -> Result<u64, ClassError> {
    let io = |e: std::io::Error| ClassError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    let mut n = 0;
    if meta.is_dir() || meta.is_file() {
        set_class(path, class)?;
        n += 1;
    }
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(io)? {
            n += set_class_tree(&entry.map_err(io)?.path(), class)?;
        }
    }
    Ok(n)
}

/// Sets the storage class of `path`.
pub fn set_class(path: &Path, class: StorageClass) -> Result<(), ClassError> {
    let p = c_path(path)?;
    let name = xattr_name();
    let value = class.as_str().as_bytes();
    // SAFETY: both strings are NUL terminated and outlive the call; `value` is read for
    // exactly its length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(os_error(path, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Reads the storage class of `path`.
pub fn get_class(path: &Path) -> Result<StorageClass, ClassError> {
    let p = c_path(path)?;
    let name = xattr_name();
    let mut buf = vec![0u8; 64];
    loop {
        // SAFETY: `buf` is writable for `buf.len()` bytes; the strings are NUL terminated.
        let n = unsafe {
            libc::getxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let e = std::io::Error::last_os_error();
        // A value larger than any class name: not ours, but read it whole to say what it is.
        if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < 1 << 16 {
            buf.resize(buf.len() * 16, 0);
            continue;
        }
        return Err(os_error(path, e));
    }
    let value = String::from_utf8_lossy(&buf).into_owned();
    value.parse().map_err(|_| ClassError::Unknown {
        path: path.to_path_buf(),
        value,
    })
}

fn xattr_name() -> CString {
    // The constant has no NUL byte; an empty name would only make the call fail.
    CString::new(CLASS_XATTR).unwrap_or_default()
}

fn c_path(path: &Path) -> Result<CString, ClassError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ClassError::Nul(path.to_path_buf()))
}

/// Maps an xattr call's error: the errnos other filesystems give for a name they do not know
/// mean PATH is not on a rawfs mount; the rest (no such file, permission) are passed on.
fn os_error(path: &Path, e: std::io::Error) -> ClassError {
    if e.raw_os_error().is_some_and(means_not_rawfs) {
        ClassError::NotRawfs(path.to_path_buf())
    } else {
        ClassError::Io {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// ENOTSUP: no handler for the name (every local filesystem); ENODATA: another FUSE
/// filesystem that has no such attribute (rawfs always has it).
fn means_not_rawfs(errno: i32) -> bool {
    errno == libc::ENOTSUP || errno == libc::EOPNOTSUPP || errno == libc::ENODATA
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_file_is_not_on_a_rawfs_mount() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("f");
        std::fs::write(&f, b"x").expect("write");
        match get_class(&f) {
            Err(ClassError::NotRawfs(p)) => assert_eq!(p, f),
            other => panic!("expected NotRawfs, got {other:?}"),
        }
        match set_class(d.path(), StorageClass::Cold) {
            Err(ClassError::NotRawfs(p)) => assert_eq!(p, d.path()),
            other => panic!("expected NotRawfs, got {other:?}"),
        }
        let msg = ClassError::NotRawfs(f.clone()).to_string();
        assert_eq!(msg, format!("{} is not on a rawfs mount", f.display()));
    }

    #[test]
    fn a_missing_path_says_so() {
        let d = tempfile::tempdir().expect("tempdir");
        match get_class(&d.path().join("missing")) {
            Err(ClassError::Io { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn cli_names_map_to_the_wire_classes() {
        for (n, c) in [
            (ClassName::Hot, StorageClass::Hot),
            (ClassName::Cold, StorageClass::Cold),
            (ClassName::Auto, StorageClass::Auto),
        ] {
            let wire: StorageClass = n.into();
            assert_eq!(wire, c);
            let name = clap::ValueEnum::to_possible_value(&n).expect("visible");
            assert_eq!(
                name.get_name(),
                c.as_str(),
                "the CLI spells it as the xattr does"
            );
        }
    }
}
