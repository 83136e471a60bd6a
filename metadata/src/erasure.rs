//! Erasure-coded chunks (RS 4+2): conversion of a replicated chunk, copy-on-write out of an
//! erasure-coded one, lost shards, and their place in the status.
//!
//! ```text
//!  ec_prepare ─▶ leader places 6 shards ─▶ log: 6 fresh ids, version + 1, converting
//!     converter ─▶ FENCE replicas at the new version, read, encode, write the 6 shards
//!  ec_commit  ─▶ log (fenced by version and plan term): ec = shards, servers = [],
//!                old replicas queued for deletion
//!  writer sees `shared` (converting or erasure coded) ─▶ cow_chunk
//!     converting ─▶ conversion cancelled (reserved shards queued for deletion), version + 1
//!     erasure coded ─▶ new replicated chunk, pending copy whose source is the EC chunk;
//!        writer decodes the EC chunk into the replicas ─▶ cow_done ─▶ shards released
//! ```
//!
//! Every shard id (reserved by a plan, or committed) has a CHUNK_OWNER row pointing at the
//! owner of its chunk, and `shares::view_of` shows a shard as a one-replica chunk on its
//! server: inventories then keep a shard on its own server and delete it anywhere else,
//! with no table of their own. When a chunk's ownership passes to another reference, its
//! shards' rows follow ([`move_shard_owners`]); when its last reference goes, every shard
//! is queued for deletion on its server ([`drop_shards`]).
//!
//! An erasure-coded chunk is never written in place, so its version never changes (a
//! snapshot shares it without a bump): its shards stay at the version they were written at.

use std::collections::HashMap;
use std::time::Instant;

use rawfs_metadata_api::{
    ChunkCounts, ChunkId, ChunkLoc, CowLoc, EcLoc, EcPlan, Ino, MetaError, MetaResult, Replica,
    ReqId, ServerId, Shard, Timespec, CHUNK_SIZE, EC_SHARDS, REPLICAS,
};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use crate::chunks::to_loc;
use crate::commands::{Command, Reply};
use crate::namespace::invalid;
use crate::registry::place;
use crate::server::{tracked, Server};
use crate::store::{
    decode, get_chunk, get_server, inode, ChunkRec, Fail, Op, ReadTables, Tables, NEXT_CHUNK,
};

/// The shards of an erasure-coded chunk (in `ChunkRec::ec`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EcRec {
    /// Logical bytes of the chunk at conversion.
    pub length: u64,
    /// Exactly `EC_SHARDS`, by shard number (0..4 data, 4 = P, 5 = Q).
    pub shards: Vec<ShardRec>,
}

/// One shard: its own chunk id and the server holding it (`None` once known lost).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShardRec {
    pub chunk: ChunkId,
    pub server: Option<ServerId>,
}

/// A conversion to RS 4+2 in progress, as `ec_prepare` planned it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Converting {
    /// The reserved shards, each on its planned server.
    pub shards: Vec<ShardRec>,
    /// The leader term of the plan: `ec_commit` must name it.
    pub term: u64,
}

/// Shards that must be live for an erasure-coded chunk to be readable.
pub(crate) const EC_DATA: usize = 4;

/// Where a shard id appears in a chunk record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ShardOf {
    /// A shard of the record's own (erasure-coded) chunk.
    Chunk,
    /// A shard of the erasure-coded source of a pending copy.
    Source,
    /// A shard reserved by the conversion under way.
    Reserved,
}

/// Finds shard `id` in `rec`: where, the version it is stored at, and the shard.
/// The version of the erasure-coded chunk whose shard `id` is stored on `server`, if `id` is
/// such a shard (for a corrupt-block report from that server).
pub(crate) fn shard_held_by(rt: &ReadTables, id: ChunkId, server: ServerId) -> Op<Option<u64>> {
    let Some((ino, index)) = rt.chunk_owner.get(id)?.map(|g| g.value()) else {
        return Ok(None);
    };
    let Some(rec) = get_chunk(&rt.chunks, ino, index)? else {
        return Ok(None);
    };
    Ok(match find_shard(&rec, id) {
        Some((ShardOf::Chunk, version, shard)) if shard.server == Some(server) => Some(version),
        _ => None,
    })
}

