//! The replicated state machine: decodes committed commands and applies them to the store.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rawfs_metadata_api::{MetaError, MetaResult};
use rawfs_replication::{Entry, StateMachine, StorageError};

use crate::chunks;
use crate::commands::{encode_reply, Command, Reply};
use crate::delegation;
use crate::locks;
use crate::namespace::{self as ns, OpenKind};
use crate::rename;
use crate::requests;
use crate::shares;
use crate::store::{Fail, Op, ReadTables, Store, StoreError, Tables};

/// The metadata state machine over a redb file.
pub struct MetaStateMachine {
    store: Arc<Store>,
    /// This replica leads: its applies commit at once (see [`Store::apply_with`]).
    leading: AtomicBool,
}

impl From<StoreError> for StorageError {
    fn from(e: StoreError) -> Self {
        storage(e)
    }
}

fn storage(e: impl std::fmt::Display) -> StorageError {
    StorageError {
        reason: e.to_string(),
    }
}

impl MetaStateMachine {
    /// Opens (or creates) the state in `path`, with a page cache of `cache_bytes`.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Self, StoreError> {
        Ok(MetaStateMachine {
            store: Arc::new(Store::open(path, cache_bytes)?),
            leading: AtomicBool::new(false),
        })
    }

    /// The underlying store (for durability ticks).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// `(applied index, digest)` of the whole state: see [`Store::digest`].
    pub fn digest(&self) -> Result<(u64, u64), StoreError> {
        self.store.digest()
    }

    /// Runs a read-only query in a fresh read transaction.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&ReadTables) -> Op<T>) -> MetaResult<T> {
        self.read_txn(|txn| f(&ReadTables::open(txn)?))
    }

    /// Runs a read-only query that opens the tables it needs (those `ReadTables` leaves out).
    pub(crate) fn read_txn<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Op<T>,
    ) -> MetaResult<T> {
        let run = || -> Op<T> { f(&self.store.begin_read()?) };
        run().map_err(|e| match e {
            Fail::Meta(m) => m,
            Fail::Store(s) => {
                tracing::error!(error = %s, "metadata read failed");
                MetaError::Storage {
                    reason: s.to_string(),
                }
            }
        })
    }
}

