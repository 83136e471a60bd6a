//! The redb file that holds the metadata state: table layout, record encodings, durability.
//!
//! Every value that is a structure is MessagePack (rmp-serde) behind a one-byte format
//! version, so a later release can read and migrate old records. Keys are plain redb tuples
//! so that range scans (a directory's entries, a file's chunks) are ordered B-tree walks.
//!
//! Commits made while applying log entries use `Durability::None`: the replicated log is the
//! durable record and re-applies whatever a crash lost. [`Store::flush_durable`] makes
//! everything committed so far durable; the server calls it about once a second, and before
//! snapshots and shutdown. A follower goes further and leaves its applies uncommitted for up
//! to 20 ms or 256 entries ([`Store::apply_with`]); any read commits them first.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{Attr, ChunkId, FileKind, Ino, MetaError, ServerId, Timespec};
use redb::{
    Database, Durability, ReadOnlyTable, ReadTransaction, ReadableTable, ReadableTableMetadata,
    Table, TableDefinition, WriteTransaction,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

pub(crate) use crate::erasure::{Converting, EcRec};

/// ino -> InodeRec
pub(crate) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
/// (parent, name) -> (child, seq)
pub(crate) const DIRENTS: TableDefinition<(u64, &[u8]), (u64, u64)> =
    TableDefinition::new("dirents");
/// (parent, seq) -> name: the order `readdir` walks, so cookies stay valid under changes.
pub(crate) const DIR_ORDER: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("dir_order");
/// (ino, name) -> value
pub(crate) const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
/// ino -> target
pub(crate) const SYMLINKS: TableDefinition<u64, &[u8]> = TableDefinition::new("symlinks");
/// (ino, index) -> ChunkRec
pub(crate) const CHUNKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("chunks");
/// chunk -> (ino, index). Also every shard id of an erasure-coded chunk (committed or
/// reserved by a conversion) -> the owner of its chunk, so inventories keep shards.
pub(crate) const CHUNK_OWNER: TableDefinition<u64, (u64, u64)> =
    TableDefinition::new("chunk_owner");
/// (chunk, ino, index) -> (): the references to a shared chunk other than its owner in
/// CHUNK_OWNER (snapshots, clones, a pending copy-on-write). A chunk's reference count is
/// one plus its rows here; see `shares.rs`.
pub(crate) const CHUNK_REFS: TableDefinition<(u64, u64, u64), ()> =
    TableDefinition::new("chunk_refs");
/// (ino, session) -> open count: opens logged by `open` in the low 32 bits, leased opens
/// the leader logged in the high 32 bits (`namespace::OpenKind`). Not in `ReadTables`:
/// only `reopen` reads it outside the apply.
pub(crate) const OPENS: TableDefinition<(u64, u64), u64> = TableDefinition::new("opens");
/// (session, ino) -> (): the reverse index of OPENS, for `end_session`.
pub(crate) const SESSIONS: TableDefinition<(u64, u64), ()> = TableDefinition::new("sessions");
/// ino -> (): inodes with no links left that are kept because they are open.
pub(crate) const ORPHANS: TableDefinition<u64, ()> = TableDefinition::new("orphans");
/// name -> counter (next inode, next chunk id, inode count).
pub(crate) const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// server -> ServerRec: every chunkserver ever registered.
pub(crate) const SERVERS: TableDefinition<u64, &[u8]> = TableDefinition::new("servers");
/// (server, chunk) -> (): chunks the server should delete, handed out on heartbeat replies.
pub(crate) const DELETIONS: TableDefinition<(u64, u64), ()> = TableDefinition::new("deletions");
/// directory -> mount session: directories whose creates are delegated (`delegation.rs`).
pub(crate) const DELEGATIONS: TableDefinition<u64, u64> = TableDefinition::new("delegations");
/// (ino, session, owner, start): a lock's key.
pub(crate) type LockKey = (u64, u64, u64, u64);
/// (end, write, pid): the rest of a lock.
pub(crate) type LockVal = (u64, bool, u32);
/// [`LockKey`] -> [`LockVal`]: byte-range locks (`locks.rs`).
pub(crate) const LOCKS: TableDefinition<LockKey, LockVal> = TableDefinition::new("locks");
/// ino -> mount session: inodes whose locks are delegated to a mount (`locks.rs`).
pub(crate) const LOCK_HOLDERS: TableDefinition<u64, u64> = TableDefinition::new("lock_holders");
/// (client, seq) -> encoded reply of a mutation that carried that request id.
pub(crate) const REQUESTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("requests");
/// (leader time in seconds, client, seq) -> (): REQUESTS by age, for pruning.
pub(crate) const REQUEST_AGES: TableDefinition<(u64, u64, u64), ()> =
    TableDefinition::new("request_ages");
/// "index" / "term" -> the last applied log entry's index and term. Bookkeeping, not part of
/// the state digest (it is in snapshots, so a restored state knows where it stands).
pub(crate) const APPLIED: TableDefinition<&str, u64> = TableDefinition::new("applied");
/// key -> blob owned by the replication crate (last applied log id, membership).
pub(crate) const REPL: TableDefinition<&str, &[u8]> = TableDefinition::new("replication");

pub(crate) const NEXT_INO: &str = "next_ino";
pub(crate) const NEXT_CHUNK: &str = "next_chunk";
pub(crate) const INODE_COUNT: &str = "inode_count";
/// The highest leader term that may have granted a lease (see `leases.rs`); 0: none ever.
pub(crate) const LEASE_TERM: &str = "lease_term";
const REPL_KEY: &str = "state";
pub(crate) const APPLIED_INDEX: &str = "index";
pub(crate) const APPLIED_TERM: &str = "term";

/// Current format version of every encoded record.
const FORMAT: u8 = 1;

/// Failure of the metadata store; fatal for the replica.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redb: {0}")]
    Db(Box<redb::Error>),
    #[error("corrupt {what} record: {reason}")]
    Corrupt { what: &'static str, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

macro_rules! redb_into_store {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
redb_into_store!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError
);

/// Why an operation did not complete: a filesystem error for the caller, or a store failure.
#[derive(Debug)]
pub(crate) enum Fail {
    Meta(MetaError),
    Store(StoreError),
}

impl From<MetaError> for Fail {
    fn from(e: MetaError) -> Self {
        Fail::Meta(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

macro_rules! redb_into_fail {
    ($($t:ty),*) => {$(
        impl From<$t> for Fail {
            fn from(e: $t) -> Self {
                Fail::Store(e.into())
            }
        }
    )*};
}
redb_into_fail!(redb::StorageError, redb::TableError);

/// Result of an operation on the store.
pub(crate) type Op<T> = Result<T, Fail>;

/// Encodes a record behind the format byte.
pub(crate) fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![FORMAT];
    rmp_serde::encode::write(&mut out, v).map_err(|e| StoreError::Encode {
        what,
        reason: e.to_string(),
    })?;
    Ok(out)
}

/// Decodes a record written by [`encode`]; anything else is reported as corruption.
pub(crate) fn decode<T: DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, StoreError> {
    match b.split_first() {
        Some((&FORMAT, rest)) => rmp_serde::from_slice(rest).map_err(|e| StoreError::Corrupt {
            what,
            reason: e.to_string(),
        }),
        Some((v, _)) => Err(StoreError::Corrupt {
            what,
            reason: format!("unknown format version {v}"),
        }),
        None => Err(StoreError::Corrupt {
            what,
            reason: "empty record".into(),
        }),
    }
}

/// One inode as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InodeRec {
    pub kind: FileKind,
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub rdev: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    pub stored: u64,
    /// Directories only: the parent directory (a directory has exactly one).
    pub parent: Ino,
    /// Directories only: the last sequence number given to an entry (readdir cookie).
    pub last_seq: u64,
    /// A read-only snapshot of this inode (its data, size and chunk map never change).
    /// Absent in records written before snapshots existed.
    #[serde(default)]
    pub snapshot_of: Option<Ino>,
    /// Storage class (see `classes.rs`). Records are MessagePack arrays, so a record written
    /// before classes existed simply ends one element early and decodes as `Auto`; later
    /// fields go after it, also defaulted.
    #[serde(default)]
    pub class: rawfs_metadata_api::StorageClass,
    /// How many rows of the xattr table the inode has; `None` (records written before the
    /// count existed) when unknown. Keep last.
    #[serde(default)]
    pub xattrs: Option<u32>,
}

impl InodeRec {
    pub fn attr(&self, ino: Ino) -> Attr {
        Attr {
            ino,
            kind: self.kind,
            perm: self.perm,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            size: self.size,
            rdev: self.rdev,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            crtime: self.crtime,
            stored: self.stored,
            no_xattrs: self.xattrs == Some(0),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.kind == FileKind::Dir
    }
}

/// One chunk of a file as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ChunkRec {
    pub chunk: ChunkId,
    pub version: u64,
    pub servers: Vec<ServerId>,
    /// A copy-on-write in progress: `chunk` is to be cloned from this shared chunk, which
    /// this reference keeps alive (and readers are sent to) until the copy is done.
    #[serde(default)]
    pub pending: Option<PendingCopy>,
    /// Erasure coded (RS 4+2): the chunk's data is in these shards, and `servers` is empty.
    #[serde(default)]
    pub ec: Option<EcRec>,
    /// A conversion to RS 4+2 under way (`ec_prepare`): its reserved shards.
    #[serde(default)]
    pub converting: Option<Converting>,
}

/// The source of a pending copy-on-write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PendingCopy {
    pub chunk: ChunkId,
    pub version: u64,
    pub servers: Vec<ServerId>,
    /// The source is erasure coded: the writer decodes it and writes the bytes.
    #[serde(default)]
    pub ec: Option<EcRec>,
}

/// A registered chunkserver's addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ServerRec {
    pub data_addr: String,
    pub control_addr: String,
    /// Being drained (`drain.rs`). Last, defaulted: records written before draining
    /// existed end one element early.
    #[serde(default)]
    pub draining: bool,
}

/// Every table, opened in one write transaction.
pub(crate) struct Tables<'t> {
    pub inodes: Table<'t, u64, &'static [u8]>,
    pub dirents: Table<'t, (u64, &'static [u8]), (u64, u64)>,
    pub dir_order: Table<'t, (u64, u64), &'static [u8]>,
    pub xattrs: Table<'t, (u64, &'static [u8]), &'static [u8]>,
    pub symlinks: Table<'t, u64, &'static [u8]>,
    pub chunks: Table<'t, (u64, u64), &'static [u8]>,
    pub chunk_owner: Table<'t, u64, (u64, u64)>,
    pub chunk_refs: Table<'t, (u64, u64, u64), ()>,
    pub opens: Table<'t, (u64, u64), u64>,
    pub sessions: Table<'t, (u64, u64), ()>,
    pub orphans: Table<'t, u64, ()>,
    pub counters: Table<'t, &'static str, u64>,
    pub servers: Table<'t, u64, &'static [u8]>,
    pub deletions: Table<'t, (u64, u64), ()>,
    pub requests: Table<'t, (u64, u64), &'static [u8]>,
    pub request_ages: Table<'t, (u64, u64, u64), ()>,
    pub delegations: Table<'t, u64, u64>,
    pub locks: Table<'t, LockKey, LockVal>,
    pub lock_holders: Table<'t, u64, u64>,
}

