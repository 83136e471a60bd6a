//! The tarpc `MetadataRpc` service: reads behind a leadership check, mutations through the
//! replicated log, heartbeats into the leader's registry.
//!
//! Reads call `Replica::ensure_leader` (a ReadIndex round: the state machine has applied
//! everything acknowledged before the call) and then read one redb snapshot. Mutations stamp
//! the leader's time (and, for new chunks, its placement) into a [`Command`] and propose it.
//! A follower answers both with `NotLeader` naming the leader's client address.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use rawfs_metadata_api::*;
use rawfs_replication::{ProposeError, Replica, Role};
use serde_bytes::ByteBuf;
use tarpc::context::Context;

use crate::commands::{Command, Reply};
use crate::machine::MetaStateMachine;
use crate::proposer::Proposer;
use crate::queries;
use crate::registry::{place, Registry};
use crate::store::{get_server, Op, ReadTables};

/// State shared by every connection.
pub(crate) struct Shared {
    pub sm: Arc<MetaStateMachine>,
    pub replica: Replica,
    /// Group commit of mutations into the log.
    pub proposer: Proposer,
    pub registry: Mutex<Registry>,
    /// The root directory is known to exist (no need to propose `Init`).
    pub root_ready: AtomicBool,
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
        ProposeError::Fatal { reason } => {
            // This replica has stopped; another one may answer, so the caller may retry.
            tracing::error!(%reason, "replica failed");
            MetaError::Unavailable { reason }
        }
    }
}