/// Applies one command; `term` is the term of its log entry (the fencing token).
fn dispatch(t: &mut Tables, cmd: &Command, term: u64) -> Op<Reply> {
    use Command::*;
    let unit = |r: Op<()>| r.map(|()| Reply::Unit);
    match cmd {
        Init { now } => unit(ns::init(t, *now)),
        SetAttr { ino, set, now } => ns::setattr(t, *ino, set, *now).map(Reply::Attr),
        Mknod {
            parent,
            name,
            node,
            caller,
            now,
        } => ns::mknod(t, *parent, name, node, *caller, *now).map(Reply::Attr),
        Create {
            parent,
            name,
            node,
            caller,
            session,
            now,
        } => ns::mknod(t, *parent, name, node, *caller, *now)
            .and_then(|a| ns::open(t, a.ino, *session))
            .map(Reply::Attr),
        Symlink {
            parent,
            name,
            target,
            caller,
            now,
        } => ns::symlink(t, *parent, name, target, *caller, *now).map(Reply::Attr),
        Link {
            ino,
            newparent,
            newname,
            now,
        } => ns::link(t, *ino, *newparent, newname, *now).map(Reply::Attr),
        Unlink { parent, name, now } => unit(ns::unlink(t, *parent, name, *now)),
        Rmdir { parent, name, now } => unit(ns::rmdir(t, *parent, name, *now)),
        Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
            now,
        } => unit(rename::rename(
            t, *parent, name, *newparent, newname, *flags, *now,
        )),
        Open { ino, session } => ns::open(t, *ino, *session).map(Reply::Attr),
        OpenMany { opens, then } => {
            for &(ino, session) in opens {
                ns::open_leased(t, ino, session)?;
            }
            match then.as_deref() {
                Some(OpenMany { .. } | Batch(_)) => Err(Fail::Meta(MetaError::Invalid {
                    reason: "nested open batch".into(),
                })),
                Some(cmd) => dispatch(t, cmd, term),
                None => Ok(Reply::Unit),
            }
        }
        Release { ino, session } => unit(ns::release(t, *ino, *session, OpenKind::Logged)),
        ReleaseMany { inos, session } => unit(
            inos.iter()
                .try_for_each(|&ino| ns::release(t, ino, *session, OpenKind::Logged)),
        ),
        ReleaseLeased { inos, session } => unit(
            inos.iter()
                .try_for_each(|&ino| ns::release(t, ino, *session, OpenKind::Leased)),
        ),
        EndSession { session } => unit(
            ns::end_session(t, *session)
                .and_then(|()| delegation::end_session(t, *session))
                .and_then(|()| locks::drop_session(t, *session)),
        ),
        SetLock { ino, session, lock } => locks::set(t, *ino, *session, lock).map(Reply::Lock),
        DropLocks { session } => unit(locks::drop_session(t, *session)),
        DelegateLocks { ino, session } => locks::delegate(t, *ino, *session).map(Reply::Delegation),
        ReturnLocks {
            ino,
            session,
            locks,
        } => unit(locks::take_back(t, *ino, *session, locks.as_deref())),
        SetXattr {
            ino,
            name,
            value,
            mode,
            now,
        } => unit(ns::setxattr(t, *ino, name, value, *mode, *now)),
        RemoveXattr { ino, name, now } => unit(ns::removexattr(t, *ino, name, *now)),
        AllocateChunk {
            ino,
            index,
            servers,
        } => chunks::allocate(t, *ino, *index, servers, term).map(Reply::Chunk),
        CommitWrite {
            ino,
            end,
            stored_delta,
            now,
        } => chunks::commit_write(t, *ino, *end, *stored_delta, *now).map(Reply::Attr),
        ReleaseChunks {
            ino,
            first,
            count,
            now,
        } => unit(chunks::release_chunks(t, *ino, *first, *count, *now)),
        DropReplica {
            chunk,
            expected_version,
            server,
        } => chunks::drop_replica(t, *chunk, *expected_version, *server, term).map(Reply::Chunk),
        RegisterServer {
            id,
            data_addr,
            control_addr,
        } => unit(chunks::register_server(t, *id, data_addr, control_addr)),
        AckDeletes { server, chunks } => unit(chunks::ack_deletes(t, *server, chunks)),
        SetDraining { server, draining } => unit(crate::drain::set_draining(t, *server, *draining)),
        SetHealerSettings {
            repair_rate,
            scrub_rate,
        } => unit(crate::limits::set_settings(t, *repair_rate, *scrub_rate)),
        Snapshot {
            origin,
            parent,
            name,
            read_only,
            label,
            now,
        } => shares::snapshot(t, *origin, *parent, name, *read_only, label, *now).map(Reply::Attr),
        CowChunk { ino, index, chunk } => {
            shares::cow(t, *ino, *index, *chunk, term).map(Reply::Cow)
        }
        CowDone {
            ino,
            index,
            chunk,
            failed,
        } => shares::cow_done(t, *ino, *index, *chunk, failed, term).map(Reply::Chunk),
        AddReplica {
            chunk,
            version,
            server,
            term: order_term,
        } => crate::healing::add_replica(t, *chunk, *version, *server, *order_term, term)
            .map(Reply::Chunk),
        ReplaceShard {
            chunk,
            version,
            shard,
            server,
            term: order_term,
        } => {
            crate::healing::replace_shard(t, *chunk, *version, *shard, *server, (*order_term, term))
                .map(Reply::Chunk)
        }
        EcPrepare { .. } | EcCommit { .. } | CowPlaced { .. } => {
            crate::erasure::dispatch(t, cmd, term)
        }
        DropMissing {
            chunk,
            expected_version,
            server,
        } => {
            let loc = chunks::drop_replica(t, *chunk, *expected_version, *server, term)?;
            chunks::ack_deletes(t, *server, &[*chunk])?;
            Ok(Reply::Chunk(loc))
        }
        AllocateEc {
            ino,
            index,
            servers,
        } => crate::ec_write::allocate(t, *ino, *index, servers, term).map(Reply::Chunk),
        EcExtend {
            ino,
            index,
            chunk,
            version,
            shards,
            from,
            to,
        } => crate::ec_write::extend(
            t,
            (*ino, *index),
            *chunk,
            *version,
            shards,
            (*from, *to),
            term,
        )
        .map(Reply::Chunk),
        RecordLeaseTerm { term } => unit(crate::leases::record(t, *term)),
        MkdirHeld {
            parent,
            name,
            node,
            caller,
            holder,
            now,
        } => delegation::mkdir_held(t, (*parent, name), node, *caller, *holder, *now)
            .map(Reply::Attr),
        ReserveInodes { count } => delegation::reserve(t, *count).map(Reply::Number),
        CommitHeld {
            dir,
            holder,
            ops,
            give_back,
            allocate,
        } => {
            delegation::commit(t, *dir, *holder, ops, *give_back)?;
            if allocate.is_empty() {
                return Ok(Reply::Unit);
            }
            let mut out = Vec::with_capacity(allocate.len());
            for (ino, index, servers) in allocate {
                out.push(Ok(match chunks::allocate(t, *ino, *index, servers, term) {
                    Ok(loc) => Reply::Chunk(loc),
                    Err(Fail::Meta(_)) => Reply::Unit,
                    Err(e) => return Err(e),
                }));
            }
            Ok(Reply::Batch(out))
        }
        Revoke { dir, holder } => unit(delegation::revoke(t, *dir, *holder)),
        Batch(cmds) => {
            let mut out = Vec::with_capacity(cmds.len());
            for c in cmds {
                let r = match c {
                    Batch(_) => Err(Fail::Meta(MetaError::Invalid {
                        reason: "nested batch".into(),
                    })),
                    c => dispatch(t, c, term),
                };
                match r {
                    Ok(r) => out.push(Ok(r)),
                    Err(Fail::Meta(m)) => out.push(Err(m)),
                    Err(Fail::Store(s)) => return Err(Fail::Store(s)),
                }
            }
            Ok(Reply::Batch(out))
        }
        Tracked { req, now, cmd } => {
            requests::apply_once(t, *req, *now, cmd, |t, c| dispatch(t, c, term))
        }
    }
}

