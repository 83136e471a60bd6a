//! rawfs-mount: the FUSE filesystem of rawfs and the `mount.rawfs` helper.
//!
//! Each kernel request is decoded by fuser's session loop; the callback copies its
//! arguments, moves the reply into a task and returns, so the loop never waits on the
//! network. Metadata operations run on a one-thread runtime (each hand-off between tasks
//! stays on one CPU; waking another CPU costs more than the work on a virtual machine), data
//! operations on a multi-threaded one. Namespace calls go to the metadata service; file data
//! goes through one shared [`rawfs_client::FileIo`] per open inode (write buffer, replicas,
//! verified reads), which is also what `getattr` asks for the size of a file with buffered
//! writes, so `O_APPEND` from several processes lands at the right offset.
//!
//! ```text
//!  kernel ──/dev/fuse──► fuser loop ──spawn──► task: Inner::op(..).await ──reply──► kernel
//!                                                 │                  │
//!                                       MetadataClient (tarpc)   FileIo per open inode
//!                                                 ▼                  ▼
//!                                          metadata leader     chunkservers (3 replicas)
//! ```
//!
//! Kernel setup: 1 MiB `max_write`, up to 4 MiB readahead, async reads, READDIRPLUS (auto),
//! parallel directory operations, `default_permissions` (the kernel checks permissions,
//! including sticky directories) and `allow_other` when mounted by root. The mount drops
//! setuid, setgid and file capabilities on write, truncate and chown itself
//! (`FUSE_HANDLE_KILLPRIV_V2`, see `privs`), which spares the kernel's getxattr before
//! every write. Attributes and
//! names are cached for 30 s (`attr_timeout=`, `entry_timeout=`) and kept coherent between
//! mounts by the leader's invalidation events (see `coherence`): a change made elsewhere is
//! taken back before that change is acknowledged. A file's pages stay cached across opens
//! while its version (size, mtime, ctime) is unchanged (`page_cache`), so a file read again
//! is read from memory. Another client's change of a file open here also drops what the
//! mount read ahead of it, and the next `getattr` takes its new size, larger or smaller. `fcntl` and `flock` locks are held at the metadata leader and
//! exclude processes on every mount (`locks`); the locks of a file only this mount locks
//! are delegated to it, and decided here until another mount asks.
//!
//! Directories this mount makes are delegated to it (`held`; `-o nodelegate` turns it
//! off): it answers lookups, creates and stats of new empty files in them, and unlinks and
//! renames of its files there, on the FUSE thread and commits them in order in batches, so
//! such an operation costs FUSE round trips only; the
//! leader recalls the directory before any other client looks into it or changes it. A new
//! file of up to 1 MiB there is written behind its close (`write_behind`): the recall waits
//! for those flushes, and `fsync` returns their errors.
//!
//! Deliberate gaps:
//! - No writeback cache yet: with it the kernel owns mtime and size and merges writes from
//!   all handles into page-cache writeback, which needs care with `O_APPEND`, truncate and
//!   close-to-open semantics across mounts. Writes are write-through to the `FileIo`
//!   buffer, which batches them anyway.
//! - Locks (`fcntl` and `flock`) are the cluster's (`locks`): `flock` is a whole-file
//!   byte-range lock of the open file, so it conflicts with other processes' `fcntl`
//!   locks (as on NFS), and waiters' deadlocks are not detected (no `EDEADLK`).
//! - `fallocate` mode 0 extends the size but reserves no space (chunks are placed when
//!   first written); `FALLOC_FL_ZERO_RANGE` punches (thin storage keeps zeros as holes);
//!   collapse and insert ranges are refused. `SEEK_DATA`/`SEEK_HOLE` see written blocks
//!   while no handle here may write the file, else the plain answer (the whole file is data).
//! - ACLs are not supported (`system.*` xattrs are refused), and xattrs cannot be set in
//!   namespaces Linux does not know (EOPNOTSUPP, as on local filesystems). One inode holds
//!   at most 64 KiB of names (what `listxattr(2)` can return) and 1 MiB of names and
//!   values; past that a set fails with ENOSPC.
//! - Whether a writer may keep a file's setgid bit (no group-execute) is judged by its
//!   primary group and root: a writer that is in the file's group only through a
//!   supplementary group loses it, where Linux would keep it.
//! - A file open here learns the growth that other clients' writes made whenever its
//!   attributes are asked for, and before a truncate or an extension (from the leader only:
//!   not with `consistency=local`); a shrink by another client is not taken while it is
//!   open here (the size this mount knows stays until the last close).
//! - A directory removed while open here keeps answering `fstat` (no links, its attributes
//!   when opened); the metadata service keeps no open of a directory, which would cost a
//!   log entry per `opendir`.
//! - Open files are registered with the metadata service (so that an unlinked open file
//!   lives until its last close), one registration per inode per mount. `create` makes the
//!   file and registers the open in one replicated command; the release after the last
//!   close runs in the background (it only ends that protection) and is batched with other
//!   releases for 10 ms, so a create-write-close costs about one replicated write (in a
//!   held directory the open is recorded with the batched create if the file is still
//!   open then). A read-only open is leased: the leader keeps it in memory (no log entry)
//!   and the mount sends it again to each new leader (see `opens`). A reader that cannot
//!   reach a new leader within 5 s of its election may lose the protection of a file that
//!   another client unlinks meanwhile (its reads of it then fail).
//!
//! Installing the helper makes `mount -t rawfs` and fstab work (mount(8) runs
//! `/sbin/mount.rawfs SPEC MNT -o OPTIONS`):
//!
//! ```text
//! install -m 755 target/release/mount.rawfs /sbin/mount.rawfs
//! mount -t rawfs 127.0.0.1:7000:/ /mnt/rawfs
//! # /etc/fstab
//! 127.0.0.1:7000:/  /mnt/rawfs  rawfs  _netdev,defaults  0  0
//! ```
//!
//! `umount /mnt/rawfs` ends the daemon: it finishes the requests in flight, flushes what is
//! buffered, ends its metadata session and exits 0.
//!
//! Entry points: [`mount_helper_main`] (the helper: fork, detach, report), and
//! [`run_foreground`] (mount and serve in the calling thread, for tests and embedding).

mod attr;
mod busy_poll;
mod coherence;
mod errno;
mod fs;
mod held;
mod held_attrs;
mod held_leader;
mod helper;
mod inner;
mod locks;
mod opens;
mod ops_dir;
mod ops_file;
mod ops_inode;
mod ops_xattr;
mod options;
mod page_cache;
mod privs;
mod reply;
mod session;
mod write_behind;

pub use helper::mount_helper_main;
pub use options::{
    parse_helper_args, parse_spec, HelperArgs, LocalLock, MountOptions, MountSpec, UsageError,
    USAGE,
};
pub use session::{run_foreground, MountError};
