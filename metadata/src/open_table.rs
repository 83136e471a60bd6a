//! Leased opens: a read-only open kept in the leader's memory instead of the log.
//!
//! An open only matters when something removes the inode's last link: the inode must then
//! live on as an orphan until the open is released. Logging every open costs a log entry
//! (about a millisecond) per `cat` of a small file; so `open_leased` records the open in
//! this table, and the leader writes the whole table to the log (`OpenMany`) just before it
//! proposes anything that may remove a link (unlink, rename, a held directory's commit).
//!
//! ```text
//!  open_leased ──► table (this term) ──── release: dropped from the table, no log entry
//!                        │
//!  unlink/rename ──► drain table ─► OpenMany (logged) ─► the unlink (logged) ─► done
//!                    (opens arriving meanwhile, and opens of orphans, are logged)
//!
//!  new leader ──► empty table; mounts send their leased opens again (`reopen`) when they
//!                 see the new epoch; no link is removed for OPEN_GRACE after taking office
//!                 (unless no lease, and so no leased open, was ever recorded)
//! ```
//!
//! The table belongs to one term of one process: a new leader (or a restarted one) starts
//! empty and counts on the mounts. A mount that cannot reach the new leader within
//! [`OPEN_GRACE`] of its election may lose the protection of a file it reads, if another
//! client removes the file's last link meanwhile: its reads of that file then fail. Writers
//! never lease: their opens are logged (the erasure coder's commit depends on them).
//!
//! What is never possible is an early free from a stale table: entries only ever move to
//! the log (a leaked entry keeps an orphan until its session ends).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rawfs_metadata_api::{
    Attr, FileKind, HeldOp, Ino, LeasedOpen, MetaError, MetaResult, OPEN_CHUNKS,
};

use crate::commands::{Command, Reply};
use crate::namespace::OpenKind;
use crate::queries;
use crate::server::Server;

/// How long a new leader removes no link, so that mounts can send their leased opens.
pub(crate) const OPEN_GRACE: Duration = Duration::from_secs(5);

/// Leased opens of the current term: (inode, session) -> count.
#[derive(Default)]
pub(crate) struct OpenTable(Mutex<State>);

#[derive(Default)]
struct State {
    term: u64,
    opens: HashMap<(Ino, u64), u32>,
    /// Link-removing commands in flight: opens are logged until they are done.
    unlinking: usize,
}

impl OpenTable {
    /// The table of `term`; None when a later term has started here.
    fn state(&self, term: u64) -> Option<MutexGuard<'_, State>> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.term < term {
            s.term = term;
            s.opens.clear();
        }
        (s.term == term).then_some(s)
    }

    /// Records an open in `term`; false (nothing recorded) while a link may be removed:
    /// the caller logs the open instead.
    pub(crate) fn add(&self, term: u64, ino: Ino, session: u64) -> bool {
        let Some(mut s) = self.state(term) else {
            return false;
        };
        if s.unlinking > 0 {
            return false;
        }
        *s.opens.entry((ino, session)).or_default() += 1;
        true
    }

    /// Drops one leased open; false when there was none (the open is in the log).
    pub(crate) fn remove(&self, term: u64, ino: Ino, session: u64) -> bool {
        let Some(mut s) = self.state(term) else {
            return false;
        };
        match s.opens.get_mut(&(ino, session)) {
            None => false,
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                s.opens.remove(&(ino, session));
                true
            }
        }
    }

    /// Forgets every leased open of `session` (it ended).
    pub(crate) fn end_session(&self, session: u64) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.opens.retain(|(_, sess), _| *sess != session);
    }

    /// Starts a link-removing command: takes every leased open out of the table (the
    /// caller logs them) and logs new opens until the returned guard is dropped.
    pub(crate) fn begin_unlinking(&self, term: u64) -> (Unlinking<'_>, Vec<(Ino, u64)>) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.unlinking += 1;
        let mut drained = Vec::new();
        if s.term <= term {
            // (Of an older term only if no open was ever leased in `term`.)
            for ((ino, session), n) in s.opens.drain() {
                drained.extend(std::iter::repeat((ino, session)).take(n as usize));
            }
        }
        (Unlinking(self), drained)
    }

    /// Puts back opens `begin_unlinking` took out that could not be logged.
    pub(crate) fn restore(&self, term: u64, opens: &[(Ino, u64)]) {
        let Some(mut s) = self.state(term) else {
            return;
        };
        for key in opens {
            *s.opens.entry(*key).or_default() += 1;
        }
    }
}