impl StateMachine for MetaStateMachine {
    fn apply(
        &self,
        entries: &[Entry<'_>],
        replication_state: &[u8],
    ) -> Result<Vec<Vec<u8>>, StorageError> {
        let defer = !self.leading.load(Ordering::Relaxed);
        self.store.apply_with(entries.len(), defer, |txn| {
            let mut out = Vec::with_capacity(entries.len());
            {
                let mut t = Tables::open(txn).map_err(storage)?;
                for e in entries {
                    let Some(bytes) = e.command else {
                        out.push(Vec::new());
                        continue;
                    };
                    let reply: MetaResult<Reply> = match Command::decode(bytes) {
                        Ok(cmd) => match dispatch(&mut t, &cmd, e.term) {
                            Ok(r) => Ok(r),
                            Err(Fail::Meta(m)) => Err(m),
                            Err(Fail::Store(s)) => {
                                // Dropping the transaction discards the whole batch; the log
                                // still has it, so nothing acknowledged is lost.
                                tracing::error!(index = e.index, error = %s, "applying entry failed");
                                return Err(storage(s));
                            }
                        },
                        Err(err) => {
                            // Every replica decodes the same bytes the same way, so refusing
                            // the entry keeps them in step.
                            tracing::error!(index = e.index, error = %err, "undecodable command");
                            Err(MetaError::Invalid {
                                reason: "undecodable command".into(),
                            })
                        }
                    };
                    out.push(encode_reply(&reply).map_err(storage)?);
                }
            }
            if let Some(last) = entries.last() {
                Store::put_applied(txn, last.index, last.term).map_err(storage)?;
            }
            Store::put_replication_state(txn, replication_state).map_err(storage)?;
            Ok(out)
        })
    }

    fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    fn replication_state(&self) -> Result<Option<Vec<u8>>, StorageError> {
        self.store.replication_state().map_err(storage)
    }

    fn snapshot(&self) -> Result<Vec<u8>, StorageError> {
        self.store.snapshot().map_err(storage)
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), StorageError> {
        self.store.restore(snapshot).map_err(storage)
    }
}
