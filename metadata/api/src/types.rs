//! Plain data types shared by the metadata service and its clients.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// A 64-bit inode number. `ROOT_INO` is the root directory.
pub type Ino = u64;
/// The root directory's inode number (as FUSE expects).
pub const ROOT_INO: Ino = 1;
/// A cluster-wide unique chunk id, never reused.
pub type ChunkId = u64;
/// A chunkserver's id, chosen by its operator and stable across restarts.
pub type ServerId = u64;
/// A file or directory entry name: raw bytes, as POSIX allows (no `/`, no NUL).
pub type Name = ByteBuf;

/// Default chunk size: 64 MiB.
pub const CHUNK_SIZE: u64 = 64 << 20;
/// Longest name accepted in a directory entry, as on Linux.
pub const NAME_MAX: usize = 255;
/// Longest symlink target accepted.
pub const PATH_MAX: usize = 4096;
/// Replicas kept of each hot chunk.
pub const REPLICAS: usize = 3;
/// Most new files whose first chunks one `commit_held_allocating` places.
pub const MAX_HELD_ALLOCATIONS: usize = 256;

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

impl Timespec {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timespec {
            sec: d.as_secs() as i64,
            nsec: d.subsec_nanos(),
        }
    }
}

/// What kind of object an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// What `open_leased` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedOpen {
    pub attr: Attr,
    /// The epoch of the leader that keeps the open (as `watch` reports it).
    pub epoch: u64,
    /// Where the file's first [`OPEN_CHUNKS`] chunks are (a hole is a missing index), so
    /// that a small file is read with no further lookup.
    pub chunks: Vec<ChunkLoc>,
}

/// Chunks whose locations `open_leased` answers with.
pub const OPEN_CHUNKS: u64 = 16;

/// `Attr::stored` after a write of data up to `end` that stored `delta` more bytes, the file
/// being `size` long afterwards. Writers count the blocks the chunkservers say they filled
/// for the first time (growth past the size they knew where a chunkserver does not say);
/// the result is kept between these bounds:
/// - at least one 4 KiB block for a file with data: a file of some size with `st_blocks` 0
///   is taken for "all hole" (GNU tar's `--sparse` archives it empty);
/// - at most the size rounded up to a block: the counts are not exact (blocks a punch freed
///   inside a chunk are not subtracted, two writers filling the same block may both count
///   it), and must never grow without bound.
pub fn stored_after_write(stored: u64, delta: i64, size: u64, end: u64) -> u64 {
    const BLOCK: u64 = 4096;
    let stored = stored.saturating_add_signed(delta);
    let stored = if end == 0 {
        stored
    } else {
        stored.max(size.min(BLOCK))
    };
    stored.min(size.div_ceil(BLOCK).saturating_mul(BLOCK))
}

#[cfg(test)]
mod stored_tests {
    use super::stored_after_write;

    #[test]
    fn stored_bytes_stay_between_one_block_and_the_size() {
        assert_eq!(stored_after_write(0, 10, 10, 10), 10, "what was written");
        assert_eq!(stored_after_write(0, 0, 1 << 20, 1 << 20), 4096);
        assert_eq!(stored_after_write(0, 0, 0, 0), 0, "no data, no blocks");
        assert_eq!(stored_after_write(8192, 4096, 1 << 30, 20), 12_288);
        // Counted twice or never freed: no more than the size.
        assert_eq!(stored_after_write(12_288, 8192, 10_000, 10_000), 12_288);
        assert_eq!(stored_after_write(4096, -8192, 100, 0), 0);
    }
}

/// The attributes of one inode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Length in bytes (for symlinks: the target's length).
    pub size: u64,
    pub rdev: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    /// Bytes actually stored (one replica), for `st_blocks`.
    pub stored: u64,
    /// The inode has no extended attributes: a client may answer `getxattr` and `listxattr`
    /// itself (`ls -l` asks for `security.selinux` of every file it lists). False when it
    /// has some, or when the server has not counted them (inodes made before the count).
    /// Last and defaulted, so older encodings decode.
    #[serde(default)]
    pub no_xattrs: bool,
}

/// One entry returned by `readdir`, with the child's attributes (for READDIRPLUS).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Name,
    pub attr: Attr,
    /// Opaque cookie: pass it back to continue listing after this entry.
    pub cookie: u64,
}

/// How a time attribute is set by `setattr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    /// The server's current time (UTIME_NOW).
    Now,
    At(Timespec),
}

