//! Storage classes: which files stay replicated and which become RS 4+2.
//!
//! Every file and directory carries a [`StorageClass`] in its inode record; a new inode takes
//! its directory's (see `namespace::mknod`). The class is set by `set_class` or through the
//! virtual xattr [`CLASS_XATTR`], which is never stored in the xattr table nor listed.
//!
//! ```text
//!  set_class / setxattr(rawfs.class) ─▶ Command::SetXattr ─▶ set_class_xattr ─▶ InodeRec.class
//!  removexattr(rawfs.class)          ─▶ Command::RemoveXattr ─▶ class = auto
//!  cold_chunks (a read) ─▶ walk CHUNKS in (ino, index) order, skipping files not due
//! ```
//!
//! `set_class` travels as the `SetXattr` command of the virtual xattr, so the RPC and the
//! xattr share one code path (and the same cache invalidations) in the replicated log.

use rawfs_metadata_api::{
    Attr, ColdChunk, ColdPage, FileKind, Ino, MetaError, StorageClass, Timespec, XattrMode,
    CHUNK_SIZE, CLASS_XATTR,
};
use serde_bytes::ByteBuf;

use crate::commands::Command;
use crate::namespace::invalid;
use crate::shares::{has_extra_refs, is_shared};
use crate::store::{decode, get_inode, inode, ChunkRec, InodeRec, Op, ReadTables, Tables};

/// Most chunks one `cold_chunks` call returns, whatever the caller asks for.
pub(crate) const COLD_PAGE_MAX: u32 = 1024;

/// True for the name of the virtual class xattr.
pub(crate) fn is_class_xattr(name: &[u8]) -> bool {
    name == CLASS_XATTR.as_bytes()
}

/// Only regular files and directories have a class that can be changed (other inodes keep
/// the one they inherited at creation, which nothing reads).
fn check_classable(rec: &InodeRec) -> Op<()> {
    match rec.kind {
        FileKind::File | FileKind::Dir => Ok(()),
        _ => Err(invalid(
            "a storage class can be set only on a regular file or a directory",
        )),
    }
}

/// The command that sets `ino`'s class: the virtual xattr's `SetXattr`, applied by
/// [`set_class_xattr`].
pub(crate) fn set_class_command(ino: Ino, class: StorageClass, now: Timespec) -> Command {
    Command::SetXattr {
        ino,
        name: ByteBuf::from(CLASS_XATTR.as_bytes().to_vec()),
        value: ByteBuf::from(class.as_str().as_bytes().to_vec()),
        mode: XattrMode::Any,
        now,
    }
}

/// Sets the class of a file or directory and bumps its ctime (also when unchanged, like
/// `chmod` to the same mode).
pub(crate) fn set_class(t: &mut Tables, ino: Ino, class: StorageClass, now: Timespec) -> Op<Attr> {
    let mut rec = inode(&t.inodes, ino)?;
    check_classable(&rec)?;
    rec.class = class;
    rec.ctime = now;
    t.put_inode(ino, &rec)?;
    Ok(rec.attr(ino))
}

/// `setxattr` of [`CLASS_XATTR`]: `value` is `hot`, `cold` or `auto`. The xattr always
/// exists (every inode has a class), so `Create` fails with `Exists` and `Replace` succeeds.
pub(crate) fn set_class_xattr(
    t: &mut Tables,
    ino: Ino,
    value: &[u8],
    mode: XattrMode,
    now: Timespec,
) -> Op<()> {
    let rec = inode(&t.inodes, ino)?;
    check_classable(&rec)?;
    if mode == XattrMode::Create {
        return Err(MetaError::Exists.into());
    }
    let class = parse_class(value)?;
    set_class(t, ino, class, now).map(|_| ())
}

/// Parses an xattr value into a class; a trailing NUL or newline (as some tools send) is
/// accepted.
fn parse_class(value: &[u8]) -> Op<StorageClass> {
    let text = std::str::from_utf8(value)
        .map_err(|_| invalid("storage class must be hot, cold or auto (value is not UTF-8)"))?;
    text.trim_end_matches('\0')
        .parse()
        .map_err(|reason: String| MetaError::Invalid { reason }.into())
}

/// The class of `ino` (any kind of inode).
pub(crate) fn get_class(rt: &ReadTables, ino: Ino) -> Op<StorageClass> {
    Ok(inode(&rt.inodes, ino)?.class)
}

/// `getxattr` of [`CLASS_XATTR`]: the class name.
pub(crate) fn class_xattr(rt: &ReadTables, ino: Ino) -> Op<ByteBuf> {
    Ok(ByteBuf::from(
        get_class(rt, ino)?.as_str().as_bytes().to_vec(),
    ))
}

/// Can this chunk record be converted now? Not while it is erasure coded already or being
/// copied (copy-on-write pending). A chunk marked converting is listed again: only the
/// lease-holding healer converts, one chunk at a time, so a conversion still marked when it
/// lists is one whose converter died (or lost the lease); a new `ec_prepare` replaces its
/// plan, and the old converter's commit is refused.
pub(crate) fn eligible(rec: &ChunkRec) -> bool {
    rec.pending.is_none() && rec.ec.is_none()
}

