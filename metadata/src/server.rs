//! The tarpc `MetadataRpc` service: reads behind a leadership check (or from the local state
//! when the caller accepts staleness), mutations through the replicated log, heartbeats into
//! the leader's registry.
//!
//! Linearizable reads call `Replica::ensure_leader` (a ReadIndex round or the leader lease:
//! the state machine has applied everything acknowledged before the call) and then read one
//! redb snapshot. Local reads skip that check on any replica that knows of a leader.
//! Mutations stamp the leader's time (and, for new chunks, its placement) into a
//! [`Command`], wrapped in [`Command::Tracked`] with the caller's request id, and propose it.
//! A follower answers mutations and linearizable reads with `NotLeader` naming the leader's
//! client address.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rawfs_metadata_api::*;
use rawfs_replication::{Node, ProposeError, Replica, Role};
use serde_bytes::ByteBuf;
use tarpc::context::Context;

use crate::cluster::{own_status, Members};
use crate::commands::{Command, Reply};
use crate::events::{self, EventLog};
use crate::machine::MetaStateMachine;
use crate::proposer::Proposer;
use crate::queries;
use crate::registry::Registry;

/// State shared by every connection.
pub(crate) struct Shared {
    pub sm: Arc<MetaStateMachine>,
    pub replica: Replica,
    /// Group commit of mutations into the log.
    pub proposer: Proposer,
    pub registry: Mutex<Registry>,
    /// The root directory is known to exist (no need to propose `Init`).
    pub root_ready: AtomicBool,
    /// This replica's client address (for `replica_status`).
    pub addr: String,
    /// Connections to the other members and membership changes in progress.
    pub members: Arc<Members>,
    /// Cache invalidations published to watching clients while this replica leads.
    pub events: EventLog,
    /// Woken when this leader ends a directory delegation (`recall.rs` waits on it).
    pub delegations_changed: tokio::sync::Notify,
    /// When each recall in progress started: (directory, holder) -> start.
    pub recalling: Mutex<std::collections::HashMap<(Ino, u64), Instant>>,
    /// Opens this leader keeps in memory (`open_table.rs`).
    pub opens: crate::open_table::OpenTable,
    /// Lock sessions' liveness and lock waiters (`locks.rs`).
    pub locks: crate::locks::LockState,
}

/// One handle on the shared state per request (cheap clone).
#[derive(Clone)]
pub(crate) struct Server(pub Arc<Shared>);

pub(crate) fn propose_error(e: ProposeError) -> MetaError {
    match e {
        ProposeError::NotLeader {
            leader,
            leader_node,
            term,
        } => MetaError::NotLeader {
            leader,
            leader_addr: leader_node.map(|n| n.client_addr),
            term,
        },
        ProposeError::Unavailable { reason } => MetaError::Unavailable { reason },
        ProposeError::Rejected { reason } => MetaError::Invalid { reason },
        ProposeError::Fatal { reason } => {
            // This replica has stopped; another one may answer, so the caller may retry.
            tracing::error!(%reason, "replica failed");
            MetaError::Unavailable { reason }
        }
    }
}

/// `cmd` applied at most once for the caller's request `req` (see `requests.rs`).
pub(crate) fn tracked(req: ReqId, now: Timespec, cmd: Command) -> Command {
    Command::Tracked {
        req,
        now,
        cmd: Box::new(cmd),
    }
}

impl Server {
    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        self.0.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Confirms leadership; returns the term.
    pub(crate) async fn leader_term(&self) -> MetaResult<u64> {
        let term = self
            .0
            .replica
            .ensure_leader()
            .await
            .map_err(propose_error)?;
        self.registry().note_term(term, Instant::now());
        Ok(term)
    }

    /// Proposes `Init` once if the root directory is missing (a fresh cluster).
    pub(crate) async fn ensure_root(&self) -> MetaResult<()> {
        if self.0.root_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let exists = self
            .0
            .sm
            .read(|rt| Ok(crate::store::get_inode(&rt.inodes, ROOT_INO)?.is_some()))?;
        if !exists {
            self.propose(Command::Init {
                now: Timespec::now(),
            })
            .await?
            .into_unit()?;
            tracing::info!("created the root directory");
        }
        self.0.root_ready.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) async fn propose(&self, cmd: Command) -> MetaResult<Reply> {
        self.0.proposer.propose(cmd).await
    }

