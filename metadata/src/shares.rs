//! Shared chunks: snapshots, clones and copy-on-write at chunk granularity.
//!
//! A snapshot (or clone) is a new inode whose chunk map names the same chunk ids as its
//! origin's. Each chunk has one owner `(ino, index)` in CHUNK_OWNER and one row in
//! CHUNK_REFS per other reference, so its reference count is one plus those rows; a chunk
//! with rows there is *shared*. Every mutation here is one command through the log.
//!
//! ```text
//!  snapshot(origin) ─▶ new inode; per chunk: version + 1 (all refs), ref row for the copy
//!        caller ─▶ FENCE(chunk, new version) on each replica: older locations now refused
//!  write to a shared chunk:
//!     cow_chunk ─▶ new id on the SAME servers, pending = old; this ref of old kept as a row
//!        writer ─▶ CLONE(old → new) on each replica (local file copy, checksums verified)
//!     cow_done  ─▶ failed replicas dropped; pending cleared; the ref of old released
//!  release (unlink, truncate, punch) ─▶ unref: a row goes, or the owner passes to a row;
//!        only the last reference queues the chunk's deletion on its servers
//! ```
//!
//! Why the version bump and FENCE: writers keep chunk locations cached. A writer that
//! fetched a location before the snapshot would otherwise keep writing in place into what
//! is now the snapshot's data. The bump makes the chunk map newer than the replicas, and the
//! FENCE (sent by the snapshot's caller before it reports success) makes the replicas refuse
//! the old version; the writer then refreshes, sees `shared` and copies first.
//!
//! Why pending copies: the new chunk must be known (CHUNK_OWNER) before any chunkserver holds
//! it, or an inventory would have it deleted as unknown; and the data must be readable at
//! every moment. While pending, readers are given the old chunk (the content is the same:
//! nobody writes the new one before `cow_done`), and a writer that finds a pending copy
//! (its predecessor died) makes the copy again; CLONE is idempotent.

use rawfs_metadata_api::{
    Attr, ChunkId, ChunkLoc, CopySource, CowLoc, FileKind, Ino, MetaError, ServerId, Timespec,
};
use redb::ReadableTable;

use crate::chunks::to_loc;
use crate::namespace::{self as ns, invalid};
use crate::store::{
    get_chunk, inode, ChunkRec, Fail, InodeRec, Op, PendingCopy, Tables, NEXT_CHUNK,
};

/// xattr holding the label (origin volume name) given to `snapshot`.
pub(crate) const ORIGIN_XATTR: &[u8] = b"trusted.rawfs.origin";

/// The non-owner references of `chunk`.
pub(crate) fn extra_refs(
    refs: &impl ReadableTable<(u64, u64, u64), ()>,
    chunk: ChunkId,
) -> Op<Vec<(Ino, u64)>> {
    let mut out = Vec::new();
    for item in refs.range((chunk, 0, 0)..=(chunk, u64::MAX, u64::MAX))? {
        let (k, _) = item?;
        let (_, ino, index) = k.value();
        out.push((ino, index));
    }
    Ok(out)
}

/// True when `chunk` has more than one reference.
pub(crate) fn has_extra_refs(
    refs: &impl ReadableTable<(u64, u64, u64), ()>,
    chunk: ChunkId,
) -> Op<bool> {
    Ok(refs
        .range((chunk, 0, 0)..=(chunk, u64::MAX, u64::MAX))?
        .next()
        .is_some())
}

/// The record of `chunk` as seen through the reference `rec` (which names it either as its
/// chunk or as the source of a pending copy). A shard id of an erasure-coded chunk (or of
/// a conversion under way) shows as a one-replica chunk on the shard's server.
pub(crate) fn view_of(rec: &ChunkRec, chunk: ChunkId) -> Option<ChunkRec> {
    if rec.chunk == chunk {
        return Some(rec.clone());
    }
    match &rec.pending {
        Some(p) if p.chunk == chunk => Some(source_view(p)),
        _ => crate::erasure::shard_view(rec, chunk),
    }
}

