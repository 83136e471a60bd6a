//! The file -> chunk map: allocation, release, replica drops, and the deletion queue.
//!
//! A chunk that leaves the map (file deleted, truncated, hole punched) is queued for deletion
//! on every server that held it; the queue is handed out on heartbeat replies. Truncation
//! releases only chunks that lie wholly past the new size: the bytes past the new end inside
//! the last chunk stay on the chunkservers, and the client library zeroes them (it writes
//! zeros from the new size to the end of that chunk, or to the old size) so that a later
//! extension reads zeros there.

use rawfs_metadata_api::{
    stored_after_write, Attr, ChunkId, ChunkLoc, FileKind, Ino, MetaError, Replica, ServerId,
    Timespec, CHUNK_SIZE,
};
use redb::ReadableTable;

use crate::namespace::invalid;
use crate::store::{
    decode, get_chunk, get_server, inode, ChunkRec, Fail, Op, ServerRec, Tables, NEXT_CHUNK,
};

/// Chunk `chunk` by id: its owning `(ino, index)` and its record as that reference sees it
/// (`NotFound` if no file holds it).
pub(crate) fn chunk_by_id(t: &Tables, chunk: ChunkId) -> Op<(Ino, u64, ChunkRec)> {
    let (ino, index) = t
        .chunk_owner
        .get(chunk)?
        .map(|g| g.value())
        .ok_or(Fail::Meta(MetaError::NotFound))?;
    let rec = get_chunk(&t.chunks, ino, index)?
        .and_then(|r| crate::shares::view_of(&r, chunk))
        .ok_or(Fail::Meta(MetaError::NotFound))?;
    Ok((ino, index, rec))
}

/// Builds the wire form of a chunk record, with each replica's (or shard's) data address.
/// `shared` is set for a chunk that is being converted or is erasure coded (a writer must
/// `cow_chunk` first); callers add sharing by references.
pub(crate) fn to_loc(
    servers: &impl ReadableTable<u64, &'static [u8]>,
    index: u64,
    rec: &ChunkRec,
    term: u64,
) -> Op<ChunkLoc> {
    let mut replicas = Vec::with_capacity(rec.servers.len());
    for &server in &rec.servers {
        let data_addr = get_server(servers, server)?
            .map(|s| s.data_addr)
            .unwrap_or_default();
        replicas.push(Replica { server, data_addr });
    }
    let ec = match &rec.ec {
        Some(ec) => Some(crate::erasure::ec_loc(servers, ec)?),
        None => None,
    };
    Ok(ChunkLoc {
        index,
        chunk: rec.chunk,
        version: rec.version,
        replicas,
        term,
        shared: rec.ec.is_some() || rec.converting.is_some(),
        ec,
    })
}

/// Removes the chunks of `ino` with index in `first..first + count`, queueing their deletion.
/// Returns how many chunks were released.
pub(crate) fn release_range(t: &mut Tables, ino: Ino, first: u64, count: u64) -> Op<u64> {
    let end = first.saturating_add(count);
    let mut gone = Vec::new();
    for item in t.chunks.range((ino, first)..(ino, end))? {
        let (k, v) = item?;
        let rec: ChunkRec = decode("chunk", v.value())?;
        gone.push((k.value().1, rec));
    }
    for (index, rec) in &gone {
        t.chunks.remove((ino, *index))?;
        // A chunk shared with a snapshot or clone stays until its last reference goes.
        crate::shares::release_entry(t, ino, *index, rec)?;
    }
    Ok(gone.len() as u64)
}

/// Releases every chunk wholly past `size`.
pub(crate) fn truncate(t: &mut Tables, ino: Ino, size: u64) -> Op<()> {
    let first = size.div_ceil(CHUNK_SIZE);
    release_range(t, ino, first, u64::MAX)?;
    Ok(())
}

/// A regular file whose data may change (not a read-only snapshot).
pub(crate) fn file_rec(t: &Tables, ino: Ino) -> Op<crate::store::InodeRec> {
    let rec = inode(&t.inodes, ino)?;
    match rec.kind {
        FileKind::File => {}
        FileKind::Dir => return Err(MetaError::IsDir.into()),
        _ => return Err(invalid("not a regular file")),
    }
    crate::shares::check_writable(&rec)?;
    Ok(rec)
}

pub(crate) fn allocate(
    t: &mut Tables,
    ino: Ino,
    index: u64,
    servers: &[ServerId],
    term: u64,
) -> Op<ChunkLoc> {
    if let Some(loc) = allocated(t, ino, index, term)? {
        return Ok(loc);
    }
    if servers.is_empty() {
        return Err(MetaError::NoSpace {
            reason: "no live chunkserver".into(),
        }
        .into());
    }
    let chunk = t.counter(NEXT_CHUNK)?.max(1);
    t.set_counter(NEXT_CHUNK, chunk + 1)?;
    let rec = ChunkRec {
        chunk,
        version: 1,
        servers: servers.to_vec(),
        pending: None,
        ec: None,
        converting: None,
    };
    t.put_chunk(ino, index, &rec)?;
    t.chunk_owner.insert(chunk, (ino, index))?;
    to_loc(&t.servers, index, &rec, term)
}

