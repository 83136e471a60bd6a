//! Directory delegations: a mount that has just made a directory may create files in it on
//! its own, without a round trip per file, and commit them in batches.
//!
//! ```text
//!  mount: mkdir_held(P, "d")  ──► MkdirHeld: d created (empty), DELEGATIONS[d] = session
//!  mount: creates in d answered locally (inodes from reserve_inodes ranges)
//!  mount: unlinks and renames of its files in d, also answered locally
//!  mount: commit_held(d, ops)             ──► CommitHeld: changes applied (fenced by the row)
//!  other client: lookup(d, x) / readdir(d) / a change in or of d
//!        └─► leader: Recall{d} published ──► holder commits, give_back ──► row removed
//!            (no answer in RECALL_WAIT: Revoke; the holder's late commit is refused)
//! ```
//!
//! Why it is safe to answer in the mount: the directory was empty when the row was written,
//! and while the row exists only the holder changes its entries, so the holder's own list is the
//! directory's whole content. Every other client's operation that could see or change that
//! content waits for the row to go (`recall.rs`), and the holder stops answering on its own
//! before it gives the row back. The row is replicated state, so a new leader honours it.
//! The holder may also make subdirectories in it through the leader (`mkdir_held`, after
//! committing its queue), so its entries are files it created and directories it made.
//! A delegation is granted only at `mkdir_held` and never again for the same directory.

use std::collections::{HashMap, HashSet};

use rawfs_metadata_api::{
    Attr, Caller, FileKind, HeldCreate, HeldOp, Ino, MetaError, Name, NewNode, RenameFlags,
};
use redb::ReadableTable;

use crate::namespace::{self as ns, check_name, invalid};
use crate::store::{inode, Fail, InodeRec, Op, Tables, INODE_COUNT, NEXT_INO};

/// Most inode numbers one `reserve_inodes` may take.
pub(crate) const RESERVE_MAX: u64 = 1 << 16;

/// Creates directory `parent/name` and delegates its creates to `holder`.
pub(crate) fn mkdir_held(
    t: &mut Tables,
    (parent, name): (Ino, &Name),
    node: &NewNode,
    caller: Caller,
    holder: u64,
    now: rawfs_metadata_api::Timespec,
) -> Op<Attr> {
    if node.kind != FileKind::Dir || !node.exclusive {
        return Err(invalid("mkdir_held makes new directories only"));
    }
    // In a held directory only its holder adds entries (others have recalled it first).
    if self::holder(&t.delegations, parent)?.is_some_and(|h| h != holder) {
        return Err(MetaError::NotPermitted.into());
    }
    let attr = ns::mknod(t, parent, name, node, caller, now)?;
    t.delegations.insert(attr.ino, holder)?;
    Ok(attr)
}

/// Reserves `count` inode numbers; returns the first.
pub(crate) fn reserve(t: &mut Tables, count: u64) -> Op<u64> {
    if count == 0 || count > RESERVE_MAX {
        return Err(invalid("reserve between 1 and 65536 inode numbers"));
    }
    let first = t.counter(NEXT_INO)?;
    t.set_counter(NEXT_INO, first + count)?;
    Ok(first)
}

/// The session `dir`'s creates are delegated to, if any.
pub(crate) fn holder(t: &impl ReadableTable<u64, u64>, dir: Ino) -> Op<Option<u64>> {
    Ok(t.get(dir)?.map(|g| g.value()))
}

/// Applies `holder`'s changes to `dir` in order (all or nothing), and with `give_back`
/// ends the delegation.
pub(crate) fn commit(
    t: &mut Tables,
    dir: Ino,
    holder: u64,
    ops: &[HeldOp],
    give_back: bool,
) -> Op<()> {
    if self::holder(&t.delegations, dir)? != Some(holder) {
        return Err(MetaError::NotPermitted.into());
    }
    // The directory's record, read once and written back once for each run of creates and
    // unlinks (a rename reads and writes it itself).
    let mut prec = Some(ns::live_dir(t, dir)?);
    // Check everything before writing anything: a refused command changes nothing.
    check(t, dir, ops)?;
    let mut created = 0;
    for op in ops {
        match op {
            HeldOp::Create(e) => {
                let prec = match &mut prec {
                    Some(p) => p,
                    None => prec.insert(ns::live_dir(t, dir)?),
                };
                create(t, (dir, prec), holder, e)?;
                created += 1;
            }
            HeldOp::Unlink { name, time, .. } => {
                let prec = match &mut prec {
                    Some(p) => p,
                    None => prec.insert(ns::live_dir(t, dir)?),
                };
                ns::unlink_in(t, (dir, prec), name, *time)?
            }
            HeldOp::Rename { from, to, time, .. } => {
                if let Some(p) = prec.take() {
                    t.put_inode(dir, &p)?;
                }
                let flags = RenameFlags::default();
                crate::rename::rename(t, dir, from, dir, to, flags, *time)?
            }
            HeldOp::SetAttr { ino, set, time } if *ino == dir => {
                // The directory itself (`tar` sets its times as it leaves it): over the
                // record as the changes before left it, under those after.
                if let Some(p) = prec.take() {
                    t.put_inode(dir, &p)?;
                }
                ns::setattr(t, dir, set, *time)?;
            }
            HeldOp::SetAttr { ino, set, time } => skip_gone(ns::setattr(t, *ino, set, *time))?,
            HeldOp::Wrote {
                ino,
                end,
                stored_delta,
                time,
            } => skip_gone(crate::chunks::commit_write(
                t,
                *ino,
                *end,
                *stored_delta,
                *time,
            ))?,
        }
    }
    if let Some(p) = prec {
        t.put_inode(dir, &p)?;
    }
    let n = t.counter(INODE_COUNT)?;
    t.set_counter(INODE_COUNT, n + created)?;
    if give_back {
        t.delegations.remove(dir)?;
    }
    Ok(())
}

