//! The metadata service's tarpc interface.

// `create` and `rename` take six arguments plus the tarpc context and the request id; the
// generated client and server functions follow the wire shape.
#![allow(clippy::too_many_arguments)]

use crate::error::MetaError;
use crate::events::WatchReply;
use crate::healer::{HealerReport, HealerSettings, RateChange};
use crate::locks::*;
use crate::types::*;
use serde_bytes::ByteBuf;

/// Result of a metadata call.
pub type MetaResult<T> = Result<T, MetaError>;

/// The metadata service. Mutations go through the replicated log on the leader; a follower
/// answers them with [`MetaError::NotLeader`].
///
/// Every mutation takes a [`ReqId`] last: a repeat of an id the service remembers gets the
/// first reply back without being applied again (see [`ReqId`]). Namespace and chunk reads
/// take a [`Consistency`] last: `Linearizable` is answered by the leader only, `Local` by any
/// replica from its applied state (see [`Consistency`] for the staleness that implies).
#[tarpc::service]
pub trait MetadataRpc {
    // ---- namespace -------------------------------------------------------------------------
    /// Finds `name` in directory `parent`.
    async fn lookup(parent: Ino, name: Name, read: Consistency) -> MetaResult<Attr>;
    async fn getattr(ino: Ino, read: Consistency) -> MetaResult<Attr>;
    /// Changes attributes; a size change truncates or extends the file (releasing whole chunks).
    async fn setattr(ino: Ino, set: SetAttr, req: ReqId) -> MetaResult<Attr>;
    /// Creates a file, directory, fifo, socket or device node. In a setgid directory the new
    /// node takes the directory's group (and a new directory keeps the setgid bit).
    /// Returns the new (or, if not exclusive, existing) inode's attributes.
    async fn mknod(
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        req: ReqId,
    ) -> MetaResult<Attr>;
    /// `mknod` and `open` by `session` in one step: the new (or, if not exclusive, existing)
    /// inode is protected from unlinks by other clients from the moment it exists.
    async fn create(
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        session: u64,
        req: ReqId,
    ) -> MetaResult<Attr>;
    async fn symlink(
        parent: Ino,
        name: Name,
        target: ByteBuf,
        caller: Caller,
        req: ReqId,
    ) -> MetaResult<Attr>;
    async fn readlink(ino: Ino, read: Consistency) -> MetaResult<ByteBuf>;
    /// Adds a hard link `newparent/newname` to `ino`.
    async fn link(ino: Ino, newparent: Ino, newname: Name, req: ReqId) -> MetaResult<Attr>;
    /// Removes a non-directory entry. An inode whose last link goes while it is open stays
    /// (orphaned) until its last `release`.
    async fn unlink(parent: Ino, name: Name, req: ReqId) -> MetaResult<()>;
    async fn rmdir(parent: Ino, name: Name, req: ReqId) -> MetaResult<()>;
    /// `rmdir` by the mount session `holder` that holds `parent`'s delegation (see
    /// `mkdir_held`): `parent` is not recalled from `holder`, which keeps answering for
    /// it. The removed directory's own delegation is recalled as for `rmdir`, whoever
    /// holds it.
    async fn rmdir_held(parent: Ino, name: Name, holder: u64, req: ReqId) -> MetaResult<()>;
    async fn rename(
        parent: Ino,
        name: Name,
        newparent: Ino,
        newname: Name,
        flags: RenameFlags,
        req: ReqId,
    ) -> MetaResult<()>;
    /// Lists up to `limit` entries after `cookie` (0 = from the start), without `.` and `..`.
    async fn readdir(
        ino: Ino,
        cookie: u64,
        limit: u32,
        read: Consistency,
    ) -> MetaResult<Vec<DirEntry>>;
    /// `readdir` (linearizable) of `dir` for the mount session `holder` that holds its
    /// delegation (see `mkdir_held`): not recalled, since the holder committed its queue
    /// before asking and goes on answering for the directory. A delegation of another
    /// session is recalled as for `readdir`. Leader only.
    async fn readdir_held(
        dir: Ino,
        holder: u64,
        cookie: u64,
        limit: u32,
    ) -> MetaResult<Vec<DirEntry>>;
    /// `mknod` of a directory whose creates are then delegated to mount session `holder`:
    /// until the delegation is given back, `holder` alone changes its entries, with
    /// `commit_held`, and answers lookups in it from what it knows (the directory starts
    /// empty). Any other client's operation on the directory (a lookup or listing of it, a
    /// change in it, a change of it) first recalls the delegation: the leader publishes
    /// [`Inval::Recall`](crate::Inval::Recall), waits for the holder to commit and give it
    /// back, and takes it back itself if the holder stays silent.
    async fn mkdir_held(
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        holder: u64,
        req: ReqId,
    ) -> MetaResult<Attr>;
    /// Reserves `count` inode numbers for creates a mount makes on its own (in a delegated
    /// directory); returns the first. Unused numbers are never reused.
    async fn reserve_inodes(count: u32, req: ReqId) -> MetaResult<Ino>;
    /// Commits, in order, the changes `holder` made in delegated directory `dir` (exclusive
    /// creates of empty regular files, opened by `holder` if `open` says so; unlinks and
    /// renames of its files), and with `give_back` ends the delegation. All or nothing:
    /// fails with `NotPermitted` if `dir` is no longer delegated to `holder` (the leader
    /// took it back), or with the error of the first change that cannot apply.
    async fn commit_held(
        dir: Ino,
        holder: u64,
        ops: Vec<HeldOp>,
        give_back: bool,
        req: ReqId,
    ) -> MetaResult<()>;
    /// `commit_held` (without giving the directory back), then chunk 0 of each of `files`
    /// (at most [`MAX_HELD_ALLOCATIONS`] new files the changes create), in one log entry:
    /// new files' first flushes need both. One answer per file, in order; `None`: the
    /// changes are committed but that chunk was not allocated (no servers, or a cold
    /// directory's RS 4+2 layout): ask `allocate_chunk`.
    async fn commit_held_allocating(
        dir: Ino,
        holder: u64,
        ops: Vec<HeldOp>,
        files: Vec<Ino>,
        req: ReqId,
    ) -> MetaResult<Vec<Option<ChunkLoc>>>;
    /// Records that `session` has `ino` open (keeps an unlinked inode alive).
    async fn open(ino: Ino, session: u64) -> MetaResult<Attr>;
    /// Like `open`, for a reader: the leader keeps the open in memory and logs it only
    /// when a link of the inode may be removed, so it costs no log entry. Returns the
    /// attributes, the leader's epoch (as `watch` reports it) and the first chunks'
    /// locations: the caller must send its leased opens again (`reopen`) to each leader of
    /// another epoch, and those who cannot within 5 s of that leader's election may lose
    /// the protection of an unlinked file. Writers use `open` (the erasure coder relies on
    /// their opens being logged).
    async fn open_leased(ino: Ino, session: u64) -> MetaResult<LeasedOpen>;
    /// Records again, at the current leader, the opens `session` took with `open_leased`,
    /// each given with the epoch it was taken in (one per inode); those of this epoch, of
    /// inodes that are gone, and those the leader already logged are skipped. Returns the
    /// leader's epoch.
    async fn reopen(opens: Vec<(Ino, u64)>, session: u64) -> MetaResult<u64>;
    /// Gives back opens `session` took with `open_leased` (one of each of `inos`).
    async fn release_leased(inos: Vec<Ino>, session: u64) -> MetaResult<()>;
    /// Drops one open of `ino` by `session`; frees an orphaned inode on its last release.
    async fn release(ino: Ino, session: u64) -> MetaResult<()>;
    /// `release` of each of `inos` by `session`, in one log entry (a mount gives back the
    /// opens of many closed files at once).
    async fn release_many(inos: Vec<Ino>, session: u64) -> MetaResult<()>;
    /// Drops every open held by `session` (on unmount).
    async fn end_session(session: u64) -> MetaResult<()>;
    /// Filesystem totals. Capacity is the leader's soft state (from heartbeats): with
    /// `Local` the leader answers without confirming its leadership, and a follower
    /// redirects to it.
    async fn statfs(read: Consistency) -> MetaResult<StatFs>;
    /// Returns once every change acknowledged so far is on the leader's disk: the power-loss
    /// barrier behind `fsync` (changes survive a process crash as soon as they are acknowledged).
    async fn sync() -> MetaResult<()>;
    /// Cache invalidation events of the leader's `epoch` from sequence number `from` on,
    /// waiting up to `wait_ms` for one. A client that starts (or sees another epoch, or
    /// `lost`) must drop what it caches and continue from `next`. The call acknowledges,
    /// for client `watcher` (its `ReqId::client`), that the events before `from` are applied:
    /// changes by other clients wait for that (briefly) before they are answered. Leader only.
    async fn watch(watcher: u64, epoch: u64, from: u64, wait_ms: u32) -> MetaResult<WatchReply>;

