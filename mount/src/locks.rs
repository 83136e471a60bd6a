//! Byte-range locks held at the metadata leader, so that processes on different mounts
//! exclude each other: POSIX `fcntl` locks, and `flock`, which the kernel sends as a
//! whole-file lock owned by the open file (as NFS does, the two kinds therefore conflict
//! with each other, where a local Linux filesystem keeps them apart).
//!
//! ```text
//!  fcntl/flock ──► setlk ──► set_lock (leader: conflict, or logged) ──► EAGAIN / done
//!     F_SETLKW: set_lock waiting up to WAIT_SLICE at the leader, again and again, until
//!               granted or the caller has a signal pending (EINTR)
//!  close(fd) ──► flush(owner) ──► unlock of the owner's locks on the file (POSIX rule)
//!  last close of a flock'ed file ──► release(owner) ──► unlock
//!  renewer: renew_locks every RENEW_EVERY while any lock may be held here
//! ```
//!
//! fuser answers the kernel's `FUSE_INTERRUPT` with ENOSYS, so a process waiting in
//! `F_SETLKW` is not told about its signals; the waiting loop looks for a pending signal
//! in `/proc` between slices instead, so `kill`, Ctrl-C and `flock -w`'s alarm still end
//! the wait within a slice.
//!
//! Data written under a lock is sent before the lock is given up or downgraded: the other
//! mounts' caches of the file are then taken back (the coherence events) before it can be
//! locked elsewhere.
//!
//! A file that only this mount locks has its locks delegated here (`delegate_locks`): the
//! mount then decides every request on it with the same rules the leader applies, with no
//! call, until the leader recalls the delegation because another mount asks (the locks go
//! back with `return_locks`, and from then on requests go to the leader again). A local
//! grant needs a lease the leader renewed within half its length, so that a mount cut off
//! from the leader stops granting before the leader drops its locks. A database on one
//! mount takes a dozen locks per transaction, each a log entry without this.
//!
//! ```text
//!  setlk ──► delegated here? ── yes ──► decide locally (wait locally for a local holder)
//!              │ no
//!              ▼
//!            delegate_locks (unless refused lately) ── granted ──► decide locally
//!              │ refused
//!              ▼
//!            set_lock at the leader (above)
//!  RecallLocks event ──► return_locks(our locks) ──► requests go to the leader
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use fuser::Errno;
use rawfs_metadata_api::{
    apply, first_conflict, HeldLock, Ino, LockConflict, LockKind, LockRequest, MetaError,
    LOCK_LEASE_MS,
};
use tracing::{error, warn};

use crate::errno;
use crate::inner::{lock, Inner};

/// How long one `set_lock` call of a blocking request waits at the leader (and a local
/// waiter between looks for a signal).
const WAIT_SLICE_MS: u32 = 500;
/// How long a request waits for a delegation being given back before it looks again.
const RETURN_WAIT: Duration = Duration::from_millis(100);
/// How often a mount holding locks renews them (a lease lasts [`LOCK_LEASE_MS`]).
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How long after the leader refused to delegate an inode's locks this mount asks again.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// (inode, lock owner) pairs that may hold locks at the leader, with the handle that last
/// asked for one.
///
/// The last release of a handle gives up the locks taken through it and still held: those
/// of `flock` and of open file description (`F_OFD_SETLK`) locks, whose owner is the
/// kernel's open file (POSIX locks went at each `close`). The handle matters because a new
/// open may get the old open file's address, and so its owner id, as soon as the old one
/// is closed, and the old one's RELEASE reaches us after `close` returned, possibly after
/// the new open locked: a release gives up only what its own handle took.
#[derive(Default)]
pub(crate) struct Locks {
    held: Mutex<HashMap<(Ino, u64), u64>>,
    /// Owners whose unlock failed (leader unreachable), with their handle: the renewer
    /// tries again, so that a lock given up by a close does not stay forever.
    retry: Mutex<HashMap<(Ino, u64), u64>>,
    /// Inodes whose locks are delegated to this mount.
    delegated: Mutex<HashMap<Ino, Delegated>>,
    /// Inodes the leader would not delegate, and when it said so.
    refused: Mutex<HashMap<Ino, Instant>>,
    /// Woken at every change of a delegated inode's locks: local waiters look again.
    local_changed: tokio::sync::Notify,
    /// When the last call that renewed this session's lease was sent.
    renewed: Mutex<Option<Instant>>,
}

