//! Attribute changes of files in held directories, made here and queued with the
//! directory's other changes (see `held.rs`): `tar`, `cp -a` and `rsync` set each file's
//! owner, mode and times right after writing it, and each of those would otherwise be a
//! replicated log entry of its own.
//!
//! A file named in a held directory gets a `SetAttr` queued; its attributes after the
//! change are kept here (a fresh file's in `fresh`, a committed one's in `pending`) until
//! the commit, and the leader's are not asked for meanwhile (anything else that needs the
//! leader commits the queue first). Sizes
//! always go through the leader, and so does a file with an unlink or rename queued.

use rawfs_client::Deferred;
use rawfs_metadata_api::{
    stored_after_write, Attr, FileKind, HeldOp, Ino, SetAttr, TimeSet, Timespec,
};

use crate::errno;
use crate::held::{DirState, HeldDir};
use crate::inner::{lock, Inner};
use fuser::Errno;
use std::sync::Arc;

use crate::privs::{S_ISGID, S_ISUID, S_IXGRP};

/// `a` after `set` at `now`, by the leader's rules (`namespace::setattr`): a new owner of a
/// non-directory drops setuid, and setgid where it means "execute as group"; ctime moves.
pub(crate) fn apply_set(mut a: Attr, set: &SetAttr, now: Timespec) -> Attr {
    if let Some(perm) = set.perm {
        a.perm = perm & 0o7777;
    }
    let chown = set.uid.is_some_and(|u| u != a.uid) || set.gid.is_some_and(|g| g != a.gid);
    a.uid = set.uid.unwrap_or(a.uid);
    a.gid = set.gid.unwrap_or(a.gid);
    if chown && set.perm.is_none() && a.kind != FileKind::Dir {
        a.perm &= !S_ISUID;
        if a.perm & S_IXGRP != 0 {
            a.perm &= !S_ISGID;
        }
    }
    let at = |t: TimeSet| match t {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    };
    if let Some(t) = set.atime {
        a.atime = at(t);
    }
    if let Some(t) = set.mtime {
        a.mtime = at(t);
    }
    a.ctime = now;
    a
}

impl Inner {
    /// `setattr` (no size) of a file named in a directory held here, queued with the
    /// directory's changes (see the module docs); `None`: not such a file, ask the leader.
    /// Times go after any data still buffered, which would restamp mtime when sent later.
    pub(crate) async fn held_setattr(
        self: &Arc<Self>,
        ino: Ino,
        set: &SetAttr,
    ) -> Option<Result<Attr, Errno>> {
        let (dir, _) = self.held_dir_of(ino, set)?;
        // Times of a file whose data is all being written behind from this directory (an
        // `rsync` or `cp` setting times after close) go with that data's commit (see
        // `held_setattr_queued`): no wait for the flush.
        let behind = self.write_behind.pending_dir(ino) == Some(dir);
        if (set.atime.is_some() || set.mtime.is_some()) && !behind {
            if let Some(io) = self.io_if_open(ino) {
                if let Err(e) = self.data_before_times(ino, &io, set).await {
                    return Some(Err(e));
                }
            }
        }
        self.held_setattr_queued(ino, set).await
    }

    /// The held directory `ino` is named in, if `set` may be queued there (sizes go to the
    /// leader).
    fn held_dir_of(&self, ino: Ino, set: &SetAttr) -> Option<(Ino, Arc<HeldDir>)> {
        if set.size.is_some() {
            return None;
        }
        let dir = *lock(&self.held.files).get(&ino)?;
        Some((dir, self.held_dir(dir)?))
    }

    /// [`Inner::held_setattr`] once buffered data is out of the way.
    pub(crate) async fn held_setattr_queued(
        self: &Arc<Self>,
        ino: Ino,
        set: &SetAttr,
    ) -> Option<Result<Attr, Errno>> {
        let (dir, d) = self.held_dir_of(ino, set)?;
        let known = {
            let st = lock(&d.state);
            if st.gone {
                return None;
            }
            st.fresh.get(&ino).or(st.pending.get(&ino)).cloned()
        };
        let base = match known {
            Some(a) => a,
            // An unlink or rename of it is queued: the leader's attributes are behind.
            None if lock(&self.held.queued).contains_key(&ino) => return None,
            None => match self.client.meta().getattr(ino).await {
                // The leader may have the commit of data written behind (with its own mtime)
                // before the times to be set again after it: the answer shows them already.
                Ok(a) => match self.write_behind.times_after(ino) {
                    Some(times) => apply_set(a, &times, Timespec::now()),
                    None => a,
                },
                Err(e) => return Some(Err(errno::meta(e))),
            },
        };
        if base.kind == FileKind::Dir || base.nlink != 1 {
            // A directory is no file of this one; a file linked elsewhere too may be cached
            // by other clients that would not see a queued change: both go to the leader.
            return None;
        }
        let mut out = None;
        let done = self.held_change(dir, |st: &mut DirState, now| {
            // Queued before a flush behind of the file queues its data's commit, the times
            // would be undone by it: they go again after it (see `held_wrote`).
            self.write_behind.times_also_after(ino, dir, set);
            let a = apply_set(base, set, now);
            match st.fresh.get_mut(&ino) {
                Some(f) => *f = a.clone(),
                None => drop(st.pending.insert(ino, a.clone())),
            }
            out = Some(a);
            Ok(Some(HeldOp::SetAttr {
                ino,
                set: set.clone(),
                time: now,
            }))
        })?;
        Some(done.map(|()| out.expect("set by the change")))
    }

