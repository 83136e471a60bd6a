//! The write path: one extent of file data -> every live replica of each chunk it touches.
//!
//! ```text
//!  Extent ──split_by_chunk──▶ pieces per chunk ──(in parallel)──▶ write_pieces
//!  write_pieces: location (allocate_chunk, cached) ──shared?──▶ private copy (cow.rs)
//!               ──▶ all replicas in parallel, each as
//!               ≤ FRAME-byte frames with FRAMES_IN_FLIGHT outstanding
//!     replica failure ──▶ drop_replica (version bump) ──▶ write again to the survivors
//!     stale version/term ──▶ refresh the location once ──▶ write again
//! ```
//!
//! Every data write is idempotent (positional), so writing a piece again after a drop or a
//! refresh is always safe. The survivors are written again with the new version so that the
//! version they store follows the chunk map.

use crate::ec_write::{try_append, Append};
use crate::error::ClientError;
use crate::extent::{frames, split_by_chunk, Extent};
use crate::locations::Locations;
use crate::store::{Frame, PutV, Store};
use bytes::Bytes;
use futures::future::join_all;
use futures::{StreamExt, TryStreamExt};
use rawfs_chunkserver_api::{DataError, EncodedWrite, Piece, MAX_PIECES};
use rawfs_metadata_api::{ChunkId, ChunkLoc, ServerId, CHUNK_SIZE, REPLICAS};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest data frame sent in one write request.
pub(crate) const FRAME: usize = 1 << 20;
/// Frames outstanding at once per replica: keeps the pipe full without a huge queue.
pub(crate) const FRAMES_IN_FLIGHT: usize = 8;

/// A chunk whose replicas received data since the last fsync (none listed: an RS 4+2 append,
/// durable when written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Dirty {
    pub index: u64,
    pub chunk: ChunkId,
    pub servers: Vec<ServerId>,
    /// Bytes the write added to the chunk's stored space (one replica), if every replica
    /// said: blocks that held no data before, wherever they are in the chunk.
    pub added: Option<u64>,
}

/// Writes `extents` (not overlapping) to the replicas of every chunk they touch, all chunks
/// in parallel, the pieces of one chunk together (see [`write_pieces`]). Returns the
/// replicas written (for fsync). On error nothing is undone: the caller keeps the extents
/// and may write them again.
pub(crate) async fn write_extents(
    store: &dyn Store,
    locs: &Locations,
    extents: &[Extent],
    file_end: u64,
) -> Result<Vec<Dirty>, ClientError> {
    let mut by_chunk: BTreeMap<u64, Vec<Piece>> = BTreeMap::new();
    for ext in extents {
        for p in split_by_chunk(ext.start, ext.data.len() as u64) {
            by_chunk.entry(p.index).or_default().push(Piece {
                offset: p.off,
                data: ext.data.slice(p.pos..p.pos + p.len as usize),
            });
        }
    }
    join_all(
        by_chunk
            .into_iter()
            .map(|(index, pieces)| write_pieces(store, locs, index, pieces, Some(file_end))),
    )
    .await
    .into_iter()
    .collect()
}

/// Writes `pieces` (sorted, not overlapping) of chunk `index` to all of its live replicas,
/// or appends them to its RS 4+2 shards when they extend an erasure-coded chunk of a file
/// that ends at `file_end` (see `ec_write.rs`; `None`: never). An append is durable already:
/// its [`Dirty`] lists no servers.
pub(crate) async fn write_pieces(
    store: &dyn Store,
    locs: &Locations,
    index: u64,
    pieces: Vec<Piece>,
    file_end: Option<u64>,
) -> Result<Dirty, ClientError> {
    let mut loc = locs.for_write(store, index).await?;
    if let Some(end) = file_end {
        let in_chunk = end.saturating_sub(index.saturating_mul(CHUNK_SIZE));
        match try_append(store, locs, loc, &pieces, in_chunk).await? {
            Append::Done(new) => {
                return Ok(Dirty {
                    index,
                    chunk: new.chunk,
                    servers: Vec::new(),
                    added: None,
                })
            }
            Append::Fallback(current) => loc = current,
        }
    }
    let loc = crate::cow::writable(store, locs, loc).await?;
    // Encoded and hashed once for all replicas (and every round).
    let frames = frames_of(&pieces).map_err(|source| ClientError::Io {
        chunk: loc.chunk,
        addr: String::new(),
        source,
    })?;
    write_frames(store, locs, index, loc, &frames).await
}