/// The locks of an inode delegated to this mount.
enum Delegated {
    /// Decided here: every lock of this session on the inode, since the grant arrived.
    Held {
        locks: Vec<HeldLock>,
        since: Instant,
    },
    /// Being given back: requests wait until they can go to the leader.
    Returning,
}

/// What this mount can say about a request by itself.
enum Here {
    /// The inode's locks are delegated here: granted (`None`) or the conflict.
    Decided(Option<LockConflict>),
    /// The delegation is being given back.
    Returning,
    /// Not delegated here: ask the leader.
    NotHeld,
}

impl Locks {
    /// Whether `owner` may hold a lock on `ino` here.
    pub(crate) fn may_hold(&self, ino: Ino, owner: u64) -> bool {
        lock(&self.held).contains_key(&(ino, owner))
    }
}

/// A lock as the kernel describes it.
pub(crate) struct KernelLock {
    /// The handle it comes through.
    pub fh: u64,
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub typ: i32,
    pub pid: u32,
}

impl KernelLock {
    /// A lock of `owner` through handle `fh` over `range` (first and last byte).
    pub(crate) fn new(fh: u64, owner: u64, range: (u64, u64), typ: i32, pid: u32) -> Self {
        KernelLock {
            fh,
            owner,
            start: range.0,
            end: range.1,
            typ,
            pid,
        }
    }

    fn request(&self) -> Result<LockRequest, Errno> {
        let kind = match self.typ {
            libc::F_RDLCK => LockKind::Read,
            libc::F_WRLCK => LockKind::Write,
            libc::F_UNLCK => LockKind::Unlock,
            _ => return Err(Errno::EINVAL),
        };
        if self.start > self.end {
            return Err(Errno::EINVAL);
        }
        Ok(LockRequest {
            owner: self.owner,
            pid: self.pid,
            start: self.start,
            end: self.end,
            kind,
        })
    }
}

/// What `getlk` answers: (start, end, type, pid).
pub(crate) type LockReport = (u64, u64, i32, u32);

fn report(c: Option<LockConflict>, asked: &KernelLock) -> LockReport {
    match c {
        None => (asked.start, asked.end, libc::F_UNLCK, 0),
        Some(c) => {
            let typ = if c.kind == LockKind::Write {
                libc::F_WRLCK
            } else {
                libc::F_RDLCK
            };
            (c.start, c.end, typ, c.pid)
        }
    }
}

impl Inner {
    /// Decides `req` on `ino` here if its locks are delegated to this mount; `grant`: take
    /// the lock (else only look for a conflict).
    async fn here(&self, ino: Ino, req: &LockRequest, grant: bool) -> Result<Here, Errno> {
        let held = matches!(
            lock(&self.locks.delegated).get(&ino),
            Some(Delegated::Held { .. })
        );
        let lease = Duration::from_millis(LOCK_LEASE_MS);
        let fresh = lock(&self.locks.renewed).is_some_and(|at| at.elapsed() < lease / 2);
        // Giving up needs no lease: only a grant could hurt another mount.
        if held && !fresh && grant && req.kind != LockKind::Unlock {
            self.renew_locks_now().await.map_err(errno::meta)?;
        }
        let mut delegated = lock(&self.locks.delegated);
        Ok(match delegated.get_mut(&ino) {
            None => Here::NotHeld,
            Some(Delegated::Returning) => Here::Returning,
            Some(Delegated::Held { locks, .. }) if !grant => {
                Here::Decided(first_conflict(locks, self.session, req))
            }
            Some(Delegated::Held { locks, .. }) => {
                let outcome = apply(locks, self.session, req);
                if outcome.is_none() {
                    self.locks.local_changed.notify_waiters();
                }
                Here::Decided(outcome)
            }
        })
    }

