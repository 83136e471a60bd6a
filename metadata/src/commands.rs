//! The commands that travel through the replicated log, and their replies.
//!
//! Everything that is not a pure function of the state (the time, where a new chunk goes) is
//! decided by the leader and carried inside the command, so that every replica applying the
//! same log reaches the same state and the same replies.

use rawfs_metadata_api::{
    Attr, Caller, ChunkId, ChunkLoc, CowLoc, EcPlan, HeldLock, HeldOp, Ino, LockConflict,
    LockDelegation, LockRequest, MetaError, MetaResult, Name, NewNode, RateChange, RenameFlags,
    ReqId, ServerId, SetAttr, Timespec, XattrMode,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Format version byte in front of every encoded command and reply.
const WIRE_FORMAT: u8 = 1;

/// One mutation of the metadata state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the root directory if it does not exist yet.
    Init {
        now: Timespec,
    },
    SetAttr {
        ino: Ino,
        set: SetAttr,
        now: Timespec,
    },
    Mknod {
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        now: Timespec,
    },
    /// `Mknod` followed by `Open` in the same transaction.
    Create {
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        session: u64,
        now: Timespec,
    },
    Symlink {
        parent: Ino,
        name: Name,
        target: ByteBuf,
        caller: Caller,
        now: Timespec,
    },
    Link {
        ino: Ino,
        newparent: Ino,
        newname: Name,
        now: Timespec,
    },
    Unlink {
        parent: Ino,
        name: Name,
        now: Timespec,
    },
    Rmdir {
        parent: Ino,
        name: Name,
        now: Timespec,
    },
    Rename {
        parent: Ino,
        name: Name,
        newparent: Ino,
        newname: Name,
        flags: RenameFlags,
        now: Timespec,
    },
    Open {
        ino: Ino,
        session: u64,
    },
    Release {
        ino: Ino,
        session: u64,
    },
    EndSession {
        session: u64,
    },
    SetXattr {
        ino: Ino,
        name: Name,
        value: ByteBuf,
        mode: XattrMode,
        now: Timespec,
    },
    RemoveXattr {
        ino: Ino,
        name: Name,
        now: Timespec,
    },
    /// Creates the chunk at `index` on `servers` (chosen by the leader) unless it exists.
    AllocateChunk {
        ino: Ino,
        index: u64,
        servers: Vec<ServerId>,
    },
    CommitWrite {
        ino: Ino,
        end: u64,
        stored_delta: i64,
        now: Timespec,
    },
    ReleaseChunks {
        ino: Ino,
        first: u64,
        count: u64,
        now: Timespec,
    },
    DropReplica {
        chunk: ChunkId,
        expected_version: u64,
        server: ServerId,
    },
    /// Records (or updates) a chunkserver's addresses.
    RegisterServer {
        id: ServerId,
        data_addr: String,
        control_addr: String,
    },
    /// The listed deletions were handed to `server`; forget them.
    AckDeletes {
        server: ServerId,
        chunks: Vec<ChunkId>,
    },
    /// Makes `parent/name` share every chunk of `origin`: a read-only snapshot or a
    /// writable clone (see `shares.rs`).
    Snapshot {
        origin: Ino,
        parent: Ino,
        name: Name,
        read_only: bool,
        label: ByteBuf,
        now: Timespec,
    },
    /// Starts (or repeats) the copy-on-write of the shared chunk `chunk` at `(ino, index)`.
    CowChunk {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
    },
    /// Ends the copy into `chunk` at `(ino, index)`; `failed` replicas are dropped.
    CowDone {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        failed: Vec<ServerId>,
    },
    /// Lists `server` as holding a new copy of `chunk` written at `version` (the healer's),
    /// bumping the version; refused unless the entry's term is `term` (see `healing.rs`).
    AddReplica {
        chunk: ChunkId,
        version: u64,
        server: ServerId,
        term: u64,
    },
    /// Starts converting chunk `chunk` (at `version`) of `(ino, index)` to RS 4+2 with one
    /// shard on each of `servers` (the leader's placement, 6 distinct); see `erasure.rs`.
    EcPrepare {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        servers: Vec<ServerId>,
    },
    /// Commits the conversion of `chunk` planned at `version` in leader term `term`.
    EcCommit {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        length: u64,
        term: u64,
    },
    /// `CowChunk` with the leader's placement of the replicated copy, for an erasure-coded
    /// chunk (which has no replicas to copy on).
    CowPlaced {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        servers: Vec<ServerId>,
    },
    /// Several commands that arrived together, applied in order as one log entry (group
    /// commit: one log write for many callers). Replies with [`Reply::Batch`]. Not nested.
    Batch(Vec<Command>),
    /// `cmd` on behalf of the client request `req`, applied at most once: while `req` is
    /// remembered (about ten minutes of leader time, see `requests.rs`), a repeat returns
    /// the first reply and changes nothing. `now` is the leader's time, which ages the
    /// remembered requests. `cmd` is neither a `Batch` nor a `Tracked`.
    Tracked {
        req: ReqId,
        now: Timespec,
        cmd: Box<Command>,
    },
    // New variants go last: log entries name variants by index.
    /// Marks `server` as draining (or not): no new chunks, its copies moved elsewhere.
    SetDraining {
        server: ServerId,
        draining: bool,
    },
    /// Lists `server` as holding shard `shard` of the erasure-coded `chunk` at `version` (a
    /// rebuild by the healer), without a version bump; refused unless the entry's term is
    /// `term` (see `healing.rs`).
    ReplaceShard {
        chunk: ChunkId,
        version: u64,
        shard: ChunkId,
        server: ServerId,
        term: u64,
    },
    /// Changes the healer's repair limit and the chunkservers' scrub limit (`limits.rs`).
    SetHealerSettings {
        repair_rate: RateChange,
        scrub_rate: RateChange,
    },
    /// `AllocateChunk` of a `cold` file: an erasure-coded chunk of length 0 with one shard
    /// on each of `servers` (the leader's placement, 6 distinct); see `ec_write.rs`.
    AllocateEc {
        ino: Ino,
        index: u64,
        servers: Vec<ServerId>,
    },
    /// `DropReplica` of a copy `server` does not have (its inventories say so, see
    /// `missing.rs`), without the deletion order a drop queues for the server: an order sent
    /// after the healer made a new copy there would delete that copy.
    DropMissing {
        chunk: ChunkId,
        expected_version: u64,
        server: ServerId,
    },
    /// Commits an append of logical bytes `from..to` to the erasure-coded chunk `chunk` at
    /// `version`, written to exactly `shards`; bumps the version (see `ec_write.rs`).
    EcExtend {
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        shards: Vec<(ChunkId, ServerId)>,
        from: u64,
        to: u64,
    },
    /// Records that a lease (the healer's, or a volume writer's) may be granted in `term`
    /// (see `leases.rs`): written before the first grant of each term.
    RecordLeaseTerm {
        term: u64,
    },
    /// `Release` of each inode.
    ReleaseMany {
        inos: Vec<Ino>,
        session: u64,
    },
    /// `Mknod` of a directory whose creates are delegated to mount session `holder`
    /// (see `delegation.rs`).
    MkdirHeld {
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        holder: u64,
        now: Timespec,
    },
    /// Reserves `count` inode numbers; replies with the first ([`Reply::Number`]).
    ReserveInodes {
        count: u64,
    },
    /// The changes `holder` made in its delegated directory `dir`, in order; `give_back`
    /// ends the delegation. With `allocate` (file, index, servers chosen by the leader),
    /// then also the chunk at that index of each of those files (new files' first flushes
    /// need both): the reply is a [`Reply::Batch`] with each chunk, or `Unit` for one that
    /// could not be allocated (the changes are applied either way; that writer then asks
    /// `AllocateChunk` itself). Without `allocate` the reply is `Unit`.
    CommitHeld {
        dir: Ino,
        holder: u64,
        ops: Vec<HeldOp>,
        give_back: bool,
        #[serde(default)]
        allocate: Vec<(Ino, u64, Vec<ServerId>)>,
    },
    /// Takes the delegation of `dir` back from `holder`, which did not answer a recall.
    Revoke {
        dir: Ino,
        holder: u64,
    },
    /// Opens the leader kept in memory (`open_leased`, see `open_table.rs`), logged with a
    /// command that may remove links: a leased open of each (inode, session) whose inode
    /// still exists, then `then` (whose reply this is; `Unit` without one).
    OpenMany {
        opens: Vec<(Ino, u64)>,
        then: Option<Box<Command>>,
    },
    /// Drops one logged leased open (`OpenMany`) of each inode by `session`.
    ReleaseLeased {
        inos: Vec<Ino>,
        session: u64,
    },
    /// Takes, changes or drops a byte-range lock (`locks.rs`).
    SetLock {
        ino: Ino,
        session: u64,
        lock: LockRequest,
    },
    /// Drops every lock of a session whose lease ran out.
    DropLocks {
        session: u64,
    },
    /// Delegates the locks of `ino` to `session` if no other session holds or asked for
    /// them (`locks.rs`).
    DelegateLocks {
        ino: Ino,
        session: u64,
    },
    /// Ends `session`'s delegation of `ino`'s locks, which `locks` replace (`None`: kept).
    ReturnLocks {
        ino: Ino,
        session: u64,
        locks: Option<Vec<HeldLock>>,
    },
}

