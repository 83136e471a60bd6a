//! Byte-range locks: the request and answer types, and the rules that decide them, shared
//! by the leader (which keeps every mount's locks in the log) and by a mount that holds the
//! locks of an inode itself (a lock delegation, see `MetadataRpc::delegate_locks`), so that
//! both judge a request exactly alike.
//!
//! The rules are Linux's: an owner's locks never overlap each other; a new lock replaces
//! the owner's locks in its range (splitting one that reaches past it), and merges with
//! the owner's adjacent or overlapping locks of the same kind; a read lock conflicts with
//! another owner's overlapping write lock, a write lock with any overlapping lock of
//! another owner.

use serde::{Deserialize, Serialize};

use crate::types::Ino;

/// What a byte-range lock request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    /// Shared: other owners may read-lock the range too.
    Read,
    /// Exclusive.
    Write,
    /// Drops the owner's locks in the range (splitting a lock that reaches past it).
    Unlock,
}

/// A byte-range lock request of one lock owner of a mount session: POSIX `fcntl` locks,
/// and `flock`, which the kernel sends as a whole-file range owned by the open file (as
/// NFS does, the two kinds therefore see each other).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRequest {
    /// The owner within the session (the kernel's opaque lock owner id).
    pub owner: u64,
    /// The process asking: `test_lock` reports it to other processes of the same session.
    pub pid: u32,
    /// First byte of the range.
    pub start: u64,
    /// Last byte of the range (inclusive; the kernel's OFFSET_MAX means "to the end").
    pub end: u64,
    pub kind: LockKind,
}

impl LockRequest {
    /// Why the request is malformed, if it is.
    pub fn invalid(&self) -> Option<String> {
        (self.start > self.end)
            .then(|| format!("lock range {}..={} is empty", self.start, self.end))
    }
}

/// A lock that stands in the way of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockConflict {
    /// `Read` or `Write`.
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
    /// The holder's process when it is of the asking session; 0 for another mount's.
    pub pid: u32,
}

impl LockConflict {
    /// What a request sees of an inode whose locks another mount holds and did not give
    /// back in time: the whole file, write-locked (a holder that died, until its lease ends).
    pub const HELD_ELSEWHERE: LockConflict = LockConflict {
        kind: LockKind::Write,
        start: 0,
        end: u64::MAX,
        pid: 0,
    };
}

/// One granted lock of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLock {
    /// The mount session holding it.
    pub session: u64,
    /// The lock owner within the session.
    pub owner: u64,
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// Exclusive (else shared).
    pub write: bool,
    /// The process that took it.
    pub pid: u32,
}

impl HeldLock {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    /// Touches `start..=end` without overlapping it (merges with a lock of the same kind).
    fn adjacent(&self, start: u64, end: u64) -> bool {
        self.end.checked_add(1) == Some(start) || end.checked_add(1) == Some(self.start)
    }