impl<'t> Tables<'t> {
    pub fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        Ok(Tables {
            inodes: txn.open_table(INODES)?,
            dirents: txn.open_table(DIRENTS)?,
            dir_order: txn.open_table(DIR_ORDER)?,
            xattrs: txn.open_table(XATTRS)?,
            symlinks: txn.open_table(SYMLINKS)?,
            chunks: txn.open_table(CHUNKS)?,
            chunk_owner: txn.open_table(CHUNK_OWNER)?,
            chunk_refs: txn.open_table(CHUNK_REFS)?,
            opens: txn.open_table(OPENS)?,
            sessions: txn.open_table(SESSIONS)?,
            orphans: txn.open_table(ORPHANS)?,
            counters: txn.open_table(COUNTERS)?,
            servers: txn.open_table(SERVERS)?,
            deletions: txn.open_table(DELETIONS)?,
            requests: txn.open_table(REQUESTS)?,
            request_ages: txn.open_table(REQUEST_AGES)?,
            delegations: txn.open_table(DELEGATIONS)?,
            locks: txn.open_table(LOCKS)?,
            lock_holders: txn.open_table(LOCK_HOLDERS)?,
        })
    }

    pub fn put_inode(&mut self, ino: Ino, rec: &InodeRec) -> Result<(), StoreError> {
        self.inodes.insert(ino, encode("inode", rec)?.as_slice())?;
        Ok(())
    }

    pub fn put_chunk(&mut self, ino: Ino, index: u64, rec: &ChunkRec) -> Result<(), StoreError> {
        self.chunks
            .insert((ino, index), encode("chunk", rec)?.as_slice())?;
        Ok(())
    }

    pub fn counter(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.counters.get(name)?.map(|g| g.value()).unwrap_or(0))
    }

    pub fn set_counter(&mut self, name: &str, v: u64) -> Result<(), StoreError> {
        self.counters.insert(name, v)?;
        Ok(())
    }
}