/// A link-removing command in flight (see [`OpenTable::begin_unlinking`]).
pub(crate) struct Unlinking<'a>(&'a OpenTable);

impl Drop for Unlinking<'_> {
    fn drop(&mut self) {
        let mut s = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        s.unlinking = s.unlinking.saturating_sub(1);
    }
}

impl Server {
    /// `open_leased`: the attributes, the epoch of the leader that recorded the open, and
    /// where the first chunks are.
    pub(crate) async fn open_leased(&self, ino: Ino, session: u64) -> MetaResult<LeasedOpen> {
        let term = self.leader_term().await?;
        let epoch = self.0.events.epoch(term);
        let leased = self.lease(term, ino, session).await?;
        if leased.is_none() {
            self.log_leased(vec![(ino, session)]).await?;
        }
        // Recorded (if the inode still existed, which then it still does): read after.
        let (attr, chunks) = self.0.sm.read(|rt| {
            let attr = match leased {
                Some(attr) => attr,
                None => queries::getattr(rt, ino)?,
            };
            let chunks = match attr.kind {
                FileKind::File => queries::chunks(rt, ino, 0, OPEN_CHUNKS, term)?,
                _ => Vec::new(),
            };
            Ok((attr, chunks))
        })?;
        Ok(LeasedOpen {
            attr,
            epoch,
            chunks,
        })
    }

    /// `reopen`: records again, in this leader's term, the leased opens a mount took from
    /// leaders of other epochs. Returns this leader's epoch.
    pub(crate) async fn reopen(&self, opens: Vec<(Ino, u64)>, session: u64) -> MetaResult<u64> {
        let term = self.leader_term().await?;
        let epoch = self.0.events.epoch(term);
        let mut to_log = Vec::new();
        for (ino, from) in opens {
            if from == epoch {
                // Recorded by this leader already.
                continue;
            }
            let (exists, logged) = self.0.sm.read_txn(|txn| {
                let inodes = txn.open_table(crate::store::INODES)?;
                let exists = crate::store::get_inode(&inodes, ino)?.is_some();
                let opens = txn.open_table(crate::store::OPENS)?;
                let count = opens.get((ino, session))?.map_or(0, |g| g.value());
                Ok((exists, OpenKind::Leased.of(count) > 0))
            })?;
            if !exists || logged {
                // Gone (nothing left to protect), or its leased open was logged when a link
                // went (a mount holds one leased open per inode).
                continue;
            }
            match self.lease(term, ino, session).await {
                Ok(Some(_)) | Err(MetaError::NotFound) => {}
                Ok(None) => to_log.push((ino, session)),
                Err(e) => return Err(e),
            }
        }
        if !to_log.is_empty() {
            self.log_leased(to_log).await?;
        }
        Ok(epoch)
    }

    /// `release_leased`: drops leased opens from the table, or from the log if the leader
    /// logged them.
    pub(crate) async fn release_leased(&self, inos: Vec<Ino>, session: u64) -> MetaResult<()> {
        let term = self.leader_term().await?;
        let logged: Vec<Ino> = inos
            .into_iter()
            .filter(|&ino| !self.0.opens.remove(term, ino, session))
            .collect();
        if logged.is_empty() {
            return Ok(());
        }
        let cmd = Command::ReleaseLeased {
            inos: logged,
            session,
        };
        self.mutate(cmd).await?.into_unit()
    }

    /// Logs leased opens that cannot stay in the table.
    async fn log_leased(&self, opens: Vec<(Ino, u64)>) -> MetaResult<()> {
        let cmd = Command::OpenMany { opens, then: None };
        self.mutate(cmd).await?.into_unit()
    }

