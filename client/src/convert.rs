//! Conversion of a replicated chunk to RS 4+2 ([`crate::Client::convert_to_ec`]): the one
//! library operation the client (for `cold` files) and the healer (for `auto` files) use.
//!
//! ```text
//!  ec_prepare(ino, index, chunk, version) ──▶ plan: chunk at version v+1, 6 shard ids/servers
//!  FENCE every replica at v+1 ──(any refuses)──▶ abort
//!  READ `length` bytes from one replica at v+1 (verified there; next replica on failure)
//!  encode (Codec, on a blocking thread) ──▶ 6 shards + their block crc32c
//!  WRITE each shard at v+1, term of the plan ──▶ SYNC ──▶ READ back, crcs must match
//!  ec_commit(ino, index, chunk, v+1, length, term) ──▶ the chunk is erasure coded
//! ```
//!
//! Why it is safe at every step: until `ec_commit` the replicated chunk stays authoritative
//! and complete (the conversion only reads it); the metadata side garbage-collects shards of a
//! conversion that never commits. The fence makes every replica refuse writers that still
//! hold the old version, so the bytes read cannot change under the encoder: a writer must
//! refresh, sees the chunk `shared`, and its `cow_chunk` cancels the conversion (bumping the
//! version, so the commit is refused with `StaleVersion`). The commit is fenced by the plan's
//! term too: a conversion planned under a deposed leader cannot commit. Only after the commit
//! are the replicas queued for deletion, by the metadata service.

use crate::ec_read::{codec, erasure_error, on_blocking_thread, read_shard};
use crate::erasure::block_crcs;
use crate::error::ClientError;
use crate::extent::frames;
use crate::store::{Put, Store};
use crate::write_path::{FRAME, FRAMES_IN_FLIGHT};
use bytes::Bytes;
use futures::future::join_all;
use futures::{StreamExt, TryStreamExt};
use rawfs_chunkserver_api::{DataError, MAX_PAYLOAD};
use rawfs_metadata_api::{ChunkLoc, ColdChunk, MetaError, Shard, CHUNK_SIZE, EC_SHARDS};

/// Converts the erasure-coded chunk `c` back to 3 replicas (its file became `hot`): the same
/// copy-out a write into an EC chunk makes (`cow_chunk` gives a new replicated chunk, the
/// client decodes the shards into it, syncs, and `cow_done` switches the file to it and queues
/// the shards for deletion). Until `cow_done` the EC chunk stays authoritative; a crash leaves
/// a pending copy that the next writer or conversion finishes. `StaleVersion` if the chunk is
/// no longer `c.chunk` or no longer erasure coded.
pub(crate) async fn to_replicas(store: &dyn Store, c: &ColdChunk) -> Result<ChunkLoc, ClientError> {
    let locs = crate::locations::Locations::new(c.ino);
    let loc = locs.for_read(store, c.index).await?;
    match loc {
        Some(loc) if loc.chunk == c.chunk && loc.ec.is_some() => {
            let replicated = crate::cow::writable(store, &locs, loc).await?;
            tracing::info!(
                ino = c.ino,
                index = c.index,
                chunk = c.chunk,
                new_chunk = replicated.chunk,
                bytes = c.length,
                "converted chunk from RS 4+2 to replicas"
            );
            Ok(replicated)
        }
        other => Err(ClientError::Meta(MetaError::StaleVersion {
            current: other.map_or(0, |l| l.version),
        })),
    }
}

/// Converts the replicated chunk `c` to RS 4+2; see the module docs. Returns the chunk's new
/// (erasure-coded) location. On an error before the commit nothing changed for readers and
/// writers: the replicated chunk stays authoritative.
pub(crate) async fn convert(store: &dyn Store, c: &ColdChunk) -> Result<ChunkLoc, ClientError> {
    if c.length > CHUNK_SIZE {
        return Err(ClientError::TooLarge {
            offset: c.index.saturating_mul(CHUNK_SIZE),
            len: c.length,
        });
    }
    let plan = store.ec_prepare(c.ino, c.index, c.chunk, c.version).await?;
    let loc = &plan.loc;
    // Checked before anything is written: a CPU the kernel cannot run on fails here.
    let codec = codec().map_err(|e| erasure_error(loc, e, None))?.clone();
    let shards = plan_shards(&plan.shards)?;
    fence_all(store, loc, c.length).await?;
    let data = read_replicated(store, loc, c.length).await?;
    let encoded = on_blocking_thread(move || codec.encode_chunk(&data))
        .await?
        .map_err(|e| erasure_error(loc, e, None))?;
    let crcs = encoded.crcs;
    let outcomes = join_all(
        shards
            .iter()
            .zip(encoded.shards.into_iter().map(Bytes::from))
            .zip(crcs.iter())
            .map(|(((id, addr), data), crcs)| store_shard(store, addr, *id, loc, data, crcs)),
    )
    .await;
    for ((id, addr), outcome) in shards.iter().zip(outcomes) {
        if let Err(source) = outcome {
            tracing::warn!(chunk = loc.chunk, shard = id, %addr, error = %source, "conversion aborted: shard not stored");
            return Err(ClientError::Io {
                chunk: *id,
                addr: addr.clone(),
                source,
            });
        }
    }
    let new = store
        .ec_commit(c.ino, c.index, c.chunk, loc.version, c.length, loc.term)
        .await?;
    tracing::info!(
        ino = c.ino,
        index = c.index,
        chunk = c.chunk,
        bytes = c.length,
        "converted chunk to RS 4+2"
    );
    Ok(new)
}

