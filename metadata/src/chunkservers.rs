//! Leader-side work for chunkservers: placing a new chunk on live servers, and answering
//! heartbeats (registration, liveness, the deletions each server owes, corrupt copies
//! dropped and corrupt shards marked lost).

use std::time::Instant;

use rawfs_metadata_api::*;

use crate::commands::Command;
use crate::queries;
use crate::registry::place;
use crate::server::{tracked, Server};
use crate::store::get_server;
use redb::ReadableTableMetadata;

/// Most FENCE orders one heartbeat reply carries from the leader's queue.
const FENCES_PER_REPLY: usize = 10_000;

/// Where a new chunk goes.
enum Placement {
    /// 3 replicas (fewer if fewer servers are live).
    Replicas(Vec<ServerId>),
    /// One RS 4+2 shard on each of 6 servers (a `cold` file).
    Shards(Vec<ServerId>),
}

impl Server {
    pub(crate) async fn do_allocate(
        &self,
        ino: Ino,
        index: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        let term = self.leader_term().await?;
        let (existing, key, cold, registered) = self.0.sm.read(|rt| {
            Ok((
                queries::chunk_at(rt, ino, index, term)?,
                queries::next_chunk_id(rt)?,
                crate::ec_write::is_cold(rt, ino).unwrap_or(false),
                rt.servers.len()?,
            ))
        })?;
        if let Some(loc) = existing {
            return Ok(loc);
        }
        let servers = match self.placement(ino, index, key, cold, registered)? {
            Placement::Replicas(replicas) => replicas,
            Placement::Shards(shards) => {
                let cmd = Command::AllocateEc {
                    ino,
                    index,
                    servers: shards,
                };
                return self
                    .propose(tracked(req, Timespec::now(), cmd))
                    .await?
                    .into_chunk();
            }
        };
        let cmd = Command::AllocateChunk {
            ino,
            index,
            servers,
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_chunk()
    }

    /// Replicas for chunk `index` of `ino`, a file a delegation holder created in `dir` and
    /// is committing with this (see `Command::CommitHeld`'s `allocate`). `None` where the
    /// chunk needs the general path: a cold directory's files are RS 4+2 from the first byte.
    pub(crate) fn held_placement(
        &self,
        dir: Ino,
        ino: Ino,
        index: u64,
    ) -> MetaResult<Option<Vec<ServerId>>> {
        let (key, cold, registered) = self.0.sm.read(|rt| {
            Ok((
                queries::next_chunk_id(rt)?,
                crate::ec_write::is_cold(rt, dir).unwrap_or(false),
                rt.servers.len()?,
            ))
        })?;
        Ok(match self.placement(ino, index, key, cold, registered)? {
            Placement::Replicas(replicas) => Some(replicas),
            Placement::Shards(_) => None,
        })
    }

    /// Where a new chunk `index` of `ino` goes: live servers with free space, spread by
    /// `key` (the next chunk id) and the chunk's place; 6 shards for a `cold` file.
    /// `registered`: how many chunkservers the cluster has ever registered.
    fn placement(
        &self,
        ino: Ino,
        index: u64,
        key: u64,
        cold: bool,
        registered: u64,
    ) -> MetaResult<Placement> {
        let now = Instant::now();
        let reg = self.registry();
        let candidates = reg.candidates(now);
        let wanted = if cold { EC_SHARDS } else { REPLICAS };
        // A new leader knows only the servers whose first heartbeat has reached it. Placing
        // on those alone would give chunks allocated in its first second one or two copies
        // (seen in a fault run: a chunk placed on one server right after a failover became
        // unreadable when that server was killed next). So while it warms up, a short
        // placement waits (retryable) unless the cluster has no more servers to hear from.
        if reg.warming_up(now) && (candidates.len() as u64) < (wanted as u64).min(registered) {
            return Err(MetaError::Unavailable {
                reason: format!(
                    "waiting for chunkserver heartbeats ({} of {registered} heard)",
                    candidates.len()
                ),
            });
        }
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
        if cold && candidates.len() >= EC_SHARDS {
            // A cold file: RS 4+2 from the first byte (see `ec_write.rs`).
            return Ok(Placement::Shards(place(&candidates, key, EC_SHARDS)));
        }
        let replicas = place(&candidates, key, REPLICAS);
        if replicas.len() < REPLICAS {
            tracing::warn!(
                ino,
                index,
                live = replicas.len(),
                "fewer live chunkservers than replicas: new chunk is under-replicated"
            );
        }
        Ok(Placement::Replicas(replicas))
    }

    pub(crate) async fn do_heartbeat(&self, mut hb: Heartbeat) -> MetaResult<HeartbeatReply> {
        let term = self.leader_term().await?;
        let server = hb.server;
        let (known, pending, stale, (corrupt, bad_shards), scrub_rate) = self.0.sm.read(|rt| {
            let known = get_server(&rt.servers, server)?;
            let scrub_rate = crate::limits::settings(rt)?.scrub_rate;
            let pending = queries::pending_deletes(rt, server)?;
            let stale = match &hb.inventory {
                Some(inv) => (
                    queries::inventory_deletes(rt, server, inv)?,
                    queries::inventory_fences(rt, server, inv)?,
                ),
                None => Default::default(),
            };
            let mut corrupt = Vec::new();
            let mut bad_shards = Vec::new();
            for &c in &hb.corrupt {
                if let Some(version) = crate::erasure::shard_held_by(rt, c, server)? {
                    bad_shards.push((c, version));
                } else if let Some(rec) = queries::chunk_by_id(rt, c)? {
                    corrupt.push((c, rec));
                }
            }
            Ok((known, pending, stale, (corrupt, bad_shards), scrub_rate))
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
        let draining = known.as_ref().is_some_and(|k| k.draining);
        {
            let mut reg = self.registry();
            reg.heartbeat(&hb, now);
            reg.set_draining(server, draining);
        }
        if let Some(inv) = hb.inventory.take() {
            // In the background: a scan of the chunk map.
            let me = self.clone();
            tokio::spawn(async move { me.check_missing(server, inv).await });
        }
        if draining {
            // In the background: the reply must not wait for a scan and its proposals.
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.drop_drained_copies(server).await {
                    tracing::warn!(server, error = %e, "dropping drained copies failed");
                }
            });
        }
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
        for (chunk, version) in bad_shards {
            // A shard has no other copy: mark it lost, for reads to decode around it and
            // the healer to rebuild it from the others.
            tracing::warn!(chunk, server, "marking a corrupt shard lost");
            self.propose(Command::DropReplica {
                chunk,
                expected_version: version,
                server,
            })
            .await?
            .into_chunk()?;
        }
        if !pending.is_empty() {
            self.propose(Command::AckDeletes {
                server,
                chunks: pending.clone(),
            })
            .await?
            .into_unit()?;
        }
        let (stale, mut fence) = stale;
        let mut delete = pending;
        delete.sort_unstable();
        delete.dedup();
        // Between the inventory and the reply's arrival, the healer may copy the chunk to this
        // server (a fresh copy, at a newer version): the order names the version seen.
        let delete_stale: Vec<(ChunkId, u64)> = stale
            .into_iter()
            .filter(|(c, _)| delete.binary_search(c).is_err())
            .collect();
        let want_inventory = {
            let mut reg = self.registry();
            fence.extend(reg.take_fences(server, FENCES_PER_REPLY));
            reg.suspects.want_inventory(server, Instant::now())
        };
        Ok(HeartbeatReply {
            term,
            delete,
            delete_stale,
            fence,
            scrub_rate,
            want_inventory,
        })
    }
}

impl Server {
    /// Queues a FENCE of every replicated chunk of the new snapshot `ino` (at its bumped
    /// version) for each server holding it, sent with their next heartbeat replies. The
    /// snapshot's client fences them itself before it reports success; these orders matter
    /// when it died in between: a writer still holding the old location would otherwise
    /// keep writing into chunks the snapshot shares.
    pub(crate) fn queue_snapshot_fences(&self, ino: Ino) {
        let listed = self.0.sm.read(|rt| {
            let mut out = Vec::new();
            for item in rt.chunks.range((ino, 0)..=(ino, u64::MAX))? {
                let (_, v) = item?;
                let rec: crate::store::ChunkRec = crate::store::decode("chunk", v.value())?;
                if rec.ec.is_none() {
                    out.push((rec.chunk, rec.version, rec.servers));
                }
            }
            Ok(out)
        });
        match listed {
            Ok(chunks) => {
                let mut reg = self.registry();
                for (chunk, version, servers) in chunks {
                    for s in servers {
                        reg.queue_fence(s, chunk, version);
                    }
                }
            }
            // The client's own FENCE and the inventory comparison still cover the chunks.
            Err(e) => tracing::warn!(ino, error = %e, "cannot list a snapshot's chunks to fence"),
        }
    }
}
