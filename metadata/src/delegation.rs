//! Directory delegations: a mount that has just made a directory may create files in it on
//! its own, without a round trip per file, and commit them in batches.
//!
//! ```text
//!  mount: mkdir_held(P, "d")  ──► MkdirHeld: d created (empty), DELEGATIONS[d] = session
//!  mount: creates in d answered locally (inodes from reserve_inodes ranges)
//!  mount: commit_creates(d, entries)      ──► CommitCreates: entries added (fenced by the row)
//!  other client: lookup(d, x) / readdir(d) / a change in or of d
//!        └─► leader: Recall{d} published ──► holder commits, give_back ──► row removed
//!            (no answer in RECALL_WAIT: Revoke; the holder's late commit is refused)
//! ```
//!
//! Why it is safe to answer in the mount: the directory was empty when the row was written,
//! and while the row exists only the holder adds entries, so the holder's own list is the
//! directory's whole content. Every other client's operation that could see or change that
//! content waits for the row to go (`recall.rs`), and the holder stops answering on its own
//! before it gives the row back. The row is replicated state, so a new leader honours it.
//! A delegation is granted only at `mkdir_held` and never again for the same directory.

use rawfs_metadata_api::{Attr, Caller, FileKind, HeldCreate, Ino, MetaError, Name, NewNode};
use redb::ReadableTable;

use crate::namespace::{self as ns, check_name, invalid};
use crate::store::{Op, Tables, INODE_COUNT, NEXT_INO};

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

/// Adds `holder`'s creates to `dir` (all or nothing), and with `give_back` ends the
/// delegation.
pub(crate) fn commit(
    t: &mut Tables,
    dir: Ino,
    holder: u64,
    entries: &[HeldCreate],
    give_back: bool,
) -> Op<()> {
    if self::holder(&t.delegations, dir)? != Some(holder) {
        return Err(MetaError::NotPermitted.into());
    }
    let mut prec = ns::live_dir(t, dir)?;
    // Check everything before writing anything: a refused command changes nothing.
    let next_ino = t.counter(NEXT_INO)?;
    let mut names = std::collections::HashSet::new();
    let mut inos = std::collections::HashSet::new();
    for e in entries {
        check_name(&e.name)?;
        if !names.insert(&e.name) || ns::entry(t, dir, &e.name)?.is_some() {
            return Err(MetaError::Exists.into());
        }
        let reserved = e.ino > rawfs_metadata_api::ROOT_INO && e.ino < next_ino;
        if !reserved || !inos.insert(e.ino) || t.inodes.get(e.ino)?.is_some() {
            return Err(invalid(
                "held create with an inode number not reserved or in use",
            ));
        }
    }
    for e in entries {
        let caller = Caller {
            uid: e.uid,
            gid: e.gid,
        };
        let mut rec = ns::new_rec(FileKind::File, e.perm, caller, e.gid, e.time);
        rec.class = prec.class;
        t.put_inode(e.ino, &rec)?;
        ns::add_entry(t, dir, &mut prec, &e.name, e.ino)?;
        ns::touch_dir(&mut prec, e.time);
        if e.open {
            ns::open(t, e.ino, holder)?;
        }
    }
    let n = t.counter(INODE_COUNT)?;
    t.set_counter(INODE_COUNT, n + entries.len() as u64)?;
    t.put_inode(dir, &prec)?;
    if give_back {
        t.delegations.remove(dir)?;
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