    fn mine(&self, session: u64, req: &LockRequest) -> bool {
        (self.session, self.owner) == (session, req.owner)
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

/// The first lock of another owner that `req` of `session` conflicts with.
pub fn first_conflict(locks: &[HeldLock], session: u64, req: &LockRequest) -> Option<LockConflict> {
    if req.kind == LockKind::Unlock {
        return None;
    }
    locks
        .iter()
        .find(|l| {
            !l.mine(session, req)
                && l.overlaps(req.start, req.end)
                && (l.write || req.kind == LockKind::Write)
        })
        .map(|l| l.conflict(session))
}

/// Whether `req`'s owner holds anything in its range.
pub fn holds_any(locks: &[HeldLock], session: u64, req: &LockRequest) -> bool {
    locks
        .iter()
        .any(|l| l.mine(session, req) && l.overlaps(req.start, req.end))
}

/// What granting `req` of `session` changes (no conflict check): the locks it removes and
/// the locks it adds.
pub fn replacement(
    locks: &[HeldLock],
    session: u64,
    req: &LockRequest,
) -> (Vec<HeldLock>, Vec<HeldLock>) {
    let write = req.kind == LockKind::Write;
    let (mut start, mut end) = (req.start, req.end);
    let (mut removed, mut added) = (Vec::new(), Vec::new());
    for l in locks.iter().filter(|l| l.mine(session, req)) {
        let same = req.kind != LockKind::Unlock && l.write == write;
        if !(l.overlaps(req.start, req.end) || same && l.adjacent(req.start, req.end)) {
            continue;
        }
        removed.push(*l);
        if same {
            start = start.min(l.start);
            end = end.max(l.end);
            continue;
        }
        // The parts outside the range stay as they were.
        if l.start < req.start {
            added.push(HeldLock {
                end: req.start - 1,
                ..*l
            });
        }
        if l.end > req.end {
            added.push(HeldLock {
                start: req.end + 1,
                ..*l
            });
        }
    }
    if req.kind != LockKind::Unlock {
        added.push(HeldLock {
            session,
            owner: req.owner,
            start,
            end,
            write,
            pid: req.pid,
        });
    }
    (removed, added)
}

/// Grants `req` of `session` in `locks` unless it conflicts: `None` when done, else the
/// conflicting lock.
pub fn apply(locks: &mut Vec<HeldLock>, session: u64, req: &LockRequest) -> Option<LockConflict> {
    if let Some(c) = first_conflict(locks, session, req) {
        return Some(c);
    }
    let (removed, added) = replacement(locks, session, req);
    locks.retain(|l| !removed.contains(l));
    locks.extend(added);
    None
}

/// A lock delegation granted by `delegate_locks`: the session's locks on the inode when it
/// was granted. From then on the holder decides every lock request on the inode itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockDelegation {
    pub ino: Ino,
    pub locks: Vec<HeldLock>,
}

/// How long the leader keeps a session's locks without hearing from it (`set_lock`,
/// `test_lock` or `renew_locks`): a mount that holds locks renews well within this, so
/// the locks of a mount that died are free again after it.
pub const LOCK_LEASE_MS: u64 = 10_000;

/// The longest a `set_lock` call waits at the leader for a conflicting lock to go.
pub const LOCK_WAIT_MAX_MS: u32 = 5_000;

#[cfg(test)]
mod tests {
    use super::*;

    fn req(owner: u64, start: u64, end: u64, kind: LockKind) -> LockRequest {
        LockRequest {
            owner,
            pid: owner as u32,
            start,
            end,
            kind,
        }
    }

    #[test]
    fn ranges_split_merge_and_conflict_as_on_linux() {
        let mut locks = Vec::new();
        assert_eq!(apply(&mut locks, 1, &req(7, 0, 99, LockKind::Write)), None);
        // Unlocking the middle splits the lock in two.
        assert_eq!(
            apply(&mut locks, 1, &req(7, 40, 59, LockKind::Unlock)),
            None
        );
        let mut ranges: Vec<_> = locks.iter().map(|l| (l.start, l.end)).collect();
        ranges.sort_unstable();
        assert_eq!(ranges, vec![(0, 39), (60, 99)]);
        // Filling the gap merges all three.
        assert_eq!(apply(&mut locks, 1, &req(7, 40, 59, LockKind::Write)), None);
        assert_eq!(locks.len(), 1);
        assert_eq!((locks[0].start, locks[0].end), (0, 99));
        // Another owner of the same session sees the pid; another session does not.
        let c = apply(&mut locks, 1, &req(8, 50, 50, LockKind::Read)).unwrap();
        assert_eq!((c.kind, c.start, c.end, c.pid), (LockKind::Write, 0, 99, 7));
        assert_eq!(
            first_conflict(&locks, 2, &req(7, 0, 0, LockKind::Read))
                .unwrap()
                .pid,
            0
        );
        // A downgrade lets readers in, not writers.
        assert_eq!(apply(&mut locks, 1, &req(7, 0, 99, LockKind::Read)), None);
        assert_eq!(apply(&mut locks, 2, &req(3, 10, 10, LockKind::Read)), None);
        assert!(apply(&mut locks, 2, &req(4, 10, 10, LockKind::Write)).is_some());
        assert!(holds_any(&locks, 2, &req(3, 0, u64::MAX, LockKind::Unlock)));
        assert_eq!(
            apply(&mut locks, 2, &req(3, 0, u64::MAX, LockKind::Unlock)),
            None
        );
        assert!(!holds_any(
            &locks,
            2,
            &req(3, 0, u64::MAX, LockKind::Unlock)
        ));
        assert!(req(1, 5, 4, LockKind::Read).invalid().is_some());
    }
}