    /// Asks the leader to delegate `ino`'s locks here (unless it refused lately); whether
    /// they are now.
    async fn ask_delegation(&self, ino: Ino) -> Result<bool, Errno> {
        let asked_lately = lock(&self.locks.refused)
            .get(&ino)
            .is_some_and(|at| at.elapsed() < ASK_AGAIN_AFTER);
        if asked_lately {
            return Ok(false);
        }
        let sent = Instant::now();
        let d = self
            .client
            .meta()
            .delegate_locks(ino, self.session)
            .await
            .map_err(errno::meta)?;
        let Some(d) = d else {
            let mut refused = lock(&self.locks.refused);
            refused.retain(|_, at| at.elapsed() < ASK_AGAIN_AFTER);
            refused.insert(ino, Instant::now());
            return Ok(false);
        };
        *lock(&self.locks.renewed) = Some(sent);
        lock(&self.locks.delegated)
            .entry(ino)
            .or_insert(Delegated::Held {
                locks: d.locks,
                since: Instant::now(),
            });
        Ok(true)
    }

    /// Gives the delegation of `ino`'s locks back (the leader recalled it), with the locks
    /// this mount's processes hold on it.
    pub(crate) async fn return_locks(self: &Arc<Self>, ino: Ino) {
        let (locks, since) = {
            let mut delegated = lock(&self.locks.delegated);
            match delegated.insert(ino, Delegated::Returning) {
                Some(Delegated::Held { locks, since }) => (Some(locks), since),
                // Being given back already.
                Some(Delegated::Returning) => return,
                // A grant whose answer never arrived: the leader keeps what it has.
                None => (None, Instant::now()),
            }
        };
        let done = self
            .client
            .meta()
            .return_locks(ino, self.session, locks.clone())
            .await;
        let mut delegated = lock(&self.locks.delegated);
        match (done, locks) {
            (Ok(()), _) | (Err(MetaError::NotPermitted), None) => drop(delegated.remove(&ino)),
            (Err(MetaError::NotPermitted), Some(_)) => {
                delegated.remove(&ino);
                error!(ino, "the leader had dropped this mount's locks on the file");
            }
            (Err(e), Some(locks)) => {
                // Still ours: the leader recalls again while someone waits.
                warn!(ino, error = %e, "cannot give the file's locks back yet");
                delegated.insert(ino, Delegated::Held { locks, since });
            }
            (Err(e), None) => {
                warn!(ino, error = %e, "cannot give the file's locks back yet");
                delegated.remove(&ino);
            }
        }
        self.locks.local_changed.notify_waiters();
    }

    /// Renews this session's lease at the leader, and forgets the delegations the leader
    /// no longer has for it (its lease ran out: their locks are gone).
    async fn renew_locks_now(&self) -> Result<(), MetaError> {
        let sent = Instant::now();
        let listed = self.client.meta().renew_locks(self.session).await?;
        *lock(&self.locks.renewed) = Some(sent);
        let mut delegated = lock(&self.locks.delegated);
        let lost: Vec<Ino> = delegated
            .iter()
            .filter(|(ino, d)| {
                matches!(d, Delegated::Held { since, .. } if *since < sent) && !listed.contains(ino)
            })
            .map(|(ino, _)| *ino)
            .collect();
        for ino in lost {
            delegated.remove(&ino);
            error!(
                ino,
                "the leader dropped this mount's locks on the file (lease ended)"
            );
        }
        self.locks.local_changed.notify_waiters();
        Ok(())
    }

    /// Delegations of files this mount neither locks nor has open: given back.
    fn idle_delegations(&self) -> Vec<Ino> {
        lock(&self.locks.delegated)
            .iter()
            .filter(|(ino, d)| {
                matches!(d, Delegated::Held { locks, .. } if locks.is_empty())
                    && self.io_if_open(**ino).is_none()
            })
            .map(|(ino, _)| *ino)
            .collect()
    }

    /// `F_GETLK`: the first lock of another owner that would stand in the way.
    pub(crate) async fn getlk(&self, ino: Ino, asked: KernelLock) -> Result<LockReport, Errno> {
        let req = asked.request()?;
        loop {
            let changed = self.locks.local_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.here(ino, &req, false).await? {
                Here::Decided(c) => return Ok(report(c, &asked)),
                Here::Returning => {
                    let _ = tokio::time::timeout(RETURN_WAIT, changed).await;
                }
                Here::NotHeld => break,
            }
        }
        let c = self
            .client
            .meta()
            .test_lock(ino, self.session, req)
            .await
            .map_err(errno::meta)?;
        Ok(report(c, &asked))
    }

