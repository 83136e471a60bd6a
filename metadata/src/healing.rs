//! What the healer needs from the metadata service: the endangered chunks, committing a new
//! copy, and the lease that lets one healer work at a time.
//!
//! ```text
//!  healer ── healer_lease(holder, ttl) ──▶ leader registry (soft state)
//!         ── endangered_chunks(after) ───▶ chunk map scan + registry liveness
//!         ── copy chunk: source ──read (crc checked)──▶ healer ──write (version, term)──▶ target
//!         ── add_replica(chunk, version, target, term) ─▶ log: version + 1, target listed
//!         ── FENCE(chunk, version + 1) on every listed replica
//!  erasure coded: read 4 live shards, decode, write the lost shard (same id, same version)
//!         ── replace_shard(chunk, version, shard, target, term) ─▶ log: shard on target
//! ```
//!
//! Why `add_replica` bumps the version: writers keep chunk locations cached. One that
//! fetched the location before the commit would keep writing to the old replicas only,
//! leaving the new copy behind. After the bump and the FENCE, such a writer is refused, asks
//! again, and writes to every replica, the new one included. Writes that reached the old
//! replicas between the healer's read and the FENCE are caught by the healer comparing the
//! new copy with a source after the FENCE (see `rawfs-healer`).
//!
//! The lease is the leader's soft state, not replicated: a new leader does not know who held
//! it, so it grants nothing until [`LEASE_MAX`] has passed since it took office (any lease
//! granted by an earlier leader has lapsed by then), unless no lease was ever granted
//! (`leases.rs`).

use std::time::{Duration, Instant};

use redb::ReadableTable;

use rawfs_metadata_api::{
    ChunkId, ChunkLoc, EndangeredChunk, EndangeredPage, HealerLease, MetaError, MetaResult,
    ServerId, ServerLiveness, CHUNK_SIZE, EC_SHARDS, WANTED_COPIES,
};

use crate::chunks::to_loc;
use crate::commands::Command;
use crate::erasure::{update_ec, EcRec};
use crate::queries;
use crate::server::Server;
use crate::store::{decode, get_chunk, inode, ChunkRec, Op, ReadTables, Tables};

/// The longest healer lease granted, whatever the holder asks for.
pub(crate) const LEASE_MAX: Duration = Duration::from_secs(10);
/// Most chunks one `endangered_chunks` page lists.
pub(crate) const PAGE_MAX: u32 = 4096;

/// Who holds the healer lease, on the leader.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lease {
    pub holder: u64,
    pub until: Instant,
    pub term: u64,
}

/// Decides a lease request: granted (`Ok(ttl)`) or held by another (`Err`).
/// `in_office` is how long this leader has led in `term`.
pub(crate) fn decide_lease(
    current: Option<Lease>,
    holder: u64,
    ttl: Duration,
    term: u64,
    in_office: Duration,
    now: Instant,
) -> Result<Lease, MetaError> {
    let ttl = ttl.min(LEASE_MAX);
    let until = now + ttl;
    match current {
        Some(l) if l.term == term && l.until > now && l.holder != holder => {
            Err(MetaError::LeaseHeld {
                holder: l.holder,
                remaining_ms: l.until.saturating_duration_since(now).as_millis() as u64,
            })
        }
        Some(l) if l.term == term => Ok(Lease {
            holder,
            until,
            term,
        }),
        // No lease granted in this term: one from an earlier leader may still run.
        _ if in_office < LEASE_MAX => Err(MetaError::LeaseHeld {
            holder: 0,
            remaining_ms: (LEASE_MAX - in_office).as_millis() as u64,
        }),
        _ => Ok(Lease {
            holder,
            until,
            term,
        }),
    }
}