/// Changes requested by `setattr`; `None` leaves a field alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    pub perm: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Truncate or extend; chunks wholly past the new size are released.
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    /// Stamp the change time even if nothing else is set, as Linux does for `chown(2)` to
    /// -1, -1. Last and left out when false, so that servers from before it still decode
    /// every other request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stamp_ctime: bool,
}

/// Who is asking: used for ownership of new inodes and setgid inheritance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// What `mknod` creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewNode {
    pub kind: FileKind,
    /// Permission bits after the umask has been applied.
    pub perm: u32,
    pub rdev: u32,
    /// Fail with `Exists` if the name is taken (always true except for open(O_CREAT) without O_EXCL).
    pub exclusive: bool,
}

/// One create a mount made in a directory delegated to it (see `MetadataRpc::mkdir_held`):
/// an empty regular file, with the inode number from a `reserve_inodes` range and the
/// attributes the mount already gave its kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCreate {
    pub name: Name,
    pub ino: Ino,
    /// Permission bits (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Its birth, change, modification and access time.
    pub time: Timespec,
    /// Record an open of it by the holder's session (the file is still open there).
    pub open: bool,
}

/// One change a mount made on its own in a directory delegated to it, in the order made.
/// Every entry of such a directory is a regular file the holder created or a directory it
/// made through the leader; these changes concern files only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeldOp {
    Create(HeldCreate),
    /// Removes the entry `name` (file `ino`).
    Unlink {
        name: Name,
        ino: Ino,
        time: Timespec,
    },
    /// Renames the entry `from` (file `ino`) to `to`, replacing the file `replaced` that
    /// `to` named, if any.
    Rename {
        from: Name,
        to: Name,
        ino: Ino,
        replaced: Option<Ino>,
        time: Timespec,
    },
    /// `setattr` of file `ino` (one of its entries; never a size) at `time`, which is also
    /// what `TimeSet::Now` means. A file gone meanwhile (unlinked here and closed since)
    /// is skipped. `ino` may also be the directory itself (`tar` sets each directory's
    /// times and mode as it leaves it): later changes in the batch restamp its mtime.
    SetAttr {
        ino: Ino,
        set: SetAttr,
        time: Timespec,
    },
    /// Data of file `ino` is on its replicas up to `end`, with `stored_delta` more bytes
    /// stored: what `commit_write` records, at `time`. Queued by the mount that created the
    /// file in this directory, so that the file's first write costs no log entry of its own
    /// (nobody else sees the file before the queue is committed). Skipped if the file is
    /// gone (unlinked and closed) when it arrives.
    Wrote {
        ino: Ino,
        end: u64,
        stored_delta: i64,
        time: Timespec,
    },
}

/// `rename` flags (Linux renameat2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// `setxattr` mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum XattrMode {
    /// Create or replace.
    Any,
    /// XATTR_CREATE: fail with `Exists` if present.
    Create,
    /// XATTR_REPLACE: fail with `NoAttr` if absent.
    Replace,
}

/// One chunk of a file: its id, version and the chunkservers holding it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkLoc {
    /// Index of the chunk within the file (`offset / CHUNK_SIZE`).
    pub index: u64,
    pub chunk: ChunkId,
    /// Bumped whenever the replica set shrinks, so a dropped replica is recognisably stale.
    pub version: u64,
    /// Live replicas, each with the address of its data port.
    pub replicas: Vec<Replica>,
    /// The metadata leader's term when this location was handed out: the fencing token to
    /// put in `WriteReq::term` (a chunkserver refuses terms older than the newest it saw).
    #[serde(default)]
    pub term: u64,
    /// The chunk must not be written in place: it is shared with a snapshot or a clone, or
    /// the file is a read-only snapshot, or it is being converted to RS 4+2 or is erasure
    /// coded. A writer asks `cow_chunk` for a private (replicated) copy first.
    #[serde(default)]
    pub shared: bool,
    /// `Some` when the chunk is erasure coded (RS 4+2): read its shards, not `replicas`
    /// (which is then empty).
    #[serde(default)]
    pub ec: Option<EcLoc>,
}

/// An erasure-coded chunk: 4 data + 2 parity shards in the layout of the client's
/// `erasure` module (1 MiB cells, 4 MiB stripes). Each shard is stored on one chunkserver as
/// an ordinary chunk file under its own id, at the chunk's version, with the usual per-block
/// crc32c.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcLoc {
    /// Logical bytes of the chunk at conversion; past them the chunk reads as zeros.
    pub length: u64,
    /// Exactly [`EC_SHARDS`], by shard number: 0..4 data, 4 = P, 5 = Q.
    pub shards: Vec<Shard>,
}