    /// Records a leased open of `ino` in `term` if it may be (the attributes); None when
    /// the open must be logged: an orphan, a directory, or a link removal in flight.
    async fn lease(&self, term: u64, ino: Ino, session: u64) -> MetaResult<Option<Attr>> {
        // A later leader must know that leased opens may exist (it waits OPEN_GRACE).
        self.lease_office(term, true).await?;
        let table = &self.0.opens;
        if !table.add(term, ino, session) {
            return Ok(None);
        }
        // Read after recording: a link removal that finished before is seen here, and one
        // that starts after drains the table, this open included.
        match self.0.sm.read(|rt| queries::getattr(rt, ino)) {
            Ok(a) if a.nlink > 0 && a.kind != FileKind::Dir => Ok(Some(a)),
            other => {
                table.remove(term, ino, session);
                other.map(|_| None)
            }
        }
    }

    /// Proposes the client mutation `cmd` (`Tracked`), which `removes_links`: waits until
    /// a new leader's mounts had time to send their leased opens, then logs every leased
    /// open in the same log entry, ahead of `cmd`. New opens are logged until it is applied.
    pub(crate) async fn propose_removing_links(&self, cmd: Command) -> MetaResult<Reply> {
        let term = loop {
            let term = self.leader_term().await?;
            let settled = self.lease_office(term, false).await?;
            if settled >= OPEN_GRACE {
                break term;
            }
            tokio::time::sleep(OPEN_GRACE - settled).await;
        };
        // In a task of its own: the opens leave the table here and must reach the log (or
        // come back) even if the caller gives up.
        let me = self.clone();
        let proposing = tokio::spawn(async move {
            let (_guard, opens) = me.0.opens.begin_unlinking(term);
            if opens.is_empty() {
                return me.mutate(cmd).await;
            }
            let logging = Command::OpenMany {
                opens: opens.clone(),
                then: Some(Box::new(cmd)),
            };
            let done = me.mutate(logging).await;
            if let Err(MetaError::NotLeader { .. } | MetaError::Unavailable { .. }) = &done {
                // Perhaps not logged: kept (a leak at worst, never an early free). Any other
                // error is the command's own, applied after the opens.
                me.0.opens.restore(term, &opens);
            }
            done
        });
        proposing.await.map_err(|e| MetaError::Unavailable {
            reason: format!("proposal task failed: {e}"),
        })?
    }
}

/// Whether applying `cmd` may remove a link (and so free an inode that is open).
pub(crate) fn removes_links(cmd: &Command) -> bool {
    match cmd {
        Command::Unlink { .. } | Command::Rename { .. } => true,
        Command::CommitHeld { ops, .. } => ops
            .iter()
            .any(|op| matches!(op, HeldOp::Unlink { .. } | HeldOp::Rename { .. })),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_count_per_inode_and_session_and_end_with_the_term() {
        let t = OpenTable::default();
        assert!(t.add(3, 10, 1));
        assert!(t.add(3, 10, 1));
        assert!(t.add(3, 10, 2));
        assert!(t.remove(3, 10, 1));
        assert!(t.remove(3, 10, 1));
        assert!(!t.remove(3, 10, 1), "the log holds any further open");
        assert!(t.add(4, 11, 2));
        assert!(!t.remove(4, 10, 2), "a new term starts empty");
        assert!(!t.remove(3, 11, 2), "and an old one is over");
    }

    #[test]
    fn unlinking_drains_the_table_and_turns_new_opens_away() {
        let t = OpenTable::default();
        assert!(t.add(1, 10, 1));
        assert!(t.add(1, 10, 1));
        assert!(t.add(1, 11, 2));
        {
            let (_guard, mut drained) = t.begin_unlinking(1);
            drained.sort_unstable();
            assert_eq!(drained, vec![(10, 1), (10, 1), (11, 2)]);
            assert!(!t.add(1, 12, 1), "opens during an unlink go to the log");
            t.restore(1, &drained);
        }
        assert!(t.add(1, 12, 1));
        t.end_session(1);
        assert!(!t.remove(1, 12, 1) && !t.remove(1, 10, 1));
        assert!(t.remove(1, 11, 2));
    }
}
