//! The mount(8) helper: `mount.rawfs SPEC MNT [-o OPTIONS] [-f]`.
//!
//! mount(8) waits for the helper and reports its exit status, so the helper forks first
//! (before any thread or runtime exists: a forked child only keeps the calling thread), the
//! child becomes the daemon and reports over a pipe once the mount is live, and the parent
//! exits 0 only then, or 1 with the child's reason.
//!
//! ```text
//!  parent ── fork ──► child: setsid, stdio → /dev/null (or log=PATH), connect, mount(2)
//!    │                  │
//!    └◄── pipe: "ok" ───┘ (or the error text)          child serves until `umount MNT`
//! ```

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::unistd::{fork, ForkResult};

use crate::options::{parse_helper_args, HelperArgs, MountOptions, UsageError, USAGE};
use crate::session::{run, RunHooks};

/// What the child writes to the pipe when the mount is live.
const READY: &[u8] = b"ok";

/// Entry point of `mount.rawfs` (and of `rawfs mount`). `args` are the arguments after the
/// program name; a leading program name ending in `mount.rawfs` is skipped as well.
/// Returns the process exit status: 0 once the mount is live (in the foreground with `-f`:
/// once it has been unmounted cleanly), 1 on any failure, with the reason on stderr.
///
/// Call it before creating any thread or async runtime: without `-f` it forks.
pub fn mount_helper_main(mut args: Vec<OsString>) -> i32 {
    if args
        .first()
        .is_some_and(|a| a.to_string_lossy().ends_with("mount.rawfs"))
    {
        args.remove(0);
    }
    let parsed = match parse_helper_args(&args) {
        Ok(p) => p,
        Err(UsageError::Usage(USAGE)) => {
            eprintln!("{USAGE}");
            return 1;
        }
        Err(e) => {
            eprintln!("mount.rawfs: {e}\n{USAGE}");
            return 1;
        }
    };
    if parsed.foreground {
        return foreground(&parsed);
    }
    daemonize(parsed)
}

fn foreground(a: &HelperArgs) -> i32 {
    if let Some(log) = &a.options.log {
        if let Err(e) = redirect_stderr(log) {
            eprintln!("mount.rawfs: log file {}: {e}", log.display());
            return 1;
        }
    }
    init_logging(&a.options);
    let hooks = RunHooks {
        ready: Box::new(|| {}),
        signals: true,
    };
    match run(&a.spec, &a.mountpoint, &a.options, hooks) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mount.rawfs: {e}");
            1
        }
    }
}

fn daemonize(a: HelperArgs) -> i32 {
    // Resolve paths now: the daemon changes directory to `/`.
    let mountpoint = match a.mountpoint.canonicalize() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mount.rawfs: mount point {}: {e}", a.mountpoint.display());
            return 1;
        }
    };
    let log = match &a.options.log {
        Some(p) => match OpenOptions::new().create(true).append(true).open(p) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("mount.rawfs: log file {}: {e}", p.display());
                return 1;
            }
        },
        None => None,
    };
    let (rx, tx) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mount.rawfs: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: no other thread exists yet (this function is documented to run before any
    // thread or runtime is created), so the child may keep running arbitrary code.
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("mount.rawfs: fork: {e}");
            1
        }
        Ok(ForkResult::Parent { child }) => {
            drop(tx);
            let mut msg = Vec::new();
            let read = File::from(rx).read_to_end(&mut msg);
            if read.is_ok() && msg == READY {
                return 0;
            }
            let reason = if msg.is_empty() {
                // The child died without a word; reap it so its status can be told.
                match nix::sys::wait::waitpid(child, None) {
                    Ok(status) => {
                        format!("mount daemon exited before the mount was ready ({status:?})")
                    }
                    Err(e) => format!("mount daemon exited before the mount was ready ({e})"),
                }
            } else {
                String::from_utf8_lossy(&msg).into_owned()
            };
            eprintln!("mount.rawfs: {reason}");
            1
        }
        Ok(ForkResult::Child) => {
            drop(rx);
            let mut tx = Some(File::from(tx));
            if let Err(e) = detach_stdio(log) {
                report(&mut tx, &format!("cannot detach from the terminal: {e}"));
                return 1;
            }
            init_logging(&a.options);
            let hooks = RunHooks {
                ready: Box::new(|| report(&mut tx, "")),
                signals: true,
            };
            let result = run(&a.spec, &mountpoint, &a.options, hooks);
            match result {
                Ok(()) => 0,
                Err(e) => {
                    tracing::error!(error = %e, "mount failed");
                    report(&mut tx, &e.to_string());
                    1
                }
            }
        }
    }
}

/// Tells the waiting parent the outcome (an empty `err` means ready) and closes the pipe.
/// Later calls do nothing: once the parent has an answer, it has exited.
fn report(tx: &mut Option<File>, err: &str) {
    if let Some(mut f) = tx.take() {
        let msg = if err.is_empty() {
            READY
        } else {
            err.as_bytes()
        };
        // If the parent is gone there is nobody left to tell.
        let _ = f.write_all(msg);
    }
}

/// Makes the child a daemon: own session, `/` as working directory, stdin and stdout on
/// `/dev/null`, stderr on the log file if there is one.
fn detach_stdio(log: Option<File>) -> std::io::Result<()> {
    nix::unistd::setsid()?;
    std::env::set_current_dir("/")?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let err_fd = log.as_ref().map_or(null.as_raw_fd(), |f| f.as_raw_fd());
    nix::unistd::dup2(null.as_raw_fd(), 0)?;
    nix::unistd::dup2(null.as_raw_fd(), 1)?;
    nix::unistd::dup2(err_fd, 2)?;
    Ok(())
}

fn redirect_stderr(path: &Path) -> std::io::Result<()> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    nix::unistd::dup2(f.as_raw_fd(), 2)?;
    Ok(())
}

/// Logs to stderr (a log file or /dev/null for a daemon): `info`, or `debug` with `-o debug`;
/// `RUST_LOG` overrides. Keeps a subscriber the embedding binary installed.
fn init_logging(opts: &MountOptions) {
    use tracing_subscriber::EnvFilter;
    // tarpc logs every call at info, fuser every unimplemented request at warn.
    let default = if opts.debug {
        "debug,tarpc=info"
    } else {
        "info,tarpc=warn"
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log file on a full disk must not make the mount panic (see rawfs's main.rs).
        .log_internal_errors(false)
        .with_ansi(false)
        .try_init();
}