/// Zeroes `off..off + len` of chunk `index` on all of its live replicas, as a write of zeros
/// would, but with one ZERO request per replica and no payload: the chunkservers give the
/// space of whole blocks back (they read as holes afterwards; see `seek.rs`).
pub(crate) async fn zero_piece(
    store: &dyn Store,
    locs: &Locations,
    index: u64,
    off: u32,
    len: u32,
) -> Result<Dirty, ClientError> {
    let loc = locs.for_write(store, index).await?;
    let loc = crate::cow::writable(store, locs, loc).await?;
    let frame = Frame {
        pieces: Vec::new(),
        encoded: EncodedWrite::zero(off, len),
    };
    write_frames(store, locs, index, loc, &[Arc::new(frame)]).await
}

/// Writes `frames` to every live replica of chunk `index` (at `loc`), dropping replicas that
/// fail and refreshing a stale location once (see the module docs).
async fn write_frames(
    store: &dyn Store,
    locs: &Locations,
    index: u64,
    loc: ChunkLoc,
    frames: &[Arc<Frame>],
) -> Result<Dirty, ClientError> {
    // A read that found the chunk on no replica must not remember that past this write.
    locs.writing(index);
    let result = write_frames_to_replicas(store, locs, index, loc, frames).await;
    locs.writing(index);
    result
}

async fn write_frames_to_replicas(
    store: &dyn Store,
    locs: &Locations,
    index: u64,
    mut loc: ChunkLoc,
    frames: &[Arc<Frame>],
) -> Result<Dirty, ClientError> {
    let mut refreshed = false;
    let mut last: Option<DataError> = None;
    // The most any replica reported over all rounds: a replica written again after another
    // one failed reports nothing new the second time, and copies that agree report the same.
    let mut added = Some(0u64);
    // Each round either succeeds, drops at least one replica, or refreshes (once): bounded.
    for _round in 0..REPLICAS + 3 {
        if loc.replicas.is_empty() {
            break;
        }
        let outcomes = join_all(
            loc.replicas
                .iter()
                .map(|r| write_replica_frames(store, &r.data_addr, &loc, frames)),
        )
        .await;
        let mut failed = Vec::new();
        let mut stale = None;
        for (r, outcome) in loc.replicas.iter().zip(outcomes) {
            match outcome {
                Ok(said) => added = added.zip(said).map(|(a, b)| a.max(b)),
                // A replica that refuses the version the metadata service just gave us is
                // not ahead of it: its copy is gone (deleted; the chunkserver refuses to
                // recreate it at that version). It failed like any other replica.
                Err(DataError::StaleVersion { current }) if refreshed && current <= loc.version => {
                    let e = DataError::StaleVersion { current };
                    tracing::warn!(chunk = loc.chunk, addr = %r.data_addr, error = %e, "replica refuses the current version");
                    failed.push((r.server, e.clone()));
                    last = Some(e);
                }
                Err(e) if e.is_replica_failure() => {
                    tracing::warn!(chunk = loc.chunk, addr = %r.data_addr, error = %e, "replica write failed");
                    failed.push((r.server, e.clone()));
                    last = Some(e);
                }
                Err(e) => stale = Some((r.data_addr.clone(), e)),
            }
        }
        if let Some((addr, e)) = stale {
            if refreshed {
                return Err(ClientError::Io {
                    chunk: loc.chunk,
                    addr,
                    source: e,
                });
            }
            tracing::debug!(chunk = loc.chunk, error = %e, "stale fence on write; refreshing the location");
            refreshed = true;
            loc = match locs.refresh(store, index).await? {
                Some(fresh) => fresh,
                // Released meanwhile (a concurrent truncate or punch): allocate it again.
                None => locs.for_write(store, index).await?,
            };
            // A snapshot taken since the location was cached fences the old version: the
            // fresh location says the chunk is shared, and it is copied before writing.
            loc = crate::cow::writable(store, locs, loc).await?;
            continue;
        }
        if failed.is_empty() {
            return Ok(Dirty {
                index,
                chunk: loc.chunk,
                servers: loc.replicas.iter().map(|r| r.server).collect(),
                added,
            });
        }
        if failed.len() == loc.replicas.len() {
            // Nothing took the write. Dropping every replica would also lose the data already in
            // the chunk (the metadata service refuses to drop the last one anyway), and a
            // failure of every replica at once more likely means our own network is gone.
            if failed.iter().all(|(_, e)| *e == DataError::NoSpace) {
                return Err(ClientError::NoSpace { chunk: loc.chunk });
            }
            break;
        }
        let before = loc.version;
        for (server, _) in &failed {
            loc = locs.drop_replica(store, &loc, *server).await?;
        }
        if loc.version == before
            && failed
                .iter()
                .all(|(s, _)| loc.replicas.iter().any(|r| r.server == *s))
        {
            // The metadata service would not drop them (it never drops the last replica).
            break;
        }
        tracing::warn!(
            chunk = loc.chunk,
            version = loc.version,
            live = loc.replicas.len(),
            "chunk is under-replicated after a failed write"
        );
    }
    Err(ClientError::NoReplica {
        index,
        chunk: loc.chunk,
        last,
    })
}