    // ---- byte-range locks ------------------------------------------------------------------
    /// Takes, changes or drops (`LockKind::Unlock`) a lock of `session`'s owner `lock.owner`
    /// on `ino`, as `fcntl(F_SETLK)` does: the owner's locks in the range are replaced, and
    /// its adjacent locks of the same kind merge. `None` when done; otherwise the
    /// conflicting lock of another owner, once it has stood for up to `wait_ms` (at most
    /// [`LOCK_WAIT_MAX_MS`]) of waiting at the leader. Locks are in the log, so they survive
    /// a failover; the leader drops a session's locks when it has not heard from it for
    /// [`LOCK_LEASE_MS`] (see `renew_locks`), and at `end_session`. Idempotent: a retry
    /// finds the lock already taken or dropped. Leader only.
    async fn set_lock(
        ino: Ino,
        session: u64,
        lock: LockRequest,
        wait_ms: u32,
    ) -> MetaResult<Option<LockConflict>>;
    /// The first lock of another owner that would conflict with `lock` (`F_GETLK`).
    async fn test_lock(
        ino: Ino,
        session: u64,
        lock: LockRequest,
    ) -> MetaResult<Option<LockConflict>>;
    /// Keeps `session`'s locks for another [`LOCK_LEASE_MS`]; returns the inodes whose
    /// locks the leader has delegated to `session` (a delegation the session thinks it has
    /// and that is not listed was lost: its locks were dropped). Leader only.
    async fn renew_locks(session: u64) -> MetaResult<Vec<Ino>>;
    /// Asks for the locks of `ino` to be delegated to `session`: its mount then decides every
    /// lock request on `ino` itself, with no call, until the leader recalls them
    /// ([`Inval::RecallLocks`](crate::Inval::RecallLocks), published when another session
    /// asks for or tests a lock on `ino`) and the mount gives them back with
    /// `return_locks`. Granted (with the session's locks on `ino` so far) only when no
    /// other session holds a lock on `ino` and none asked for one lately; `None` otherwise.
    /// The delegation is in the log, so a failover keeps it; it ends with the session's
    /// lease like its locks. Idempotent. Leader only.
    async fn delegate_locks(ino: Ino, session: u64) -> MetaResult<Option<LockDelegation>>;
    /// Ends `session`'s delegation of `ino`'s locks: `locks` (all the session's, with its
    /// session id) replace what the leader had for `session` on `ino`; `None` keeps that
    /// (a mount giving back a delegation whose grant it never heard of). `NotPermitted` if
    /// the delegation is not `session`'s any more (its lease ran out: its locks were
    /// dropped). Leader only.
    async fn return_locks(
        ino: Ino,
        session: u64,
        locks: Option<Vec<HeldLock>>,
        req: ReqId,
    ) -> MetaResult<()>;

