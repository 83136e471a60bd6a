//! One mount's life: connect to the cluster, resolve the root, mount with mount(2) so that
//! `/proc/mounts` says `fuse.rawfs`, serve until unmounted, then drain and end the session.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, Session, SessionACL};
use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use rawfs_client::{Client, ClientConfig};
use rawfs_metadata_api::client::ClientTimeouts;
use rawfs_metadata_api::{FileKind, Ino, MetaError, ROOT_INO};
use serde_bytes::ByteBuf;
use tracing::{debug, info, warn};

use crate::busy_poll::BusyPoll;
use crate::fs::RawFs;
use crate::inner::Inner;
use crate::options::{parse_spec, MountOptions, UsageError};

/// The filesystem type in `/proc/mounts` (`fuse.` + the subtype).
const FSTYPE: &str = "fuse.rawfs";
/// Readahead of the mount's bdi (several 1 MiB reads in flight for sequential readers).
const READAHEAD: usize = 4 << 20;
/// How long the final `end_session` may take at unmount.
const END_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a mount could not be made or did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("metadata service at {addrs}: {source}")]
    Cluster { addrs: String, source: MetaError },
    #[error("no answer from the metadata service at {addrs} within {timeout:?}")]
    ClusterTimeout { addrs: String, timeout: Duration },
    #[error("subdirectory /{path}: {source}")]
    Subdir { path: String, source: MetaError },
    #[error("subdirectory /{path} is not a directory")]
    SubdirNotDir { path: String },
    #[error("mount point {path}: {source}")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mount point {0} is not a directory")]
    MountpointNotDir(PathBuf),
    #[error("cannot open /dev/fuse: {0}")]
    DevFuse(nix::Error),
    #[error("mount(2) of {path} failed: {source}{}", if *.source == nix::Error::EPERM { " (mounting needs root)" } else { "" })]
    Mount { path: PathBuf, source: nix::Error },
    #[error("FUSE session: {0}")]
    Session(std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{failed} open file(s) could not be flushed at unmount; their last writes are lost")]
    FlushFailed { failed: usize },
}

/// What the caller of [`run`] wants besides the mount itself.
pub(crate) struct RunHooks<'a> {
    /// Called once the mount is live (the helper's parent is waiting for this).
    pub(crate) ready: Box<dyn FnOnce() + 'a>,
    /// Unmount (lazily) on SIGINT/SIGTERM/SIGHUP. Only for processes that own their signals.
    pub(crate) signals: bool,
}