/// Writes `data` to one replica as frames of at most [`FRAME`] bytes, a few in flight.
pub(crate) async fn write_replica(
    store: &dyn Store,
    addr: &str,
    loc: &ChunkLoc,
    off: u32,
    data: &Bytes,
) -> Result<(), DataError> {
    let piece = Piece {
        offset: off,
        data: data.clone(),
    };
    let frames = frames_of(std::slice::from_ref(&piece))?;
    write_replica_frames(store, addr, loc, &frames)
        .await
        .map(|_| ())
}

/// Writes `frames` to one replica, a few requests in flight. Returns the bytes they added to
/// the replica's stored space, if it said for every frame.
async fn write_replica_frames(
    store: &dyn Store,
    addr: &str,
    loc: &ChunkLoc,
    frames: &[Arc<Frame>],
) -> Result<Option<u64>, DataError> {
    futures::stream::iter(frames.to_vec())
        .map(|frame| {
            store.write_v(
                addr,
                PutV {
                    chunk: loc.chunk,
                    version: loc.version,
                    term: loc.term,
                    frame,
                },
            )
        })
        .buffer_unordered(FRAMES_IN_FLIGHT)
        .try_fold(Some(0u64), |sum, added| async move {
            Ok(sum.zip(added).map(|(a, b)| a + b))
        })
        .await
}

/// `pieces` as requests ([`pack`]), each encoded once for every replica.
fn frames_of(pieces: &[Piece]) -> Result<Vec<Arc<Frame>>, DataError> {
    pack(pieces)
        .into_iter()
        .map(|pieces| {
            let encoded = EncodedWrite::new(&pieces)?;
            Ok(Arc::new(Frame { pieces, encoded }))
        })
        .collect()
}

/// Groups `pieces` into requests: a piece of [`FRAME`] bytes or more is cut into frames of
/// its own; smaller ones share a request up to [`FRAME`] bytes and [`MAX_PIECES`] pieces.
fn pack(pieces: &[Piece]) -> Vec<Vec<Piece>> {
    let mut out: Vec<Vec<Piece>> = Vec::new();
    let mut group: Vec<Piece> = Vec::new();
    let mut group_bytes = 0;
    for p in pieces.iter().filter(|p| !p.data.is_empty()) {
        if p.data.len() >= FRAME {
            for (pos, len) in frames(p.data.len(), FRAME) {
                out.push(vec![Piece {
                    // pos < CHUNK_SIZE, so it fits in u32 with the offset.
                    offset: p.offset + pos as u32,
                    data: p.data.slice(pos..pos + len),
                }]);
            }
            continue;
        }
        if group_bytes + p.data.len() > FRAME || group.len() == MAX_PIECES {
            out.push(std::mem::take(&mut group));
            group_bytes = 0;
        }
        group_bytes += p.data.len();
        group.push(p.clone());
    }
    if !group.is_empty() {
        out.push(group);
    }
    out
}

/// Makes every chunk in `dirty` durable: SYNC to each written replica in parallel. A chunk
/// is durable when at least 2 replicas synced, or all of its live ones if fewer than 2 are
/// left; failed replicas are dropped. Returns the chunks that could not be made durable
/// (to retry at the next fsync) with the first error.
pub(crate) async fn sync_chunks(
    store: &dyn Store,
    locs: &Locations,
    dirty: Vec<Dirty>,
) -> Result<(), (Vec<Dirty>, ClientError)> {
    let results = join_all(dirty.iter().map(|d| sync_chunk(store, locs, d))).await;
    let mut failed = Vec::new();
    let mut first = None;
    for (d, r) in dirty.into_iter().zip(results) {
        if let Err(e) = r {
            first.get_or_insert(e);
            failed.push(d);
        }
    }
    match first {
        None => Ok(()),
        Some(e) => Err((failed, e)),
    }
}