    /// `F_SETLK` (`sleep`: `F_SETLKW`) for thread `tid`. A conflict is EAGAIN; a wait ends
    /// with EINTR once the thread has a signal to handle.
    pub(crate) async fn setlk(
        self: &Arc<Self>,
        ino: Ino,
        asked: KernelLock,
        sleep: bool,
        tid: u32,
    ) -> Result<(), Errno> {
        let req = asked.request()?;
        if req.kind != LockKind::Write {
            // Giving up (part of) an exclusive lock: what was written under it goes first.
            self.flush(ino).await?;
        }
        if req.kind != LockKind::Unlock {
            // Before asking: a release racing the answer then gives it back.
            lock(&self.locks.held).insert((ino, req.owner), asked.fh);
        }
        let meta = self.client.meta();
        loop {
            // Registered before looking, so that a release in between is not missed.
            let changed = self.locks.local_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.here(ino, &req, true).await? {
                Here::Decided(None) => return Ok(()),
                Here::Decided(Some(_)) if !sleep => return Err(Errno::EAGAIN),
                Here::Decided(Some(_)) if signal_pending(tid) => return Err(Errno::EINTR),
                Here::Decided(Some(_)) => {
                    let slice = Duration::from_millis(u64::from(WAIT_SLICE_MS));
                    let _ = tokio::time::timeout(slice, changed).await;
                    continue;
                }
                Here::Returning => {
                    let _ = tokio::time::timeout(RETURN_WAIT, changed).await;
                    continue;
                }
                Here::NotHeld => {}
            }
            // An unlock of what is not delegated here is the leader's.
            if req.kind != LockKind::Unlock && self.ask_delegation(ino).await? {
                continue;
            }
            let wait = if sleep { WAIT_SLICE_MS } else { 0 };
            let sent = Instant::now();
            let c = meta
                .set_lock(ino, self.session, req, wait)
                .await
                .map_err(errno::meta)?;
            *lock(&self.locks.renewed) = Some(sent);
            match c {
                None => return Ok(()),
                Some(_) if !sleep => return Err(Errno::EAGAIN),
                Some(_) if signal_pending(tid) => return Err(Errno::EINTR),
                Some(_) => {}
            }
        }
    }

    /// The last release of handle `fh`: gives back what was locked through it.
    pub(crate) async fn unlock_handle(self: &Arc<Self>, ino: Ino, fh: u64) -> Result<(), Errno> {
        let owners: Vec<u64> = lock(&self.locks.held)
            .iter()
            .filter(|((i, _), by)| *i == ino && **by == fh)
            .map(|((_, owner), _)| *owner)
            .collect();
        let mut out = Ok(());
        for owner in owners {
            out = out.and(self.unlock_owner(ino, owner, Some(fh)).await);
        }
        out
    }

    /// Gives back every lock `owner` may hold on `ino`, after sending what was written
    /// under them: at `close` for POSIX locks (any handle), at the last release of handle
    /// `fh` for the others (only if that handle took them).
    pub(crate) async fn unlock_owner(
        self: &Arc<Self>,
        ino: Ino,
        owner: u64,
        fh: Option<u64>,
    ) -> Result<(), Errno> {
        let taken_by = lock(&self.locks.held).get(&(ino, owner)).copied();
        match (taken_by, fh) {
            (None, _) => return Ok(()),
            (Some(by), Some(fh)) if by != fh => return Ok(()),
            _ => {}
        }
        let all = KernelLock {
            fh: taken_by.unwrap_or(0),
            owner,
            start: 0,
            end: u64::MAX,
            typ: libc::F_UNLCK,
            pid: 0,
        };
        if let Err(e) = self.setlk(ino, all, false, 0).await {
            if let Some(by) = taken_by {
                lock(&self.locks.retry).insert((ino, owner), by);
            }
            return Err(e);
        }
        lock(&self.locks.retry).remove(&(ino, owner));
        let mut held = lock(&self.locks.held);
        // Unless a new lock was asked for meanwhile.
        if held.get(&(ino, owner)) == taken_by.as_ref() {
            held.remove(&(ino, owner));
        }
        Ok(())
    }