/// Shards of an erasure-coded chunk (4 data + 2 parity).
pub const EC_SHARDS: usize = 6;

/// One shard of an erasure-coded chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// The shard's own chunk id on its chunkserver (unique, never reused).
    pub chunk: ChunkId,
    /// Where it is stored; `None` once it is known lost (its server died, or it failed its
    /// checksum) until the healer rebuilds it.
    pub replica: Option<Replica>,
}

/// A conversion of one replicated chunk to RS 4+2, started by `ec_prepare`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EcPlan {
    /// The replicated chunk at its new (bumped) version: fence every replica at
    /// `loc.version` before reading it.
    pub loc: ChunkLoc,
    /// Where to write the 6 shards (fresh ids, 6 distinct live chunkservers), at
    /// `loc.version` and term `loc.term`.
    pub shards: Vec<Shard>,
}

/// Storage class of a file or directory; a new file or directory inherits its parent's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StorageClass {
    /// Replicas only.
    Hot,
    /// Erasure coded (RS 4+2) as soon as written.
    Cold,
    /// Replicas, converted to RS 4+2 once the file has been quiet for `cold_after`.
    #[default]
    Auto,
}

/// The xattr that shows and sets a file's or directory's [`StorageClass`] (not listed by
/// `listxattr`, like CephFS's layout xattrs).
pub const CLASS_XATTR: &str = "rawfs.class";

impl StorageClass {
    /// The name used by the CLI and the xattr: `hot`, `cold` or `auto`.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageClass::Hot => "hot",
            StorageClass::Cold => "cold",
            StorageClass::Auto => "auto",
        }
    }
}

impl std::fmt::Display for StorageClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for StorageClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "hot" => Ok(StorageClass::Hot),
            "cold" => Ok(StorageClass::Cold),
            "auto" => Ok(StorageClass::Auto),
            other => Err(format!(
                "unknown storage class {other:?} (expected hot, cold or auto)"
            )),
        }
    }
}

/// A chunk whose layout disagrees with its file's class, as `cold_chunks` lists it: a
/// replicated chunk due for RS 4+2, or (`to_replicas`) an erasure-coded chunk of a `hot` file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdChunk {
    pub ino: Ino,
    pub index: u64,
    pub chunk: ChunkId,
    pub version: u64,
    /// Bytes of the file within this chunk (at most [`CHUNK_SIZE`]).
    pub length: u64,
    /// The chunk is erasure coded and its file is `hot`: it is due for replicas.
    #[serde(default)]
    pub to_replicas: bool,
}

/// One page of `cold_chunks`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdPage {
    pub chunks: Vec<ColdChunk>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<(Ino, u64)>,
}

/// A chunk copy from a shared chunk that the writer must make on the chunkservers before
/// writing (see `MetadataRpc::cow_chunk`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopySource {
    pub chunk: ChunkId,
    pub version: u64,
}

/// The answer of `cow_chunk`: the chunk to write, and where its content must be copied from
/// first (each replica copies the source's local file) when the copy is not done yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CowLoc {
    pub loc: ChunkLoc,
    /// `Some` while the copy is pending: clone `source` into `loc.chunk` on every replica of
    /// `loc`, then report with `cow_done`.
    pub source: Option<CopySource>,
    /// `Some` while a copy out of an erasure-coded chunk is pending: read this chunk
    /// (decoding its shards), write its bytes to every replica of `loc`, sync, then report
    /// with `cow_done`. `source` is `None` then.
    #[serde(default)]
    pub from_ec: Option<ChunkLoc>,
}

/// One replica of a chunk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub server: ServerId,
    /// `host:port` of the chunkserver's framed data protocol.
    pub data_addr: String,
}

/// Filesystem totals for `statfs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    /// Raw capacity of live chunkservers, in bytes.
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
    /// Replicas per chunk, so that `df` can divide raw space.
    pub replicas: u32,
}