/// The source of a pending copy as a chunk record of its own.
pub(crate) fn source_view(p: &PendingCopy) -> ChunkRec {
    ChunkRec {
        chunk: p.chunk,
        version: p.version,
        servers: p.servers.clone(),
        pending: None,
        ec: p.ec.clone(),
        converting: None,
    }
}

/// Every reference of `chunk`: its owner first.
pub(crate) fn all_refs(t: &Tables, chunk: ChunkId) -> Op<Vec<(Ino, u64)>> {
    let mut out: Vec<(Ino, u64)> = t
        .chunk_owner
        .get(chunk)?
        .map(|g| g.value())
        .into_iter()
        .collect();
    out.extend(extra_refs(&t.chunk_refs, chunk)?);
    Ok(out)
}

/// Applies `f` to (version, servers) of `chunk` in every reference, so that all copies of
/// its record stay equal (a replica drop, a version bump). A conversion to RS 4+2 under
/// way is cancelled: it was planned from the replicas and version that change here.
pub(crate) fn update_chunk(
    t: &mut Tables,
    chunk: ChunkId,
    mut f: impl FnMut(&mut u64, &mut Vec<ServerId>),
) -> Op<()> {
    for (ino, index) in all_refs(t, chunk)? {
        let Some(mut rec) = get_chunk(&t.chunks, ino, index)? else {
            continue;
        };
        if rec.chunk == chunk {
            f(&mut rec.version, &mut rec.servers);
            crate::erasure::cancel_conversion(t, &mut rec)?;
        } else if let Some(p) = rec.pending.as_mut().filter(|p| p.chunk == chunk) {
            f(&mut p.version, &mut p.servers);
        } else {
            continue;
        }
        t.put_chunk(ino, index, &rec)?;
    }
    Ok(())
}

/// Drops the reference `(ino, index)` of the chunk `view` (as that reference sees it). The
/// last reference queues the chunk's deletion on its servers (every shard on its server,
/// for an erasure-coded chunk); the owner's going hands ownership (with the shards' owner
/// rows) to another reference.
pub(crate) fn unref(t: &mut Tables, view: &ChunkRec, ino: Ino, index: u64) -> Op<()> {
    let chunk = view.chunk;
    if t.chunk_refs.remove((chunk, ino, index))?.is_some() {
        return Ok(());
    }
    let owner = t.chunk_owner.get(chunk)?.map(|g| g.value());
    if owner != Some((ino, index)) {
        // Not a reference of this chunk (already released): nothing to do.
        return Ok(());
    }
    match extra_refs(&t.chunk_refs, chunk)?.first() {
        Some(&(i2, x2)) => {
            t.chunk_refs.remove((chunk, i2, x2))?;
            t.chunk_owner.insert(chunk, (i2, x2))?;
            crate::erasure::move_shard_owners(t, view.ec.as_ref(), (i2, x2))?;
        }
        None => {
            t.chunk_owner.remove(chunk)?;
            for &s in &view.servers {
                t.deletions.insert((s, chunk), ())?;
            }
            if let Some(ec) = &view.ec {
                crate::erasure::drop_shards(t, &ec.shards)?;
            }
        }
    }
    Ok(())
}

/// Releases everything the chunk map entry `(ino, index) -> rec` references, the shards
/// reserved by a conversion under way included.
pub(crate) fn release_entry(t: &mut Tables, ino: Ino, index: u64, rec: &ChunkRec) -> Op<()> {
    let mut rec = rec.clone();
    crate::erasure::cancel_conversion(t, &mut rec)?;
    unref(t, &rec, ino, index)?;
    if let Some(p) = &rec.pending {
        unref(t, &source_view(p), ino, index)?;
    }
    Ok(())
}

