//! Copy-on-write of chunks shared with snapshots and clones, and the fencing that makes a
//! new snapshot immutable.
//!
//! ```text
//!  write to a chunk whose location says `shared`
//!    ──▶ cow_chunk (metadata: new chunk id on the same servers, pending copy)
//!    ──▶ CLONE(source → new) on every replica in parallel (each copies its local file)
//!    ──▶ cow_done(failed replicas)  ──▶ the new, private location is cached and written
//!
//!  write to an erasure-coded chunk (always `shared`)
//!    ──▶ cow_chunk (metadata: new replicated chunk, `from_ec` = the EC chunk)
//!    ──▶ per 4 MiB stripe: EC read (decoding around lost shards) ──▶ WRITE to every replica
//!    ──▶ SYNC ──▶ cow_done(failed replicas)  ──▶ written in place from then on
//!
//!  snapshot(origin) ──▶ metadata: new inode sharing the chunks, their versions bumped
//!    ──▶ FENCE(chunk, new version) on every replica: writers still holding the old
//!        location are refused from now on (they refresh, see `shared`, and copy first)
//!        a replica that cannot be fenced is dropped from the chunk (version bump)
//!    (the metadata leader also sends these FENCE orders with the servers' next heartbeat
//!     replies, so a snapshot client that dies before fencing leaves no gap open for long)
//! ```
//!
//! Copying on the chunkservers (rather than reading through the client and writing back)
//! moves no data over the network, and keeps the copy next to the replica set the chunk
//! already had. A replica that fails its copy is dropped, as one that fails a write is.

use crate::erasure::Layout;
use crate::error::ClientError;
use crate::locations::Locations;
use crate::read_path::Suspects;
use crate::store::{Put, Store};
use crate::write_path::write_replica;
use bytes::Bytes;
use futures::future::join_all;
use futures::StreamExt;
use rawfs_chunkserver_api::{DataClient, DataError};
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{Attr, ChunkLoc, Ino, MetaError, Name, CHUNK_SIZE};

/// Rounds of copy-on-write for one chunk before giving up (each ends with a private chunk
/// unless a new snapshot shares it again right away).
const COW_ROUNDS: usize = 4;
/// Chunks fenced at once when a snapshot is taken.
const FENCES_IN_FLIGHT: usize = 16;
/// Chunk locations read per call when fencing a snapshot.
const LIST_BATCH: u64 = 1024;

/// `loc` if it may be written in place; otherwise the private copy made for this file.
pub(crate) async fn writable(
    store: &dyn Store,
    locs: &Locations,
    mut loc: ChunkLoc,
) -> Result<ChunkLoc, ClientError> {
    for _ in 0..COW_ROUNDS {
        if !loc.shared {
            return Ok(loc);
        }
        loc = copy(store, locs, &loc).await?;
        locs.update(&loc);
    }
    Err(ClientError::Meta(MetaError::Unavailable {
        reason: format!("chunk {} stays shared after {COW_ROUNDS} copies", loc.chunk),
    }))
}

async fn copy(
    store: &dyn Store,
    locs: &Locations,
    loc: &ChunkLoc,
) -> Result<ChunkLoc, ClientError> {
    let ino = locs.ino();
    let cow = store.cow_chunk(ino, loc.index, loc.chunk).await?;
    if let Some(src) = &cow.from_ec {
        return copy_from_ec(store, ino, loc.index, cow.loc, src).await;
    }
    let Some(src) = cow.source else {
        return Ok(cow.loc);
    };
    let new = cow.loc;
    let outcomes = join_all(new.replicas.iter().map(|r| {
        store.clone_chunk(
            &r.data_addr,
            (src.chunk, src.version),
            (new.chunk, new.version),
            new.term,
        )
    }))
    .await;
    let mut failed = Vec::new();
    let mut last: Option<DataError> = None;
    for (r, outcome) in new.replicas.iter().zip(outcomes) {
        if let Err(e) = outcome {
            tracing::warn!(chunk = new.chunk, source = src.chunk, addr = %r.data_addr, error = %e, "replica failed to copy a shared chunk");
            failed.push(r.server);
            last = Some(e);
        }
    }
    if failed.len() == new.replicas.len() {
        // The copy stays pending: the next writer tries again, and readers still see the
        // source, so nothing is lost.
        return Err(ClientError::NoReplica {
            index: loc.index,
            chunk: new.chunk,
            last,
        });
    }
    tracing::debug!(
        ino,
        index = loc.index,
        from = src.chunk,
        to = new.chunk,
        "chunk copied on write"
    );
    Ok(store.cow_done(ino, loc.index, new.chunk, failed).await?)
}