/// A chunkserver's periodic report to the metadata leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub server: ServerId,
    pub data_addr: String,
    pub control_addr: String,
    pub total_bytes: u64,
    pub used_bytes: u64,
    /// False when the chunkserver's disk refuses writes (full, read-only, failing).
    pub healthy: bool,
    /// Every chunk it holds with its version, sent on the first heartbeat and then every few minutes.
    pub inventory: Option<Vec<(ChunkId, u64)>>,
    /// Chunks whose reads failed their checksum since the last heartbeat.
    pub corrupt: Vec<ChunkId>,
    /// The filesystem holding the chunks: the same for every chunkserver on it, different
    /// across filesystems and hosts; 0 when unknown. Chunkservers on one disk share its
    /// free space, so the cluster's free space counts it once.
    #[serde(default)]
    pub disk: u64,
}

/// Orders for a chunkserver, carried on the heartbeat reply (the metadata service never calls out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The leader's term: the fencing token the chunkserver must remember.
    pub term: u64,
    /// Chunks to delete (no longer referenced, or a dropped copy).
    pub delete: Vec<ChunkId>,
    /// Copies to delete only while still stored at the given version or older: stale
    /// copies the server's inventory showed. A copy written there since (the healer may
    /// have picked this very server for a new one) has a newer version and stays.
    #[serde(default)]
    pub delete_stale: Vec<(ChunkId, u64)>,
    /// Chunks to FENCE at a version (refuse older versions from now on): chunks shared by a
    /// new snapshot, and copies the inventory shows behind the chunk map. The snapshot's
    /// client fences them itself; these orders close the gap when it died before it could.
    #[serde(default)]
    pub fence: Vec<(ChunkId, u64)>,
    /// The cluster's scrub rate (`rawfs healer set --scrub-rate`), bytes per second; `None`
    /// while unset: the chunkserver's own `--scrub-rate` applies.
    #[serde(default)]
    pub scrub_rate: Option<u64>,
    /// Send an inventory with the next heartbeat (to confirm copies the last one lacked).
    #[serde(default)]
    pub want_inventory: bool,
}

/// Health of one chunk, as counted by `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkCounts {
    pub healthy: u64,
    pub under_replicated: u64,
    pub degraded: u64,
    pub lost: u64,
    pub replicated: u64,
    pub ec: u64,
    /// Logical bytes (file bytes) held in replicated chunks.
    #[serde(default)]
    pub replicated_bytes: u64,
    /// Logical bytes held in erasure-coded chunks (stored as 1.5x that).
    #[serde(default)]
    pub ec_bytes: u64,
    /// Chunks one more loss away from being lost: a replicated chunk with one live copy, an
    /// RS 4+2 chunk with exactly 4 live shards (the healer repairs these first).
    #[serde(default)]
    pub one_loss_from_lost: u64,
    /// Logical bytes of the chunks below full redundancy (under-replicated or degraded).
    #[serde(default)]
    pub at_risk_bytes: u64,
}

/// One chunkserver as the registry sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkserverStatus {
    pub id: ServerId,
    pub data_addr: String,
    pub control_addr: String,
    pub up: bool,
    pub healthy: bool,
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub chunks: u64,
    /// Milliseconds since the last heartbeat.
    pub last_seen_ms: u64,
    /// Being drained (`rawfs chunkserver drain`): takes no new chunks, its copies move away.
    #[serde(default)]
    pub draining: bool,
}