pub(crate) fn find_shard(rec: &ChunkRec, id: ChunkId) -> Option<(ShardOf, u64, &ShardRec)> {
    let hit =
        |shards: &'_ [ShardRec]| -> Option<usize> { shards.iter().position(|s| s.chunk == id) };
    if let Some(ec) = &rec.ec {
        if let Some(i) = hit(&ec.shards) {
            return Some((ShardOf::Chunk, rec.version, &ec.shards[i]));
        }
    }
    if let Some(p) = &rec.pending {
        if let Some(ec) = &p.ec {
            if let Some(i) = hit(&ec.shards) {
                return Some((ShardOf::Source, p.version, &ec.shards[i]));
            }
        }
    }
    if let Some(c) = &rec.converting {
        if let Some(i) = hit(&c.shards) {
            return Some((ShardOf::Reserved, rec.version, &c.shards[i]));
        }
    }
    None
}

/// Shard `id` of `rec` seen as a chunk of its own: one replica on its server (none if lost).
pub(crate) fn shard_view(rec: &ChunkRec, id: ChunkId) -> Option<ChunkRec> {
    let (_, version, shard) = find_shard(rec, id)?;
    Some(ChunkRec {
        chunk: id,
        version,
        servers: shard.server.into_iter().collect(),
        pending: None,
        ec: None,
        converting: None,
    })
}

/// Queues every shard for deletion on its server and forgets its id.
pub(crate) fn drop_shards(t: &mut Tables, shards: &[ShardRec]) -> Op<()> {
    for s in shards {
        if let Some(server) = s.server {
            t.deletions.insert((server, s.chunk), ())?;
        }
        t.chunk_owner.remove(s.chunk)?;
    }
    Ok(())
}

/// Points every shard of `ec` at the chunk's new owner `to`.
pub(crate) fn move_shard_owners(t: &mut Tables, ec: Option<&EcRec>, to: (Ino, u64)) -> Op<()> {
    for s in ec.map(|e| e.shards.as_slice()).unwrap_or_default() {
        t.chunk_owner.insert(s.chunk, to)?;
    }
    Ok(())
}

