//! Direct RS 4+2 writes: the data of a `cold` file goes to 6 shards as it is written, instead
//! of to 3 replicas that the healer converts later (1.5x the bytes on the wire and on disk,
//! not 3x, and no second pass).
//!
//! ```text
//!  allocate_chunk on a cold file ──▶ an erasure-coded chunk of length 0 (6 shards placed)
//!  flush: pieces of that chunk appending at its length L (L a whole number of stripes)
//!     encode stripe by stripe (the last may be partial) ──▶ 6 shard ranges from L/4 on
//!     WRITE + SYNC all 6 shards at the chunk's version
//!     ec_extend(chunk, version, shards, L → L') ──▶ length L', version + 1
//!  anything else (an overwrite, an append at a partial stripe, a gap, a lost shard, a failed
//!  shard write, a refused extend) ──▶ the usual path: copy to replicas (cow.rs), write there
//! ```
//!
//! Why it is safe: an append writes only shard bytes past the chunk's committed length, which
//! every reader ignores (past a shard's stored length the shard is zero by definition), so
//! the committed data never changes under a reader, and a crash before `ec_extend` leaves the
//! old length authoritative and the new bytes garbage that the next append overwrites. Only
//! whole stripes are ever appended to (a chunk whose length ends inside a stripe is copied to
//! replicas first), so no parity cell that covers committed data is rewritten. The shards are
//! synced before the extend commits, so a committed length is always durable: an append needs
//! no fsync later. `ec_extend` is fenced by the chunk's id, version, length and its exact
//! shard list, and bumps the version: a healer rebuild or move of a shard that read the old
//! length is refused when it commits, and an append racing a rebuild that committed first is
//! refused and goes the usual way.
//!
//! Which writes take this path: appends that fill at least one whole stripe, or that reach
//! the end of the file (the tail at a flush or a close). Small writes inside a large file
//! (a cold volume's random writes) go to replicas, so they do not turn each chunk into a
//! partial-stripe EC chunk that the next write must copy out again.

use crate::ec_read::{codec, erasure_error, on_blocking_thread};
use crate::erasure::{Codec, TOTAL_SHARDS};
use crate::error::ClientError;
use crate::extent::frames;
use crate::locations::Locations;
use crate::store::{Put, Store};
use crate::write_path::{FRAME, FRAMES_IN_FLIGHT};
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use futures::{StreamExt, TryStreamExt};
use rawfs_chunkserver_api::{DataError, Piece};
use rawfs_metadata_api::{ChunkId, ChunkLoc, MetaError, ServerId, CHUNK_SIZE};

/// One shard of the chunk being appended to, and where it lives.
struct ShardAt {
    id: ChunkId,
    server: ServerId,
    addr: String,
}

/// What an attempt to append as RS 4+2 came to.
pub(crate) enum Append {
    /// Written, synced and committed: the chunk's new location.
    Done(ChunkLoc),
    /// Not an erasure-coded append (or refused): write `pieces` the usual way, starting
    /// from this location.
    Fallback(ChunkLoc),
}

