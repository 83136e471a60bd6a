//! The `fuser::Filesystem` implementation: a thin layer that copies each request's arguments,
//! answers at once what needs no waiting, and moves anything else with its reply into a task
//! on the mount's tokio runtime, so the FUSE loop never waits on the network. The work itself is in `ops_*.rs`.

use bytes::Bytes;
use std::ffi::OsStr;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, INodeNo,
    InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::debug;

use crate::busy_poll::BusyPoll;
use crate::inner::{name, Inner};
use crate::locks::KernelLock;
use crate::reply::{respond, Respond};

/// Largest write the kernel sends us (and the size of a FUSE read).
pub(crate) const MAX_WRITE: u32 = 1 << 20;
/// Readahead we ask the kernel for (it may grant less).
const MAX_READAHEAD: u32 = 4 << 20;

/// The filesystem handed to fuser.
pub(crate) struct RawFs {
    inner: Arc<Inner>,
    /// Multi-threaded: data operations (read, write, flush, fsync, ...).
    rt: tokio::runtime::Handle,
    /// One thread: pure metadata operations (see `session::MetaRuntime` for why).
    meta_rt: tokio::runtime::Handle,
    /// Polling for the next request after one is answered here (see `busy_poll.rs`).
    busy_poll: Option<Arc<BusyPoll>>,
}

impl RawFs {
    pub(crate) fn new(
        inner: Arc<Inner>,
        rt: tokio::runtime::Handle,
        meta_rt: tokio::runtime::Handle,
        busy_poll: Option<Arc<BusyPoll>>,
    ) -> Self {
        RawFs {
            inner,
            rt,
            meta_rt,
            busy_poll,
        }
    }

    /// Runs `fut` on `rt` and answers `reply` with its result.
    fn spawn_in<R, F>(&self, rt: &tokio::runtime::Handle, reply: R, fut: F)
    where
        R: Respond,
        F: Future<Output = Result<R::Value, Errno>> + Send + 'static,
    {
        // Polled once here first: an operation that needs no network (a flush with nothing
        // buffered, a write into the buffer, a read the page cache answers) is answered from
        // this thread, saving the wake-up of a runtime thread (tens of microseconds on a
        // virtual machine, more than the work). Anything that would wait becomes a task; its
        // first poll there registers the real waker.
        let mut fut = Box::pin(fut);
        {
            let _runtime = rt.enter();
            let mut cx = Context::from_waker(futures::task::noop_waker_ref());
            if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
                let poll = out.as_ref().map_or(true, R::poll_after);
                respond(reply, out);
                if let (Some(b), true) = (&self.busy_poll, poll) {
                    b.answered();
                }
                return;
            }
        }
        self.spawn_waiting(async move { respond(reply, fut.await) }, rt);
    }

    /// Runs `fut`, which answers a request, as a task on `rt`; no busy-polling meanwhile.
    fn spawn_waiting<F>(&self, fut: F, rt: &tokio::runtime::Handle)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let waiting = self.busy_poll.as_ref().map(BusyPoll::waits);
        self.inner.tasks.spawn_on(
            async move {
                let _waiting = waiting;
                fut.await
            },
            rt,
        );
    }

    /// A data operation: on the multi-threaded runtime.
    fn spawn<R, F>(&self, reply: R, fut: F)
    where
        R: Respond,
        F: Future<Output = Result<R::Value, Errno>> + Send + 'static,
    {
        self.spawn_in(&self.rt, reply, fut);
    }

    /// A metadata operation: on the metadata thread.
    fn spawn_meta<R, F>(&self, reply: R, fut: F)
    where
        R: Respond,
        F: Future<Output = Result<R::Value, Errno>> + Send + 'static,
    {
        self.spawn_in(&self.meta_rt, reply, fut);
    }

    /// A metadata task that answers its reply itself (directory listings fill a buffer).
    fn spawn_raw_meta<F: Future<Output = ()> + Send + 'static>(&self, fut: F) {
        self.spawn_waiting(fut, &self.meta_rt);
    }

    fn ino(&self, ino: INodeNo) -> u64 {
        self.inner.map.meta(ino)
    }
}

/// Asks for a kernel capability, ignoring kernels that lack it.
fn want(config: &mut KernelConfig, flag: InitFlags) {
    if let Err(missing) = config.add_capabilities(flag) {
        debug!(?missing, "kernel lacks a FUSE capability");
    }
}