/// The tables a query reads, opened in one read transaction.
pub(crate) struct ReadTables {
    pub inodes: ReadOnlyTable<u64, &'static [u8]>,
    pub dirents: ReadOnlyTable<(u64, &'static [u8]), (u64, u64)>,
    pub dir_order: ReadOnlyTable<(u64, u64), &'static [u8]>,
    pub xattrs: ReadOnlyTable<(u64, &'static [u8]), &'static [u8]>,
    pub symlinks: ReadOnlyTable<u64, &'static [u8]>,
    pub chunks: ReadOnlyTable<(u64, u64), &'static [u8]>,
    pub chunk_owner: ReadOnlyTable<u64, (u64, u64)>,
    pub chunk_refs: ReadOnlyTable<(u64, u64, u64), ()>,
    pub counters: ReadOnlyTable<&'static str, u64>,
    pub servers: ReadOnlyTable<u64, &'static [u8]>,
    pub deletions: ReadOnlyTable<(u64, u64), ()>,
    pub applied: ReadOnlyTable<&'static str, u64>,
    pub delegations: ReadOnlyTable<u64, u64>,
}

impl ReadTables {
    pub fn open(txn: &ReadTransaction) -> Result<Self, StoreError> {
        Ok(ReadTables {
            inodes: txn.open_table(INODES)?,
            dirents: txn.open_table(DIRENTS)?,
            dir_order: txn.open_table(DIR_ORDER)?,
            xattrs: txn.open_table(XATTRS)?,
            symlinks: txn.open_table(SYMLINKS)?,
            chunks: txn.open_table(CHUNKS)?,
            chunk_owner: txn.open_table(CHUNK_OWNER)?,
            chunk_refs: txn.open_table(CHUNK_REFS)?,
            counters: txn.open_table(COUNTERS)?,
            servers: txn.open_table(SERVERS)?,
            deletions: txn.open_table(DELETIONS)?,
            applied: txn.open_table(APPLIED)?,
            delegations: txn.open_table(DELEGATIONS)?,
        })
    }

    pub fn counter(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.counters.get(name)?.map(|g| g.value()).unwrap_or(0))
    }

    /// The term of the last applied entry: the fencing token of a location read locally.
    pub fn applied_term(&self) -> Result<u64, StoreError> {
        Ok(self
            .applied
            .get(APPLIED_TERM)?
            .map(|g| g.value())
            .unwrap_or(0))
    }
}

/// Reads and decodes an inode from any table handle.
pub(crate) fn get_inode(
    t: &impl ReadableTable<u64, &'static [u8]>,
    ino: Ino,
) -> Result<Option<InodeRec>, StoreError> {
    match t.get(ino)? {
        Some(g) => Ok(Some(decode("inode", g.value())?)),
        None => Ok(None),
    }
}

/// Reads an inode that must exist (`NotFound` otherwise).
pub(crate) fn inode(t: &impl ReadableTable<u64, &'static [u8]>, ino: Ino) -> Op<InodeRec> {
    get_inode(t, ino)?.ok_or(Fail::Meta(MetaError::NotFound))
}

/// Reads and decodes a chunk record.
pub(crate) fn get_chunk(
    t: &impl ReadableTable<(u64, u64), &'static [u8]>,
    ino: Ino,
    index: u64,
) -> Result<Option<ChunkRec>, StoreError> {
    match t.get((ino, index))? {
        Some(g) => Ok(Some(decode("chunk", g.value())?)),
        None => Ok(None),
    }
}

/// Reads a registered server's record.
pub(crate) fn get_server(
    t: &impl ReadableTable<u64, &'static [u8]>,
    id: ServerId,
) -> Result<Option<ServerRec>, StoreError> {
    match t.get(id)? {
        Some(g) => Ok(Some(decode("server", g.value())?)),
        None => Ok(None),
    }
}

mod snapshot;

/// The redb database with the metadata state.
pub struct Store {
    db: Database,
    /// Something was committed with `Durability::None` (or deferred) since the last durable
    /// commit.
    dirty: AtomicBool,
    last_durable: Mutex<Instant>,
    /// A follower's applied entries not committed yet (see [`Store::apply_with`]). Every
    /// read transaction commits it first, so nothing applied is ever invisible.
    deferred: Mutex<Option<Deferred>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Before the database: its drop waits for every write transaction to end. Committing
        // (rather than dropping) keeps what was applied, as the immediate commits did.
        if let Err(e) = self.commit_deferred() {
            tracing::warn!(error = %e, "committing deferred entries at close failed");
        }
    }
}