/// What a command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Unit,
    Attr(Attr),
    Chunk(ChunkLoc),
    Cow(CowLoc),
    /// The plan of an RS 4+2 conversion.
    Plan(EcPlan),
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<MetaResult<Reply>>),
    /// A number (the first of reserved inodes).
    Number(u64),
    /// `SetLock`: the conflicting lock, or `None` when done.
    Lock(Option<LockConflict>),
    /// `DelegateLocks`: the delegation, or `None` when refused.
    Delegation(Option<LockDelegation>),
}

/// Why an encoded command or reply could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode: {0}")]
    Encode(String),
    #[error("cannot decode: {0}")]
    Decode(String),
    #[error("unknown wire format {0}")]
    Format(u8),
}

fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = vec![WIRE_FORMAT];
    rmp_serde::encode::write(&mut out, v).map_err(|e| CodecError::Encode(e.to_string()))?;
    Ok(out)
}

fn from_bytes<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, CodecError> {
    match b.split_first() {
        Some((&WIRE_FORMAT, rest)) => {
            rmp_serde::from_slice(rest).map_err(|e| CodecError::Decode(e.to_string()))
        }
        Some((&v, _)) => Err(CodecError::Format(v)),
        None => Err(CodecError::Decode("empty".into())),
    }
}

