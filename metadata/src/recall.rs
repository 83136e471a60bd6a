//! The leader's side of directory delegations (`delegation.rs`): before it answers another
//! client's operation on a delegated directory, it recalls the delegation.
//!
//! ```text
//!  request touching dir D ──► DELEGATIONS[D] = holder? ── no ──► go on
//!                                   │ yes
//!                                   ▼
//!        publish Recall{D, holder} on the watch stream (again every REPUBLISH)
//!        wait for the row to go (the holder's commit_held with give_back)
//!        RECALL_WAIT passed ──► propose Revoke{D, holder} ──► go on
//! ```
//!
//! Which operations touch D: a lookup or listing in D (linearizable reads; local reads on a
//! follower may lag by the holder's commit interval, as they lag the log), every change of
//! D's entries (mknod, create, symlink, link, unlink, rmdir, rename in or out of D), and
//! every change of D itself (setattr, xattrs, rmdir of D, rename of D or over D). A plain
//! getattr of D does not: what the holder changes about D itself (its times, and the mode,
//! owner and times it sets on D, queued with its other changes) the next commit brings
//! (within the mount's commit interval).
//!
//! Requests carry no identity that says they come from the holder, so the holder's own
//! operations recall too; the mount gives the delegation back before it sends any of them
//! (it then costs nothing), and one it missed is still correct, only slower. Three say who
//! asks: `mkdir_held`, `readdir_held` and `rmdir_held`, which the holder sends after
//! committing what they depend on, keeping the directory (the directory `rmdir_held`
//! removes is recalled as ever).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{Ino, Inval, MetaResult};
use redb::ReadableTableMetadata;

use crate::commands::Command;
use crate::delegation;
use crate::queries;
use crate::server::Server;

/// How long the leader waits for a holder to give a recalled delegation back before it
/// takes it back itself (a mount that was killed, or cut off).
pub(crate) const RECALL_WAIT: Duration = Duration::from_secs(5);
/// How often a recall is published again while it waits (a holder that missed events, for
/// example across a leader change, sees the next one).
const REPUBLISH: Duration = Duration::from_millis(500);

impl Server {
    fn recalling(&self) -> std::sync::MutexGuard<'_, HashMap<(Ino, u64), Instant>> {
        self.0.recalling.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recalls the delegations of every directory `cmd` touches (see the module docs), but
    /// for `by_holder` = (directory, holder): the holder asks, having committed its queue.
    pub(crate) async fn recall_for(
        &self,
        cmd: &Command,
        by_holder: Option<(Ino, u64)>,
    ) -> MetaResult<()> {
        let dirs = self.0.sm.read(|rt| {
            if rt.delegations.is_empty()? {
                return Ok(Vec::new());
            }
            let at =
                |parent: Ino, name: &[u8]| queries::lookup(rt, parent, name).ok().map(|a| a.ino);
            let mut inos = match cmd {
                // The holder itself may make a subdirectory in a directory it holds (it
                // committed its queue first); anyone else recalls it.
                Command::MkdirHeld { parent, holder, .. }
                    if delegation::holder(&rt.delegations, *parent)? == Some(*holder) =>
                {
                    Vec::new()
                }
                Command::Mknod { parent, .. }
                | Command::Create { parent, .. }
                | Command::Symlink { parent, .. }
                | Command::MkdirHeld { parent, .. }
                | Command::Unlink { parent, .. }
                | Command::Snapshot { parent, .. } => vec![*parent],
                Command::Link { newparent, .. } => vec![*newparent],
                Command::Rmdir { parent, name, .. } => {
                    vec![*parent].into_iter().chain(at(*parent, name)).collect()
                }
                Command::Rename {
                    parent,
                    name,
                    newparent,
                    newname,
                    ..
                } => vec![*parent, *newparent]
                    .into_iter()
                    .chain(at(*parent, name))
                    .chain(at(*newparent, newname))
                    .collect(),
                Command::SetAttr { ino, .. }
                | Command::SetXattr { ino, .. }
                | Command::RemoveXattr { ino, .. } => vec![*ino],
                _ => Vec::new(),
            };
            inos.sort_unstable();
            inos.dedup();
            let mut held = Vec::new();
            for ino in inos {
                match delegation::holder(&rt.delegations, ino)? {
                    Some(h) if by_holder != Some((ino, h)) => held.push((ino, h)),
                    _ => {}
                }
            }
            Ok(held)
        })?;
        for (dir, holder) in dirs {
            self.recall(dir, holder).await?;
        }
        Ok(())
    }

    /// Recalls the delegation of `dir` if it has one, unless `reader` holds it (for reads
    /// in it).
    pub(crate) async fn recall_dir(&self, dir: Ino, reader: Option<u64>) -> MetaResult<()> {
        let held = self
            .0
            .sm
            .read(|rt| delegation::holder(&rt.delegations, dir))?;
        match held {
            Some(holder) if Some(holder) != reader => self.recall(dir, holder).await,
            _ => Ok(()),
        }
    }

    /// Waits until `holder` gave `dir` back, publishing the recall; takes it back after
    /// [`RECALL_WAIT`] from the first recall of it. That start is kept across calls: a
    /// client whose call timed out (its deadline is shorter than the wait) retries, and the
    /// retry must not start the wait over.
    async fn recall(&self, dir: Ino, holder: u64) -> MetaResult<()> {
        let start = *self
            .recalling()
            .entry((dir, holder))
            .or_insert_with(Instant::now);
        let deadline = tokio::time::Instant::from_std(start + RECALL_WAIT);
        let still_held = || {
            let now = self
                .0
                .sm
                .read(|rt| delegation::holder(&rt.delegations, dir))?;
            Ok(now == Some(holder))
        };
        let recall = Inval::Recall { dir, holder };
        let changed = &self.0.delegations_changed;
        if !self
            .await_return(recall, changed, deadline, still_held)
            .await?
        {
            tracing::warn!(
                dir,
                holder,
                "delegation not given back in time; taking it back"
            );
            self.propose(Command::Revoke { dir, holder })
                .await?
                .into_unit()?;
            self.0.delegations_changed.notify_waiters();
        }
        self.recalling().remove(&(dir, holder));
        Ok(())
    }

    /// Publishes `recall` (again every [`REPUBLISH`]) until `still_held` says the
    /// delegation came back (true) or `deadline` passes (false). `changed` is woken
    /// whenever it may have come back. Directory and lock delegations both wait here.
    pub(crate) async fn await_return(
        &self,
        recall: Inval,
        changed: &tokio::sync::Notify,
        deadline: tokio::time::Instant,
        still_held: impl Fn() -> MetaResult<bool>,
    ) -> MetaResult<bool> {
        let mut published: Option<tokio::time::Instant> = None;
        loop {
            // Registered before looking, so that a return in between is not missed.
            let woken = changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if !still_held()? {
                return Ok(true);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            if published.map_or(true, |at| now >= at + REPUBLISH) {
                let (term, _) = self.0.replica.term_and_leading();
                self.0
                    .events
                    .publish(term, 0, vec![(recall.clone(), false)]);
                published = Some(now);
            }
            let wake = deadline.min(published.unwrap_or(now) + REPUBLISH);
            let _ = tokio::time::timeout_at(wake, woken).await;
        }
    }
}