    // ---- extended attributes ----------------------------------------------------------------
    async fn setxattr(
        ino: Ino,
        name: Name,
        value: ByteBuf,
        mode: XattrMode,
        req: ReqId,
    ) -> MetaResult<()>;
    async fn getxattr(ino: Ino, name: Name, read: Consistency) -> MetaResult<ByteBuf>;
    async fn listxattr(ino: Ino, read: Consistency) -> MetaResult<Vec<Name>>;
    async fn removexattr(ino: Ino, name: Name, req: ReqId) -> MetaResult<()>;

    // ---- chunk map ----------------------------------------------------------------------------
    /// The existing chunks of `ino` with index in `first..first + count` (holes are absent).
    async fn chunks(
        ino: Ino,
        first: u64,
        count: u64,
        read: Consistency,
    ) -> MetaResult<Vec<ChunkLoc>>;
    /// The chunk at `index`, placed on 3 distinct live chunkservers if it does not exist yet.
    async fn allocate_chunk(ino: Ino, index: u64, req: ReqId) -> MetaResult<ChunkLoc>;
    /// Records a completed data write: the size grows to at least `end`, mtime and ctime are
    /// set, and `stored_delta` bytes are added to the stored total. Returns the new attributes.
    async fn commit_write(ino: Ino, end: u64, stored_delta: i64, req: ReqId) -> MetaResult<Attr>;
    /// Releases the chunks of `ino` with index in `first..first + count` (punch hole).
    async fn release_chunks(ino: Ino, first: u64, count: u64, req: ReqId) -> MetaResult<()>;
    /// Removes `server` from the replicas of `chunk` (it failed a write or a checksum),
    /// bumping the version if `expected_version` is current. Returns the new location.
    /// `chunk` may also be a shard's id: the shard is then marked lost (its `replica`
    /// becomes `None`) without a version bump, for the healer to rebuild.
    async fn drop_replica(
        chunk: ChunkId,
        expected_version: u64,
        server: ServerId,
        req: ReqId,
    ) -> MetaResult<ChunkLoc>;

