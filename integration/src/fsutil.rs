//! Small syscall wrappers and helpers for filesystem tests.

use anyhow::{bail, Context, Result};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

/// The errno of a failed call (panics if it succeeded: the test expected an error).
#[track_caller]
pub fn errno<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("not an OS error: {e}")),
    }
}

/// Path as a C string.
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths in tests have no NUL")
}

/// `utimensat(2)` of `p` (following symlinks): `times` are atime, then mtime.
pub fn utimensat(p: &Path, times: [libc::timespec; 2]) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: a valid C path and two timespecs.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// renameat2(2) with `flags` (`libc::RENAME_NOREPLACE`, `libc::RENAME_EXCHANGE`).
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths; AT_FDCWD.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
}

/// setxattr(2).
pub fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (cp, cn) = (cpath(p), CString::new(name).expect("name"));
    // SAFETY: valid pointers and lengths.
    check(unsafe {
        libc::setxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// getxattr(2) into a fresh buffer.
pub fn getxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), CString::new(name).expect("name"));
    let mut buf = vec![0u8; 65536];
    // SAFETY: buffer of the given length.
    let n = check_size(unsafe {
        libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// listxattr(2), split into names.
pub fn listxattr(p: &Path) -> io::Result<Vec<String>> {
    let cp = cpath(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: buffer of the given length.
    let n =
        check_size(unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// removexattr(2).
pub fn removexattr(p: &Path, name: &str) -> io::Result<()> {
    let (cp, cn) = (cpath(p), CString::new(name).expect("name"));
    // SAFETY: valid NUL-terminated strings.
    check(unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) })
}

/// mknod(2).
pub fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let cp = cpath(p);
    // SAFETY: valid path.
    check(unsafe { libc::mknod(cp.as_ptr(), mode, dev) })
}

/// fallocate(2) on an open file.
pub fn fallocate(f: &std::fs::File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fd is open for the duration of the call.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) })
}

/// copy_file_range(2) of `len` bytes; returns bytes copied.
pub fn copy_file_range(
    src: &std::fs::File,
    off_in: u64,
    dst: &std::fs::File,
    off_out: u64,
    len: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let mut i = off_in as i64;
    let mut o = off_out as i64;
    // SAFETY: fds open; offsets are valid pointers to locals.
    check_size(unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut i, dst.as_raw_fd(), &mut o, len, 0)
    })
}

