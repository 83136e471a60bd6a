//! `mount.rawfs`: the mount(8) helper (`mount -t rawfs SPEC MNT -o OPTS` runs it).
//!
//! ```text
//!  mount(8) -> mount.rawfs SPEC MNT [-o OPTS] [-f]
//!     -> rawfs_mount::mount_helper_main: fork (before any thread), mount /dev/fuse,
//!        parent exits 0 once the mount is live, the child serves FUSE
//! ```
//!
//! Deliberately nothing else happens here: no runtime and no threads may exist before the
//! helper forks, and tracing is set up by the helper itself (it knows where its log goes).

use std::process::ExitCode;

fn main() -> ExitCode {
    let code = rawfs_mount::mount_helper_main(std::env::args_os().skip(1).collect());
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