/// Ends the conversion under way in `rec`, if any (the caller stores `rec`): its reserved
/// shards are queued for deletion. Returns whether there was one.
pub(crate) fn cancel_conversion(t: &mut Tables, rec: &mut ChunkRec) -> Op<bool> {
    match rec.converting.take() {
        Some(c) => {
            drop_shards(t, &c.shards)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The wire form of shards, with each live one's data address.
pub(crate) fn shards_loc(
    servers: &impl ReadableTable<u64, &'static [u8]>,
    shards: &[ShardRec],
) -> Op<Vec<Shard>> {
    let mut out = Vec::with_capacity(shards.len());
    for s in shards {
        let replica = match s.server {
            Some(server) => Some(Replica {
                server,
                data_addr: get_server(servers, server)?
                    .map(|r| r.data_addr)
                    .unwrap_or_default(),
            }),
            None => None,
        };
        out.push(Shard {
            chunk: s.chunk,
            replica,
        });
    }
    Ok(out)
}

/// The wire form of an erasure-coded chunk's shards.
pub(crate) fn ec_loc(servers: &impl ReadableTable<u64, &'static [u8]>, ec: &EcRec) -> Op<EcLoc> {
    Ok(EcLoc {
        length: ec.length,
        shards: shards_loc(servers, &ec.shards)?,
    })
}

/// Applies `f` to the shards of erasure-coded `chunk` in every reference (its own record,
/// or the source of a pending copy), so that all copies stay equal.
pub(crate) fn update_ec(t: &mut Tables, chunk: ChunkId, mut f: impl FnMut(&mut EcRec)) -> Op<()> {
    for (ino, index) in crate::shares::all_refs(t, chunk)? {
        let Some(mut rec) = get_chunk(&t.chunks, ino, index)? else {
            continue;
        };
        let ec = if rec.chunk == chunk {
            rec.ec.as_mut()
        } else {
            rec.pending
                .as_mut()
                .filter(|p| p.chunk == chunk)
                .and_then(|p| p.ec.as_mut())
        };
        let Some(ec) = ec else { continue };
        f(ec);
        t.put_chunk(ino, index, &rec)?;
    }
    Ok(())
}

/// The chunk at `(ino, index)`, fenced by its id and version: `NotFound` without a chunk
/// there, `StaleVersion` if another chunk or another version is there now.
pub(crate) fn fenced(
    t: &Tables,
    ino: Ino,
    index: u64,
    chunk: ChunkId,
    version: u64,
) -> Op<ChunkRec> {
    inode(&t.inodes, ino)?;
    let rec = get_chunk(&t.chunks, ino, index)?.ok_or(Fail::Meta(MetaError::NotFound))?;
    if rec.chunk != chunk || rec.version != version {
        return Err(MetaError::StaleVersion {
            current: rec.version,
        }
        .into());
    }
    Ok(rec)
}

/// Applies `EcPrepare`: reserves shard ids on `servers` (the leader's placement) and marks
/// the chunk converting at a new version. A conversion already under way is replaced.
pub(crate) fn prepare(
    t: &mut Tables,
    (ino, index): (Ino, u64),
    chunk: ChunkId,
    version: u64,
    servers: &[ServerId],
    term: u64,
) -> Op<EcPlan> {
    let mut rec = fenced(t, ino, index, chunk, version)?;
    if rec.ec.is_some() {
        return Err(invalid("chunk is erasure coded already"));
    }
    if rec.pending.is_some() {
        return Err(invalid("chunk has a copy-on-write pending"));
    }
    let owned = t.chunk_owner.get(chunk)?.map(|g| g.value()) == Some((ino, index));
    if !owned || crate::shares::has_extra_refs(&t.chunk_refs, chunk)? {
        return Err(invalid("chunk is shared with a snapshot or clone"));
    }
    let mut distinct = servers.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != EC_SHARDS || servers.len() != EC_SHARDS {
        return Err(MetaError::NoSpace {
            reason: format!(
                "RS 4+2 needs {EC_SHARDS} distinct live chunkservers, {} available",
                distinct.len()
            ),
        }
        .into());
    }
    // A converter that restarted (or a second one) replaces the earlier plan: its commit
    // is refused by the version bump below.
    cancel_conversion(t, &mut rec)?;
    let first = t.counter(NEXT_CHUNK)?.max(1);
    t.set_counter(NEXT_CHUNK, first + EC_SHARDS as u64)?;
    let shards: Vec<ShardRec> = servers
        .iter()
        .zip(first..)
        .map(|(&server, chunk)| ShardRec {
            chunk,
            server: Some(server),
        })
        .collect();
    for s in &shards {
        t.chunk_owner.insert(s.chunk, (ino, index))?;
    }
    rec.version += 1;
    rec.converting = Some(Converting {
        shards: shards.clone(),
        term,
    });
    t.put_chunk(ino, index, &rec)?;
    Ok(EcPlan {
        loc: to_loc(&t.servers, index, &rec, term)?,
        shards: shards_loc(&t.servers, &shards)?,
    })
}

/// Applies `EcCommit`: the conversion planned in term `plan_term` becomes the chunk's data.
#[allow(clippy::too_many_arguments)]
pub(crate) fn commit(
    t: &mut Tables,
    (ino, index): (Ino, u64),
    chunk: ChunkId,
    version: u64,
    length: u64,
    plan_term: u64,
    term: u64,
) -> Op<ChunkLoc> {
    if length > CHUNK_SIZE {
        return Err(invalid("erasure-coded length past the chunk size"));
    }
    let mut rec = fenced(t, ino, index, chunk, version)?;
    if rec.ec.is_some() {
        // Committed already (a retry under another request id): the current location.
        return visible(t, ino, index, &rec, term);
    }
    // A writer holding a location from before the conversion may have put bytes on the
    // replicas past `length` (the size when the chunk was listed) before the fence, with its
    // commit_write still to come: those bytes are not in the shards. Writes inside `length`
    // are safe (the fence came before the read), so only a chunk the file ends in can lose
    // bytes that way. Every writer has the file open until its data is committed: a partial
    // chunk of an open file, or a size that moved since the listing, refuses the commit
    // (the replicas stay authoritative; the chunk is converted once the file is closed).
    let opened = t.opens.range((ino, 0)..=(ino, u64::MAX))?.next().is_some();
    let size = inode(&t.inodes, ino)?.size;
    let in_chunk = size
        .saturating_sub(index.saturating_mul(CHUNK_SIZE))
        .min(CHUNK_SIZE);
    if in_chunk != length || (opened && length < CHUNK_SIZE) {
        return Err(MetaError::StaleVersion {
            current: rec.version,
        }
        .into());
    }
    let Some(conv) = rec.converting.take() else {
        // Cancelled by a writer (or never prepared).
        return Err(MetaError::StaleVersion {
            current: rec.version,
        }
        .into());
    };
    if conv.term != plan_term {
        return Err(MetaError::StaleTerm { current: term }.into());
    }
    for &s in &rec.servers {
        t.deletions.insert((s, chunk), ())?;
    }
    rec.servers.clear();
    rec.ec = Some(EcRec {
        length,
        shards: conv.shards,
    });
    t.put_chunk(ino, index, &rec)?;
    visible(t, ino, index, &rec, term)
}

pub(crate) fn visible(t: &Tables, ino: Ino, index: u64, rec: &ChunkRec, term: u64) -> Op<ChunkLoc> {
    let file = inode(&t.inodes, ino)?;
    crate::shares::visible_loc(
        &t.servers,
        &t.chunk_refs,
        &t.chunk_owner,
        &file,
        (ino, index),
        rec,
        term,
    )
}

/// `drop_replica` of a shard id: marks the shard lost (no version bump) when
/// `expected_version` is current and `server` holds it, and queues the copy there for
/// deletion. `None` when `id` is no committed shard. A reserved shard is left alone (its
/// conversion fails on its own).
pub(crate) fn drop_shard(
    t: &mut Tables,
    id: ChunkId,
    expected_version: u64,
    server: ServerId,
    term: u64,
) -> Op<Option<ChunkLoc>> {
    let Some((ino, index)) = t.chunk_owner.get(id)?.map(|g| g.value()) else {
        return Ok(None);
    };
    let Some(rec) = get_chunk(&t.chunks, ino, index)? else {
        return Ok(None);
    };
    let Some((kind, version, shard)) = find_shard(&rec, id) else {
        return Ok(None);
    };
    let chunk = match (kind, &rec.pending) {
        (ShardOf::Chunk | ShardOf::Reserved, _) => rec.chunk,
        (ShardOf::Source, Some(p)) => p.chunk,
        (ShardOf::Source, None) => return Ok(None),
    };
    if kind != ShardOf::Reserved && version == expected_version && shard.server == Some(server) {
        tracing::warn!(chunk, shard = id, server, "shard marked lost");
        update_ec(t, chunk, |ec| {
            for s in ec.shards.iter_mut().filter(|s| s.chunk == id) {
                s.server = None;
            }
        })?;
        t.deletions.insert((server, id), ())?;
    }
    let rec = get_chunk(&t.chunks, ino, index)?.ok_or(Fail::Meta(MetaError::NotFound))?;
    let view = crate::shares::view_of(&rec, chunk).ok_or(Fail::Meta(MetaError::NotFound))?;
    let mut loc = to_loc(&t.servers, index, &view, term)?;
    loc.shared = true;
    Ok(Some(loc))
}

/// Servers for the replicated copy of an erasure-coded chunk when the leader gave none:
/// up to [`REPLICAS`] of its shards' servers not known lost (placed like new chunks).
pub(crate) fn fallback_servers(ec: &EcRec, key: u64) -> Vec<ServerId> {
    let candidates: Vec<(ServerId, u64)> = ec
        .shards
        .iter()
        .filter_map(|s| s.server)
        .map(|s| (s, 1))
        .collect();
    place(&candidates, key, REPLICAS)
}

/// Health of every chunk (counted once, at its owner) given which servers are up, with
/// logical bytes per kind, and chunks (or shards) per server.
pub(crate) fn chunk_counts(
    rt: &ReadTables,
    up: &dyn Fn(ServerId) -> bool,
) -> Op<(ChunkCounts, HashMap<ServerId, u64>)> {
    let mut counts = ChunkCounts::default();
    let mut per_server: HashMap<ServerId, u64> = HashMap::new();
    let mut sizes: HashMap<Ino, u64> = HashMap::new();
    for item in rt.chunks.iter()? {
        let (k, v) = item?;
        let (ino, index) = k.value();
        let rec: ChunkRec = decode("chunk", v.value())?;
        // A chunk shared by snapshots or clones is counted once, at its owner.
        if rt.chunk_owner.get(rec.chunk)?.map(|g| g.value()) != Some((ino, index)) {
            continue;
        }
        let size = match sizes.get(&ino) {
            Some(&s) => s,
            None => {
                let s = inode(&rt.inodes, ino)?.size;
                sizes.insert(ino, s);
                s
            }
        };
        let bytes = size
            .saturating_sub(index.saturating_mul(CHUNK_SIZE))
            .min(CHUNK_SIZE);
        match &rec.ec {
            Some(ec) => {
                counts.ec += 1;
                counts.ec_bytes += bytes;
                let mut live = 0;
                for s in ec.shards.iter().filter_map(|s| s.server) {
                    *per_server.entry(s).or_default() += 1;
                    live += usize::from(up(s));
                }
                if live >= EC_SHARDS {
                    counts.healthy += 1;
                } else if live >= EC_DATA {
                    counts.degraded += 1;
                    counts.at_risk_bytes += bytes;
                    counts.one_loss_from_lost += u64::from(live == EC_DATA);
                } else {
                    counts.lost += 1;
                }
            }
            None => {
                counts.replicated += 1;
                counts.replicated_bytes += bytes;
                for &s in &rec.servers {
                    *per_server.entry(s).or_default() += 1;
                }
                let live = rec.servers.iter().filter(|&&s| up(s)).count();
                if live == 0 {
                    counts.lost += 1;
                } else if live >= REPLICAS {
                    counts.healthy += 1;
                } else {
                    counts.under_replicated += 1;
                    counts.at_risk_bytes += bytes;
                    counts.one_loss_from_lost += u64::from(live == 1);
                }
            }
        }
    }
    Ok((counts, per_server))
}

/// Applies the erasure-coding commands.
pub(crate) fn dispatch(t: &mut Tables, cmd: &Command, term: u64) -> Op<Reply> {
    match cmd {
        Command::EcPrepare {
            ino,
            index,
            chunk,
            version,
            servers,
        } => prepare(t, (*ino, *index), *chunk, *version, servers, term).map(Reply::Plan),
        Command::EcCommit {
            ino,
            index,
            chunk,
            version,
            length,
            term: plan_term,
        } => commit(
            t,
            (*ino, *index),
            *chunk,
            *version,
            *length,
            *plan_term,
            term,
        )
        .map(Reply::Chunk),
        Command::CowPlaced {
            ino,
            index,
            chunk,
            servers,
        } => {
            crate::shares::cow_placed(t, *ino, *index, *chunk, Some(servers), term).map(Reply::Cow)
        }
        _ => Err(invalid("not an erasure-coding command")),
    }
}

/// Rendezvous key for placing something new at `(ino, index)`: the next chunk id mixed with
/// the file and index (as `allocate_chunk` does), so racing placements spread.
fn placement_key(next: u64, ino: Ino, index: u64) -> u64 {
    next ^ ino.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ index.wrapping_mul(0xc2b2_ae3d_27d4_eb4f).rotate_left(17)
}

/// Picks `n` distinct servers from `candidates`, those not in `avoid` first.
pub(crate) fn place_avoiding(
    candidates: &[(ServerId, u64)],
    avoid: &[ServerId],
    key: u64,
    n: usize,
) -> Vec<ServerId> {
    let (others, holders): (Vec<_>, Vec<_>) =
        candidates.iter().partition(|(s, _)| !avoid.contains(s));
    let mut out = place(&others, key, n);
    if out.len() < n {
        out.extend(place(&holders, key, n - out.len()));
    }
    out
}

impl Server {
    /// Live candidates for new data, or `Unavailable` while a new leader may not have heard
    /// every chunkserver yet.
    fn ec_candidates(&self, wanted: usize) -> MetaResult<Vec<(ServerId, u64)>> {
        let now = Instant::now();
        let reg = self.registry();
        let candidates = reg.candidates(now);
        if candidates.len() < wanted && reg.warming_up(now) {
            return Err(MetaError::Unavailable {
                reason: "waiting for chunkserver heartbeats".into(),
            });
        }
        Ok(candidates)
    }

    /// `ec_prepare`: the leader places the shards, the log reserves them.
    pub(crate) async fn do_ec_prepare(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        req: ReqId,
    ) -> MetaResult<EcPlan> {
        let term = self.leader_term().await?;
        let (rec, next) = self.0.sm.read(|rt| {
            Ok((
                get_chunk(&rt.chunks, ino, index)?,
                crate::queries::next_chunk_id(rt)?,
            ))
        })?;
        let holders = rec.map(|r| r.servers).unwrap_or_default();
        let candidates = self.ec_candidates(EC_SHARDS)?;
        // Shards away from the replicas when there is room: those are deleted at commit.
        // Fewer than 6 is refused (NoSpace) when applied, so a retry still gets its reply.
        let servers = place_avoiding(
            &candidates,
            &holders,
            placement_key(next, ino, index),
            EC_SHARDS,
        );
        tracing::debug!(
            term,
            ino,
            index,
            chunk,
            ?servers,
            "preparing RS 4+2 conversion"
        );
        let cmd = Command::EcPrepare {
            ino,
            index,
            chunk,
            version,
            servers,
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_plan()
    }

    /// `ec_commit`: one command, fenced when applied.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn do_ec_commit(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        length: u64,
        term: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        let cmd = Command::EcCommit {
            ino,
            index,
            chunk,
            version,
            length,
            term,
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_chunk()
    }

    /// `cow_chunk`, with the leader's placement for the replicated copy of an erasure-coded
    /// chunk (other chunks are copied on their own servers and need none). Meant for the
    /// `cow_chunk` handler; until it delegates here, such a copy goes to the shards' servers.
    pub(crate) async fn do_cow_chunk(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        req: ReqId,
    ) -> MetaResult<CowLoc> {
        self.leader_term().await?;
        let (rec, next) = self.0.sm.read(|rt| {
            Ok((
                get_chunk(&rt.chunks, ino, index)?,
                crate::queries::next_chunk_id(rt)?,
            ))
        })?;
        let from_ec = rec
            .as_ref()
            .is_some_and(|r| r.chunk == chunk && r.ec.is_some() && r.pending.is_none());
        let cmd = if from_ec {
            let candidates = self.ec_candidates(1)?;
            let servers = place(&candidates, placement_key(next, ino, index), REPLICAS);
            if servers.is_empty() {
                return Err(MetaError::NoSpace {
                    reason: "no live chunkserver with free space".into(),
                });
            }
            Command::CowPlaced {
                ino,
                index,
                chunk,
                servers,
            }
        } else {
            Command::CowChunk { ino, index, chunk }
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_cow()
    }
}