/// An open write transaction holding applied entries.
struct Deferred {
    txn: WriteTransaction,
    entries: usize,
    since: Instant,
}

/// A follower commits its applied entries once this many are deferred...
const DEFER_MAX_ENTRIES: usize = 256;
/// ... or the oldest has waited this long (or a read, the durable tick, a snapshot comes).
const DEFER_MAX_AGE: Duration = Duration::from_millis(20);

/// How long non-durable commits may pile up before one durable commit.
pub(crate) const DURABLE_EVERY: Duration = Duration::from_secs(1);
/// A batch at least this long is committed durably right away.
const LARGE_BATCH: usize = 4096;

/// How long opening waits for the database lock of a predecessor that is still exiting.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Opens (or creates) the database, waiting up to [`LOCK_WAIT`] while another process holds
/// its lock: a replica restarted right after `kill -9` (by a supervisor, or by hand) may find
/// the killed process's threads still exiting and holding the file lock for a moment. A
/// lock held for longer is a second replica on the same directory, and stays an error.
///
/// `on_locked` is called each time the lock is found held (the daemon logs the first; a test
/// learns that the wait began).
pub(crate) fn open_db(
    path: &Path,
    cache_bytes: usize,
    on_locked: &mut dyn FnMut(),
) -> Result<Database, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match Database::builder().set_cache_size(cache_bytes).create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                on_locked();
                // A file lock gives no notice when it is released: poll it.
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return Ok(other?),
        }
    }
}