impl Filesystem for RawFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // 1 MiB writes; the buffer pages of a request follow max(max_write, readahead).
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_READAHEAD) {
            let _ = config.set_max_readahead(nearest);
        }
        // Room for readahead and parallel writes from many processes; every request is a task.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        want(config, InitFlags::FUSE_ASYNC_READ);
        want(config, InitFlags::FUSE_BIG_WRITES);
        want(config, InitFlags::FUSE_MAX_PAGES);
        want(config, InitFlags::FUSE_DO_READDIRPLUS);
        want(config, InitFlags::FUSE_READDIRPLUS_AUTO);
        want(config, InitFlags::FUSE_PARALLEL_DIROPS);
        // O_DIRECT handles bypass the page cache (FOPEN_DIRECT_IO); without this a shared
        // mmap of such a handle fails with ENODEV, where a local filesystem allows it.
        want(config, InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        // The mount drops setuid, setgid and capabilities on write, truncate and chown
        // itself (see `privs`): the kernel then skips a getxattr before every write.
        want(config, InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // Locks are the cluster's, not this kernel's (`locks.rs`), unless `local_lock=`.
        if self.inner.local_lock.cluster_posix() {
            want(config, InitFlags::FUSE_POSIX_LOCKS);
        }
        if self.inner.local_lock.cluster_flock() {
            want(config, InitFlags::FUSE_FLOCK_LOCKS);
        }
        // Not requested: FUSE_WRITEBACK_CACHE (the kernel would then own mtime and size and
        // merge writes across handles; see the crate docs).
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, _nlookup: u64) {
        // No per-lookup state is kept; only drop the small per-inode caches.
        self.inner.forget(self.ino(ino));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn_meta(reply, async move { inner.getattr(ino).await });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        let set = crate::ops_inode::set_attr(mode, uid, gid, size, atime, mtime);
        let caller = Inner::caller(req);
        self.spawn(reply, async move {
            let set = inner.with_privs_dropped(ino, set, caller).await?;
            inner.setattr(ino, set).await
        });
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        let (inner, parent, n) = (self.inner.clone(), self.ino(parent), name(n));
        self.spawn_meta(reply, async move { inner.lookup(parent, n?).await });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn_meta(
            reply,
            async move { inner.readlink(ino).await.map(Bytes::from) },
        );
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (inner, parent, n) = (self.inner.clone(), self.ino(parent), name(n));
        let caller = Inner::caller(req);
        self.spawn_meta(reply, async move {
            inner.mknod(parent, n?, mode, umask, rdev, caller).await
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (inner, parent, n) = (self.inner.clone(), self.ino(parent), name(n));
        let caller = Inner::caller(req);
        let mode = libc::S_IFDIR | (mode & 0o7777);
        self.spawn_meta(reply, async move {
            inner.mknod(parent, n?, mode, umask, 0, caller).await
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let (inner, parent, n) = (self.inner.clone(), self.ino(parent), name(n));
        self.spawn_meta(reply, async move { inner.unlink(parent, n?).await });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let (inner, parent, n) = (self.inner.clone(), self.ino(parent), name(n));
        self.spawn_meta(reply, async move { inner.rmdir(parent, n?).await });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (inner, parent, n) = (self.inner.clone(), self.ino(parent), name(link_name));
        let target = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec();
        let caller = Inner::caller(req);
        self.spawn_meta(reply, async move {
            inner.symlink(parent, n?, target, caller).await
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        n: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let inner = self.inner.clone();
        let (parent, newparent) = (self.ino(parent), self.ino(newparent));
        let (n, newname) = (name(n), name(newname));
        self.spawn_meta(reply, async move {
            inner.rename(parent, n?, newparent, newname?, flags).await
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (inner, ino, newparent) = (self.inner.clone(), self.ino(ino), self.ino(newparent));
        let newname = name(newname);
        self.spawn_meta(
            reply,
            async move { inner.link(ino, newparent, newname?).await },
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn_meta(reply, async move { inner.open(ino, flags).await });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn(reply, async move { inner.read(ino, offset, size).await });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Writes are keyed by inode, not handle: page-cache writeback (mmap) may come with
        // another handle's fh, and all handles of an inode share one buffer anyway.
        let ino = self.ino(ino);
        let (caller, kill_suid) = (
            Inner::caller(req),
            write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID),
        );
        let keeps_privs = self.inner.write_keeps_privs(ino, kill_suid, caller);
        // Most small writes only enter the buffer: answer them here rather than paying a
        // hop to a runtime thread and back (measured: 4 KiB random writes ~1.4x).
        if let Some(io) = self.inner.io_if_open(ino).filter(|_| keeps_privs) {
            // A write after a close written behind waits for that flush (`Inner::write`).
            if !self.inner.write_behind.is_pending(ino) && io.write_if_buffered(offset, data) {
                // FUSE writes are at most max_write (1 MiB) long. No busy-polling after
                // these: a streaming writer's buffer goes out on runtime threads meanwhile,
                // and they need the CPU more than the next write needs a quick pick-up.
                reply.written(data.len() as u32);
                return;
            }
        }
        let (inner, data) = (self.inner.clone(), data.to_vec());
        self.spawn(reply, async move {
            if !keeps_privs {
                inner.drop_privs_for_write(ino, kill_suid, caller).await?;
            }
            inner.write(ino, offset, data).await
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        if inner.nothing_to_flush(ino) && !inner.locks.may_hold(ino, lock_owner.0) {
            // Most closes (every read-only one): no task, no wait.
            reply.ok();
            return;
        }
        self.spawn(reply, async move {
            let flushed = inner.flush(ino).await;
            // A close gives up the closing process's POSIX locks on the file, always.
            let unlocked = inner.unlock_owner(ino, lock_owner.0, None).await;
            flushed.and(unlocked)
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn(reply, async move {
            // The open file's `flock` and OFD locks go with it.
            let unlocked = inner.unlock_handle(ino, fh.0).await;
            inner.close_file(ino).await.and(unlocked)
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        let asked = KernelLock::new(fh.0, lock_owner.0, (start, end), typ, pid);
        self.spawn_meta(reply, async move { inner.getlk(ino, asked).await });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let (inner, ino, tid) = (self.inner.clone(), self.ino(ino), req.pid());
        let asked = KernelLock::new(fh.0, lock_owner.0, (start, end), typ, pid);
        self.spawn(
            reply,
            async move { inner.setlk(ino, asked, sleep, tid).await },
        );
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn(reply, async move { inner.fsync(ino).await });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn_meta(reply, async move { inner.opendir(ino).await });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn_raw_meta(async move { inner.readdir(ino, fh.0, offset, reply).await });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn_raw_meta(async move { inner.readdir(ino, fh.0, offset, reply).await });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Namespace changes survive a crash once acknowledged (creates in a held directory
        // once committed); fsync makes them survive a power loss too.
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn_meta(reply, async move {
            inner.commit_dir(ino).await?;
            inner.sync_metadata().await
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let inner = self.inner.clone();
        self.spawn_meta(reply, async move { inner.statfs().await });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (inner, ino, value) = (self.inner.clone(), self.ino(ino), value.to_vec());
        let n = std::os::unix::ffi::OsStrExt::as_bytes(n).to_vec();
        self.spawn_meta(
            reply,
            async move { inner.setxattr(ino, n, value, flags).await },
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        let n = std::os::unix::ffi::OsStrExt::as_bytes(n).to_vec();
        // Answered on this thread when nothing needs asking (`ls -l` asks every file for
        // security.selinux): a hop to the metadata thread costs more than the answer.
        if inner.surely_no_xattr(ino, &n) {
            reply.error(Errno::NO_XATTR);
            return;
        }
        self.spawn_meta(reply, async move { inner.getxattr(ino, n, size).await });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        if inner.coherence.knows_no_xattrs(ino) {
            match crate::ops_xattr::sized(Vec::new(), size) {
                Ok(empty) => Respond::ok(reply, empty),
                Err(e) => Respond::err(reply, e),
            }
            return;
        }
        self.spawn_meta(reply, async move { inner.listxattr(ino, size).await });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        let n = std::os::unix::ffi::OsStrExt::as_bytes(n).to_vec();
        self.spawn_meta(reply, async move { inner.removexattr(ino, n).await });
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let (inner, ino, caller) = (self.inner.clone(), self.ino(ino), Inner::caller(req));
        self.spawn_meta(reply, async move { inner.access(ino, caller, mask).await });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (inner, parent, n) = (self.inner.clone(), self.ino(parent), name(n));
        let caller = Inner::caller(req);
        self.spawn_meta(reply, async move {
            inner.create(parent, n?, mode, umask, flags, caller).await
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        let caller = Inner::caller(req);
        self.spawn(reply, async move {
            inner.drop_privs_as_modified(ino, caller).await?;
            inner.fallocate(ino, offset, length, mode).await
        });
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let inner = self.inner.clone();
        let (ino_in, ino_out) = (self.ino(ino_in), self.ino(ino_out));
        let caller = Inner::caller(req);
        self.spawn(reply, async move {
            if !flags.is_empty() {
                return Err(Errno::EINVAL);
            }
            inner.drop_privs_as_modified(ino_out, caller).await?;
            inner
                .copy_file_range(ino_in, offset_in, ino_out, offset_out, len)
                .await
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        // The kernel asks only for SEEK_DATA and SEEK_HOLE; it does the others itself.
        let (inner, ino) = (self.inner.clone(), self.ino(ino));
        self.spawn(reply, async move { inner.seek(ino, offset, whence).await });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // isatty() and friends probe every file with TCGETS; no ioctl applies to rawfs files.
        reply.error(Errno::ENOTTY);
    }

    // Not implemented on purpose: getlk/setlk (and flock). The kernel then keeps POSIX and
    // flock locks local to this mount, which is correct for one mount; cluster-wide locks
    // are a later issue.
}