    /// Renews this session's locks at the leader while any may be held here.
    pub(crate) fn start_lock_renewer(self: &Arc<Self>, rt: &tokio::runtime::Handle) {
        let me: Weak<Inner> = Arc::downgrade(self);
        rt.spawn(async move {
            let lease = Duration::from_millis(LOCK_LEASE_MS);
            let mut renewed = Instant::now();
            let mut lost_reported = false;
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let Some(inner) = me.upgrade() else { return };
                let retry: Vec<_> = lock(&inner.locks.retry).drain().collect();
                for ((ino, owner), fh) in retry {
                    // Unless the owner locked again through the handle since.
                    if lock(&inner.locks.held).get(&(ino, owner)) == Some(&fh) {
                        let _ = inner.unlock_owner(ino, owner, Some(fh)).await;
                    }
                }
                for ino in inner.idle_delegations() {
                    inner.return_locks(ino).await;
                }
                let delegated = !lock(&inner.locks.delegated).is_empty();
                if lock(&inner.locks.held).is_empty() && !delegated {
                    renewed = Instant::now();
                    continue;
                }
                match inner.renew_locks_now().await {
                    Ok(_) => {
                        renewed = Instant::now();
                        lost_reported = false;
                    }
                    Err(e) if renewed.elapsed() < lease => {
                        warn!(error = %e, "cannot renew this mount's locks")
                    }
                    Err(e) if !lost_reported => {
                        lost_reported = true;
                        error!(error = %e, "locks not renewed for {lease:?}: the leader may \
                               have dropped them, and other mounts may take them")
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

/// Whether thread `tid` has a signal pending that it neither blocks nor ignores (what
/// would have interrupted a local `F_SETLKW`), from `/proc/<tid>/status`.
fn signal_pending(tid: u32) -> bool {
    if tid == 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{tid}/status")) {
        Ok(status) => pending_in_status(&status),
        // The thread is gone: nobody waits any more.
        Err(_) => true,
    }
}

fn pending_in_status(status: &str) -> bool {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = field("SigPnd:") | field("ShdPnd:");
    pending & !field("SigBlk:") & !field("SigIgn:") != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_signal_counts_unless_blocked_or_ignored() {
        let status = |pnd: &str, shd: &str, blk: &str, ign: &str| {
            format!(
                "Name:\tsleep\nSigQ:\t0/1\nSigPnd:\t{pnd}\nShdPnd:\t{shd}\n\
                 SigBlk:\t{blk}\nSigIgn:\t{ign}\nSigCgt:\t0\n"
            )
        };
        let none = "0000000000000000";
        let kill = "0000000000000100"; // SIGKILL (9): bit 8
        let alarm = "0000000000002000"; // SIGALRM (14): bit 13
        assert!(!pending_in_status(&status(none, none, none, none)));
        assert!(pending_in_status(&status(kill, none, none, none)));
        assert!(pending_in_status(&status(none, alarm, none, none)));
        assert!(!pending_in_status(&status(none, alarm, alarm, none)));
        assert!(!pending_in_status(&status(alarm, none, none, alarm)));
        assert!(!signal_pending(0));
        assert!(!signal_pending(std::process::id()));
    }

    #[test]
    fn kernel_locks_map_to_requests_and_reports() {
        let k = |typ| KernelLock {
            fh: 3,
            owner: 5,
            start: 10,
            end: 19,
            typ,
            pid: 77,
        };
        assert_eq!(k(libc::F_RDLCK).request().unwrap().kind, LockKind::Read);
        assert_eq!(k(libc::F_WRLCK).request().unwrap().kind, LockKind::Write);
        assert_eq!(k(libc::F_UNLCK).request().unwrap().kind, LockKind::Unlock);
        assert_eq!(k(99).request().unwrap_err(), Errno::EINVAL);
        assert_eq!(report(None, &k(libc::F_WRLCK)), (10, 19, libc::F_UNLCK, 0));
        let held = LockConflict {
            kind: LockKind::Read,
            start: 0,
            end: 99,
            pid: 0,
        };
        assert_eq!(
            report(Some(held), &k(libc::F_WRLCK)),
            (0, 99, libc::F_RDLCK, 0)
        );
    }
}