/// Checks that chunk `index` of `ino` may be allocated; the chunk there already, if any
/// (another writer allocated it between the leader's check and this entry).
pub(crate) fn allocated(t: &Tables, ino: Ino, index: u64, term: u64) -> Op<Option<ChunkLoc>> {
    let file = file_rec(t, ino)?;
    if index > (i64::MAX as u64) / CHUNK_SIZE {
        return Err(invalid("chunk index past the largest file size"));
    }
    let Some(rec) = get_chunk(&t.chunks, ino, index)? else {
        return Ok(None);
    };
    crate::shares::visible_loc(
        &t.servers,
        &t.chunk_refs,
        &t.chunk_owner,
        &file,
        (ino, index),
        &rec,
        term,
    )
    .map(Some)
}

pub(crate) fn commit_write(
    t: &mut Tables,
    ino: Ino,
    end: u64,
    stored_delta: i64,
    now: Timespec,
) -> Op<Attr> {
    let mut rec = file_rec(t, ino)?;
    rec.size = rec.size.max(end);
    rec.stored = stored_after_write(rec.stored, stored_delta, rec.size, end);
    rec.mtime = now;
    rec.ctime = now;
    t.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

pub(crate) fn release_chunks(
    t: &mut Tables,
    ino: Ino,
    first: u64,
    count: u64,
    now: Timespec,
) -> Op<()> {
    let mut rec = file_rec(t, ino)?;
    if release_range(t, ino, first, count)? > 0 {
        // Per-chunk byte counts are not kept: bound `stored` by what the remaining chunks
        // can hold, which is exact for fully punched files and never over-reports.
        let remaining = t.chunks.range((ino, 0)..=(ino, u64::MAX))?.count() as u64;
        rec.stored = rec.stored.min(remaining.saturating_mul(CHUNK_SIZE));
    }
    rec.mtime = now;
    rec.ctime = now;
    t.put_inode(ino, &rec)?;
    Ok(())
}

/// Drops `server` from `chunk`'s replicas if `expected_version` is current, bumping the
/// version so that the dropped copy is recognisably stale. The last replica is never
/// dropped (there would be nothing left to read); the location is returned unchanged then.
/// A shard id marks the shard lost instead (see `erasure::drop_shard`).
pub(crate) fn drop_replica(
    t: &mut Tables,
    chunk: ChunkId,
    expected_version: u64,
    server: ServerId,
    term: u64,
) -> Op<ChunkLoc> {
    if let Some(loc) = crate::erasure::drop_shard(t, chunk, expected_version, server, term)? {
        return Ok(loc);
    }
    let (_, index, rec) = chunk_by_id(t, chunk)?;
    if rec.version != expected_version || !rec.servers.contains(&server) {
        return to_loc(&t.servers, index, &rec, term);
    }
    if rec.servers.len() == 1 {
        tracing::warn!(
            chunk,
            server,
            "refusing to drop the last replica of a chunk"
        );
        return to_loc(&t.servers, index, &rec, term);
    }
    // Every reference of a shared chunk carries its record: change them all alike.
    crate::shares::update_chunk(t, chunk, |version, servers| {
        servers.retain(|&s| s != server);
        *version += 1;
    })?;
    t.deletions.insert((server, chunk), ())?;
    // Re-read: the change may also have cancelled a conversion under way.
    let (_, index, rec) = chunk_by_id(t, chunk)?;
    let mut loc = to_loc(&t.servers, index, &rec, term)?;
    loc.shared |= crate::shares::has_extra_refs(&t.chunk_refs, chunk)?;
    Ok(loc)
}

pub(crate) fn register_server(
    t: &mut Tables,
    id: ServerId,
    data_addr: &str,
    control_addr: &str,
) -> Op<()> {
    // A server that moves to new addresses stays draining if it was.
    let draining = crate::store::get_server(&t.servers, id)?.is_some_and(|r| r.draining);
    let rec = ServerRec {
        data_addr: data_addr.to_string(),
        control_addr: control_addr.to_string(),
        draining,
    };
    t.servers
        .insert(id, crate::store::encode("server", &rec)?.as_slice())?;
    Ok(())
}

pub(crate) fn ack_deletes(t: &mut Tables, server: ServerId, chunks: &[ChunkId]) -> Op<()> {
    for &c in chunks {
        t.deletions.remove((server, c))?;
    }
    Ok(())
}
