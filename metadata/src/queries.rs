//! Read-only queries, answered from one redb read transaction.

use rawfs_metadata_api::{
    Attr, ChunkId, ChunkLoc, DirEntry, FileKind, Ino, MetaError, Name, ServerId, NAME_MAX,
};
use redb::ReadableTable;
use serde_bytes::ByteBuf;

use crate::shares::{view_of, visible_loc};
use crate::store::{
    decode, get_chunk, get_inode, inode, ChunkRec, Fail, Op, ReadTables, ServerRec, INODE_COUNT,
    NEXT_CHUNK,
};

/// Most entries one `readdir` call returns, whatever the caller asks for.
pub(crate) const READDIR_MAX: u32 = 4096;
/// Most deletions handed to a chunkserver in one heartbeat reply.
pub(crate) const DELETES_PER_REPLY: usize = 10_000;

pub(crate) fn getattr(rt: &ReadTables, ino: Ino) -> Op<Attr> {
    Ok(inode(&rt.inodes, ino)?.attr(ino))
}

pub(crate) fn lookup(rt: &ReadTables, parent: Ino, name: &[u8]) -> Op<Attr> {
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong.into());
    }
    let prec = inode(&rt.inodes, parent)?;
    if !prec.is_dir() {
        return Err(MetaError::NotDir.into());
    }
    // The kernel resolves these itself, but an NFS-style export asks for them.
    match name {
        b"." => return Ok(prec.attr(parent)),
        b".." => return getattr(rt, prec.parent),
        _ => {}
    }
    let (child, _) = rt
        .dirents
        .get((parent, name))?
        .map(|g| g.value())
        .ok_or(Fail::Meta(MetaError::NotFound))?;
    getattr(rt, child)
}

pub(crate) fn readlink(rt: &ReadTables, ino: Ino) -> Op<ByteBuf> {
    let rec = inode(&rt.inodes, ino)?;
    if rec.kind != FileKind::Symlink {
        return Err(crate::namespace::invalid("not a symlink"));
    }
    let target = rt
        .symlinks
        .get(ino)?
        .map(|g| g.value().to_vec())
        .ok_or(Fail::Meta(MetaError::NotFound))?;
    Ok(ByteBuf::from(target))
}

