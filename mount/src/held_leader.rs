//! Changes and listings of a held directory that the leader makes for its holder, which
//! keeps the directory (see `held.rs`): the leader does not recall a delegation from the
//! holder that asks with `readdir_held` or `rmdir_held`, and the holder commits what the
//! answer depends on first. `rm -rf` of a tree made here lists each directory, unlinks its
//! files here and removes its subdirectories. Without these, the listing gave the
//! directory back, and every later change in it was a log entry of its own.

use std::sync::Arc;

use fuser::Errno;
use rawfs_metadata_api::{Ino, Name};

use crate::errno;
use crate::held::HeldDir;
use crate::inner::{lock, Inner};

impl Inner {
    /// `dir`'s delegation, if `dir` is held here and not being given back.
    fn held_here(&self, dir: Ino) -> Option<Arc<HeldDir>> {
        self.held_dir(dir).filter(|d| {
            let st = lock(&d.state);
            !st.gone && !st.draining
        })
    }

    /// Before this mount lists `dir`: if `dir` is held here, the files closed here before
    /// are written and the queue committed, so that the leader lists what this mount made;
    /// returns whether `dir` is still held, to be listed with `readdir_held`, which keeps
    /// the delegation (`rm -rf` of a tree made here unlinks its files here after listing
    /// them). Entries changed here while the listing goes on may or may not show, as POSIX
    /// allows for changes after `opendir`.
    pub(crate) async fn settle_for_listing(&self, dir: Ino) -> Result<bool, Errno> {
        let Some(d) = self.held_here(dir) else {
            return Ok(false);
        };
        self.written_in_now(dir).await;
        self.commit_held(dir, false).await?;
        Ok(self.held_here(dir).is_some_and(|now| Arc::ptr_eq(&now, &d)))
    }

    /// Removes the subdirectory `dir/name` through the leader if `dir` is held here,
    /// keeping `dir` (`rmdir_held`: `rm -rf` of a tree made here goes on unlinking the
    /// rest of `dir` here). The subdirectory is given back first if it is held here too,
    /// so that the leader judges its emptiness with all its entries. `None` if `dir` is
    /// not held.
    pub(crate) async fn held_rmdir(&self, dir: Ino, name: &Name) -> Option<Result<(), Errno>> {
        let d = self.held_here(dir)?;
        let ino = match lock(&d.state).subdir(name) {
            Ok(ino) => ino,
            Err(e) => return Some(Err(e)),
        };
        self.give_back(ino).await;
        let removed = self
            .client
            .meta()
            .rmdir_held(dir, name.clone(), self.session)
            .await
            .map_err(errno::meta);
        if removed.is_ok() {
            self.forget_subdir(&d, name, ino);
        }
        Some(removed)
    }
}