    // ---- snapshots and copy-on-write ---------------------------------------------------------
    /// Makes `parent/name` a new regular file that shares every chunk of `origin` (instant:
    /// chunks are reference counted and copied on write). With `read_only` the new file is a
    /// snapshot (mode 0444; its data, size and chunks cannot change); otherwise a writable
    /// clone. `label` (may be empty) is kept as the xattr `trusted.rawfs.origin`. Every
    /// chunk of `origin` gets a new version, which the caller must push to the replicas
    /// (chunkserver FENCE) so that writers holding older locations are refused.
    async fn snapshot(
        origin: Ino,
        parent: Ino,
        name: Name,
        read_only: bool,
        label: ByteBuf,
        req: ReqId,
    ) -> MetaResult<Attr>;
    /// The private copy of chunk `index` of `ino` for writing, when `chunk` (the caller's
    /// current chunk there) is shared. Not shared: the current location, no source. While a
    /// copy is pending, every caller gets the same new chunk and source (idempotent);
    /// `NotPermitted` for a read-only snapshot.
    async fn cow_chunk(ino: Ino, index: u64, chunk: ChunkId, req: ReqId) -> MetaResult<CowLoc>;
    /// Ends the copy into `chunk` (from `cow_chunk`): `failed` replicas could not copy and are
    /// dropped (version bump), and the reference to the source is released.
    async fn cow_done(
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        failed: Vec<ServerId>,
        req: ReqId,
    ) -> MetaResult<ChunkLoc>;