/// One metadata replica's view of the replicated log.
///
/// From `replica_status` a replica describes itself; in [`ClusterStatus::replicas`] the
/// leader adds what it knows about each member (`lag`, `up`, `voter`). Fields after
/// `applied` default when absent, so older peers still decode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub id: u64,
    /// Its client (`MetadataRpc`) address.
    pub addr: String,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`; `unknown` for a member
    /// that did not answer the leader.
    pub role: String,
    /// The newest term it knows (0 if it did not answer).
    pub term: u64,
    /// Index of the last log entry applied to its state (0 if it did not answer).
    pub applied: u64,
    /// Index of the last entry in its log.
    #[serde(default)]
    pub last_log_index: u64,
    /// The leader it knows of.
    #[serde(default)]
    pub leader: Option<u64>,
    /// Entries it is behind the leader: the leader's last log index minus the last index
    /// the leader knows to be in this member's log (the whole log if none). 0 on the leader
    /// and in a replica's own `replica_status`.
    #[serde(default)]
    pub lag: u64,
    /// It answered (the leader asks every member with a short deadline for `status`).
    #[serde(default)]
    pub up: bool,
    /// A voting member (false for a learner still catching up).
    #[serde(default)]
    pub voter: bool,
}

/// A fingerprint of a replica's whole state (namespace, chunk map, registry, request
/// table) at one applied log index: two replicas at the same `applied` must have the same
/// `digest`. The hash is FNV-1a 64 over the tables' raw rows in key order, so it is stable
/// across processes and releases that keep the same record formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    /// The last log index applied to the state that was hashed.
    pub applied: u64,
    pub digest: u64,
}

/// Identifies one mutation across retries: a client draws `client` at random once and a
/// fresh `seq` per operation, and sends the same `ReqId` with every retry of it. The
/// service remembers recent ids (about ten minutes) with their replies and answers a
/// repeat with the remembered reply instead of applying it again, so a retry after a lost
/// reply (a dropped connection, a leader failover) is applied once.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct ReqId {
    pub client: u64,
    pub seq: u64,
}

/// How fresh a read must be.
///
/// - `Linearizable` (the default): the leader answers after confirming its leadership
///   (ReadIndex, or its lease), so the read sees every operation acknowledged before it.
/// - `Local`: any replica that knows of a live leader answers from its own applied state,
///   without asking anyone. The answer may be stale by up to the replication delay (usually
///   milliseconds; more while a replica catches up after a restart, and up to an election
///   timeout for a replica cut off from the leader, after which it stops answering). Reads
///   are not guaranteed to see the caller's own writes (they go to the leader and may not
///   have reached the replica yet). Chunk locations read this way carry the term of the
///   last applied entry, so a chunkserver that has seen a newer leader refuses writes
///   through a stale location and the writer asks again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consistency {
    #[default]
    Linearizable,
    Local,
}

/// The cluster's state, as `rawfs status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub leader: Option<u64>,
    pub term: u64,
    pub replicas: Vec<ReplicaStatus>,
    pub chunkservers: Vec<ChunkserverStatus>,
    pub chunks: ChunkCounts,
    pub files: u64,
    /// Holder of the healer lease (the working healer), as the leader granted it.
    #[serde(default)]
    pub healer: Option<u64>,
    /// Every healer heard from lately (active and standby), with its last report.
    #[serde(default)]
    pub healers: Vec<crate::HealerInfo>,
    /// The run-time repair and scrub limits (`rawfs healer set`).
    #[serde(default)]
    pub healer_settings: crate::HealerSettings,
}

/// Copies per replicated chunk the healer restores (the same as [`REPLICAS`]).
pub const WANTED_COPIES: u32 = REPLICAS as u32;

/// A chunk with fewer live copies (or, erasure coded, live shards) than wanted, as
/// `endangered_chunks` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndangeredChunk {
    pub chunk: ChunkId,
    /// The version a new copy is written and committed (`add_replica`) at.
    pub version: u64,
    /// Every server the chunk map lists (live or not).
    pub replicas: Vec<ServerId>,
    /// How many copies the chunk should have.
    pub wanted: u32,
    /// Bytes a copy must hold: the owner file's size within this chunk (at most
    /// [`CHUNK_SIZE`]); past it the chunk reads as zeros.
    pub bytes: u64,
    /// `Some` for an erasure-coded chunk with fewer than [`EC_SHARDS`] shards on live
    /// servers: its shards (a lost one has no `replica`; one on a down server still names
    /// it), each with its data address, and the logical length to decode with. `replicas`
    /// then lists the servers of the shards not known lost, `wanted` is [`EC_SHARDS`], and a
    /// rebuilt shard is written at `version` and committed with `replace_shard`.
    #[serde(default)]
    pub ec: Option<EcLoc>,
}

/// One chunkserver as the leader's registry sees it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerLiveness {
    pub id: ServerId,
    pub data_addr: String,
    /// Heartbeating within the timeout and healthy.
    pub up: bool,
    pub free_bytes: u64,
}

/// A page of `endangered_chunks`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndangeredPage {
    /// By chunk id, all above the `after` asked for.
    pub chunks: Vec<EndangeredChunk>,
    /// Where the next page starts (`after` for the next call); `None` on the last page.
    pub next: Option<ChunkId>,
    /// Every registered chunkserver.
    pub servers: Vec<ServerLiveness>,
    /// The leader's term: the fencing token for copies and `add_replica`.
    pub term: u64,
}

/// A granted (or renewed) healer lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealerLease {
    /// The leader term it was granted in: writes and `add_replica` carry it.
    pub term: u64,
    /// Valid this long from the request (the holder renews well before).
    pub ttl_ms: u64,
}