/// The chunks (counted once, at their owner) with id above `after` and fewer than
/// [`WANTED_COPIES`] live replicas or, erasure coded, fewer than [`EC_SHARDS`] live shards,
/// at most `limit`, and where the next page starts. Scans the whole chunk map (like
/// `status`).
pub(crate) fn endangered(
    rt: &ReadTables,
    is_up: &dyn Fn(ServerId) -> bool,
    after: ChunkId,
    limit: u32,
) -> Op<(Vec<EndangeredChunk>, Option<ChunkId>)> {
    let limit = limit.clamp(1, PAGE_MAX) as usize;
    let mut out = Vec::new();
    for item in rt.chunks.iter()? {
        let (k, v) = item?;
        let (ino, index) = k.value();
        let rec: ChunkRec = decode("chunk", v.value())?;
        // The chunk itself, unless it is a copy-on-write target not written yet; and the
        // source of a pending copy where this reference owns it.
        let mut views = Vec::new();
        if rec.pending.is_none() {
            views.push(rec.clone());
        }
        if let Some(p) = &rec.pending {
            views.extend(crate::shares::view_of(&rec, p.chunk));
        }
        for view in views {
            if view.chunk <= after
                || rt.chunk_owner.get(view.chunk)?.map(|g| g.value()) != Some((ino, index))
            {
                continue;
            }
            let bytes = || -> Op<u64> {
                let size = inode(&rt.inodes, ino)?.size;
                Ok(size
                    .saturating_sub(index.saturating_mul(CHUNK_SIZE))
                    .min(CHUNK_SIZE))
            };
            // Erasure-coded chunks have shards, not copies: listed while a shard is lost
            // or on a down server (even with fewer than 4 left, so the healer can report
            // them lost), with the shards the healer rebuilds from.
            if let Some(ec) = &view.ec {
                if live_shards(ec, is_up) >= EC_SHARDS {
                    continue;
                }
                out.push(EndangeredChunk {
                    chunk: view.chunk,
                    version: view.version,
                    replicas: ec.shards.iter().filter_map(|s| s.server).collect(),
                    wanted: EC_SHARDS as u32,
                    bytes: bytes()?,
                    ec: Some(crate::erasure::ec_loc(&rt.servers, ec)?),
                });
                continue;
            }
            let live = view.servers.iter().filter(|&&s| is_up(s)).count();
            if live >= WANTED_COPIES as usize {
                continue;
            }
            out.push(EndangeredChunk {
                chunk: view.chunk,
                version: view.version,
                replicas: view.servers,
                wanted: WANTED_COPIES,
                bytes: bytes()?,
                ec: None,
            });
        }
    }
    out.sort_by_key(|c| c.chunk);
    let next = if out.len() > limit {
        out.truncate(limit);
        out.last().map(|c| c.chunk)
    } else {
        None
    };
    Ok((out, next))
}

/// Shards of `ec` not known lost whose server is up.
pub(crate) fn live_shards(ec: &EcRec, is_up: &dyn Fn(ServerId) -> bool) -> usize {
    ec.shards
        .iter()
        .filter(|s| s.server.is_some_and(is_up))
        .count()
}

/// Applies `ReplaceShard`: shard `shard` of the erasure-coded `chunk` (at `version`) is now
/// on `server`, where the healer wrote, synced and verified it. No version bump: an
/// erasure-coded chunk is never written in place, so no writer holds a location to fence.
pub(crate) fn replace_shard(
    t: &mut Tables,
    chunk: ChunkId,
    version: u64,
    shard: ChunkId,
    server: ServerId,
    (order_term, term): (u64, u64),
) -> Op<ChunkLoc> {
    if order_term != term {
        return Err(MetaError::StaleTerm { current: term }.into());
    }
    let (_, _, rec) = crate::chunks::chunk_by_id(t, chunk)?;
    let stale = MetaError::StaleVersion {
        current: rec.version,
    };
    // Turned back to replicas (or never erasure coded), or converted again: the shard the
    // healer rebuilt belongs to a layout that is gone.
    let Some(ec) = rec.ec.as_ref().filter(|_| rec.version == version) else {
        return Err(stale.into());
    };
    let Some(old) = ec
        .shards
        .iter()
        .find(|s| s.chunk == shard)
        .map(|s| s.server)
    else {
        return Err(stale.into());
    };
    if old != Some(server) {
        if ec.shards.iter().any(|s| s.server == Some(server)) {
            // Two shards on one server: losing it would cost two.
            return Err(MetaError::Exists.into());
        }
        update_ec(t, chunk, |ec| {
            for s in ec.shards.iter_mut().filter(|s| s.chunk == shard) {
                s.server = Some(server);
            }
        })?;
        // An inventory may have queued the new copy's deletion while it was being written;
        // the old copy (on a server that is down, or failing) goes if it ever comes back.
        t.deletions.remove((server, shard))?;
        if let Some(old) = old {
            t.deletions.insert((old, shard), ())?;
        }
    }
    let (_, index, rec) = crate::chunks::chunk_by_id(t, chunk)?;
    let mut loc = to_loc(&t.servers, index, &rec, term)?;
    loc.shared |= crate::shares::has_extra_refs(&t.chunk_refs, chunk)?;
    Ok(loc)
}