/// Mounts `spec` at `mountpoint` and serves it in the calling thread until it is unmounted
/// (`umount MNT`), then flushes what is buffered and ends the metadata session.
///
/// Must be called as root (it uses mount(2) directly). It starts its own tokio runtime, so
/// call it from a plain thread, not from inside a runtime.
pub fn run_foreground(
    spec: &str,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<(), MountError> {
    run(
        spec,
        mountpoint,
        opts,
        RunHooks {
            ready: Box::new(|| {}),
            signals: false,
        },
    )
}

pub(crate) fn run(
    spec: &str,
    mountpoint: &Path,
    opts: &MountOptions,
    hooks: RunHooks<'_>,
) -> Result<(), MountError> {
    let parsed = parse_spec(spec)?;
    let mnt = mountpoint
        .canonicalize()
        .map_err(|source| MountError::Mountpoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    let md = std::fs::metadata(&mnt).map_err(|source| MountError::Mountpoint {
        path: mnt.clone(),
        source,
    })?;
    if !md.is_dir() {
        return Err(MountError::MountpointNotDir(mnt));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("rawfs-mount")
        .enable_all()
        .build()
        .map_err(MountError::Runtime)?;
    let meta_rt = MetaRuntime::start()?;
    let timeouts = ClientTimeouts {
        call: ClientTimeouts::default().call.min(opts.op_timeout),
        op: opts.op_timeout,
    };
    let addrs = parsed.metadata.join(",");
    let client = {
        let _guard = rt.enter();
        Client::new(ClientConfig {
            metadata: parsed.metadata.clone(),
            timeouts,
            io_timeout: opts.io_timeout,
            write_buffer: opts.write_buffer,
            consistency: opts.consistency,
        })
    };
    // Connect from the metadata thread, so that the connection's tasks live there.
    let root = {
        let (client, addrs, subdir) = (client.clone(), addrs.clone(), parsed.subdir.clone());
        let timeout = opts.op_timeout;
        let task = meta_rt
            .handle
            .spawn(async move { connect(&client, &addrs, &subdir, timeout).await });
        rt.block_on(task)
            .map_err(|e| MountError::Runtime(std::io::Error::other(e)))??
    };

    let session = loop {
        let s: u64 = rand::random();
        if s != 0 {
            break s;
        }
    };
    let mut inner = Inner::new(
        client.clone(),
        session,
        root,
        opts.attr_timeout,
        opts.entry_timeout,
    );
    // A read-only mount makes no directories; `nodelegate` asks for none.
    inner.delegate = opts.delegate && !opts.read_only;
    inner.local_lock = opts.local_lock;
    let inner = Arc::new(inner);
    inner.start_releaser(&meta_rt.handle);
    inner.start_recalls(&meta_rt.handle);
    inner.start_reopener(&meta_rt.handle);
    inner.start_lock_renewer(&meta_rt.handle);
    inner.watch_foreign_writes();

    // Catch signals from before the mount exists, so none can kill us between mount(2) and
    // serving (which would leave a dead mount behind); they are acted on once mounted.
    let signals = if hooks.signals {
        let _guard = rt.enter();
        Signals::new()
    } else {
        None
    };
    let allow_other = opts.allow_other.unwrap_or(nix::unistd::geteuid().is_root());
    let fd = mount_fuse(spec, &mnt, md.mode(), opts, allow_other)?;
    let busy_poll = BusyPoll::start(&fd, opts.busy_poll);
    let fs = RawFs::new(
        inner.clone(),
        rt.handle().clone(),
        meta_rt.handle.clone(),
        busy_poll,
    );
    let mut config = Config::default();
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(1);
    let fuse = match Session::from_fd(fs, fd, config.acl, config) {
        Ok(s) => s,
        Err(e) => {
            detach(&mnt);
            return Err(MountError::Session(e));
        }
    };
    if let Err(e) = inner
        .coherence
        .start(fuse.notifier(), client.meta().clone(), &meta_rt.handle)
    {
        detach(&mnt);
        return Err(MountError::Runtime(e));
    }
    raise_readahead(&mnt);
    info!(spec, mountpoint = %mnt.display(), session, root, "mounted");
    (hooks.ready)();
    if let Some(signals) = signals {
        rt.spawn(signals.unmount_on_signal(mnt.clone()));
    }

    let served = fuse.run();
    if let Err(e) = &served {
        warn!(error = %e, "FUSE session ended with an error; detaching the mount");
        detach(&mnt);
    }
    // Unmounted: finish the requests still in flight, send what is buffered, and drop the
    // session's opens (frees files unlinked while open).
    let failed = rt.block_on(async {
        inner.tasks.close();
        inner.tasks.wait().await;
        inner.give_back_all().await;
        let failed = inner.flush_all().await;
        match tokio::time::timeout(END_SESSION_TIMEOUT, client.meta().end_session(session)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "end_session failed; this session's opens stay recorded")
            }
            Err(_) => warn!("end_session timed out; this session's opens stay recorded"),
        }
        failed
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    meta_rt.stop();
    info!(mountpoint = %mnt.display(), "unmounted");
    served.map_err(MountError::Session)?;
    if failed > 0 {
        return Err(MountError::FlushFailed { failed });
    }
    Ok(())
}

/// A one-thread runtime for the metadata operations (lookup, getattr, create, ...).
///
/// A metadata operation is a chain of short steps: the request task, the RPC connection's
/// task, the socket, the reply. On one thread each hand-off is a task switch; spread over a
/// multi-threaded runtime each is a wake-up of another CPU, which on a virtual machine costs
/// tens of microseconds (measured ~40 µs here) — more than the work itself. Bulk data keeps
/// the multi-threaded runtime, where parallel replica writes and checksums need the cores.
struct MetaRuntime {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl MetaRuntime {
    fn start() -> Result<MetaRuntime, MountError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(MountError::Runtime)?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("rawfs-meta".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .map_err(MountError::Runtime)?;
        Ok(MetaRuntime {
            handle,
            stop,
            thread,
        })
    }

    /// Stops the runtime (its tasks are dropped) and waits for its thread.
    fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            warn!("the metadata runtime thread panicked");
        }
    }
}

/// Checks (within `timeout`) that the cluster answers, and resolves the mounted subdirectory.
async fn connect(
    client: &Client,
    addrs: &str,
    subdir: &[String],
    timeout: Duration,
) -> Result<Ino, MountError> {
    let meta = client.meta();
    let cluster = |source| MountError::Cluster {
        addrs: addrs.to_string(),
        source,
    };
    let timed_out = || MountError::ClusterTimeout {
        addrs: addrs.to_string(),
        timeout,
    };
    let stat = tokio::time::timeout(timeout, meta.statfs())
        .await
        .map_err(|_| timed_out())?
        .map_err(cluster)?;
    info!(
        addrs,
        total = stat.total_bytes,
        free = stat.free_bytes,
        "cluster reachable"
    );
    let mut ino = ROOT_INO;
    for (i, part) in subdir.iter().enumerate() {
        let path = subdir[..=i].join("/");
        let a = tokio::time::timeout(
            timeout,
            meta.lookup(ino, ByteBuf::from(part.as_bytes().to_vec())),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(|source| MountError::Subdir {
            path: path.clone(),
            source,
        })?;
        if a.kind != FileKind::Dir {
            return Err(MountError::SubdirNotDir { path });
        }
        ino = a.ino;
    }
    Ok(ino)
}

/// Opens `/dev/fuse` and mounts it at `mnt` with type `fuse.rawfs`. fuser's own mount
/// passes type `fuse` and drops the subtype, so we do the mount(2) call ourselves and give
/// fuser the descriptor.
fn mount_fuse(
    spec: &str,
    mnt: &Path,
    mnt_mode: u32,
    opts: &MountOptions,
    allow_other: bool,
) -> Result<OwnedFd, MountError> {
    let raw = nix::fcntl::open("/dev/fuse", OFlag::O_RDWR | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(MountError::DevFuse)?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut data = format!(
        "fd={raw},rootmode={:o},user_id={},group_id={},default_permissions",
        mnt_mode & libc::S_IFMT,
        nix::unistd::getuid(),
        nix::unistd::getgid(),
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = MsFlags::empty();
    for (on, flag) in [
        (opts.read_only, MsFlags::MS_RDONLY),
        (opts.nosuid, MsFlags::MS_NOSUID),
        (opts.nodev, MsFlags::MS_NODEV),
        (opts.noexec, MsFlags::MS_NOEXEC),
        (opts.noatime, MsFlags::MS_NOATIME),
    ] {
        if on {
            flags |= flag;
        }
    }
    // A spec with a NUL cannot be a source; parse_spec would have refused it anyway.
    let source = CString::new(spec.as_bytes())
        .map_err(|_| MountError::Usage(UsageError::Usage("the mount spec contains a NUL byte")))?;
    nix::mount::mount(
        Some(source.as_c_str()),
        mnt.as_os_str().as_bytes(),
        Some(FSTYPE),
        flags,
        Some(data.as_str()),
    )
    .map_err(|source| MountError::Mount {
        path: mnt.to_path_buf(),
        source,
    })?;
    Ok(fd)
}

/// The `major:minor` of the FUSE mount at `mnt`, from `/proc/self/mountinfo` (not from
/// `stat`, which would call into the not yet running session).
fn mount_dev(mnt: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    dev_in_mountinfo(&info, mnt.to_str()?)
}

/// Finds the newest `fuse.rawfs` mount on `mnt` in mountinfo text (fields: id parent
/// major:minor root mountpoint ... - fstype source options; mount points escape space, tab,
/// newline and backslash as octal). The newest mount on a point is listed last.
fn dev_in_mountinfo(info: &str, mnt: &str) -> Option<String> {
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let fstype = f
            .iter()
            .position(|x| *x == "-")
            .and_then(|i| f.get(i + 1))?;
        let point = f
            .get(4)?
            .replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\");
        if point != mnt || *fstype != FSTYPE {
            return None;
        }
        f.get(2).map(|d| d.to_string())
    })
}

/// The kernel offers FUSE only its default readahead (128 KiB) at INIT; sequential reads
/// go much faster with more, which only the mount's bdi setting can give.
fn raise_readahead(mnt: &Path) {
    let Some(dev) = mount_dev(mnt) else {
        debug!(mountpoint = %mnt.display(), "mount not found in mountinfo; readahead unchanged");
        return;
    };
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    let kb = (READAHEAD >> 10).to_string();
    if let Err(e) = std::fs::write(&path, kb) {
        debug!(path, error = %e, "cannot raise readahead");
    }
}

/// Lazily unmounts `mnt`: gone from the namespace now, the session ends when the last
/// open file on it is closed.
fn detach(mnt: &Path) {
    if let Err(e) = nix::mount::umount2(mnt, MntFlags::MNT_DETACH) {
        if e != nix::Error::EINVAL {
            warn!(mountpoint = %mnt.display(), error = %e, "unmount failed");
        }
    }
}

/// SIGINT, SIGTERM and SIGHUP, caught from creation on.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Needs a runtime context. `None` (logged) if the handlers cannot be installed.
    fn new() -> Option<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(int), Ok(term), Ok(hup)) => Some(Signals { int, term, hup }),
            _ => {
                warn!("cannot install signal handlers; unmount with umount(8)");
                None
            }
        }
    }

    /// Ends the mount on the first signal the way `umount -l` would: the session loop
    /// then sees the device close and the normal shutdown runs.
    async fn unmount_on_signal(mut self, mnt: PathBuf) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
            _ = self.hup.recv() => {}
        }
        info!(mountpoint = %mnt.display(), "signal received, unmounting");
        detach(&mnt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_newest_rawfs_mount_in_mountinfo() {
        let info = "\
22 1 0:21 / /proc rw - proc proc rw
90 22 0:50 / /mnt/a\\040b rw,relatime - fuse.rawfs h:1:/ rw,user_id=0
91 22 0:51 / /mnt/x rw - fuse.other h:1 rw
92 90 0:52 / /mnt/a\\040b rw,relatime - fuse.rawfs h:1:/ rw,user_id=0
";
        assert_eq!(dev_in_mountinfo(info, "/mnt/a b"), Some("0:52".into()));
        assert_eq!(dev_in_mountinfo(info, "/mnt/x"), None);
        assert_eq!(dev_in_mountinfo(info, "/mnt/none"), None);
    }
}