/// The shard ids and data addresses of a plan: exactly 6, each with a server.
fn plan_shards(shards: &[Shard]) -> Result<Vec<(u64, String)>, ClientError> {
    let listed: Vec<(u64, String)> = shards
        .iter()
        .filter_map(|s| Some((s.chunk, s.replica.as_ref()?.data_addr.clone())))
        .collect();
    if listed.len() != EC_SHARDS || shards.len() != EC_SHARDS {
        return Err(ClientError::Meta(MetaError::Invalid {
            reason: format!("ec_prepare placed {} of {EC_SHARDS} shards", listed.len()),
        }));
    }
    Ok(listed)
}

/// Fences every replica of `loc` at `loc.version`. Any replica that cannot be fenced aborts
/// the conversion: it might still take a write the encoder would not see.
///
/// An empty chunk (`length` 0) may never have been written, so its replicas may have no
/// file to fence: an empty write at the new version creates one, which refuses older
/// versions just as a fence does. Never for a chunk with data: a replica without its file
/// would then read as zeros.
async fn fence_all(store: &dyn Store, loc: &ChunkLoc, length: u64) -> Result<(), ClientError> {
    if loc.replicas.is_empty() {
        return Err(ClientError::NoReplica {
            index: loc.index,
            chunk: loc.chunk,
            last: None,
        });
    }
    let outcomes = join_all(loc.replicas.iter().map(|r| async move {
        match store
            .fence(&r.data_addr, loc.chunk, loc.version, loc.term)
            .await
        {
            Err(DataError::NotFound) if length == 0 => {
                let put = Put {
                    chunk: loc.chunk,
                    version: loc.version,
                    term: loc.term,
                    offset: 0,
                    data: Bytes::new(),
                };
                store.write(&r.data_addr, put).await?;
                // Fenced now; the fence again makes the new file durable.
                store
                    .fence(&r.data_addr, loc.chunk, loc.version, loc.term)
                    .await
            }
            other => other,
        }
    }))
    .await;
    for (r, outcome) in loc.replicas.iter().zip(outcomes) {
        if let Err(source) = outcome {
            tracing::warn!(chunk = loc.chunk, addr = %r.data_addr, error = %source, "conversion aborted: replica not fenced");
            return Err(ClientError::Io {
                chunk: loc.chunk,
                addr: r.data_addr.clone(),
                source,
            });
        }
    }
    Ok(())
}

/// Reads the first `length` bytes of the replicated chunk from one replica (each verified
/// by its chunkserver), moving to the next replica when one fails.
async fn read_replicated(
    store: &dyn Store,
    loc: &ChunkLoc,
    length: u64,
) -> Result<Bytes, ClientError> {
    let mut last = None;
    let n = loc.replicas.len();
    for i in 0..n {
        // Rotated by chunk id, as the read path does, to spread conversions over replicas.
        let r = &loc.replicas[(loc.chunk as usize + i) % n];
        match read_shard(store, &r.data_addr, loc.chunk, loc.version, 0, length).await {
            Ok(b) => return Ok(b),
            Err(e) => {
                tracing::warn!(chunk = loc.chunk, addr = %r.data_addr, error = %e, "conversion: replica read failed; trying the next");
                last = Some(e);
            }
        }
    }
    Err(ClientError::NoReplica {
        index: loc.index,
        chunk: loc.chunk,
        last,
    })
}

/// Writes one shard (as chunk `id` at the plan's version and term), syncs it, and reads it
/// back: every block's crc32c must equal the encoder's `crcs`.
async fn store_shard(
    store: &dyn Store,
    addr: &str,
    id: u64,
    loc: &ChunkLoc,
    data: Bytes,
    crcs: &[u32],
) -> Result<(), DataError> {
    let put = |offset: usize, bytes: Bytes| Put {
        chunk: id,
        version: loc.version,
        term: loc.term,
        // A shard is at most a quarter chunk: offsets fit in u32.
        offset: offset as u32,
        data: bytes,
    };
    if data.is_empty() {
        // An empty shard still exists as a chunk file, so that it can be synced and listed.
        store.write(addr, put(0, Bytes::new())).await?;
    } else {
        futures::stream::iter(frames(data.len(), FRAME))
            .map(|(pos, len)| store.write(addr, put(pos, data.slice(pos..pos + len))))
            .buffer_unordered(FRAMES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
    }
    store.sync(addr, id, loc.version).await?;
    let len = data.len() as u64;
    drop(data);
    // Read back piece by piece (whole crc blocks each), so that verifying holds one piece
    // of each shard in memory rather than the whole shard again.
    let block = u64::from(rawfs_chunkserver_api::BLOCK_SIZE);
    let piece = u64::from(MAX_PAYLOAD) / block * block;
    let mut at = 0u64;
    while at < len {
        let n = piece.min(len - at);
        let back = read_shard(store, addr, id, loc.version, at, n).await?;
        let first = (at / block) as usize;
        for (i, crc) in block_crcs(&back).into_iter().enumerate() {
            if crcs.get(first + i) != Some(&crc) {
                return Err(DataError::Corrupt {
                    offset: at + i as u64 * block,
                });
            }
        }
        at += n;
    }
    Ok(())
}
