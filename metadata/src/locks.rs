//! Byte-range locks (POSIX `fcntl` locks, and `flock` as whole-file ranges) shared by every
//! mount: in the log, so that a failover keeps them, with a lease per mount session so that
//! the locks of a mount that died come free.
//!
//! ```text
//!  set_lock ──► leader: a conflict in the applied state? ── yes ──► wait (changed / deadline)
//!                         │ no                                         │ (no log entry)
//!                         ▼                                            ▼
//!               SetLock (logged) ──► apply: conflict check, replace, merge ──► answer
//!  expiry loop (leader, 1 s): a session with locks not heard from for LOCK_LEASE_MS ──► DropLocks
//! ```
//!
//! A lock is a row `(ino, session, owner, start) -> (end, write, pid)`; one owner's rows of
//! one inode never overlap, and adjacent rows of the same kind are merged, as Linux keeps
//! them. Conflicts are judged at apply, so every replica grants the same locks; the check
//! before proposing only spares a log entry for a request that must wait or fail anyway (a
//! grant never comes from it).
//!
//! Session liveness is the leader's soft state: a new leader gives every session a whole
//! lease from when it first sees it, so a failover never expires a live mount's locks.
//! Deadlock detection (`EDEADLK`) is not done: a cycle of waiters waits until one of them
//! is interrupted.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{
    Ino, LockConflict, LockKind, LockRequest, MetaError, MetaResult, LOCK_LEASE_MS,
    LOCK_WAIT_MAX_MS,
};
use redb::ReadableTable;

use crate::commands::Command;
use crate::server::Server;
use crate::store::{LockKey as Key, LockVal as Val, Op, StoreError, Tables, LOCKS};

/// One stored lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Row {
    session: u64,
    owner: u64,
    start: u64,
    end: u64,
    write: bool,
    pid: u32,
}

impl Row {
    fn key(&self, ino: Ino) -> Key {
        (ino, self.session, self.owner, self.start)
    }

    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    /// Touches `start..=end` without overlapping it (merges with a lock of the same kind).
    fn adjacent(&self, start: u64, end: u64) -> bool {
        self.end.checked_add(1) == Some(start) || end.checked_add(1) == Some(self.start)
    }

    /// What a request of `session` sees of this lock.
    fn conflict(&self, session: u64) -> LockConflict {
        LockConflict {
            kind: if self.write {
                LockKind::Write
            } else {
                LockKind::Read
            },
            start: self.start,
            end: self.end,
            pid: if self.session == session { self.pid } else { 0 },
        }
    }
}

/// The locks of `ino`.
fn rows(t: &impl ReadableTable<Key, Val>, ino: Ino) -> Result<Vec<Row>, StoreError> {
    let mut out = Vec::new();
    for item in t.range((ino, 0, 0, 0)..=(ino, u64::MAX, u64::MAX, u64::MAX))? {
        let (k, v) = item?;
        let ((_, session, owner, start), (end, write, pid)) = (k.value(), v.value());
        out.push(Row {
            session,
            owner,
            start,
            end,
            write,
            pid,
        });
    }
    Ok(out)
}

/// The first lock of another owner that `req` of `session` conflicts with.
fn first_conflict(rows: &[Row], session: u64, req: &LockRequest) -> Option<LockConflict> {
    if req.kind == LockKind::Unlock {
        return None;
    }
    rows.iter()
        .find(|r| {
            (r.session, r.owner) != (session, req.owner)
                && r.overlaps(req.start, req.end)
                && (r.write || req.kind == LockKind::Write)
        })
        .map(|r| r.conflict(session))
}

/// Whether `req`'s owner holds anything in its range.
fn holds_any(rows: &[Row], session: u64, req: &LockRequest) -> bool {
    rows.iter()
        .any(|r| (r.session, r.owner) == (session, req.owner) && r.overlaps(req.start, req.end))
}

fn invalid(req: &LockRequest) -> Option<MetaError> {
    (req.start > req.end).then(|| MetaError::Invalid {
        reason: format!("lock range {}..={} is empty", req.start, req.end),
    })
}

/// Applies `SetLock`: the conflicting lock, or the owner's locks in the range replaced.
pub(crate) fn set(
    t: &mut Tables,
    ino: Ino,
    session: u64,
    req: &LockRequest,
) -> Op<Option<LockConflict>> {
    if let Some(e) = invalid(req) {
        return Err(e.into());
    }
    let all = rows(&t.locks, ino)?;
    if let Some(c) = first_conflict(&all, session, req) {
        return Ok(Some(c));
    }
    let write = req.kind == LockKind::Write;
    let (mut start, mut end) = (req.start, req.end);
    let mine = all
        .iter()
        .filter(|r| (r.session, r.owner) == (session, req.owner));
    let mut keep = Vec::new();
    for r in mine {
        let same = req.kind != LockKind::Unlock && r.write == write;
        if !(r.overlaps(req.start, req.end) || same && r.adjacent(req.start, req.end)) {
            continue;
        }
        t.locks.remove(r.key(ino))?;
        if same {
            start = start.min(r.start);
            end = end.max(r.end);
            continue;
        }
        // The parts outside the range stay as they were.
        if r.start < req.start {
            keep.push(Row {
                end: req.start - 1,
                ..*r
            });
        }
        if r.end > req.end {
            keep.push(Row {
                start: req.end + 1,
                ..*r
            });
        }
    }
    if req.kind != LockKind::Unlock {
        keep.push(Row {
            session,
            owner: req.owner,
            start,
            end,
            write,
            pid: req.pid,
        });
    }
    for r in keep {
        t.locks.insert(r.key(ino), (r.end, r.write, r.pid))?;
    }
    Ok(None)
}