impl Server {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.0.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Confirms leadership; returns the term.
    async fn leader_term(&self) -> MetaResult<u64> {
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
    async fn ensure_root(&self) -> MetaResult<()> {
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

    async fn propose(&self, cmd: Command) -> MetaResult<Reply> {
        self.0.proposer.propose(cmd).await
    }

    /// A namespace mutation: root check, then the log.
    async fn mutate(&self, cmd: Command) -> MetaResult<Reply> {
        self.ensure_root().await?;
        self.propose(cmd).await
    }

    /// A linearizable read; returns the query's result and the leader's term.
    async fn query<T>(&self, f: impl FnOnce(&ReadTables, u64) -> Op<T>) -> MetaResult<T> {
        let term = self.leader_term().await?;
        self.ensure_root().await?;
        self.0.sm.read(|rt| f(rt, term))
    }

    async fn do_allocate(&self, ino: Ino, index: u64) -> MetaResult<ChunkLoc> {
        let term = self.leader_term().await?;
        let (existing, key) = self.0.sm.read(|rt| {
            Ok((
                queries::chunk_at(rt, ino, index, term)?,
                queries::next_chunk_id(rt)?,
            ))
        })?;
        if let Some(loc) = existing {
            return Ok(loc);
        }
        let now = Instant::now();
        let servers = {
            let reg = self.registry();
            let candidates = reg.candidates(now);
            if candidates.is_empty() {
                return Err(if reg.warming_up(now) {
                    MetaError::Unavailable {
                        reason: "waiting for chunkserver heartbeats".into(),
                    }
                } else {
                    MetaError::NoSpace {
                        reason: "no live chunkserver with free space".into(),
                    }
                });
            }
            // The counter alone would give every allocation racing with this one the same
            // servers; the file and index spread them.
            let key = key
                ^ ino.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ index.wrapping_mul(0xc2b2_ae3d_27d4_eb4f).rotate_left(17);
            place(&candidates, key, REPLICAS)
        };
        if servers.len() < REPLICAS {
            tracing::warn!(
                ino,
                index,
                live = servers.len(),
                "fewer live chunkservers than replicas: new chunk is under-replicated"
            );
        }
        self.propose(Command::AllocateChunk {
            ino,
            index,
            servers,
        })
        .await?
        .into_chunk()
    }

    async fn do_heartbeat(&self, hb: Heartbeat) -> MetaResult<HeartbeatReply> {
        let term = self.leader_term().await?;
        let server = hb.server;
        let (known, pending, stale, corrupt) = self.0.sm.read(|rt| {
            let known = get_server(&rt.servers, server)?;
            let pending = queries::pending_deletes(rt, server)?;
            let stale = match &hb.inventory {
                Some(inv) => queries::inventory_deletes(rt, server, inv)?,
                None => Vec::new(),
            };
            let mut corrupt = Vec::new();
            for &c in &hb.corrupt {
                if let Some(rec) = queries::chunk_by_id(rt, c)? {
                    corrupt.push((c, rec));
                }
            }
            Ok((known, pending, stale, corrupt))
        })?;
        let addrs_changed = known.as_ref().map_or(true, |k| {
            k.data_addr != hb.data_addr || k.control_addr != hb.control_addr
        });
        if addrs_changed {
            tracing::info!(server, data = %hb.data_addr, "registering chunkserver");
            self.propose(Command::RegisterServer {
                id: server,
                data_addr: hb.data_addr.clone(),
                control_addr: hb.control_addr.clone(),
            })
            .await?
            .into_unit()?;
        }
        let now = Instant::now();
        self.registry().heartbeat(&hb, now);
        for (chunk, rec) in corrupt {
            // Drop a corrupt copy only while another replica is up to serve (and later
            // re-replicate) the chunk; a lone corrupt copy is still the best there is.
            let others_up = {
                let reg = self.registry();
                rec.servers
                    .iter()
                    .any(|&s| s != server && reg.is_up(s, now))
            };
            if rec.servers.contains(&server) && others_up {
                tracing::warn!(chunk, server, "dropping a corrupt replica");
                self.propose(Command::DropReplica {
                    chunk,
                    expected_version: rec.version,
                    server,
                })
                .await?
                .into_chunk()?;
            }
        }
        if !pending.is_empty() {
            self.propose(Command::AckDeletes {
                server,
                chunks: pending.clone(),
            })
            .await?
            .into_unit()?;
        }
        let mut delete = pending;
        delete.extend(stale);
        delete.sort_unstable();
        delete.dedup();
        Ok(HeartbeatReply { term, delete })
    }

    fn build_status(&self, term: u64) -> MetaResult<ClusterStatus> {
        let st = self.0.replica.status();
        let now = Instant::now();
        // One look at the registry, not one lock per replica of every chunk.
        let up: HashSet<ServerId> = self.registry().up_servers(now);
        let is_up = |s| up.contains(&s);
        let (counts, per_server, servers, files) = self.0.sm.read(|rt| {
            let (counts, per) = queries::chunk_counts(rt, &is_up)?;
            Ok((counts, per, queries::servers(rt)?, queries::files(rt)?))
        })?;
        let reg = self.registry();
        let chunkservers = servers
            .into_iter()
            .map(|(id, rec)| {
                let live = reg.get(id);
                ChunkserverStatus {
                    id,
                    data_addr: rec.data_addr,
                    control_addr: rec.control_addr,
                    up: reg.is_up(id, now),
                    healthy: live.is_some_and(|l| l.healthy),
                    used_bytes: live.map_or(0, |l| l.used_bytes),
                    total_bytes: live.map_or(0, |l| l.total_bytes),
                    chunks: per_server.get(&id).copied().unwrap_or(0),
                    last_seen_ms: live.map_or(u64::MAX, |l| {
                        now.saturating_duration_since(l.last_seen).as_millis() as u64
                    }),
                }
            })
            .collect();
        let replicas = st
            .members
            .iter()
            .map(|(&id, node)| {
                let me = id == st.id;
                ReplicaStatus {
                    id,
                    addr: node.client_addr.clone(),
                    role: if me {
                        st.role.to_string()
                    } else if st.role == Role::Leader {
                        "follower".into()
                    } else {
                        "unknown".into()
                    },
                    term: st.term,
                    applied: if me { st.last_applied } else { 0 },
                }
            })
            .collect();
        Ok(ClusterStatus {
            leader: st.leader,
            term,
            replicas,
            chunkservers,
            chunks: counts,
            files,
        })
    }
}

impl MetadataRpc for Server {
    async fn lookup(self, _: Context, parent: Ino, name: Name) -> MetaResult<Attr> {
        self.query(|rt, _| queries::lookup(rt, parent, &name)).await
    }

    async fn getattr(self, _: Context, ino: Ino) -> MetaResult<Attr> {
        self.query(|rt, _| queries::getattr(rt, ino)).await
    }

    async fn setattr(self, _: Context, ino: Ino, set: SetAttr) -> MetaResult<Attr> {
        let now = Timespec::now();
        self.mutate(Command::SetAttr { ino, set, now })
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
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Mknod {
            parent,
            name,
            node,
            caller,
            now,
        };
        self.mutate(cmd).await?.into_attr()
    }

    async fn create(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        node: NewNode,
        caller: Caller,
        session: u64,
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
        self.mutate(cmd).await?.into_attr()
    }

    async fn symlink(
        self,
        _: Context,
        parent: Ino,
        name: Name,
        target: ByteBuf,
        caller: Caller,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Symlink {
            parent,
            name,
            target,
            caller,
            now,
        };
        self.mutate(cmd).await?.into_attr()
    }

    async fn readlink(self, _: Context, ino: Ino) -> MetaResult<ByteBuf> {
        self.query(|rt, _| queries::readlink(rt, ino)).await
    }

    async fn link(self, _: Context, ino: Ino, newparent: Ino, newname: Name) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::Link {
            ino,
            newparent,
            newname,
            now,
        };
        self.mutate(cmd).await?.into_attr()
    }

    async fn unlink(self, _: Context, parent: Ino, name: Name) -> MetaResult<()> {
        let now = Timespec::now();
        self.mutate(Command::Unlink { parent, name, now })
            .await?
            .into_unit()
    }

    async fn rmdir(self, _: Context, parent: Ino, name: Name) -> MetaResult<()> {
        let now = Timespec::now();
        self.mutate(Command::Rmdir { parent, name, now })
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
        self.mutate(cmd).await?.into_unit()
    }

    async fn readdir(
        self,
        _: Context,
        ino: Ino,
        cookie: u64,
        limit: u32,
    ) -> MetaResult<Vec<DirEntry>> {
        self.query(|rt, _| queries::readdir(rt, ino, cookie, limit))
            .await
    }

    async fn open(self, _: Context, ino: Ino, session: u64) -> MetaResult<Attr> {
        self.mutate(Command::Open { ino, session })
            .await?
            .into_attr()
    }

    async fn release(self, _: Context, ino: Ino, session: u64) -> MetaResult<()> {
        self.mutate(Command::Release { ino, session })
            .await?
            .into_unit()
    }

    async fn end_session(self, _: Context, session: u64) -> MetaResult<()> {
        self.mutate(Command::EndSession { session })
            .await?
            .into_unit()
    }

    async fn statfs(self, _: Context) -> MetaResult<StatFs> {
        let files = self.query(|rt, _| queries::files(rt)).await?;
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

    async fn setxattr(
        self,
        _: Context,
        ino: Ino,
        name: Name,
        value: ByteBuf,
        mode: XattrMode,
    ) -> MetaResult<()> {
        let now = Timespec::now();
        let cmd = Command::SetXattr {
            ino,
            name,
            value,
            mode,
            now,
        };
        self.mutate(cmd).await?.into_unit()
    }

    async fn getxattr(self, _: Context, ino: Ino, name: Name) -> MetaResult<ByteBuf> {
        self.query(|rt, _| queries::getxattr(rt, ino, &name)).await
    }

    async fn listxattr(self, _: Context, ino: Ino) -> MetaResult<Vec<Name>> {
        self.query(|rt, _| queries::listxattr(rt, ino)).await
    }

    async fn removexattr(self, _: Context, ino: Ino, name: Name) -> MetaResult<()> {
        let now = Timespec::now();
        self.mutate(Command::RemoveXattr { ino, name, now })
            .await?
            .into_unit()
    }

    async fn chunks(
        self,
        _: Context,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> MetaResult<Vec<ChunkLoc>> {
        self.query(|rt, term| queries::chunks(rt, ino, first, count, term))
            .await
    }

    async fn allocate_chunk(self, _: Context, ino: Ino, index: u64) -> MetaResult<ChunkLoc> {
        self.do_allocate(ino, index).await
    }

    async fn commit_write(
        self,
        _: Context,
        ino: Ino,
        end: u64,
        stored_delta: i64,
    ) -> MetaResult<Attr> {
        let now = Timespec::now();
        let cmd = Command::CommitWrite {
            ino,
            end,
            stored_delta,
            now,
        };
        self.mutate(cmd).await?.into_attr()
    }

    async fn release_chunks(self, _: Context, ino: Ino, first: u64, count: u64) -> MetaResult<()> {
        let now = Timespec::now();
        let cmd = Command::ReleaseChunks {
            ino,
            first,
            count,
            now,
        };
        self.mutate(cmd).await?.into_unit()
    }

    async fn drop_replica(
        self,
        _: Context,
        chunk: ChunkId,
        expected_version: u64,
        server: ServerId,
    ) -> MetaResult<ChunkLoc> {
        let cmd = Command::DropReplica {
            chunk,
            expected_version,
            server,
        };
        self.propose(cmd).await?.into_chunk()
    }

    async fn heartbeat(self, _: Context, hb: Heartbeat) -> MetaResult<HeartbeatReply> {
        self.do_heartbeat(hb).await
    }

    async fn status(self, _: Context) -> MetaResult<ClusterStatus> {
        let term = self.leader_term().await?;
        let me = self.clone();
        // A full scan of the chunk map: keep it off the async workers.
        tokio::task::spawn_blocking(move || me.build_status(term))
            .await
            .map_err(|e| MetaError::Unavailable {
                reason: format!("status task failed: {e}"),
            })?
    }
}