/// Applies `AddReplica`: lists `server` as a holder of `chunk` at `version` + 1.
pub(crate) fn add_replica(
    t: &mut Tables,
    chunk: ChunkId,
    version: u64,
    server: ServerId,
    order_term: u64,
    term: u64,
) -> Op<ChunkLoc> {
    if order_term != term {
        return Err(MetaError::StaleTerm { current: term }.into());
    }
    let (ino, index, rec) = crate::chunks::chunk_by_id(t, chunk)?;
    let is_shard = get_chunk(&t.chunks, ino, index)?
        .is_some_and(|r| crate::erasure::find_shard(&r, chunk).is_some());
    if is_shard || rec.ec.is_some() {
        return Err(crate::namespace::invalid(
            "an erasure-coded chunk or shard has no replicas to add",
        ));
    }
    if rec.version != version {
        return Err(MetaError::StaleVersion {
            current: rec.version,
        }
        .into());
    }
    if rec.servers.contains(&server) {
        return Err(MetaError::Exists.into());
    }
    // Every reference of a shared chunk carries its record: change them all alike.
    crate::shares::update_chunk(t, chunk, |v, servers| {
        servers.push(server);
        *v += 1;
    })?;
    // An inventory may have queued the copy's deletion while it was being written.
    t.deletions.remove((server, chunk))?;
    // Re-read: the change may also have cancelled a conversion under way.
    let (_, index, rec) = crate::chunks::chunk_by_id(t, chunk)?;
    let mut loc = to_loc(&t.servers, index, &rec, term)?;
    loc.shared |= crate::shares::has_extra_refs(&t.chunk_refs, chunk)?;
    Ok(loc)
}

impl Server {
    pub(crate) async fn do_endangered(
        &self,
        after: ChunkId,
        limit: u32,
    ) -> MetaResult<EndangeredPage> {
        let term = self.leader_term().await?;
        let me = self.clone();
        // A full scan of the chunk map: keep it off the async workers.
        tokio::task::spawn_blocking(move || me.endangered_page(after, limit, term))
            .await
            .map_err(|e| MetaError::Unavailable {
                reason: format!("scan task failed: {e}"),
            })?
    }

    fn endangered_page(&self, after: ChunkId, limit: u32, term: u64) -> MetaResult<EndangeredPage> {
        let now = Instant::now();
        let (up, free) = {
            let reg = self.registry();
            // A draining server's copies count as missing, and it takes no new ones.
            let mut up = reg.up_servers(now);
            up.retain(|&s| !reg.is_draining(s));
            let free: std::collections::HashMap<ServerId, (bool, u64)> = up
                .iter()
                .filter_map(|&id| {
                    reg.get(id)
                        .map(|l| (id, (l.healthy, l.total_bytes.saturating_sub(l.used_bytes))))
                })
                .collect();
            (up, free)
        };
        let is_up = |s| up.contains(&s);
        let ((chunks, next), servers) = self
            .0
            .sm
            .read(|rt| Ok((endangered(rt, &is_up, after, limit)?, queries::servers(rt)?)))?;
        let servers = servers
            .into_iter()
            .map(|(id, rec)| {
                let (healthy, free_bytes) = free.get(&id).copied().unwrap_or((false, 0));
                ServerLiveness {
                    id,
                    data_addr: rec.data_addr,
                    up: up.contains(&id) && healthy,
                    free_bytes,
                }
            })
            .collect();
        Ok(EndangeredPage {
            chunks,
            next,
            servers,
            term,
        })
    }

