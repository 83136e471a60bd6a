//! Byte-range locks as the log applies them: conflicts, splits, merges, session ends.

use super::*;

const EOF_: u64 = i64::MAX as u64;

fn req(owner: u64, start: u64, end: u64, kind: LockKind) -> LockRequest {
    LockRequest {
        owner,
        pid: 40 + owner as u32,
        start,
        end,
        kind,
    }
}

impl H {
    fn lock(&mut self, ino: Ino, session: u64, r: LockRequest) -> Option<LockConflict> {
        self.apply(Command::SetLock {
            ino,
            session,
            lock: r,
        })
        .unwrap()
        .into_lock()
        .unwrap()
    }

    /// What a write lock of `start..=end` by owner 99 of `session` is refused for (a
    /// granted probe is given back, so it changes nothing).
    fn blocker(&mut self, ino: Ino, session: u64, start: u64, end: u64) -> Option<LockConflict> {
        let c = self.lock(ino, session, req(99, start, end, LockKind::Write));
        if c.is_none() {
            self.lock(ino, session, req(99, start, end, LockKind::Unlock));
        }
        c
    }
}

fn conflict(kind: LockKind, start: u64, end: u64, pid: u32) -> Option<LockConflict> {
    Some(LockConflict {
        kind,
        start,
        end,
        pid,
    })
}

#[test]
fn readers_share_a_range_and_a_writer_is_refused_with_the_holder() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "db").ino;
    assert_eq!(h.lock(f, 1, req(1, 0, 99, LockKind::Read)), None);
    assert_eq!(h.lock(f, 2, req(7, 50, 149, LockKind::Read)), None);
    // Another mount's holder has no pid here; one of the same mount has its own.
    assert_eq!(
        h.lock(f, 2, req(8, 10, 10, LockKind::Write)),
        conflict(LockKind::Read, 0, 99, 0)
    );
    assert_eq!(
        h.lock(f, 1, req(2, 120, 130, LockKind::Write)),
        conflict(LockKind::Read, 50, 149, 0)
    );
    assert_eq!(
        h.lock(f, 1, req(2, 0, 0, LockKind::Write)),
        conflict(LockKind::Read, 0, 99, 41)
    );
    // Past both: free. The owner itself may upgrade where nobody else reads.
    assert_eq!(h.lock(f, 1, req(2, 150, EOF_, LockKind::Write)), None);
    assert_eq!(h.lock(f, 1, req(1, 0, 49, LockKind::Write)), None);
    assert_eq!(
        h.lock(f, 1, req(1, 0, 60, LockKind::Write)),
        conflict(LockKind::Read, 50, 149, 0),
        "the upgrade that overlaps another reader is refused"
    );
    // Other files are untouched.
    let g = h.create(ROOT_INO, "other").ino;
    assert_eq!(h.lock(g, 3, req(1, 0, EOF_, LockKind::Write)), None);
}

#[test]
fn an_unlock_splits_a_lock_and_adjacent_locks_of_a_kind_merge() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f").ino;
    assert_eq!(h.lock(f, 1, req(1, 0, 99, LockKind::Write)), None);
    assert_eq!(h.lock(f, 1, req(1, 40, 59, LockKind::Unlock)), None);
    assert_eq!(h.blocker(f, 2, 40, 59), None, "the middle is free");
    assert_eq!(h.blocker(f, 2, 30, 45), conflict(LockKind::Write, 0, 39, 0));
    assert_eq!(
        h.blocker(f, 2, 55, 65),
        conflict(LockKind::Write, 60, 99, 0)
    );
    // Filling the gap merges the three into one lock.
    assert_eq!(h.lock(f, 1, req(1, 40, 59, LockKind::Write)), None);
    assert_eq!(
        h.blocker(f, 2, 0, EOF_),
        conflict(LockKind::Write, 0, 99, 0)
    );
    // A downgrade of the middle leaves write, read, write.
    assert_eq!(h.lock(f, 1, req(1, 40, 59, LockKind::Read)), None);
    assert_eq!(
        h.lock(f, 2, req(5, 45, 50, LockKind::Read)),
        None,
        "readers share"
    );
    assert_eq!(h.lock(f, 2, req(5, 45, 50, LockKind::Unlock)), None);
    assert_eq!(
        h.blocker(f, 2, 61, EOF_),
        conflict(LockKind::Write, 60, 99, 0)
    );
    // Unlocking everything of the owner frees the file.
    assert_eq!(h.lock(f, 1, req(1, 0, EOF_, LockKind::Unlock)), None);
    assert_eq!(h.blocker(f, 2, 0, EOF_), None);
    // An empty range is refused.
    let bad = h.apply(Command::SetLock {
        ino: f,
        session: 1,
        lock: req(1, 9, 3, LockKind::Read),
    });
    assert!(matches!(bad, Err(MetaError::Invalid { .. })), "{bad:?}");
}