/// Must a writer of `(ino, index)` copy `rec` first? Also true while it is being converted
/// to RS 4+2 (the copy-on-write cancels that) and once it is erasure coded.
pub(crate) fn is_shared(
    t_refs: &impl ReadableTable<(u64, u64, u64), ()>,
    owner: &impl ReadableTable<u64, (u64, u64)>,
    ino: Ino,
    index: u64,
    rec: &ChunkRec,
) -> Op<bool> {
    if rec.pending.is_some()
        || rec.ec.is_some()
        || rec.converting.is_some()
        || has_extra_refs(t_refs, rec.chunk)?
    {
        return Ok(true);
    }
    Ok(owner.get(rec.chunk)?.map(|g| g.value()) != Some((ino, index)))
}

/// The location of `(ino, index)` as readers and writers see it: a pending copy shows its
/// source, and `shared` says whether a write must copy first.
pub(crate) fn visible_loc(
    servers: &impl ReadableTable<u64, &'static [u8]>,
    refs: &impl ReadableTable<(u64, u64, u64), ()>,
    owner: &impl ReadableTable<u64, (u64, u64)>,
    file: &InodeRec,
    (ino, index): (Ino, u64),
    rec: &ChunkRec,
    term: u64,
) -> Op<ChunkLoc> {
    let shared = file.snapshot_of.is_some() || is_shared(refs, owner, ino, index, rec)?;
    let shown = match &rec.pending {
        Some(p) => source_view(p),
        None => rec.clone(),
    };
    let mut loc = to_loc(servers, index, &shown, term)?;
    loc.shared |= shared;
    Ok(loc)
}

/// Refuses changes to the data of a read-only snapshot.
pub(crate) fn check_writable(rec: &InodeRec) -> Op<()> {
    match rec.snapshot_of {
        Some(origin) => {
            tracing::debug!(origin, "refusing a write to a read-only snapshot");
            Err(MetaError::NotPermitted.into())
        }
        None => Ok(()),
    }
}

/// Makes `parent/name` share every chunk of `origin` (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn snapshot(
    t: &mut Tables,
    origin: Ino,
    parent: Ino,
    name: &[u8],
    read_only: bool,
    label: &[u8],
    now: Timespec,
) -> Op<Attr> {
    ns::check_name(name)?;
    let orec = inode(&t.inodes, origin)?;
    match orec.kind {
        FileKind::File => {}
        FileKind::Dir => return Err(MetaError::IsDir.into()),
        _ => return Err(invalid("only regular files have snapshots")),
    }
    if orec.nlink == 0 {
        return Err(MetaError::NotFound.into());
    }
    if label.len() > 255 {
        return Err(invalid("snapshot label too long"));
    }
    let mut prec = ns::live_dir(t, parent)?;
    if ns::entry(t, parent, name)?.is_some() {
        return Err(MetaError::Exists.into());
    }
    let mut rec = orec.clone();
    rec.nlink = 1;
    rec.ctime = now;
    rec.crtime = now;
    rec.atime = now;
    rec.snapshot_of = read_only.then_some(origin);
    // The origin's xattrs are not copied; only the label is set.
    rec.xattrs = Some(u32::from(!label.is_empty()));
    // A snapshot cannot be written (not even by root: the service refuses); a clone is an
    // ordinary writable file, also when made from a snapshot.
    rec.perm = if read_only {
        orec.perm & 0o555
    } else {
        (orec.perm | 0o200) & 0o777
    };
    let ino = ns::alloc_ino(t)?;
    let mut entries = Vec::new();
    for item in t.chunks.range((origin, 0)..=(origin, u64::MAX))? {
        let (k, v) = item?;
        let crec: ChunkRec = crate::store::decode("chunk", v.value())?;
        entries.push((k.value().1, crec));
    }
    for (index, crec) in entries {
        let shared = match &crec.pending {
            // The origin is copying this chunk; its content is still the source's.
            Some(p) => source_view(p),
            // Never written in place, so nothing to fence; its shards keep their version.
            None if crec.ec.is_some() => crec,
            None => {
                // Also cancels a conversion under way (its plan would share the chunk).
                update_chunk(t, crec.chunk, |v, _| *v += 1)?;
                ChunkRec {
                    version: crec.version + 1,
                    converting: None,
                    ..crec
                }
            }
        };
        t.chunk_refs.insert((shared.chunk, ino, index), ())?;
        t.put_chunk(ino, index, &shared)?;
    }
    t.put_inode(ino, &rec)?;
    if !label.is_empty() {
        t.xattrs.insert((ino, ORIGIN_XATTR), label)?;
    }
    ns::add_entry(t, parent, &mut prec, name, ino)?;
    ns::touch_dir(&mut prec, now);
    t.put_inode(parent, &prec)?;
    Ok(rec.attr(ino))
}