    pub(crate) async fn do_add_replica(
        &self,
        chunk: ChunkId,
        version: u64,
        server: ServerId,
        term: u64,
        req: rawfs_metadata_api::ReqId,
    ) -> MetaResult<ChunkLoc> {
        let cmd = Command::AddReplica {
            chunk,
            version,
            server,
            term,
        };
        self.propose(crate::server::tracked(
            req,
            rawfs_metadata_api::Timespec::now(),
            cmd,
        ))
        .await?
        .into_chunk()
    }

    pub(crate) async fn do_replace_shard(
        &self,
        chunk: ChunkId,
        version: u64,
        shard: ChunkId,
        server: ServerId,
        (term, req): (u64, rawfs_metadata_api::ReqId),
    ) -> MetaResult<ChunkLoc> {
        let cmd = Command::ReplaceShard {
            chunk,
            version,
            shard,
            server,
            term,
        };
        self.propose(crate::server::tracked(
            req,
            rawfs_metadata_api::Timespec::now(),
            cmd,
        ))
        .await?
        .into_chunk()
    }

    pub(crate) async fn do_healer_lease(
        &self,
        holder: u64,
        ttl_ms: u64,
    ) -> MetaResult<HealerLease> {
        let term = self.leader_term().await?;
        let in_office = self.lease_office(term, ttl_ms > 0).await?;
        let now = Instant::now();
        let mut reg = self.registry();
        let lease = decide_lease(
            reg.lease,
            holder,
            Duration::from_millis(ttl_ms),
            term,
            in_office,
            now,
        )?;
        if reg
            .lease
            .map_or(true, |l| l.holder != holder || l.term != term)
        {
            tracing::info!(holder, term, "healer lease granted");
        }
        reg.lease = Some(lease);
        Ok(HealerLease {
            term,
            ttl_ms: lease.until.saturating_duration_since(now).as_millis() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_a_new_leader_waits() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        let settled = LEASE_MAX;
        // A leader in office long enough grants; the same holder renews; others wait.
        let l = decide_lease(None, 1, ttl, 5, settled, t0).unwrap();
        assert_eq!((l.holder, l.term), (1, 5));
        let l = decide_lease(Some(l), 1, ttl, 5, settled, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(l.until, t0 + Duration::from_secs(5));
        let e = decide_lease(Some(l), 2, ttl, 5, settled, t0 + Duration::from_secs(4));
        assert!(
            matches!(e, Err(MetaError::LeaseHeld { holder: 1, .. })),
            "{e:?}"
        );
        // Lapsed: the standby takes over.
        let l2 = decide_lease(Some(l), 2, ttl, 5, settled, t0 + Duration::from_secs(6)).unwrap();
        assert_eq!(l2.holder, 2);
        // Asked for more than the cap: capped.
        let l3 = decide_lease(None, 3, Duration::from_secs(600), 5, settled, t0).unwrap();
        assert_eq!(l3.until, t0 + LEASE_MAX);
        // A new leader (new term) grants nothing until LEASE_MAX in office.
        let e = decide_lease(Some(l2), 2, ttl, 6, Duration::from_secs(1), t0);
        assert!(
            matches!(e, Err(MetaError::LeaseHeld { holder: 0, .. })),
            "{e:?}"
        );
        assert!(decide_lease(None, 2, ttl, 6, LEASE_MAX, t0).is_ok());
    }
}