    /// `setattr` (no size) of directory `dir` itself, held here, queued with its other
    /// changes: `tar` sets each directory's times, owner and mode as it leaves it, which
    /// would otherwise commit the queue and cost a log entry each. Changes queued after it
    /// restamp the directory's mtime, here as on the leader. `None`: not held here.
    pub(crate) fn held_dir_setattr(
        self: &Arc<Self>,
        dir: Ino,
        set: &SetAttr,
    ) -> Option<Result<Attr, Errno>> {
        if set.size.is_some() {
            return None;
        }
        let mut out = None;
        let done = self.held_change(dir, |st: &mut DirState, now| {
            st.attr = apply_set(st.attr.clone(), set, now);
            out = Some(st.attr.clone());
            Ok(Some(HeldOp::SetAttr {
                ino: dir,
                set: set.clone(),
                time: now,
            }))
        })?;
        Some(done.map(|()| out.expect("set by the change")))
    }

    /// Queues the commit of a file's first write `w` in `dir`, the held directory whose
    /// commit just created the file (with `base`, its attributes then) and placed its first
    /// chunk: the data is on the replicas, and nobody else can see the file before the queue
    /// is committed. Commits it through the leader if `dir` was given back meanwhile.
    /// Changes of the file through the leader wait for a flush behind (`behind_done`), so
    /// none is missing from `base` when this comes from one.
    pub(crate) async fn held_wrote(
        self: &Arc<Self>,
        dir: Ino,
        base: Attr,
        w: Deferred,
    ) -> Result<(), Errno> {
        let ino = base.ino;
        // Times set while the data was buffered or written behind go with it, in the same
        // batch: no answer in between shows the write's own mtime (the kernel would keep
        // that one). Taken under the directory's lock: a time set later is queued after.
        let queued = self.held_changes(dir, |st: &mut DirState, now| {
            let times = self.write_behind.take_times_after(ino);
            let mut a = st.pending.remove(&ino).unwrap_or(base);
            a.size = a.size.max(w.end);
            a.stored = stored_after_write(a.stored, w.stored_delta, a.size, w.end);
            a.mtime = now;
            a.ctime = now;
            let mut ops = vec![HeldOp::Wrote {
                ino,
                end: w.end,
                stored_delta: w.stored_delta,
                time: now,
            }];
            if let Some(set) = &times {
                a = apply_set(a, set, now);
                ops.push(HeldOp::SetAttr {
                    ino,
                    set: set.clone(),
                    time: now,
                });
            }
            st.pending.insert(ino, a);
            Ok(ops)
        });
        match queued {
            Some(done) => done,
            None => self
                .client
                .meta()
                .commit_write(ino, w.end, w.stored_delta)
                .await
                .map(drop)
                .map_err(errno::meta),
        }
    }

    /// The last handle of `ino` here closes, its data committed up to `size`: attributes
    /// of it kept for a queued change take that size, which those of a new file lack while
    /// its data is buffered (they have its create's), so that no answer from them once the
    /// file is closed undoes its writes in the kernel.
    pub(crate) fn held_closing(&self, ino: Ino, size: u64) {
        self.change_kept_attrs(ino, |k| k.size = size);
    }

    /// Applies `change` to the attributes of file `ino` kept here for a queued change.
    fn change_kept_attrs(&self, ino: Ino, mut change: impl FnMut(&mut Attr)) {
        let Some(dir) = lock(&self.held.queued).get(&ino).copied() else {
            return;
        };
        let Some(d) = self.held_dir(dir) else { return };
        let mut guard = lock(&d.state);
        let st = &mut *guard;
        for k in [st.fresh.get_mut(&ino), st.pending.get_mut(&ino)]
            .into_iter()
            .flatten()
        {
            change(k);
        }
    }

    /// A write, truncate or `set` of file `a.ino` was committed through the leader (`a`:
    /// its attributes after it) while attributes of it are kept here for a queued change
    /// (an unlink of it while open, say): they take its size and stored bytes, which only
    /// the leader changes, and what `set` changed, so that no later answer from them shows
    /// what was before. Fields a still queued change sets stay as they are here.
    pub(crate) fn held_took_leaders(&self, a: &Attr, set: Option<&SetAttr>) {
        self.change_kept_attrs(a.ino, |k| {
            (k.size, k.stored) = (a.size, a.stored);
            let Some(set) = set else { return };
            if set.perm.is_some() || set.uid.is_some() || set.gid.is_some() {
                // A chown may drop setuid and setgid.
                (k.perm, k.uid, k.gid) = (a.perm, a.uid, a.gid);
            }
            if set.atime.is_some() {
                k.atime = a.atime;
            }
            if set.mtime.is_some() || set.size.is_some() {
                k.mtime = a.mtime;
            }
            k.ctime = a.ctime;
        });
    }

    /// This mount changed `ino`'s xattrs: attributes of it kept for a held directory no
    /// longer say it has none.
    pub(crate) fn held_xattrs_changed(&self, ino: Ino) {
        let Some(dir) = lock(&self.held.files).get(&ino).copied() else {
            return;
        };
        let Some(d) = self.held_dir(dir) else { return };
        let mut guard = lock(&d.state);
        let st = &mut *guard;
        for a in [st.fresh.get_mut(&ino), st.pending.get_mut(&ino)]
            .into_iter()
            .flatten()
        {
            a.no_xattrs = false;
        }
    }
}