/// Copies the erasure-coded chunk `src` into the new replicated chunk `new`: stripe by
/// stripe, read (see `ec_read.rs`) and written to every replica of `new`, then synced and
/// reported with `cow_done`. Replicas that fail are left out and reported as failed; if all
/// of them fail, or the EC read fails, the copy stays pending (readers still see `src`) and
/// the next writer starts it again (writes are positional, so that is safe).
async fn copy_from_ec(
    store: &dyn Store,
    ino: Ino,
    index: u64,
    new: ChunkLoc,
    src: &ChunkLoc,
) -> Result<ChunkLoc, ClientError> {
    let Some(ec) = &src.ec else {
        return Err(ClientError::Meta(MetaError::Invalid {
            reason: format!(
                "cow_chunk names chunk {} as erasure coded, it is not",
                src.chunk
            ),
        }));
    };
    let suspects = Suspects::default();
    let stripe = Layout::DEFAULT.stripe_size();
    let length = ec.length.min(CHUNK_SIZE);
    let mut failed: Vec<Option<DataError>> = vec![None; new.replicas.len()];
    let mut at = 0u64;
    // At least one round, so that the replicas of an empty chunk exist (and can be synced).
    loop {
        let n = (length - at).min(stripe);
        let data = if n == 0 {
            Bytes::new()
        } else {
            let attempt = crate::ec_read::read(store, &suspects, src, ec, at, n).await;
            crate::ec_read::report_lost(store, src, &attempt.bad).await;
            attempt.result?
        };
        let outcomes = join_all(new.replicas.iter().zip(&failed).map(|(r, f)| {
            let (data, new) = (&data, &new);
            async move {
                match f {
                    Some(_) => Ok(()),
                    None if data.is_empty() => {
                        let put = Put {
                            chunk: new.chunk,
                            version: new.version,
                            term: new.term,
                            offset: 0,
                            data: Bytes::new(),
                        };
                        store.write(&r.data_addr, put).await
                    }
                    // `at` < CHUNK_SIZE: fits in u32.
                    None => write_replica(store, &r.data_addr, new, at as u32, data).await,
                }
            }
        }))
        .await;
        note_failures(&new, &mut failed, outcomes, "write");
        at += n;
        if at >= length {
            break;
        }
    }
    let new_ref = &new;
    let outcomes = join_all(new.replicas.iter().zip(&failed).map(|(r, f)| async move {
        let new = new_ref;
        match f {
            Some(_) => Ok(()),
            None => store.sync(&r.data_addr, new.chunk, new.version).await,
        }
    }))
    .await;
    note_failures(&new, &mut failed, outcomes, "sync");
    if failed.iter().all(|f| f.is_some()) {
        return Err(ClientError::NoReplica {
            index,
            chunk: new.chunk,
            last: failed.into_iter().flatten().last(),
        });
    }
    let failed: Vec<_> = new
        .replicas
        .iter()
        .zip(&failed)
        .filter(|(_, f)| f.is_some())
        .map(|(r, _)| r.server)
        .collect();
    tracing::debug!(
        ino,
        index,
        from = src.chunk,
        to = new.chunk,
        bytes = length,
        "erasure-coded chunk copied to replicas for a write"
    );
    Ok(store.cow_done(ino, index, new.chunk, failed).await?)
}

/// Records the replicas whose call failed (each keeps its first error).
fn note_failures(
    new: &ChunkLoc,
    failed: &mut [Option<DataError>],
    outcomes: Vec<Result<(), DataError>>,
    what: &str,
) {
    for ((r, f), outcome) in new.replicas.iter().zip(failed.iter_mut()).zip(outcomes) {
        if let Err(e) = outcome {
            tracing::warn!(chunk = new.chunk, addr = %r.data_addr, error = %e, "replica failed to {what} a copy of an erasure-coded chunk");
            f.get_or_insert(e);
        }
    }
}

/// Makes `parent/name` a snapshot (`read_only`) or a writable clone of `origin`, sharing its
/// chunks, and fences every shared chunk on its replicas before returning (see the module
/// docs). `label` is kept as the new file's `trusted.rawfs.origin` xattr.
pub async fn snapshot(
    meta: &MetadataClient,
    data: &DataClient,
    origin: Ino,
    parent: Ino,
    name: Name,
    read_only: bool,
    label: &str,
) -> Result<Attr, ClientError> {
    let label = Name::from(label.as_bytes().to_vec());
    let attr = meta
        .snapshot(origin, parent, name, read_only, label)
        .await?;
    let mut first = 0;
    let last = attr.size.div_ceil(CHUNK_SIZE);
    while first < last {
        let batch = meta.chunks(attr.ino, first, LIST_BATCH).await?;
        first += LIST_BATCH;
        let results: Vec<Result<(), ClientError>> = futures::stream::iter(batch)
            .map(|loc| fence_chunk(meta, data, loc))
            .buffer_unordered(FENCES_IN_FLIGHT)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
    }
    Ok(attr)
}

/// Fences one shared chunk on each of its replicas; a replica that cannot be fenced is
/// dropped, so that no copy of the chunk can still take a write at the old version.
async fn fence_chunk(
    meta: &MetadataClient,
    data: &DataClient,
    loc: ChunkLoc,
) -> Result<(), ClientError> {
    let outcomes = join_all(
        loc.replicas
            .iter()
            .map(|r| data.fence(&r.data_addr, loc.chunk, loc.version, loc.term)),
    )
    .await;
    let mut version = loc.version;
    for (r, outcome) in loc.replicas.iter().zip(outcomes) {
        match outcome {
            // A newer version there refuses the old one too.
            Ok(()) | Err(DataError::StaleVersion { .. }) => {}
            Err(e) => {
                tracing::warn!(chunk = loc.chunk, addr = %r.data_addr, error = %e, "cannot fence a snapshot chunk; dropping the replica");
                let new = meta.drop_replica(loc.chunk, version, r.server).await?;
                if new.replicas.iter().any(|x| x.server == r.server) {
                    // Its last replica: the service keeps it. Nothing else can be done.
                    return Err(ClientError::Io {
                        chunk: loc.chunk,
                        addr: r.data_addr.clone(),
                        source: e,
                    });
                }
                version = new.version;
            }
        }
    }
    Ok(())
}
