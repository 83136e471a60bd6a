//! The metadata service's tarpc interface.

use crate::error::MetaError;
use crate::types::*;
use serde_bytes::ByteBuf;

/// Result of a metadata call.
pub type MetaResult<T> = Result<T, MetaError>;

/// The metadata service. Mutations go through the replicated log on the leader; a follower
/// answers them with [`MetaError::NotLeader`].
#[tarpc::service]
pub trait MetadataRpc {
    // ---- namespace -------------------------------------------------------------------------
    /// Finds `name` in directory `parent`.
    async fn lookup(parent: Ino, name: Name) -> MetaResult<Attr>;
    async fn getattr(ino: Ino) -> MetaResult<Attr>;
    /// Changes attributes; a size change truncates or extends the file (releasing whole chunks).
    async fn setattr(ino: Ino, set: SetAttr) -> MetaResult<Attr>;
    /// Creates a file, directory, fifo, socket or device node. In a setgid directory the new
    /// node takes the directory's group (and a new directory keeps the setgid bit).
    /// Returns the new (or, if not exclusive, existing) inode's attributes.
    async fn mknod(parent: Ino, name: Name, node: NewNode, caller: Caller) -> MetaResult<Attr>;
    /// `mknod` and `open` by `session` in one step: the new (or, if not exclusive, existing)
    /// inode is protected from unlinks by other clients from the moment it exists.
    async fn create(
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        session: u64,
    ) -> MetaResult<Attr>;
    async fn symlink(parent: Ino, name: Name, target: ByteBuf, caller: Caller) -> MetaResult<Attr>;
    async fn readlink(ino: Ino) -> MetaResult<ByteBuf>;
    /// Adds a hard link `newparent/newname` to `ino`.
    async fn link(ino: Ino, newparent: Ino, newname: Name) -> MetaResult<Attr>;
    /// Removes a non-directory entry. An inode whose last link goes while it is open stays
    /// (orphaned) until its last `release`.
    async fn unlink(parent: Ino, name: Name) -> MetaResult<()>;
    async fn rmdir(parent: Ino, name: Name) -> MetaResult<()>;
    async fn rename(
        parent: Ino,
        name: Name,
        newparent: Ino,
        newname: Name,
        flags: RenameFlags,
    ) -> MetaResult<()>;
    /// Lists up to `limit` entries after `cookie` (0 = from the start), without `.` and `..`.
    async fn readdir(ino: Ino, cookie: u64, limit: u32) -> MetaResult<Vec<DirEntry>>;
    /// Records that `session` has `ino` open (keeps an unlinked inode alive).
    async fn open(ino: Ino, session: u64) -> MetaResult<Attr>;
    /// Drops one open of `ino` by `session`; frees an orphaned inode on its last release.
    async fn release(ino: Ino, session: u64) -> MetaResult<()>;
    /// Drops every open held by `session` (on unmount).
    async fn end_session(session: u64) -> MetaResult<()>;
    async fn statfs() -> MetaResult<StatFs>;
    /// Returns once every change acknowledged so far is on the leader's disk: the power-loss
    /// barrier behind `fsync` (changes survive a process crash as soon as they are acknowledged).
    async fn sync() -> MetaResult<()>;

    // ---- extended attributes ----------------------------------------------------------------
    async fn setxattr(ino: Ino, name: Name, value: ByteBuf, mode: XattrMode) -> MetaResult<()>;
    async fn getxattr(ino: Ino, name: Name) -> MetaResult<ByteBuf>;
    async fn listxattr(ino: Ino) -> MetaResult<Vec<Name>>;
    async fn removexattr(ino: Ino, name: Name) -> MetaResult<()>;

    // ---- chunk map ----------------------------------------------------------------------------
    /// The existing chunks of `ino` with index in `first..first + count` (holes are absent).
    async fn chunks(ino: Ino, first: u64, count: u64) -> MetaResult<Vec<ChunkLoc>>;
    /// The chunk at `index`, placed on 3 distinct live chunkservers if it does not exist yet.
    async fn allocate_chunk(ino: Ino, index: u64) -> MetaResult<ChunkLoc>;
    /// Records a completed data write: the size grows to at least `end`, mtime and ctime are
    /// set, and `stored_delta` bytes are added to the stored total. Returns the new attributes.
    async fn commit_write(ino: Ino, end: u64, stored_delta: i64) -> MetaResult<Attr>;
    /// Releases the chunks of `ino` with index in `first..first + count` (punch hole).
    async fn release_chunks(ino: Ino, first: u64, count: u64) -> MetaResult<()>;
    /// Removes `server` from the replicas of `chunk` (it failed a write or a checksum),
    /// bumping the version if `expected_version` is current. Returns the new location.
    async fn drop_replica(
        chunk: ChunkId,
        expected_version: u64,
        server: ServerId,
    ) -> MetaResult<ChunkLoc>;

    // ---- cluster ------------------------------------------------------------------------------
    /// A chunkserver's heartbeat; the reply carries the leader's term and orders.
    async fn heartbeat(hb: Heartbeat) -> MetaResult<HeartbeatReply>;
    async fn status() -> MetaResult<ClusterStatus>;
}