    // ---- storage classes and erasure coding ----------------------------------------------------
    /// Sets the storage class of a file or directory (new children of a directory inherit
    /// it). Also reachable as the xattr [`CLASS_XATTR`].
    async fn set_class(ino: Ino, class: StorageClass, req: ReqId) -> MetaResult<Attr>;
    /// The storage class of a file or directory.
    async fn get_class(ino: Ino, read: Consistency) -> MetaResult<StorageClass>;
    /// Chunks whose layout disagrees with their file's class, in `(ino, index)` order from
    /// `after` (exclusive) on: replicated chunks due for RS 4+2 (every chunk of `cold` files,
    /// and of `auto` files unchanged (mtime) for `quiet_ms`), and erasure-coded chunks of
    /// `hot` files (`to_replicas`).
    /// Shared chunks (snapshots) and chunks being copied are skipped; a chunk still marked
    /// converting is listed (its converter died or lost the lease: a new `ec_prepare`
    /// replaces the plan).
    async fn cold_chunks(
        after: (Ino, u64),
        quiet_ms: u64,
        limit: u32,
        read: Consistency,
    ) -> MetaResult<ColdPage>;
    /// Starts converting chunk `index` of `ino` (replicated, currently `chunk` at `version`)
    /// to RS 4+2: bumps the version, reserves 6 shard ids on 6 distinct live chunkservers
    /// (reserved shards are not garbage collected until the conversion ends), and marks the
    /// chunk converting, which `chunks` reports as `shared`: a writer then calls
    /// `cow_chunk`, which cancels the conversion and bumps the version again. `StaleVersion`
    /// if the chunk moved, `NoSpace` with fewer than 6 live chunkservers.
    async fn ec_prepare(
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        req: ReqId,
    ) -> MetaResult<EcPlan>;
    /// Commits the conversion started by `ec_prepare` once every shard is written, synced
    /// and verified at `version` (the plan's): the chunk becomes erasure coded with logical
    /// `length`, and its replicas are queued for deletion. In one transaction, fenced by the
    /// leader term of the plan (`StaleTerm`) and the version (`StaleVersion`, also when a
    /// writer cancelled the conversion). A conversion that never commits leaves the
    /// replicated chunk authoritative and its shards garbage.
    async fn ec_commit(
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        length: u64,
        term: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc>;

    // ---- healer -------------------------------------------------------------------------------
    /// Chunks with id above `after` missing redundancy: replicated chunks with fewer live
    /// copies than wanted, and erasure-coded chunks with fewer than 6 shards on live servers
    /// (with their shards in [`EndangeredChunk::ec`]; a shard marked lost counts as
    /// missing). At most `limit` (capped) per page, with every chunkserver's liveness.
    /// Leader only (liveness is the leader's soft state).
    async fn endangered_chunks(after: ChunkId, limit: u32) -> MetaResult<EndangeredPage>;
    /// Commits a new copy of `chunk` on `server`, written at `version` in leader term
    /// `term`. Refused with `StaleVersion` if the chunk's version moved meanwhile, `Exists`
    /// if `server` already holds it, `StaleTerm` if the log entry is of another term. The
    /// version is bumped (every listed replica must then be fenced at the new one, so that
    /// writers holding the old location refresh and write to the new copy too).
    async fn add_replica(
        chunk: ChunkId,
        version: u64,
        server: ServerId,
        term: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc>;
    /// Commits a rebuilt shard of the erasure-coded `chunk`: shard `shard` (its id, kept)
    /// is now on `server`, written there at `version` in leader term `term`. No version
    /// bump (an erasure-coded chunk is never written in place). Refused with `StaleTerm` if
    /// the log entry is of another term, `StaleVersion` if the chunk's version moved or it
    /// is no longer erasure coded with that shard (a writer turned it back to replicas, or
    /// it was converted again), `Exists` if `server` holds another shard of the chunk
    /// (shards must be on distinct servers). A pending deletion of the shard on `server` is
    /// cancelled, and the shard's previous copy (if its server was still listed) is queued
    /// for deletion. Returns the chunk's location.
    async fn replace_shard(
        chunk: ChunkId,
        version: u64,
        shard: ChunkId,
        server: ServerId,
        term: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc>;
    /// Grants or renews the healer lease to `holder` for `ttl_ms` (capped), or refuses with
    /// `LeaseHeld` while another holder has it. Soft state on the leader: a new leader
    /// grants nothing until the longest lease has had time to lapse since it took office.
    async fn healer_lease(holder: u64, ttl_ms: u64) -> MetaResult<HealerLease>;

    // ---- cluster ------------------------------------------------------------------------------
    /// A chunkserver's heartbeat; the reply carries the leader's term and orders.
    async fn heartbeat(hb: Heartbeat) -> MetaResult<HeartbeatReply>;
    /// The cluster's state (leader only). Each member's entry in `replicas` comes from a
    /// `replica_status` call with a short deadline, made in parallel; a member that does
    /// not answer in time is reported with `up: false`.
    async fn status() -> MetaResult<ClusterStatus>;

    // ---- replicas -----------------------------------------------------------------------------
    /// The answering replica's own view (any replica, never redirects).
    async fn replica_status() -> MetaResult<ReplicaStatus>;
    /// A hash of the answering replica's whole state at its applied index (any replica,
    /// never redirects): replicas at the same index must agree.
    async fn digest() -> MetaResult<StateDigest>;
    /// Adds replica `id` (client address `addr`, replication address `raft_addr`) to the
    /// group: as a learner until it has caught up, then as a voter. Leader only;
    /// idempotent. It may take as long as the new replica needs to catch up, so call it
    /// with a generous deadline. The new replica must run with `bootstrap` off.
    async fn add_peer(id: u64, addr: String, raft_addr: String) -> MetaResult<()>;
    /// Removes replica `id` (voter or learner) from the group. Leader only; removing the
    /// leader itself is allowed (it steps down once the change commits); the last voter
    /// cannot be removed.
    async fn remove_peer(id: u64) -> MetaResult<()>;
    /// Starts (`draining`) or stops draining chunkserver `server`: it takes no new chunks,
    /// the healer moves its copies and shards to other servers, and the leader then drops
    /// them from it. `NotFound` for a server never registered.
    async fn drain_chunkserver(server: ServerId, draining: bool, req: ReqId) -> MetaResult<()>;
    /// Changes the run-time repair and scrub limits (replicated); returns them as they are
    /// now.
    async fn set_healer_settings(
        repair_rate: RateChange,
        scrub_rate: RateChange,
        req: ReqId,
    ) -> MetaResult<HealerSettings>;
    /// A healer's progress report (any healer, active or standby; kept by the leader for
    /// `status`); returns the limits it must apply.
    async fn healer_report(holder: u64, report: HealerReport) -> MetaResult<HealerSettings>;
    /// Commits an append to the erasure-coded chunk `index` of `ino` (a `cold` file written
    /// as RS 4+2 directly): the client wrote and synced shard bytes for the chunk's logical
    /// bytes `from..to` at `version`, to exactly `shards` (shard id and server, by shard
    /// number). The length
    /// becomes `to` and the version is bumped, so a shard rebuild that read the old length
    /// cannot commit. `StaleVersion` if the chunk moved (another chunk, version or length,
    /// another shard list, a shard lost, a copy pending), `Invalid` if it is shared with a
    /// snapshot or clone, `NotPermitted` for a read-only snapshot: the writer then copies the
    /// chunk to replicas and writes there.
    #[allow(clippy::too_many_arguments)]
    async fn ec_extend(
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        shards: Vec<(ChunkId, ServerId)>,
        from: u64,
        to: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc>;
    /// Grants or renews to `holder` (an NBD server) the right to write volume `ino` for
    /// `ttl_ms` (capped at 10 s); returns the granted milliseconds. `LeaseHeld` while another
    /// holder has it. Soft state on the leader: for its first 10 s in office a leader grants
    /// only renewals (`renew`: the holder's lease from an earlier leader is still running by
    /// its own clock), so a lease never has two holders across a failover. `ttl_ms` 0 only
    /// asks: the answer a claim would get, with nothing taken.
    async fn volume_lease(ino: Ino, holder: u64, ttl_ms: u64, renew: bool) -> MetaResult<u64>;
    /// Gives the writer lease of volume `ino` back, if `holder` has it.
    async fn end_volume_lease(ino: Ino, holder: u64) -> MetaResult<()>;
}