/// Entries of `ino` after `cookie` in creation order, with their attributes.
pub(crate) fn readdir(rt: &ReadTables, ino: Ino, cookie: u64, limit: u32) -> Op<Vec<DirEntry>> {
    let rec = inode(&rt.inodes, ino)?;
    if !rec.is_dir() {
        return Err(MetaError::NotDir.into());
    }
    let limit = limit.clamp(1, READDIR_MAX) as usize;
    let mut out = Vec::new();
    if cookie == u64::MAX {
        return Ok(out);
    }
    for item in rt.dir_order.range((ino, cookie + 1)..=(ino, u64::MAX))? {
        let (k, v) = item?;
        let seq = k.value().1;
        let name = v.value().to_vec();
        let Some((child, _)) = rt.dirents.get((ino, name.as_slice()))?.map(|g| g.value()) else {
            tracing::error!(dir = ino, seq, "dir_order entry without a dirent");
            continue;
        };
        let Some(crec) = get_inode(&rt.inodes, child)? else {
            tracing::error!(dir = ino, child, "dirent pointing to a missing inode");
            continue;
        };
        out.push(DirEntry {
            name: Name::from(name),
            attr: crec.attr(child),
            cookie: seq,
        });
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

pub(crate) fn getxattr(rt: &ReadTables, ino: Ino, name: &[u8]) -> Op<ByteBuf> {
    if crate::classes::is_class_xattr(name) {
        return crate::classes::class_xattr(rt, ino);
    }
    inode(&rt.inodes, ino)?;
    rt.xattrs
        .get((ino, name))?
        .map(|g| ByteBuf::from(g.value().to_vec()))
        .ok_or(Fail::Meta(MetaError::NoAttr))
}

pub(crate) fn listxattr(rt: &ReadTables, ino: Ino) -> Op<Vec<Name>> {
    inode(&rt.inodes, ino)?;
    let empty: &[u8] = &[];
    let mut out = Vec::new();
    for item in rt.xattrs.range((ino, empty)..(ino + 1, empty))? {
        let (k, _) = item?;
        let name = k.value().1;
        // The class xattr is virtual and unlisted (a stored row of that name could only
        // predate storage classes, and getxattr would not show it).
        if !crate::classes::is_class_xattr(name) {
            out.push(Name::from(name.to_vec()));
        }
    }
    Ok(out)
}

pub(crate) fn chunks(
    rt: &ReadTables,
    ino: Ino,
    first: u64,
    count: u64,
    term: u64,
) -> Op<Vec<ChunkLoc>> {
    let file = inode(&rt.inodes, ino)?;
    let end = first.saturating_add(count);
    let mut out = Vec::new();
    for item in rt.chunks.range((ino, first)..(ino, end))? {
        let (k, v) = item?;
        let rec: ChunkRec = decode("chunk", v.value())?;
        out.push(visible_loc(
            &rt.servers,
            &rt.chunk_refs,
            &rt.chunk_owner,
            &file,
            (ino, k.value().1),
            &rec,
            term,
        )?);
    }
    Ok(out)
}

/// The chunk at `index` if it exists (the fast path of `allocate_chunk`).
pub(crate) fn chunk_at(rt: &ReadTables, ino: Ino, index: u64, term: u64) -> Op<Option<ChunkLoc>> {
    match get_chunk(&rt.chunks, ino, index)? {
        Some(rec) => {
            let file = inode(&rt.inodes, ino)?;
            Ok(Some(visible_loc(
                &rt.servers,
                &rt.chunk_refs,
                &rt.chunk_owner,
                &file,
                (ino, index),
                &rec,
                term,
            )?))
        }
        None => Ok(None),
    }
}

/// The current version of `chunk` and the servers holding it.
pub(crate) fn chunk_by_id(rt: &ReadTables, chunk: ChunkId) -> Op<Option<ChunkRec>> {
    let Some((ino, index)) = rt.chunk_owner.get(chunk)?.map(|g| g.value()) else {
        return Ok(None);
    };
    // The owner may name it as the source of a pending copy.
    Ok(get_chunk(&rt.chunks, ino, index)?.and_then(|r| view_of(&r, chunk)))
}

/// Chunks of a heartbeat's inventory that `server` should delete: unknown ids below the
/// allocation counter (read in this same transaction, so a chunk being allocated right now
/// is never among them) and chunks whose replica list no longer names this server.
/// A listed replica with an older version is kept: a replica-set shrink bumps the version
/// before the survivors have been written at the new one. Each with the version the
/// inventory showed, which bounds its deletion (`HeartbeatReply::delete_stale`).
pub(crate) fn inventory_deletes(
    rt: &ReadTables,
    server: ServerId,
    inventory: &[(ChunkId, u64)],
) -> Op<Vec<(ChunkId, u64)>> {
    let next = rt.counter(NEXT_CHUNK)?;
    let mut out = Vec::new();
    for &(chunk, version) in inventory {
        if chunk >= next {
            continue;
        }
        match chunk_by_id(rt, chunk)? {
            None => out.push((chunk, version)),
            Some(rec) if !rec.servers.contains(&server) => out.push((chunk, version)),
            Some(_) => {}
        }
    }
    Ok(out)
}

/// Copies in `server`'s inventory stored at an older version than the chunk map's, for a
/// FENCE at the map's version: a writer holding an old location (one from before a snapshot
/// whose fencing client died) must not write into a chunk a snapshot now shares.
pub(crate) fn inventory_fences(
    rt: &ReadTables,
    server: ServerId,
    inventory: &[(ChunkId, u64)],
) -> Op<Vec<(ChunkId, u64)>> {
    let mut out = Vec::new();
    for &(chunk, stored) in inventory {
        if let Some(rec) = chunk_by_id(rt, chunk)? {
            if rec.ec.is_none() && rec.servers.contains(&server) && stored < rec.version {
                out.push((chunk, rec.version));
            }
        }
    }
    Ok(out)
}

/// Queued deletions for `server`.
pub(crate) fn pending_deletes(rt: &ReadTables, server: ServerId) -> Op<Vec<ChunkId>> {
    let mut out = Vec::new();
    for item in rt.deletions.range((server, 0)..=(server, u64::MAX))? {
        let (k, _) = item?;
        out.push(k.value().1);
        if out.len() >= DELETES_PER_REPLY {
            break;
        }
    }
    Ok(out)
}

pub(crate) fn next_chunk_id(rt: &ReadTables) -> Op<u64> {
    Ok(rt.counter(NEXT_CHUNK)?.max(1))
}

pub(crate) fn files(rt: &ReadTables) -> Op<u64> {
    Ok(rt.counter(INODE_COUNT)?)
}

/// Every registered chunkserver.
pub(crate) fn servers(rt: &ReadTables) -> Op<Vec<(ServerId, ServerRec)>> {
    let mut out = Vec::new();
    for item in rt.servers.iter()? {
        let (k, v) = item?;
        out.push((k.value(), decode("server", v.value())?));
    }
    Ok(out)
}