fn writable_file(t: &Tables, ino: Ino) -> Op<InodeRec> {
    let rec = inode(&t.inodes, ino)?;
    if rec.kind != FileKind::File {
        return Err(invalid("not a regular file"));
    }
    check_writable(&rec)?;
    Ok(rec)
}

/// Gives `(ino, index)` a private copy of its shared chunk `expected` (see the module docs).
pub(crate) fn cow(
    t: &mut Tables,
    ino: Ino,
    index: u64,
    expected: ChunkId,
    term: u64,
) -> Op<CowLoc> {
    cow_placed(t, ino, index, expected, None, term)
}

/// [`cow`], with `servers` (the leader's placement) for the replicated copy of an
/// erasure-coded chunk; without them, that copy goes to up to 3 of its shards' servers.
/// A chunk being converted to RS 4+2 is not copied: the conversion is cancelled (its
/// version bumped again) and the chunk is written as it is.
pub(crate) fn cow_placed(
    t: &mut Tables,
    ino: Ino,
    index: u64,
    expected: ChunkId,
    servers: Option<&[ServerId]>,
    term: u64,
) -> Op<CowLoc> {
    let file = writable_file(t, ino)?;
    let mut crec = get_chunk(&t.chunks, ino, index)?.ok_or(Fail::Meta(MetaError::NotFound))?;
    if let Some(p) = &crec.pending {
        // A copy already under way (a retry, or a writer that died): hand it out again.
        let mut loc = to_loc(&t.servers, index, &crec, term)?;
        loc.shared = false;
        if p.ec.is_some() {
            let from = to_loc(&t.servers, index, &source_view(p), term)?;
            return Ok(CowLoc {
                loc,
                source: None,
                from_ec: Some(from),
            });
        }
        let source = Some(CopySource {
            chunk: p.chunk,
            version: p.version,
        });
        return Ok(CowLoc {
            loc,
            source,
            from_ec: None,
        });
    }
    if crec.chunk == expected && crec.converting.is_some() {
        // ec_prepare refuses shared chunks and a snapshot cancels conversions, so the chunk
        // is private once the conversion is gone.
        crate::erasure::cancel_conversion(t, &mut crec)?;
        crec.version += 1;
        t.put_chunk(ino, index, &crec)?;
        tracing::debug!(
            ino,
            index,
            chunk = expected,
            "write cancelled an RS 4+2 conversion"
        );
    }
    let shared = is_shared(&t.chunk_refs, &t.chunk_owner, ino, index, &crec)?;
    if crec.chunk != expected || !shared {
        // Someone else copied it meanwhile, or it is no longer shared: write it as it is.
        let loc = visible_loc(
            &t.servers,
            &t.chunk_refs,
            &t.chunk_owner,
            &file,
            (ino, index),
            &crec,
            term,
        )?;
        return Ok(CowLoc {
            loc,
            source: None,
            from_ec: None,
        });
    }
    let new = t.counter(NEXT_CHUNK)?.max(1);
    // An erasure-coded chunk has no replicas to copy on: the copy goes to new servers.
    let targets = match (&crec.ec, servers) {
        (None, _) => crec.servers.clone(),
        (Some(_), Some(s)) if !s.is_empty() => s.to_vec(),
        (Some(ec), _) => crate::erasure::fallback_servers(ec, new),
    };
    if targets.is_empty() {
        return Err(MetaError::NoSpace {
            reason: "no chunkserver for the copy".into(),
        }
        .into());
    }
    // This reference of the old chunk becomes a row of CHUNK_REFS (kept until `cow_done`).
    if t.chunk_owner.get(crec.chunk)?.map(|g| g.value()) == Some((ino, index)) {
        match extra_refs(&t.chunk_refs, crec.chunk)?.first() {
            Some(&(i2, x2)) => {
                t.chunk_refs.remove((crec.chunk, i2, x2))?;
                t.chunk_owner.insert(crec.chunk, (i2, x2))?;
                crate::erasure::move_shard_owners(t, crec.ec.as_ref(), (i2, x2))?;
                t.chunk_refs.insert((crec.chunk, ino, index), ())?;
            }
            // An erasure-coded chunk of this file alone: it stays owned here, as the source
            // of the pending copy.
            None if crec.ec.is_some() => {}
            None => return Err(invalid("shared chunk without other references")),
        }
    }
    t.set_counter(NEXT_CHUNK, new + 1)?;
    let rec = ChunkRec {
        chunk: new,
        version: 1,
        servers: targets,
        pending: Some(PendingCopy {
            chunk: crec.chunk,
            version: crec.version,
            servers: crec.servers.clone(),
            ec: crec.ec.clone(),
        }),
        ec: None,
        converting: None,
    };
    t.put_chunk(ino, index, &rec)?;
    t.chunk_owner.insert(new, (ino, index))?;
    let mut loc = to_loc(&t.servers, index, &rec, term)?;
    loc.shared = false;
    if crec.ec.is_some() {
        let from = to_loc(&t.servers, index, &crec, term)?;
        return Ok(CowLoc {
            loc,
            source: None,
            from_ec: Some(from),
        });
    }
    Ok(CowLoc {
        loc,
        source: Some(CopySource {
            chunk: crec.chunk,
            version: crec.version,
        }),
        from_ec: None,
    })
}