    /// A namespace mutation: root check, then the log.
    pub(crate) async fn mutate(&self, cmd: Command) -> MetaResult<Reply> {
        self.ensure_root().await?;
        self.propose(cmd).await
    }

    /// A namespace mutation on behalf of request `req`, applied at most once.
    async fn mutate_once(&self, req: ReqId, now: Timespec, cmd: Command) -> MetaResult<Reply> {
        self.mutate_once_by(req, now, cmd, None).await
    }

    /// [`Server::mutate_once`] asked by the holder of a directory's delegation:
    /// `by_holder` = (that directory, holder), which is not recalled.
    async fn mutate_once_by(
        &self,
        req: ReqId,
        now: Timespec,
        cmd: Command,
        by_holder: Option<(Ino, u64)>,
    ) -> MetaResult<Reply> {
        self.recall_for(&cmd, by_holder).await?;
        let replaced = self.replaced_by(&cmd);
        let invals = events::stale(&cmd, &replaced);
        let reply = if crate::open_table::removes_links(&cmd) {
            self.propose_removing_links(tracked(req, now, cmd)).await?
        } else {
            self.mutate(tracked(req, now, cmd)).await?
        };
        // Published, and acknowledged by the other watching mounts, before the caller hears
        // back: once it has, no other mount still shows the old state (see `events`). A
        // failed change publishes nothing.
        if !invals.is_empty() {
            let (term, _) = self.0.replica.term_and_leading();
            let end = self.0.events.publish(term, req.client, invals);
            self.0.events.wait_acked(term, req.client, end).await;
        }
        Ok(reply)
    }

    /// The inodes that the entries `cmd` removes or replaces name now (their link counts
    /// change); empty for other commands. Read before proposing: if the entry changes
    /// meanwhile, that change publishes its own events.
    fn replaced_by(&self, cmd: &Command) -> events::Replaced {
        let at = |parent: Ino, name: &[u8]| {
            self.0
                .sm
                .read(|rt| queries::lookup(rt, parent, name))
                .ok()
                .map(|a| a.ino)
        };
        let inos = match cmd {
            Command::Unlink { parent, name, .. } => at(*parent, name).into_iter().collect(),
            Command::Rename {
                parent,
                name,
                newparent,
                newname,
                ..
            } => at(*parent, name)
                .into_iter()
                .chain(at(*newparent, newname))
                .collect(),
            _ => Vec::new(),
        };
        events::Replaced { inos }
    }

    /// A redirect to the leader as this replica knows it (for calls only the leader can
    /// answer, even at local consistency).
    fn not_leader(&self) -> MetaError {
        let st = self.0.replica.status();
        propose_error(ProposeError::NotLeader {
            leader: st.leader,
            leader_node: st.leader_node,
            term: st.term,
        })
    }
}

impl MetadataRpc for Server {
    async fn lookup(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        read: Consistency,
    ) -> MetaResult<Attr> {
        if read == Consistency::Linearizable {
            self.recall_dir(parent, None).await?;
        }
        self.query(read, |rt, _| queries::lookup(rt, parent, &name))
            .await
    }

    async fn getattr(self, _: Context, ino: Ino, read: Consistency) -> MetaResult<Attr> {
        self.query(read, |rt, _| queries::getattr(rt, ino)).await
    }

    async fn setattr(self, _: Context, ino: Ino, set: SetAttr, req: ReqId) -> MetaResult<Attr> {
        let now = Timespec::now();
        self.mutate_once(req, now, Command::SetAttr { ino, set, now })
            .await?
            .into_attr()
    }