/// `rec` without its conversion plan (which `shares::is_shared` counts as sharing).
fn unplanned(rec: &ChunkRec) -> ChunkRec {
    ChunkRec {
        converting: None,
        ..rec.clone()
    }
}

/// Nanoseconds since the epoch, wide enough for any `Timespec`.
fn nanos(t: Timespec) -> i128 {
    i128::from(t.sec) * 1_000_000_000 + i128::from(t.nsec)
}

/// The layout a file's chunks should have at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// RS 4+2: cold files always, auto files once their data has not changed (mtime) for
    /// `quiet_ms`.
    Ec,
    /// Replicas: hot files.
    Replicas,
}

/// What this file's chunks are due for at `now`, if anything. Read-only snapshots share all
/// their chunks, and unlinked files are about to go.
fn file_due(rec: &InodeRec, quiet_ms: u64, now: Timespec) -> Option<Due> {
    if rec.kind != FileKind::File || rec.nlink == 0 || rec.snapshot_of.is_some() {
        return None;
    }
    match rec.class {
        StorageClass::Hot => Some(Due::Replicas),
        StorageClass::Cold => Some(Due::Ec),
        StorageClass::Auto => {
            (nanos(rec.mtime) + i128::from(quiet_ms) * 1_000_000 <= nanos(now)).then_some(Due::Ec)
        }
    }
}

/// Is this chunk of `(ino, index)` due for `due`? Never while shared with a snapshot or a
/// clone (converting it would un-share it) or being copied.
fn chunk_due(rt: &ReadTables, ino: Ino, index: u64, rec: &ChunkRec, due: Due) -> Op<bool> {
    Ok(match due {
        Due::Ec => {
            eligible(rec)
                && !is_shared(&rt.chunk_refs, &rt.chunk_owner, ino, index, &unplanned(rec))?
        }
        Due::Replicas => {
            rec.ec.is_some()
                && rec.pending.is_none()
                && !has_extra_refs(&rt.chunk_refs, rec.chunk)?
                && rt.chunk_owner.get(rec.chunk)?.map(|g| g.value()) == Some((ino, index))
        }
    })
}

/// The first `(ino, index)` strictly after `after`, or `None` past the last key.
fn successor((ino, index): (Ino, u64)) -> Option<(Ino, u64)> {
    match index.checked_add(1) {
        Some(i) => Some((ino, i)),
        None => ino.checked_add(1).map(|i| (i, 0)),
    }
}

/// Replicated chunks due for RS 4+2, in `(ino, index)` order after `after` (exclusive):
/// see `MetadataRpc::cold_chunks`. `now` is the answering replica's clock (a query is not
/// replicated, so its wall clock is the right one).
///
/// Walks the chunk table and jumps over each file that is not due, so its cost grows with
/// the chunks of due files plus one lookup per file that has chunks: a full scan when little
/// is due. Acceptable while the converter pages through slowly; an index of due files would
/// replace it. Chunks that lie wholly past the file's size (allocated by a write that has
/// not committed yet) are not listed.
pub(crate) fn cold_chunks(
    rt: &ReadTables,
    after: (Ino, u64),
    quiet_ms: u64,
    limit: u32,
    now: Timespec,
) -> Op<ColdPage> {
    let limit = limit.clamp(1, COLD_PAGE_MAX) as usize;
    let mut chunks = Vec::new();
    let mut from = successor(after);
    while let Some(start) = from.take() {
        // The next file with chunks at or after `start`.
        let Some(first) = rt.chunks.range(start..)?.next() else {
            break;
        };
        let (ino, index) = first?.0.value();
        let Some(file) = get_inode(&rt.inodes, ino)? else {
            tracing::error!(ino, "chunks of a missing inode");
            from = ino.checked_add(1).map(|i| (i, 0));
            continue;
        };
        let Some(due) = file_due(&file, quiet_ms, now) else {
            from = ino.checked_add(1).map(|i| (i, 0));
            continue;
        };
        for item in rt.chunks.range((ino, index)..=(ino, u64::MAX))? {
            let (k, v) = item?;
            let index = k.value().1;
            let rec: ChunkRec = decode("chunk", v.value())?;
            let length = file
                .size
                .saturating_sub(index.saturating_mul(CHUNK_SIZE))
                .min(CHUNK_SIZE);
            if length == 0 || !chunk_due(rt, ino, index, &rec, due)? {
                continue;
            }
            chunks.push(ColdChunk {
                ino,
                index,
                chunk: rec.chunk,
                version: rec.version,
                length,
                to_replicas: due == Due::Replicas,
            });
            if chunks.len() >= limit {
                return Ok(ColdPage {
                    chunks,
                    next: Some((ino, index)),
                });
            }
        }
        from = ino.checked_add(1).map(|i| (i, 0));
    }
    Ok(ColdPage { chunks, next: None })
}