/// Ends the pending copy into `chunk` at `(ino, index)` (see the module docs).
pub(crate) fn cow_done(
    t: &mut Tables,
    ino: Ino,
    index: u64,
    chunk: ChunkId,
    failed: &[ServerId],
    term: u64,
) -> Op<ChunkLoc> {
    let file = writable_file(t, ino)?;
    let mut crec = get_chunk(&t.chunks, ino, index)?.ok_or(Fail::Meta(MetaError::NotFound))?;
    let pending = match (&crec.pending, crec.chunk == chunk) {
        (Some(p), true) => p.clone(),
        // Done already (a retry), or the chunk was released meanwhile: the current state.
        _ => {
            return visible_loc(
                &t.servers,
                &t.chunk_refs,
                &t.chunk_owner,
                &file,
                (ino, index),
                &crec,
                term,
            )
        }
    };
    let survivors: Vec<ServerId> = crec
        .servers
        .iter()
        .copied()
        .filter(|s| !failed.contains(s))
        .collect();
    if survivors.is_empty() {
        return Err(invalid("no replica made the copy"));
    }
    for &s in crec.servers.iter().filter(|s| failed.contains(s)) {
        // A copy whose answer was lost may exist there.
        t.deletions.insert((s, chunk), ())?;
    }
    if survivors.len() < crec.servers.len() {
        crec.version += 1;
    }
    crec.servers = survivors;
    crec.pending = None;
    t.put_chunk(ino, index, &crec)?;
    unref(t, &source_view(&pending), ino, index)?;
    visible_loc(
        &t.servers,
        &t.chunk_refs,
        &t.chunk_owner,
        &file,
        (ino, index),
        &crec,
        term,
    )
}