async fn sync_chunk(store: &dyn Store, locs: &Locations, d: &Dirty) -> Result<(), ClientError> {
    let mut refreshed = false;
    let mut last = None;
    let mut loc = match locs.for_read(store, d.index).await? {
        Some(loc) if loc.chunk == d.chunk => loc,
        // Released since it was written (truncate, punch): nothing left to make durable.
        _ => return Ok(()),
    };
    // The replicas to sync: those written, until the chunk is found to have moved on.
    let mut written_only = true;
    for _round in 0..REPLICAS + 3 {
        let targets: Vec<_> = loc
            .replicas
            .iter()
            .filter(|r| !written_only || d.servers.contains(&r.server))
            .cloned()
            .collect();
        if targets.is_empty() {
            break;
        }
        let outcomes = join_all(
            targets
                .iter()
                .map(|r| store.sync(&r.data_addr, loc.chunk, loc.version)),
        )
        .await;
        let mut durable = 0;
        let mut failed = Vec::new();
        let mut stale = None;
        for (r, outcome) in targets.iter().zip(outcomes) {
            match outcome {
                Ok(()) => durable += 1,
                Err(e) if e.is_replica_failure() => {
                    tracing::warn!(chunk = loc.chunk, addr = %r.data_addr, error = %e, "replica sync failed");
                    failed.push(r.server);
                    last = Some(e);
                }
                Err(e) => stale = Some((r.data_addr.clone(), e)),
            }
        }
        let stale_seen = stale.is_some();
        // A stale answer, or no copy left where it was written (the chunk was converted to
        // RS 4+2 or copied elsewhere meanwhile, and the old copies deleted): look again once.
        if let Some((addr, e)) = stale {
            if refreshed {
                return Err(ClientError::Io {
                    chunk: loc.chunk,
                    addr,
                    source: e,
                });
            }
        }
        if !refreshed && (stale_seen || durable == 0) {
            refreshed = true;
            let fresh = match locs.refresh(store, d.index).await? {
                Some(fresh) if fresh.chunk == d.chunk => fresh,
                _ => return Ok(()),
            };
            if fresh.ec.is_some() {
                // Converted: the conversion fenced every replica before reading it, so it
                // holds every write acknowledged before, and it synced every shard.
                return Ok(());
            }
            if fresh.version != loc.version {
                // A newer version holds every write acknowledged at an older one (each
                // version bump comes after a fence): sync wherever the chunk is now.
                written_only = false;
            }
            loc = fresh;
            last = None;
            continue;
        }
        if durable == 0 {
            break;
        }
        for server in &failed {
            loc = locs.drop_replica(store, &loc, *server).await?;
        }
        let live = targets.len() - failed.len();
        if durable >= live.min(2) {
            return Ok(());
        }
    }
    Err(ClientError::NoReplica {
        index: d.index,
        chunk: d.chunk,
        last,
    })
}

#[cfg(test)]
mod pack_tests {
    use super::*;

    fn piece(offset: u32, len: usize) -> Piece {
        Piece {
            offset,
            data: Bytes::from(vec![1u8; len]),
        }
    }

    #[test]
    fn small_pieces_share_requests_and_big_ones_are_framed() {
        // 300 pieces of 4 KiB: 256 fill one frame's bytes, the rest go in a second request.
        let small: Vec<Piece> = (0..300).map(|i| piece(i * 8192, 4096)).collect();
        let groups = pack(&small);
        assert_eq!(
            groups.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![256, 44]
        );
        // A 2.5 MiB piece is cut into frames; the empty piece sends nothing.
        let big = vec![
            piece(0, FRAME * 5 / 2),
            piece(1 << 24, 0),
            piece(1 << 25, 10),
        ];
        let groups = pack(&big);
        let shape: Vec<(u32, usize)> = groups
            .iter()
            .flat_map(|g| g.iter().map(|p| (p.offset, p.data.len())))
            .collect();
        let f = FRAME as u32;
        assert_eq!(
            shape,
            vec![(0, FRAME), (f, FRAME), (2 * f, FRAME / 2), (1 << 25, 10)]
        );
        assert_eq!(groups.len(), 4);
    }
}