impl Command {
    /// A rough upper bound of the encoded size, for sizing batches.
    pub fn approx_size(&self) -> usize {
        const SMALL: usize = 96;
        SMALL
            + match self {
                Command::Mknod { name, .. }
                | Command::Create { name, .. }
                | Command::Unlink { name, .. }
                | Command::Rmdir { name, .. }
                | Command::RemoveXattr { name, .. } => name.len(),
                Command::Link { newname, .. } => newname.len(),
                Command::Symlink { name, target, .. } => name.len() + target.len(),
                Command::Rename { name, newname, .. } => name.len() + newname.len(),
                Command::SetXattr { name, value, .. } => name.len() + value.len(),
                Command::AllocateChunk { servers, .. } => 9 * servers.len(),
                Command::RegisterServer {
                    data_addr,
                    control_addr,
                    ..
                } => data_addr.len() + control_addr.len(),
                Command::AckDeletes { chunks, .. } => 9 * chunks.len(),
                Command::Snapshot { name, label, .. } => name.len() + label.len(),
                Command::CowDone { failed, .. } => 9 * failed.len(),
                Command::EcPrepare { servers, .. }
                | Command::CowPlaced { servers, .. }
                | Command::AllocateEc { servers, .. } => 9 * servers.len(),
                Command::EcExtend { shards, .. } => 9 * shards.len(),
                Command::ReleaseMany { inos, .. } | Command::ReleaseLeased { inos, .. } => {
                    9 * inos.len()
                }
                Command::OpenMany { opens, then } => {
                    18 * opens.len() + then.as_ref().map_or(0, |c| c.approx_size())
                }
                Command::MkdirHeld { name, .. } => name.len(),
                Command::CommitHeld { ops, .. } => ops.iter().map(held_op_size).sum(),
                Command::Batch(cmds) => cmds.iter().map(Command::approx_size).sum(),
                Command::Tracked { cmd, .. } => cmd.approx_size(),
                _ => 0,
            }
    }

    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        to_bytes(self)
    }

    pub fn decode(b: &[u8]) -> Result<Command, CodecError> {
        from_bytes(b)
    }
}