impl Store {
    /// Opens (or creates) the database file with a bounded page cache.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        let mut warned = false;
        let db = open_db(path, cache_bytes, &mut || {
            if !warned {
                tracing::warn!(path = %path.display(), "metadata store locked by another process; waiting");
                warned = true;
            }
        })?;
        // Create every table once so that read transactions never see a missing table.
        let txn = db.begin_write()?;
        {
            let mut t = Tables::open(&txn)?;
            if t.counter(NEXT_INO)? == 0 {
                t.set_counter(NEXT_INO, rawfs_metadata_api::ROOT_INO + 1)?;
                t.set_counter(NEXT_CHUNK, 1)?;
            }
            txn.open_table(REPL)?;
            txn.open_table(APPLIED)?;
        }
        txn.commit()?;
        Ok(Store {
            db,
            dirty: AtomicBool::new(false),
            last_durable: Mutex::new(Instant::now()),
            deferred: Mutex::new(None),
        })
    }

    /// A read transaction that sees everything applied so far.
    pub(crate) fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        self.commit_deferred()?;
        Ok(self.db.begin_read()?)
    }

    /// Runs `apply` (a batch of `entries` log entries) in a write transaction and commits it,
    /// not durably unless the batch is large. With `defer` (a follower: nobody waits for its
    /// applies) the commit may wait for later batches, up to [`DEFER_MAX_ENTRIES`] entries or
    /// [`DEFER_MAX_AGE`]: a redb commit costs more than applying a small command, and on a
    /// small machine the followers' commits compete with the leader for the CPU. A crash
    /// loses deferred entries exactly as it loses non-durable commits: the replica re-applies
    /// them from its log. If `apply` fails, the deferred entries are dropped with the batch
    /// and the replica, whose state machine failed, stops; a restart re-applies them.
    pub(crate) fn apply_with<R, E: From<StoreError>>(
        &self,
        entries: usize,
        defer: bool,
        apply: impl FnOnce(&WriteTransaction) -> Result<R, E>,
    ) -> Result<R, E> {
        // Held throughout, so a reader cannot find the deferred entries neither committed
        // nor pending.
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        let (txn, total, since) = match deferred.take() {
            Some(d) => (d.txn, d.entries + entries, d.since),
            None => (
                self.db.begin_write().map_err(StoreError::from)?,
                entries,
                Instant::now(),
            ),
        };
        let out = apply(&txn)?;
        if defer && total < DEFER_MAX_ENTRIES && since.elapsed() < DEFER_MAX_AGE {
            self.dirty.store(true, Ordering::SeqCst);
            *deferred = Some(Deferred {
                txn,
                entries: total,
                since,
            });
        } else {
            self.commit_applied(txn, total)?;
        }
        Ok(out)
    }

    /// Commits the deferred entries, if any.
    fn commit_deferred(&self) -> Result<(), StoreError> {
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        match deferred.take() {
            Some(d) => self.commit_applied(d.txn, d.entries),
            None => Ok(()),
        }
    }

    /// Commits a batch of applied entries: not durable unless the batch is large.
    fn commit_applied(&self, mut txn: WriteTransaction, entries: usize) -> Result<(), StoreError> {
        let durable = entries >= LARGE_BATCH;
        if !durable {
            txn.set_durability(Durability::None);
        }
        txn.commit()?;
        if durable {
            self.dirty.store(false, Ordering::SeqCst);
            *self.last_durable.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        } else {
            self.dirty.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Makes every commit so far durable (fsync), if anything is pending.
    pub fn flush_durable(&self) -> Result<(), StoreError> {
        let mut deferred = self.deferred.lock().unwrap_or_else(|p| p.into_inner());
        if !self.dirty.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        // Deferred entries become durable with this commit (redb's default durability).
        let txn = match deferred.take() {
            Some(d) => d.txn,
            None => self.db.begin_write()?,
        };
        if let Err(e) = txn.commit() {
            self.dirty.store(true, Ordering::SeqCst);
            return Err(e.into());
        }
        *self.last_durable.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// True when a durable commit is due.
    pub fn durable_due(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
            && self
                .last_durable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= DURABLE_EVERY
    }

    /// Stores the replication crate's blob inside an open write transaction.
    pub(crate) fn put_replication_state(
        txn: &WriteTransaction,
        state: &[u8],
    ) -> Result<(), StoreError> {
        txn.open_table(REPL)?.insert(REPL_KEY, state)?;
        Ok(())
    }

    /// The replication crate's blob, as last stored.
    pub fn replication_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(REPL)?;
        let v = t.get(REPL_KEY)?.map(|g| g.value().to_vec());
        Ok(v)
    }

    /// Records the last applied entry inside the write transaction that applied it.
    pub(crate) fn put_applied(
        txn: &WriteTransaction,
        index: u64,
        term: u64,
    ) -> Result<(), StoreError> {
        let mut t = txn.open_table(APPLIED)?;
        t.insert(APPLIED_INDEX, index)?;
        t.insert(APPLIED_TERM, term)?;
        Ok(())
    }
}