    async fn mknod(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Mknod {
            parent,
            name,
            node,
            caller,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_attr()
    }

    async fn create(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        session: u64,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Create {
            parent,
            name,
            node,
            caller,
            session,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_attr()
    }

    async fn symlink(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        target: ByteBuf,
        caller: Caller,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Symlink {
            parent,
            name,
            target,
            caller,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_attr()
    }

    async fn mkdir_held(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        holder: u64,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::MkdirHeld {
            parent,
            name,
            node,
            caller,
            holder,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_attr()
    }

    async fn reserve_inodes(self, _: Context, count: u32, req: ReqId) -> MetaResult<Ino> {
        let cmd = Command::ReserveInodes {
            count: u64::from(count),
        };
        self.mutate(tracked(req, Timespec::now(), cmd))
            .await?
            .into_number()
    }

    async fn commit_held(
        self,
        _: Context,
        dir: Ino,
        holder: u64,
        ops: Vec<HeldOp>,
        give_back: bool,
        req: ReqId,
    ) -> MetaResult<()> {
        let now = Timespec::now();
        let cmd = Command::CommitHeld {
            dir,
            holder,
            ops,
            give_back,
            allocate: Vec::new(),
        };
        let done = self.mutate_once(req, now, cmd).await;
        if give_back {
            self.0.delegations_changed.notify_waiters();
        }
        done?.into_unit()
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit_held_allocating(
        self,
        _: Context,
        dir: Ino,
        holder: u64,
        ops: Vec<HeldOp>,
        files: Vec<Ino>,
        req: ReqId,
    ) -> MetaResult<Vec<Option<ChunkLoc>>> {
        if files.len() > MAX_HELD_ALLOCATIONS {
            return Err(MetaError::Invalid {
                reason: format!("more than {MAX_HELD_ALLOCATIONS} chunks in one commit"),
            });
        }
        let now = Timespec::now();
        // No servers to be had is the general path's to report: those files get `None`.
        let mut allocate = Vec::with_capacity(files.len());
        let mut placed = Vec::with_capacity(files.len());
        for &ino in &files {
            let servers = self.held_placement(dir, ino, 0).ok().flatten();
            placed.push(servers.is_some());
            allocate.extend(servers.map(|s| (ino, 0, s)));
        }
        let cmd = Command::CommitHeld {
            dir,
            holder,
            ops,
            give_back: false,
            allocate,
        };
        let unexpected = |other: &Reply| MetaError::Storage {
            reason: format!("commit_held_allocating: unexpected reply {other:?}"),
        };
        let mut chunks = match self.mutate_once(req, now, cmd).await? {
            Reply::Batch(replies) => replies.into_iter(),
            Reply::Unit => Vec::new().into_iter(),
            other => return Err(unexpected(&other)),
        };
        let mut out = Vec::with_capacity(files.len());
        for was_placed in placed {
            out.push(match was_placed.then(|| chunks.next()).flatten() {
                Some(Ok(Reply::Chunk(loc))) => Some(loc),
                Some(Ok(Reply::Unit)) | None => None,
                Some(Err(e)) => return Err(e),
                Some(Ok(other)) => return Err(unexpected(&other)),
            });
        }
        Ok(out)
    }

    async fn readlink(self, _: Context, ino: Ino, read: Consistency) -> MetaResult<ByteBuf> {
        self.query(read, |rt, _| queries::readlink(rt, ino)).await
    }

    async fn link(
        self,
        _: Context,
        ino: Ino,
        newparent: Ino,
        newname: Name,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Link {
            ino,
            newparent,
            newname,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_attr()
    }

    async fn unlink(self, _: Context, parent: Ino, name: Name, req: ReqId) -> MetaResult<()> {
        let now = Timespec::now();
        self.mutate_once(req, now, Command::Unlink { parent, name, now })
            .await?
            .into_unit()
    }

    async fn rmdir(self, _: Context, parent: Ino, name: Name, req: ReqId) -> MetaResult<()> {
        let now = Timespec::now();
        self.mutate_once(req, now, Command::Rmdir { parent, name, now })
            .await?
            .into_unit()
    }

    async fn rmdir_held(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        holder: u64,
        req: ReqId,
    ) -> MetaResult<()> {
        let now = Timespec::now();
        let cmd = Command::Rmdir { parent, name, now };
        self.mutate_once_by(req, now, cmd, Some((parent, holder)))
            .await?
            .into_unit()
    }

    async fn rename(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        newparent: Ino,
        newname: Name,
        flags: RenameFlags,
        req: ReqId,
    ) -> MetaResult<()> {
        let now = Timespec::now();
        let cmd = Command::Rename {
            parent,
            name,
            newparent,
            newname,
            flags,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_unit()
    }

    async fn readdir(
        self,
        _: Context,
        ino: Ino,
        cookie: u64,
        limit: u32,
        read: Consistency,
    ) -> MetaResult<Vec<DirEntry>> {
        if read == Consistency::Linearizable {
            self.recall_dir(ino, None).await?;
        }
        self.query(read, |rt, _| queries::readdir(rt, ino, cookie, limit))
            .await
    }

    async fn readdir_held(
        self,
        _: Context,
        dir: Ino,
        holder: u64,
        cookie: u64,
        limit: u32,
    ) -> MetaResult<Vec<DirEntry>> {
        self.recall_dir(dir, Some(holder)).await?;
        self.query(Consistency::Linearizable, |rt, _| {
            queries::readdir(rt, dir, cookie, limit)
        })
        .await
    }

    async fn open(self, _: Context, ino: Ino, session: u64) -> MetaResult<Attr> {
        self.mutate(Command::Open { ino, session })
            .await?
            .into_attr()
    }

    async fn open_leased(self, _: Context, ino: Ino, session: u64) -> MetaResult<LeasedOpen> {
        self.ensure_root().await?;
        Server::open_leased(&self, ino, session).await
    }

    async fn reopen(self, _: Context, opens: Vec<(Ino, u64)>, session: u64) -> MetaResult<u64> {
        Server::reopen(&self, opens, session).await
    }

    async fn release_leased(self, _: Context, inos: Vec<Ino>, session: u64) -> MetaResult<()> {
        Server::release_leased(&self, inos, session).await
    }

    async fn release(self, _: Context, ino: Ino, session: u64) -> MetaResult<()> {
        self.mutate(Command::Release { ino, session })
            .await?
            .into_unit()
    }

    async fn release_many(self, _: Context, inos: Vec<Ino>, session: u64) -> MetaResult<()> {
        self.mutate(Command::ReleaseMany { inos, session })
            .await?
            .into_unit()
    }

    async fn end_session(self, _: Context, session: u64) -> MetaResult<()> {
        self.0.opens.end_session(session);
        let done = self.mutate(Command::EndSession { session }).await;
        // It also ended the session's delegations and dropped its locks.
        self.0.delegations_changed.notify_waiters();
        self.0.locks.changed.notify_waiters();
        done?.into_unit()
    }

    async fn set_lock(
        self,
        _: Context,
        ino: Ino,
        session: u64,
        lock: LockRequest,
        wait_ms: u32,
    ) -> MetaResult<Option<LockConflict>> {
        Server::set_lock(&self, ino, session, lock, wait_ms).await
    }

    async fn test_lock(
        self,
        _: Context,
        ino: Ino,
        session: u64,
        lock: LockRequest,
    ) -> MetaResult<Option<LockConflict>> {
        Server::test_lock(&self, ino, session, lock).await
    }

    async fn renew_locks(self, _: Context, session: u64) -> MetaResult<Vec<Ino>> {
        Server::renew_locks(&self, session).await
    }

    async fn delegate_locks(
        self,
        _: Context,
        ino: Ino,
        session: u64,
    ) -> MetaResult<Option<LockDelegation>> {
        Server::delegate_locks(&self, ino, session).await
    }

    async fn return_locks(
        self,
        _: Context,
        ino: Ino,
        session: u64,
        locks: Option<Vec<HeldLock>>,
        req: ReqId,
    ) -> MetaResult<()> {
        Server::return_locks(&self, ino, session, locks, req).await
    }

    async fn statfs(self, _: Context, read: Consistency) -> MetaResult<StatFs> {
        // Capacity lives in the leader's registry (heartbeats), so even a local statfs is
        // the leader's to answer; only the leadership confirmation is skipped.
        if read == Consistency::Local && self.0.replica.status().role != Role::Leader {
            return Err(self.not_leader());
        }
        let files = self.query(read, |rt, _| queries::files(rt)).await?;
        let (total_bytes, free_bytes) = self.registry().capacity(Instant::now());
        Ok(StatFs {
            total_bytes,
            free_bytes,
            files,
            replicas: REPLICAS as u32,
        })
    }

    async fn sync(self, _: Context) -> MetaResult<()> {
        self.0.replica.sync_log().await.map_err(propose_error)
    }

    async fn watch(
        self,
        _: Context,
        watcher: u64,
        epoch: u64,
        from: u64,
        wait_ms: u32,
    ) -> MetaResult<WatchReply> {
        // Only the leader publishes; a role check is enough (a deposed leader's events are
        // of its old term, and its clients move to the new leader's epoch).
        let st = self.0.replica.status();
        if st.role != Role::Leader {
            return Err(MetaError::NotLeader {
                leader: st.leader,
                leader_addr: st.leader_node.map(|n| n.client_addr),
                term: st.term,
            });
        }
        let wait = std::time::Duration::from_millis(u64::from(wait_ms));
        Ok(self
            .0
            .events
            .watch(st.term, watcher, epoch, from, wait)
            .await)
    }

    async fn setxattr(
        self,
        _: Context,
        ino: Ino,
        name: Name,
        value: ByteBuf,
        mode: XattrMode,
        req: ReqId,
    ) -> MetaResult<()> {
        let now = Timespec::now();
        let cmd = Command::SetXattr {
            ino,
            name,
            value,
            mode,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_unit()
    }

    async fn getxattr(
        self,
        _: Context,
        ino: Ino,
        name: Name,
        read: Consistency,
    ) -> MetaResult<ByteBuf> {
        self.query(read, |rt, _| queries::getxattr(rt, ino, &name))
            .await
    }

    async fn listxattr(self, _: Context, ino: Ino, read: Consistency) -> MetaResult<Vec<Name>> {
        self.query(read, |rt, _| queries::listxattr(rt, ino)).await
    }

    async fn removexattr(self, _: Context, ino: Ino, name: Name, req: ReqId) -> MetaResult<()> {
        let now = Timespec::now();
        self.mutate_once(req, now, Command::RemoveXattr { ino, name, now })
            .await?
            .into_unit()
    }

    async fn chunks(
        self,
        _: Context,
        ino: Ino,
        first: u64,
        count: u64,
        read: Consistency,
    ) -> MetaResult<Vec<ChunkLoc>> {
        self.query(read, |rt, term| {
            queries::chunks(rt, ino, first, count, term)
        })
        .await
    }

    async fn allocate_chunk(
        self,
        _: Context,
        ino: Ino,
        index: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        self.do_allocate(ino, index, req).await
    }

    async fn commit_write(
        self,
        _: Context,
        ino: Ino,
        end: u64,
        stored_delta: i64,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::CommitWrite {
            ino,
            end,
            stored_delta,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_attr()
    }

    async fn release_chunks(
        self,
        _: Context,
        ino: Ino,
        first: u64,
        count: u64,
        req: ReqId,
    ) -> MetaResult<()> {
        let now = Timespec::now();
        let cmd = Command::ReleaseChunks {
            ino,
            first,
            count,
            now,
        };
        self.mutate_once(req, now, cmd).await?.into_unit()
    }

    async fn drop_replica(
        self,
        _: Context,
        chunk: ChunkId,
        expected_version: u64,
        server: ServerId,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        let cmd = Command::DropReplica {
            chunk,
            expected_version,
            server,
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_chunk()
    }

    async fn snapshot(
        self,
        _: Context,
        origin: Ino,
        parent: Ino,
        name: Name,
        read_only: bool,
        label: ByteBuf,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Snapshot {
            origin,
            parent,
            name,
            read_only,
            label,
            now,
        };
        let attr = self.mutate_once(req, now, cmd).await?.into_attr()?;
        self.queue_snapshot_fences(attr.ino);
        Ok(attr)
    }

    async fn cow_chunk(
        self,
        _: Context,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        req: ReqId,
    ) -> MetaResult<CowLoc> {
        self.do_cow_chunk(ino, index, chunk, req).await
    }

    async fn cow_done(
        self,
        _: Context,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        failed: Vec<ServerId>,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        let cmd = Command::CowDone {
            ino,
            index,
            chunk,
            failed,
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_chunk()
    }

    async fn endangered_chunks(
        self,
        _: Context,
        after: ChunkId,
        limit: u32,
    ) -> MetaResult<EndangeredPage> {
        self.do_endangered(after, limit).await
    }

    async fn add_replica(
        self,
        _: Context,
        chunk: ChunkId,
        version: u64,
        server: ServerId,
        term: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        self.do_add_replica(chunk, version, server, term, req).await
    }

    async fn replace_shard(
        self,
        _: Context,
        chunk: ChunkId,
        version: u64,
        shard: ChunkId,
        server: ServerId,
        term: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        self.do_replace_shard(chunk, version, shard, server, (term, req))
            .await
    }

    async fn set_class(
        self,
        _: Context,
        ino: Ino,
        class: StorageClass,
        req: ReqId,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = crate::classes::set_class_command(ino, class, now);
        self.mutate_once(req, now, cmd).await?.into_unit()?;
        // Applied here before the reply (see `Replica::propose`), so the local state has it.
        self.0.sm.read(|rt| queries::getattr(rt, ino))
    }

    async fn get_class(self, _: Context, ino: Ino, read: Consistency) -> MetaResult<StorageClass> {
        self.query(read, |rt, _| crate::classes::get_class(rt, ino))
            .await
    }

    async fn cold_chunks(
        self,
        _: Context,
        after: (Ino, u64),
        quiet_ms: u64,
        limit: u32,
        read: Consistency,
    ) -> MetaResult<ColdPage> {
        let now = Timespec::now();
        self.query(read, |rt, _| {
            crate::classes::cold_chunks(rt, after, quiet_ms, limit, now)
        })
        .await
    }

    async fn ec_prepare(
        self,
        _: Context,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        req: ReqId,
    ) -> MetaResult<EcPlan> {
        self.do_ec_prepare(ino, index, chunk, version, req).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn ec_commit(
        self,
        _: Context,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        length: u64,
        term: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        self.do_ec_commit(ino, index, chunk, version, length, term, req)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn ec_extend(
        self,
        _: Context,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        shards: Vec<(ChunkId, ServerId)>,
        from: u64,
        to: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        self.do_ec_extend((ino, index), chunk, version, shards, from, to, req)
            .await
    }

    async fn volume_lease(
        self,
        _: Context,
        ino: Ino,
        holder: u64,
        ttl_ms: u64,
        renew: bool,
    ) -> MetaResult<u64> {
        self.do_volume_lease((ino, holder), ttl_ms, renew).await
    }

    async fn end_volume_lease(self, _: Context, ino: Ino, holder: u64) -> MetaResult<()> {
        self.do_end_volume_lease(ino, holder).await
    }

    async fn healer_lease(self, _: Context, holder: u64, ttl_ms: u64) -> MetaResult<HealerLease> {
        self.do_healer_lease(holder, ttl_ms).await
    }

    async fn heartbeat(self, _: Context, hb: Heartbeat) -> MetaResult<HeartbeatReply> {
        self.do_heartbeat(hb).await
    }

    async fn status(self, _: Context) -> MetaResult<ClusterStatus> {
        let term = self.leader_term().await?;
        let me = self.clone();
        // A full scan of the chunk map: keep it off the async workers. The members are
        // asked meanwhile.
        let scan = tokio::task::spawn_blocking(move || me.build_status(term));
        let st = self.0.replica.status();
        let members = self.0.members.statuses(&st, &self.0.addr);
        let (scan, replicas) = futures::join!(scan, members);
        let mut status = scan.map_err(|e| MetaError::Unavailable {
            reason: format!("status task failed: {e}"),
        })??;
        status.replicas = replicas;
        Ok(status)
    }

    async fn replica_status(self, _: Context) -> MetaResult<ReplicaStatus> {
        Ok(own_status(&self.0.replica.status(), &self.0.addr))
    }

    async fn digest(self, _: Context) -> MetaResult<StateDigest> {
        let sm = self.0.sm.clone();
        let (applied, digest) = tokio::task::spawn_blocking(move || sm.digest())
            .await
            .map_err(|e| MetaError::Unavailable {
                reason: format!("digest task failed: {e}"),
            })?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot compute the state digest");
                MetaError::Storage {
                    reason: e.to_string(),
                }
            })?;
        Ok(StateDigest { applied, digest })
    }

    async fn add_peer(
        self,
        _: Context,
        id: u64,
        addr: String,
        raft_addr: String,
    ) -> MetaResult<()> {
        let node = Node {
            raft_addr,
            client_addr: addr,
        };
        self.0
            .members
            .add_peer(&self.0.replica, id, node)
            .await
            .map_err(propose_error)
    }

    async fn remove_peer(self, _: Context, id: u64) -> MetaResult<()> {
        self.0.replica.remove_peer(id).await.map_err(propose_error)
    }

    async fn drain_chunkserver(
        self,
        _: Context,
        server: ServerId,
        draining: bool,
        req: ReqId,
    ) -> MetaResult<()> {
        let cmd = Command::SetDraining { server, draining };
        let cmd = tracked(req, Timespec::now(), cmd);
        self.do_drain(server, draining, cmd).await
    }

    async fn set_healer_settings(
        self,
        _: Context,
        repair_rate: RateChange,
        scrub_rate: RateChange,
        req: ReqId,
    ) -> MetaResult<HealerSettings> {
        self.do_set_healer_settings(repair_rate, scrub_rate, req)
            .await
    }

    async fn healer_report(
        self,
        _: Context,
        holder: u64,
        report: HealerReport,
    ) -> MetaResult<HealerSettings> {
        self.do_healer_report(holder, report).await
    }
}