/// Drops the kernel's cached pages of an open file, so the next read goes to the filesystem.
pub fn drop_cache(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fd is open; advice only.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Runs `sh -c script` as the unprivileged user `nobody` (uid/gid 65534) in `cwd`.
pub fn sh_as_nobody(cwd: &Path, script: &str) -> Result<Output> {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .uid(65534)
        .gid(65534)
        .output()
        .context("cannot run sh as nobody")
}

/// Runs a shell command (as the test's user) and fails with its output if it fails.
pub fn sh(cwd: &Path, script: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .output()?;
    if !out.status.success() {
        bail!(
            "`{script}` failed with {}:\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// In a forked child, tries to take a POSIX write lock on `path` bytes `start..start+len`
/// without waiting. Returns the child's errno (0 = it got the lock).
///
/// fcntl locks never conflict within one process, so a conflict needs another process. The
/// child only calls async-signal-safe functions (open, fcntl, _exit): the parent has threads.
pub fn fcntl_lock_in_child(path: &Path, start: i64, len: i64) -> Result<i32> {
    let cp = cpath(path);
    // SAFETY: fork in a multithreaded process; the child runs only async-signal-safe calls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: child side; every call is async-signal-safe and ends in _exit.
        unsafe {
            let fd = libc::open(cp.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                libc::_exit(100);
            }
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = libc::F_WRLCK as i16;
            fl.l_whence = libc::SEEK_SET as i16;
            fl.l_start = start;
            fl.l_len = len;
            if libc::fcntl(fd, libc::F_SETLK, &fl) == 0 {
                libc::_exit(0);
            }
            libc::_exit(*libc::__errno_location() & 0x7f);
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        bail!("waitpid: {}", io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) {
        bail!("lock child died abnormally ({status})");
    }
    match libc::WEXITSTATUS(status) {
        100 => bail!("lock child could not open {}", path.display()),
        code => Ok(code),
    }
}

/// Sets a POSIX lock on an open file in this process (`F_SETLK`).
pub fn fcntl_lock(f: &std::fs::File, kind: i32, start: i64, len: i64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: zeroed flock is a valid value; fd is open.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: valid fd and pointer.
    check(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl) })
}

/// flock(2) on an open file.
pub fn flock(f: &std::fs::File, op: i32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: valid fd.
    check(unsafe { libc::flock(f.as_raw_fd(), op) })
}

/// `fs::write`, but with the result of `close(2)` (dropping a `File` ignores it), where a
/// filesystem reports what it could not write.
pub fn write_and_close(p: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::fd::IntoRawFd;
    let mut f = std::fs::File::create(p)?;
    f.write_all(data)?;
    // SAFETY: closes the descriptor `into_raw_fd` just gave up.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Deterministic pseudo-random bytes (splitmix64), so large files need no reference copy.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut word = offset / 8;
    let skip = (offset % 8) as usize;
    while out.len() < len + skip {
        let mut z = seed ^ word.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
        word += 1;
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

/// The test seed: `$RAWFS_SEED` or a fresh one; printed so a failure can be reproduced.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("RAWFS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: seed {s} (reproduce with RAWFS_SEED={s})");
    s
}

/// FNV-1a 64 of a file's content, for cheap before/after comparisons.
pub fn file_hash(p: &Path) -> Result<(u64, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| p.display().to_string())?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut len = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((h, len));
        }
        len += n as u64;
        for b in &buf[..n] {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Compares the file at `path` with `pattern(seed, ..)` 4 MiB at a time, after dropping its
/// cached pages (so the bytes come from the cluster, not the page cache).
pub fn verify_pattern(path: &Path, seed: u64, len: usize) -> Result<()> {
    use std::io::Read;
    const PIECE: usize = 4 << 20;
    let mut f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    drop_cache(&f);
    let size = f.metadata()?.len();
    if size != len as u64 {
        bail!("{}: size {size}, expected {len}", path.display());
    }
    let mut buf = vec![0u8; PIECE];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(PIECE);
        f.read_exact(&mut buf[..n])?;
        if buf[..n] != pattern(seed, off as u64, n)[..] {
            bail!("{}: content differs in the piece at {off}", path.display());
        }
        off += n;
    }
    Ok(())
}

/// Writes `pattern(seed, ..)` of `len` bytes to `path` (created or truncated) 4 MiB at a
/// time, then fsyncs it.
pub fn write_pattern(path: &Path, seed: u64, len: usize) -> Result<()> {
    use std::io::Write;
    const PIECE: usize = 4 << 20;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| path.display().to_string())?;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(PIECE);
        f.write_all(&pattern(seed, off as u64, n))?;
        off += n;
    }
    f.sync_all()?;
    Ok(())
}

/// Chunk files of at least `min_len` bytes under every chunkserver's directory of the
/// cluster directory `dir`, with the id of the chunkserver holding each (copies being
/// cloned, `*.clone`, left out).
pub fn chunk_files(dir: &Path, min_len: u64) -> Result<Vec<(u64, std::path::PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_prefix("chunkserver-")
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        let mut stack = vec![e.path()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                let md = e.metadata()?;
                let path = e.path();
                let text = path.to_string_lossy();
                if md.is_dir() {
                    stack.push(path);
                } else if md.is_file()
                    && md.len() >= min_len
                    && text.contains("/chunks/")
                    && !text.ends_with(".clone")
                {
                    out.push((id, path));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_consistent_at_any_offset() {
        let whole = pattern(7, 0, 100);
        assert_eq!(pattern(7, 13, 50), whole[13..63]);
        assert_ne!(pattern(8, 0, 100), whole);
    }
}
