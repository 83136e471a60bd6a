//! Child processes and mounts for `rawfs up`: spawning with logs, waiting with deadlines,
//! `/proc/self/mountinfo`, unmounting.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// One spawned child with what is needed to report on it.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// Set once the child has been reaped.
    pub exited: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reaps the child if it has exited; returns its status the first time it is seen dead.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exited = Some(st);
                Some(st)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(name = %self.name, error = %e, "cannot query child status");
                None
            }
        }
    }

    pub fn running(&mut self) -> bool {
        self.poll_exit();
        self.exited.is_none()
    }

    /// Sends `sig` unless the child is already gone.
    pub fn signal(&mut self, sig: i32) {
        if self.running() {
            if let Ok(pid) = i32::try_from(self.pid()) {
                // SAFETY: plain kill(2) to our own unreaped child; the pid cannot be reused yet.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }
}

/// Spawns `exe args...` with stdout and stderr appended to `log`.
///
/// The child gets its own process group, so a terminal's Ctrl-C reaches only `rawfs up`, which
/// then stops everything in order (unmount first); and it gets SIGTERM if `rawfs up` dies, so a
/// killed `up` leaves no daemons behind.
pub fn spawn(name: &str, exe: &Path, args: &[String], log: &Path) -> std::io::Result<Proc> {
    let out = OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok(Proc {
        name: name.to_string(),
        child,
        log: log.to_path_buf(),
        exited: None,
    })
}

/// The last `lines` lines of a log file (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(16 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The filesystem type mounted at `path` (exactly that mountpoint), if any.
pub fn mounted_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    let mut found = None;
    for line in info.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superopts
        let mut parts = line.split(' ');
        let mountpoint = parts.nth(4).map(unescape_mountinfo);
        if mountpoint.as_deref() != Some(&*want) {
            continue;
        }
        let rest: Vec<&str> = line.split(' ').collect();
        let fstype = rest
            .iter()
            .position(|p| *p == "-")
            .and_then(|i| rest.get(i + 1))
            .map(|s| s.to_string());
        // Later lines are mounted on top of earlier ones: keep the last.
        found = fstype.or(Some(String::new()));
    }
    found
}

/// Runs a command with a deadline; true if it exited 0.
pub fn run_with_deadline(program: &str, args: &[&str], deadline: Duration) -> bool {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(program, error = %e, "cannot run");
            return false;
        }
    };
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => {
                if !st.success() {
                    let mut msg = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = e.read_to_string(&mut msg);
                    }
                    tracing::warn!(program, ?args, %st, stderr = msg.trim(), "command failed");
                }
                return st.success();
            }
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                tracing::warn!(program, ?args, "command did not finish in time");
                return false;
            }
        }
    }
}

/// Unmounts `mnt`: a normal unmount first (flushes and ends the FUSE session cleanly), then a
/// lazy one if the mount is busy. True when `mnt` is no longer a mountpoint.
pub fn unmount(mnt: &Path) -> bool {
    let m = mnt.to_string_lossy();
    if mounted_fstype(mnt).is_none() {
        return true;
    }
    if run_with_deadline("umount", &[&m], Duration::from_secs(30)) && mounted_fstype(mnt).is_none()
    {
        return true;
    }
    tracing::warn!(mount = %m, "unmount failed; detaching lazily");
    run_with_deadline("umount", &["-l", &m], Duration::from_secs(10));
    mounted_fstype(mnt).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\04"), "/x\\04");
    }

    #[test]
    fn root_is_mounted_and_a_fresh_dir_is_not() {
        assert!(mounted_fstype(Path::new("/")).is_some());
        let d = tempfile::tempdir().expect("tempdir");
        assert!(mounted_fstype(d.path()).is_none());
    }

    #[test]
    fn children_are_spawned_logged_and_reaped() {
        let d = tempfile::tempdir().expect("tempdir");
        let log = d.path().join("x.log");
        let mut p = spawn(
            "echo",
            Path::new("/bin/sh"),
            &["-c".into(), "echo hello; echo bye >&2".into()],
            &log,
        )
        .expect("spawn");
        let end = Instant::now() + Duration::from_secs(10);
        while p.running() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(p.exited.expect("exited").success());
        assert_eq!(log_tail(&log, 1), "bye");
        assert_eq!(log_tail(&log, 5), "hello\nbye");
    }
}