/// Checks that every change of `ops` applies after those before it: created names are
/// free and their inode numbers reserved and unused, unlinked and renamed names are files.
fn check(t: &Tables, dir: Ino, ops: &[HeldOp]) -> Op<()> {
    // What the batch has done to a name so far: Some(true) a file, Some(false) gone.
    let mut names: HashMap<&[u8], bool> = HashMap::new();
    let is_file = |names: &HashMap<&[u8], bool>, name: &[u8]| -> Op<Option<bool>> {
        if let Some(&file) = names.get(name) {
            return Ok(file.then_some(true));
        }
        match ns::entry(t, dir, name)? {
            None => Ok(None),
            Some((child, _)) => Ok(Some(!inode(&t.inodes, child)?.is_dir())),
        }
    };
    let next_ino = t.counter(NEXT_INO)?;
    let mut inos = HashSet::new();
    for op in ops {
        match op {
            HeldOp::Create(e) => {
                check_name(&e.name)?;
                if is_file(&names, &e.name)?.is_some() {
                    return Err(MetaError::Exists.into());
                }
                let reserved = e.ino > rawfs_metadata_api::ROOT_INO && e.ino < next_ino;
                if !reserved || !inos.insert(e.ino) || t.inodes.get(e.ino)?.is_some() {
                    return Err(invalid(
                        "held create with an inode number not reserved or in use",
                    ));
                }
                names.insert(&e.name, true);
            }
            HeldOp::Unlink { name, .. } => {
                match is_file(&names, name)? {
                    None => return Err(MetaError::NotFound.into()),
                    Some(false) => return Err(MetaError::IsDir.into()),
                    Some(true) => {}
                }
                names.insert(name, false);
            }
            HeldOp::Rename { from, to, .. } => {
                check_name(to)?;
                match is_file(&names, from)? {
                    None => return Err(MetaError::NotFound.into()),
                    Some(false) => return Err(MetaError::IsDir.into()),
                    Some(true) => {}
                }
                if is_file(&names, to)? == Some(false) {
                    return Err(MetaError::IsDir.into());
                }
                if from != to {
                    names.insert(from, false);
                    names.insert(to, true);
                }
            }
            HeldOp::SetAttr { ino, set, .. } => {
                if set.size.is_some() {
                    return Err(invalid("a held setattr changes no size"));
                }
                if *ino != dir {
                    not_a_dir(t, *ino)?;
                }
            }
            HeldOp::Wrote { ino, .. } => not_a_dir(t, *ino)?,
        }
    }
    Ok(())
}

/// A change of a file that may be gone by the time its batch arrives (unlinked in the batch
/// and closed before it was committed): nothing to change then.
fn skip_gone<T>(r: Op<T>) -> Op<()> {
    match r {
        Err(Fail::Meta(MetaError::NotFound)) => Ok(()),
        r => r.map(drop),
    }
}

/// Refuses a held change of a file that names a directory.
fn not_a_dir(t: &Tables, ino: Ino) -> Op<()> {
    if crate::store::get_inode(&t.inodes, ino)?.is_some_and(|r| r.is_dir()) {
        return Err(MetaError::IsDir.into());
    }
    Ok(())
}

/// Adds one held create to `dir`.
fn create(
    t: &mut Tables,
    (dir, prec): (Ino, &mut InodeRec),
    holder: u64,
    e: &HeldCreate,
) -> Op<()> {
    let caller = Caller {
        uid: e.uid,
        gid: e.gid,
    };
    let mut rec = ns::new_rec(FileKind::File, e.perm, caller, e.gid, e.time);
    rec.class = prec.class;
    t.put_inode(e.ino, &rec)?;
    ns::add_entry(t, dir, prec, &e.name, e.ino)?;
    ns::touch_dir(prec, e.time);
    if e.open {
        ns::open(t, e.ino, holder)?;
    }
    Ok(())
}

/// Ends `holder`'s delegation of `dir` (a no-op if it has already ended).
pub(crate) fn revoke(t: &mut Tables, dir: Ino, holder: u64) -> Op<()> {
    if self::holder(&t.delegations, dir)? == Some(holder) {
        t.delegations.remove(dir)?;
    }
    Ok(())
}

/// Ends every delegation of `session` (its mount ended).
pub(crate) fn end_session(t: &mut Tables, session: u64) -> Op<()> {
    let mut held = Vec::new();
    for item in t.delegations.iter()? {
        let (dir, h) = item?;
        if h.value() == session {
            held.push(dir.value());
        }
    }
    for dir in held {
        t.delegations.remove(dir)?;
    }
    Ok(())
}