/// Appends `pieces` (sorted, not overlapping) of chunk `loc` as RS 4+2 when they extend its
/// erasure-coded layout (see the module docs); otherwise hands the location back.
/// `file_end` is the end of the file as the writer sees it, in bytes from the chunk's start.
pub(crate) async fn try_append(
    store: &dyn Store,
    locs: &Locations,
    loc: ChunkLoc,
    pieces: &[Piece],
    file_end: u64,
) -> Result<Append, ClientError> {
    let Some((from, shards)) = appendable(&loc, pieces, file_end) else {
        return Ok(Append::Fallback(loc));
    };
    let codec = codec().map_err(|e| erasure_error(&loc, e, None))?;
    let data = joined(pieces);
    let to = from + data.len() as u64;
    let cells = encode(codec, data, &loc).await?;
    let shard_at = from / codec.layout().stripe_size() * codec.layout().cell_size();
    let outcomes = join_all(
        shards
            .iter()
            .zip(cells)
            .map(|(s, cell)| store_range(store, &s.addr, s.id, &loc, shard_at, cell)),
    )
    .await;
    if let Some((s, Err(e))) = shards.iter().zip(&outcomes).find(|(_, o)| o.is_err()) {
        tracing::warn!(chunk = loc.chunk, shard = s.id, addr = %s.addr, error = %e, "shard append failed; writing the chunk as replicas");
        return fallback(store, locs, loc.index).await;
    }
    let ids: Vec<(ChunkId, ServerId)> = shards.iter().map(|s| (s.id, s.server)).collect();
    let ino = locs.ino();
    match store
        .ec_extend(ino, loc.index, loc.chunk, loc.version, ids, from, to)
        .await
    {
        Ok(new) => {
            locs.update(&new);
            Ok(Append::Done(new))
        }
        Err(
            e @ (MetaError::StaleVersion { .. } | MetaError::Invalid { .. } | MetaError::NotFound),
        ) => {
            tracing::debug!(chunk = loc.chunk, error = %e, "erasure-coded append refused; writing the chunk as replicas");
            fallback(store, locs, loc.index).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The append's start (the chunk's length) and its shards if `pieces` can be appended to
/// `loc` as RS 4+2.
fn appendable(loc: &ChunkLoc, pieces: &[Piece], file_end: u64) -> Option<(u64, Vec<ShardAt>)> {
    let ec = loc.ec.as_ref()?;
    let stripe = crate::erasure::Layout::DEFAULT.stripe_size();
    let from = ec.length;
    if from % stripe != 0 {
        return None;
    }
    let mut end = from;
    for p in pieces {
        if u64::from(p.offset) != end {
            return None;
        }
        end += p.data.len() as u64;
    }
    if end == from || end > CHUNK_SIZE || (end - from < stripe && end < file_end.min(CHUNK_SIZE)) {
        return None;
    }
    let shards: Vec<ShardAt> = ec
        .shards
        .iter()
        .filter_map(|s| {
            let r = s.replica.as_ref()?;
            Some(ShardAt {
                id: s.chunk,
                server: r.server,
                addr: r.data_addr.clone(),
            })
        })
        .collect();
    (shards.len() == TOTAL_SHARDS).then_some((from, shards))
}

/// The pieces' bytes as one buffer (no copy for a single piece).
fn joined(pieces: &[Piece]) -> Bytes {
    if let [one] = pieces {
        return one.data.clone();
    }
    let mut all = BytesMut::with_capacity(pieces.iter().map(|p| p.data.len()).sum());
    for p in pieces {
        all.extend_from_slice(&p.data);
    }
    all.freeze()
}

/// Encodes `data` (starting on a stripe boundary of the chunk) on a blocking thread: for each
/// shard, its bytes for these stripes, contiguous in the shard.
async fn encode(
    codec: &'static Codec,
    data: Bytes,
    loc: &ChunkLoc,
) -> Result<Vec<Bytes>, ClientError> {
    let shards = on_blocking_thread(move || {
        let mut shards: [Vec<u8>; TOTAL_SHARDS] = Default::default();
        codec
            .encode_shards_into(&data, &mut shards)
            .map(|()| shards)
    })
    .await?
    .map_err(|e| erasure_error(loc, e, None))?;
    Ok(shards.into_iter().map(Bytes::from).collect())
}

/// Writes `data` at `offset` of shard `id` (at the chunk's version and term) and syncs it. An
/// empty range still writes (nothing) so that the shard's file exists at this version.
async fn store_range(
    store: &dyn Store,
    addr: &str,
    id: ChunkId,
    loc: &ChunkLoc,
    offset: u64,
    data: Bytes,
) -> Result<(), DataError> {
    let put = |pos: usize, bytes: Bytes| Put {
        chunk: id,
        version: loc.version,
        term: loc.term,
        // A shard is at most a quarter chunk: offsets fit in u32.
        offset: (offset + pos as u64) as u32,
        data: bytes,
    };
    if data.is_empty() {
        let mut create = put(0, Bytes::new());
        create.offset = 0;
        store.write(addr, create).await?;
    } else {
        futures::stream::iter(frames(data.len(), FRAME))
            .map(|(pos, len)| store.write(addr, put(pos, data.slice(pos..pos + len))))
            .buffer_unordered(FRAMES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
    }
    store.sync(addr, id, loc.version).await
}

/// The chunk's current location, for the usual write path after a failed or refused append.
async fn fallback(store: &dyn Store, locs: &Locations, index: u64) -> Result<Append, ClientError> {
    let loc = match locs.refresh(store, index).await? {
        Some(loc) => loc,
        None => locs.for_write(store, index).await?,
    };
    Ok(Append::Fallback(loc))
}
