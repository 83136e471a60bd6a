//! Byte-range locks (POSIX `fcntl` locks, and `flock` as whole-file ranges) shared by every
//! mount: in the log, so that a failover keeps them, with a lease per mount session so that
//! the locks of a mount that died come free.
//!
//! ```text
//!  set_lock ──► leader: delegated to another session? ── yes ──► RecallLocks, wait for it
//!                 │ no
//!                 ▼
//!               a conflict in the applied state? ── yes ──► wait (changed / deadline)
//!                 │ no                                        (no log entry)
//!                 ▼
//!               SetLock (logged) ──► apply: conflict check, replace, merge ──► answer
//!  delegate_locks ──► no other session's locks, no recent contention ──► DelegateLocks
//!                     (logged): the mount decides every request on the inode itself
//!  return_locks (the holder, recalled) ──► ReturnLocks (logged): its locks back in the table
//!  expiry loop (leader, 1 s): a session with locks or delegations not heard from for
//!                             LOCK_LEASE_MS ──► DropLocks
//! ```
//!
//! A lock is a row `(ino, session, owner, start) -> (end, write, pid)`; one owner's rows of
//! one inode never overlap, and adjacent rows of the same kind are merged, as Linux keeps
//! them (the rules are in the API crate, which mounts holding a delegation use too).
//! Conflicts are judged at apply, so every replica grants the same locks; the check before
//! proposing only spares a log entry for a request that must wait or fail anyway (a grant
//! never comes from it).
//!
//! A delegation (`LOCK_HOLDERS[ino] = session`) makes a lock on a file that only one mount
//! locks cost nothing but the mount's own bookkeeping: a database on one mount takes and
//! drops a dozen locks per transaction, a log entry each without it. While it stands, the
//! holder's locks on the inode live in the holder only (the table keeps what it had at the
//! grant), and nobody else's may exist: `SetLock` of another session is refused at apply.
//! When another session asks, the leader recalls it and marks the inode contended for
//! [`CONTENDED_FOR`], so that two mounts taking turns on a file do not pass the delegation
//! back and forth.
//!
//! Session liveness is the leader's soft state: a new leader gives every session a whole
//! lease from when it first sees it, so a failover never expires a live mount's locks.
//! Deadlock detection (`EDEADLK`) is not done: a cycle of waiters waits until one of them
//! is interrupted.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{
    first_conflict, holds_any, replacement, HeldLock, Ino, Inval, LockConflict, LockDelegation,
    LockKind, LockRequest, MetaError, MetaResult, ReqId, Timespec, LOCK_LEASE_MS, LOCK_WAIT_MAX_MS,
};
use redb::{ReadableTable, ReadableTableMetadata};

use crate::commands::Command;
use crate::server::Server;
use crate::store::{LockKey as Key, LockVal as Val, Op, StoreError, Tables, LOCKS, LOCK_HOLDERS};

/// How long an inode that two sessions asked to lock is not delegated again.
const CONTENDED_FOR: Duration = Duration::from_secs(5);
/// How long a request waits at least for a recalled delegation to come back before it
/// reports the inode as locked elsewhere (the holder answers in milliseconds; one that does
/// not is dead or cut off, and its lease will end).
const RECALL_MIN_WAIT: Duration = Duration::from_secs(2);

fn key(ino: Ino, l: &HeldLock) -> Key {
    (ino, l.session, l.owner, l.start)
}