/// Applies `DropLocks` (and `EndSession`): every lock of `session` goes.
pub(crate) fn drop_session(t: &mut Tables, session: u64) -> Op<()> {
    t.locks.retain(|(_, s, _, _), _| s != session)?;
    Ok(())
}

/// The leader's view of who holds locks and who waits for them.
pub(crate) struct LockState {
    /// Session -> when this leader last heard from it, in `term`.
    seen: Mutex<(u64, HashMap<u64, Instant>)>,
    /// Woken whenever locks may have been released.
    pub changed: tokio::sync::Notify,
}

impl Default for LockState {
    fn default() -> Self {
        LockState {
            seen: Mutex::new((0, HashMap::new())),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl LockState {
    fn seen(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Instant>)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn heard_from(&self, session: u64) {
        self.seen().1.insert(session, Instant::now());
    }

    /// The sessions among `holding` that this leader (in `term`) has not heard from for
    /// `lease`; sessions it sees for the first time start their lease now.
    fn expired(&self, term: u64, holding: &HashSet<u64>, lease: Duration) -> Vec<u64> {
        let now = Instant::now();
        let mut seen = self.seen();
        if seen.0 != term {
            *seen = (term, HashMap::new());
        }
        seen.1.retain(|s, _| holding.contains(s));
        let mut out = Vec::new();
        for s in holding {
            let last = *seen.1.entry(*s).or_insert(now);
            if now.duration_since(last) >= lease {
                out.push(*s);
            }
        }
        out
    }
}

/// How often the leader looks for sessions whose lease ran out.
const EXPIRY_EVERY: Duration = Duration::from_secs(1);

impl Server {
    fn lock_rows(&self, ino: Ino) -> MetaResult<Vec<Row>> {
        self.0
            .sm
            .read_txn(|txn| Ok(rows(&txn.open_table(LOCKS)?, ino)?))
    }

    /// What every lock call starts with: a valid range, leadership, the session's renewal.
    async fn begin_lock_call(&self, session: u64, req: &LockRequest) -> MetaResult<()> {
        if let Some(e) = invalid(req) {
            return Err(e);
        }
        self.leader_term().await?;
        self.0.locks.heard_from(session);
        Ok(())
    }

    /// `set_lock`: see the service docs.
    pub(crate) async fn set_lock(
        &self,
        ino: Ino,
        session: u64,
        req: LockRequest,
        wait_ms: u32,
    ) -> MetaResult<Option<LockConflict>> {
        self.begin_lock_call(session, &req).await?;
        let wait = Duration::from_millis(u64::from(wait_ms.min(LOCK_WAIT_MAX_MS)));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so that a release in between is not missed.
            let changed = self.0.locks.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let rows = self.lock_rows(ino)?;
            if req.kind == LockKind::Unlock && !holds_any(&rows, session, &req) {
                // Nothing to give up (a close after an explicit unlock): no log entry.
                return Ok(None);
            }
            let outcome = match first_conflict(&rows, session, &req) {
                Some(c) => Some(c),
                None => self
                    .propose(Command::SetLock {
                        ino,
                        session,
                        lock: req,
                    })
                    .await?
                    .into_lock()?,
            };
            if outcome.is_none() {
                // A downgrade or an unlock may let waiters in.
                self.0.locks.changed.notify_waiters();
                return Ok(None);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(outcome);
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
            self.0.locks.heard_from(session);
        }
    }

    /// `test_lock`: see the service docs.
    pub(crate) async fn test_lock(
        &self,
        ino: Ino,
        session: u64,
        req: LockRequest,
    ) -> MetaResult<Option<LockConflict>> {
        self.begin_lock_call(session, &req).await?;
        Ok(first_conflict(&self.lock_rows(ino)?, session, &req))
    }

    /// `renew_locks`: see the service docs.
    pub(crate) async fn renew_locks(&self, session: u64) -> MetaResult<()> {
        self.leader_term().await?;
        self.0.locks.heard_from(session);
        Ok(())
    }

    /// Drops the locks of sessions this leader has not heard from for [`LOCK_LEASE_MS`],
    /// every [`EXPIRY_EVERY`], until the service stops.
    pub(crate) async fn expire_locks(self) {
        let lease = Duration::from_millis(LOCK_LEASE_MS);
        let mut tick = tokio::time::interval(EXPIRY_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (term, leading) = self.0.replica.term_and_leading();
            if !leading {
                continue;
            }
            let holding = self.0.sm.read_txn(|txn| {
                let mut s = HashSet::new();
                for item in txn.open_table(LOCKS)?.iter()? {
                    s.insert(item?.0.value().1);
                }
                Ok(s)
            });
            let holding = match holding {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the lock table");
                    continue;
                }
            };
            for session in self.0.locks.expired(term, &holding, lease) {
                match self.propose(Command::DropLocks { session }).await {
                    Ok(_) => {
                        tracing::warn!(
                            session,
                            "dropped the locks of a mount not heard from for {lease:?}"
                        );
                        self.0.locks.changed.notify_waiters();
                    }
                    Err(e) => tracing::debug!(session, error = %e, "cannot drop locks yet"),
                }
            }
        }
    }
}