fn held_op_size(op: &HeldOp) -> usize {
    match op {
        HeldOp::Create(c) => 64 + c.name.len(),
        HeldOp::Unlink { name, .. } => 32 + name.len(),
        HeldOp::Rename { from, to, .. } => 48 + from.len() + to.len(),
        HeldOp::SetAttr { .. } | HeldOp::Wrote { .. } => 64,
    }
}

/// Encodes the result of applying a command.
pub fn encode_reply(r: &MetaResult<Reply>) -> Result<Vec<u8>, CodecError> {
    to_bytes(r)
}

/// Decodes a reply produced by [`encode_reply`].
pub fn decode_reply(b: &[u8]) -> Result<MetaResult<Reply>, CodecError> {
    from_bytes(b)
}

impl Reply {
    /// The attributes carried by the reply, or a storage error if the reply has another shape
    /// (which would mean a bug: the command and reply types are paired).
    pub fn into_attr(self) -> MetaResult<Attr> {
        match self {
            Reply::Attr(a) => Ok(a),
            other => Err(mismatch(&other)),
        }
    }

    pub fn into_chunk(self) -> MetaResult<ChunkLoc> {
        match self {
            Reply::Chunk(c) => Ok(c),
            other => Err(mismatch(&other)),
        }
    }

    pub fn into_plan(self) -> MetaResult<EcPlan> {
        match self {
            Reply::Plan(p) => Ok(p),
            other => Err(mismatch(&other)),
        }
    }

    pub fn into_cow(self) -> MetaResult<CowLoc> {
        match self {
            Reply::Cow(c) => Ok(c),
            other => Err(mismatch(&other)),
        }
    }

    pub fn into_number(self) -> MetaResult<u64> {
        match self {
            Reply::Number(n) => Ok(n),
            other => Err(mismatch(&other)),
        }
    }

    pub fn into_lock(self) -> MetaResult<Option<LockConflict>> {
        match self {
            Reply::Lock(c) => Ok(c),
            other => Err(mismatch(&other)),
        }
    }

    pub fn into_delegation(self) -> MetaResult<Option<LockDelegation>> {
        match self {
            Reply::Delegation(d) => Ok(d),
            other => Err(mismatch(&other)),
        }
    }

    pub fn into_unit(self) -> MetaResult<()> {
        match self {
            Reply::Unit => Ok(()),
            other => Err(mismatch(&other)),
        }
    }
}

fn mismatch(r: &Reply) -> MetaError {
    tracing::error!(reply = ?r, "reply of an unexpected shape");
    MetaError::Storage {
        reason: "reply of an unexpected shape".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_round_trips_and_rejects_garbage() {
        let c = Command::Unlink {
            parent: 1,
            name: ByteBuf::from(b"x".to_vec()),
            now: Timespec { sec: 5, nsec: 6 },
        };
        assert_eq!(Command::decode(&c.encode().unwrap()).unwrap(), c);
        assert!(Command::decode(&[]).is_err());
        assert!(Command::decode(&[9, 1, 2]).is_err());
        assert!(Command::decode(&[WIRE_FORMAT, 0xc1]).is_err());
        let r: MetaResult<Reply> = Err(MetaError::NotEmpty);
        assert_eq!(decode_reply(&encode_reply(&r).unwrap()).unwrap(), r);
    }
}