/// The locks of `ino`.
fn rows(t: &impl ReadableTable<Key, Val>, ino: Ino) -> Result<Vec<HeldLock>, StoreError> {
    let mut out = Vec::new();
    for item in t.range((ino, 0, 0, 0)..=(ino, u64::MAX, u64::MAX, u64::MAX))? {
        let (k, v) = item?;
        let ((_, session, owner, start), (end, write, pid)) = (k.value(), v.value());
        out.push(HeldLock {
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

fn invalid(req: &LockRequest) -> Option<MetaError> {
    req.invalid().map(|reason| MetaError::Invalid { reason })
}

/// The session the locks of `ino` are delegated to, if any.
fn holder(t: &impl ReadableTable<u64, u64>, ino: Ino) -> Result<Option<u64>, StoreError> {
    Ok(t.get(ino)?.map(|g| g.value()))
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
    if holder(&t.lock_holders, ino)?.is_some_and(|h| h != session) {
        // Its locks are in another mount: the leader recalls them before it proposes.
        return Ok(Some(LockConflict::HELD_ELSEWHERE));
    }
    let all = rows(&t.locks, ino)?;
    if let Some(c) = first_conflict(&all, session, req) {
        return Ok(Some(c));
    }
    let (removed, added) = replacement(&all, session, req);
    for l in &removed {
        t.locks.remove(key(ino, l))?;
    }
    for l in &added {
        t.locks.insert(key(ino, l), (l.end, l.write, l.pid))?;
    }
    Ok(None)
}

/// Applies `DelegateLocks`: the delegation (again, if `session` has it already), or `None`
/// if another session holds it or a lock.
pub(crate) fn delegate(t: &mut Tables, ino: Ino, session: u64) -> Op<Option<LockDelegation>> {
    match holder(&t.lock_holders, ino)? {
        Some(h) if h != session => return Ok(None),
        _ => {}
    }
    let all = rows(&t.locks, ino)?;
    if all.iter().any(|l| l.session != session) {
        return Ok(None);
    }
    t.lock_holders.insert(ino, session)?;
    Ok(Some(LockDelegation { ino, locks: all }))
}

/// Applies `ReturnLocks`: `session`'s locks on `ino` become `locks` (unless `None`), and
/// the delegation ends. Refused if `session` does not hold it (its lease ran out meanwhile).
pub(crate) fn take_back(
    t: &mut Tables,
    ino: Ino,
    session: u64,
    locks: Option<&[HeldLock]>,
) -> Op<()> {
    if holder(&t.lock_holders, ino)? != Some(session) {
        return Err(MetaError::NotPermitted.into());
    }
    let bad = locks.and_then(|l| l.iter().find(|l| l.session != session || l.start > l.end));
    if let Some(bad) = bad {
        return Err(MetaError::Invalid {
            reason: format!("returned lock {bad:?} is not a lock of session {session}"),
        }
        .into());
    }
    t.lock_holders.remove(ino)?;
    let Some(locks) = locks else { return Ok(()) };
    for l in rows(&t.locks, ino)? {
        t.locks.remove(key(ino, &l))?;
    }
    for l in locks {
        t.locks.insert(key(ino, l), (l.end, l.write, l.pid))?;
    }
    Ok(())
}

/// Applies `DropLocks` (and `EndSession`): every lock and delegation of `session` goes.
pub(crate) fn drop_session(t: &mut Tables, session: u64) -> Op<()> {
    t.locks.retain(|(_, s, _, _), _| s != session)?;
    t.lock_holders.retain(|_, s| s != session)?;
    Ok(())
}

/// The leader's view of who holds locks and who waits for them.
pub(crate) struct LockState {
    /// Session -> when this leader last heard from it, in `term`.
    seen: Mutex<(u64, HashMap<u64, Instant>)>,
    /// Inodes two sessions asked to lock lately, and when.
    contended: Mutex<HashMap<Ino, Instant>>,
    /// Woken whenever locks may have been released or a delegation given back.
    pub changed: tokio::sync::Notify,
}

impl Default for LockState {
    fn default() -> Self {
        LockState {
            seen: Mutex::new((0, HashMap::new())),
            contended: Mutex::new(HashMap::new()),
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

    fn contended(&self) -> std::sync::MutexGuard<'_, HashMap<Ino, Instant>> {
        self.contended.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_contended(&self, ino: Ino) {
        let now = Instant::now();
        let mut c = self.contended();
        c.retain(|_, at| now.duration_since(*at) < CONTENDED_FOR);
        c.insert(ino, now);
    }

    fn recently_contended(&self, ino: Ino) -> bool {
        self.contended()
            .get(&ino)
            .is_some_and(|at| at.elapsed() < CONTENDED_FOR)
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
    fn lock_rows(&self, ino: Ino) -> MetaResult<Vec<HeldLock>> {
        self.0
            .sm
            .read_txn(|txn| Ok(rows(&txn.open_table(LOCKS)?, ino)?))
    }

    fn lock_holder(&self, ino: Ino) -> MetaResult<Option<u64>> {
        self.0
            .sm
            .read_txn(|txn| Ok(holder(&txn.open_table(LOCK_HOLDERS)?, ino)?))
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

    /// Waits until no session but `session` holds the locks of `ino` (recalling them from
    /// the one that does); false if they are still out at `deadline`.
    async fn locks_home(
        &self,
        ino: Ino,
        session: u64,
        deadline: tokio::time::Instant,
    ) -> MetaResult<bool> {
        let holder = match self.lock_holder(ino)? {
            Some(h) if h != session => h,
            _ => return Ok(true),
        };
        self.0.locks.mark_contended(ino);
        let recall = Inval::RecallLocks { ino, holder };
        let still_held = || Ok(self.lock_holder(ino)? == Some(holder));
        self.await_return(recall, &self.0.locks.changed, deadline, still_held)
            .await
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
        let start = tokio::time::Instant::now();
        let deadline = start + wait;
        loop {
            if !self
                .locks_home(ino, session, deadline.max(start + RECALL_MIN_WAIT))
                .await?
            {
                return Ok(Some(LockConflict::HELD_ELSEWHERE));
            }
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
            if rows.iter().any(|l| l.session != session) {
                self.0.locks.mark_contended(ino);
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
        let deadline = tokio::time::Instant::now() + RECALL_MIN_WAIT;
        if !self.locks_home(ino, session, deadline).await? {
            return Ok(Some(LockConflict::HELD_ELSEWHERE));
        }
        Ok(first_conflict(&self.lock_rows(ino)?, session, &req))
    }

    /// `delegate_locks`: see the service docs.
    pub(crate) async fn delegate_locks(
        &self,
        ino: Ino,
        session: u64,
    ) -> MetaResult<Option<LockDelegation>> {
        self.leader_term().await?;
        self.0.locks.heard_from(session);
        if self.0.locks.recently_contended(ino) {
            return Ok(None);
        }
        // The same test as at apply, without a log entry for a refusal.
        let other_holder = self.lock_holder(ino)?.is_some_and(|h| h != session);
        if other_holder || self.lock_rows(ino)?.iter().any(|l| l.session != session) {
            return Ok(None);
        }
        self.propose(Command::DelegateLocks { ino, session })
            .await?
            .into_delegation()
    }

    /// `return_locks`: see the service docs.
    pub(crate) async fn return_locks(
        &self,
        ino: Ino,
        session: u64,
        locks: Option<Vec<HeldLock>>,
        req: ReqId,
    ) -> MetaResult<()> {
        self.leader_term().await?;
        self.0.locks.heard_from(session);
        let cmd = Command::ReturnLocks {
            ino,
            session,
            locks,
        };
        let done = self
            .propose(crate::server::tracked(req, Timespec::now(), cmd))
            .await;
        self.0.locks.changed.notify_waiters();
        done?.into_unit()
    }

    /// `renew_locks`: see the service docs.
    pub(crate) async fn renew_locks(&self, session: u64) -> MetaResult<Vec<Ino>> {
        self.leader_term().await?;
        self.0.locks.heard_from(session);
        self.0.sm.read_txn(|txn| {
            let mut held = Vec::new();
            for item in txn.open_table(LOCK_HOLDERS)?.iter()? {
                let (ino, s) = item?;
                if s.value() == session {
                    held.push(ino.value());
                }
            }
            Ok(held)
        })
    }

    /// The sessions that hold locks or delegations.
    fn lock_sessions(&self) -> MetaResult<HashSet<u64>> {
        self.0.sm.read_txn(|txn| {
            let mut s = HashSet::new();
            for item in txn.open_table(LOCKS)?.iter()? {
                s.insert(item?.0.value().1);
            }
            let holders = txn.open_table(LOCK_HOLDERS)?;
            if !holders.is_empty()? {
                for item in holders.iter()? {
                    s.insert(item?.1.value());
                }
            }
            Ok(s)
        })
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
            let holding = match self.lock_sessions() {
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