#[test]
fn a_session_that_ends_or_expires_loses_its_locks_and_snapshots_keep_them() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f").ino;
    assert_eq!(h.lock(f, 1, req(1, 0, EOF_, LockKind::Write)), None);
    assert_eq!(
        h.lock(f, 2, req(1, 0, 9, LockKind::Read)).map(|c| c.start),
        Some(0)
    );
    // A replica restored from a snapshot refuses the same.
    let snap = h.sm.snapshot().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    sm2.restore(&snap).unwrap();
    assert_eq!(sm2.digest().unwrap().1, h.sm.digest().unwrap().1);
    let mut h2 = H::from_sm(sm2, other, h.index);
    assert!(h2.lock(f, 2, req(1, 0, 9, LockKind::Read)).is_some());

    h.apply(Command::DropLocks { session: 1 }).unwrap();
    assert_eq!(h.lock(f, 2, req(1, 0, 9, LockKind::Read)), None);
    h.apply(Command::EndSession { session: 2 }).unwrap();
    assert_eq!(h.lock(f, 3, req(1, 0, EOF_, LockKind::Write)), None);
}

impl H {
    fn delegate(&mut self, ino: Ino, session: u64) -> Option<LockDelegation> {
        self.apply(Command::DelegateLocks { ino, session })
            .unwrap()
            .into_delegation()
            .unwrap()
    }

    fn give_back(&mut self, ino: Ino, session: u64, locks: Vec<HeldLock>) -> MetaResult<Reply> {
        let locks = Some(locks);
        self.apply(Command::ReturnLocks {
            ino,
            session,
            locks,
        })
    }
}

#[test]
fn a_delegation_goes_to_the_only_locker_and_its_locks_come_back_with_it() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "db").ino;
    assert_eq!(h.lock(f, 1, req(1, 0, 9, LockKind::Read)), None);
    // Session 1 gets the delegation with what it holds; a second ask gets the same.
    let d = h.delegate(f, 1).expect("granted");
    assert_eq!(d.locks.len(), 1);
    assert_eq!((d.locks[0].start, d.locks[0].end), (0, 9));
    assert_eq!(h.delegate(f, 1), Some(d.clone()));
    // Nobody else gets it, nor a lock, while it stands (the leader recalls first).
    assert_eq!(h.delegate(f, 2), None);
    assert_eq!(
        h.lock(f, 2, req(1, 100, 100, LockKind::Read)),
        Some(LockConflict::HELD_ELSEWHERE)
    );
    // The holder returns the locks it took meanwhile: they are the table's now.
    let mut mine = d.locks.clone();
    assert_eq!(
        apply(&mut mine, 1, &req(3, 50, 59, LockKind::Write)),
        None,
        "the holder's own bookkeeping"
    );
    assert!(
        matches!(h.give_back(f, 2, Vec::new()), Err(MetaError::NotPermitted)),
        "only the holder returns"
    );
    let forged = vec![HeldLock {
        session: 2,
        ..mine[0]
    }];
    assert!(matches!(
        h.give_back(f, 1, forged),
        Err(MetaError::Invalid { .. })
    ));
    h.give_back(f, 1, mine).unwrap();
    assert_eq!(
        h.blocker(f, 2, 50, 50),
        conflict(LockKind::Write, 50, 59, 0)
    );
    assert_eq!(h.blocker(f, 2, 5, 5), conflict(LockKind::Read, 0, 9, 0));
    assert_eq!(h.blocker(f, 2, 20, 20), None);
    // Another session's lock stands in the way of a delegation to session 1.
    assert_eq!(h.lock(f, 2, req(1, 200, 200, LockKind::Read)), None);
    assert_eq!(h.delegate(f, 1), None);
    assert!(
        matches!(h.give_back(f, 1, Vec::new()), Err(MetaError::NotPermitted)),
        "a returned delegation is not returned twice"
    );
}

#[test]
fn a_delegation_survives_a_snapshot_and_ends_with_its_session() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "db").ino;
    assert!(h.delegate(f, 1).is_some());
    let snap = h.sm.snapshot().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    sm2.restore(&snap).unwrap();
    assert_eq!(sm2.digest().unwrap().1, h.sm.digest().unwrap().1);
    let mut h2 = H::from_sm(sm2, other, h.index);
    assert_eq!(h2.delegate(f, 2), None, "the restored replica keeps it");

    h.apply(Command::DropLocks { session: 1 }).unwrap();
    assert!(
        h.delegate(f, 2).is_some(),
        "an expired holder's delegation is free"
    );
    h.apply(Command::EndSession { session: 2 }).unwrap();
    assert!(h.delegate(f, 3).is_some());
    assert!(
        matches!(h.give_back(f, 2, Vec::new()), Err(MetaError::NotPermitted)),
        "an ended session's return is refused: its locks are gone"
    );
}
