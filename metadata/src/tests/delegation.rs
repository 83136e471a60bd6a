//! Directory delegations in the state machine: held creates, their checks, and the rows in
//! snapshots.

use super::*;

fn held(name: &str, ino: Ino, at: i64) -> HeldCreate {
    HeldCreate {
        name: n(name),
        ino,
        perm: 0o600,
        uid: 3,
        gid: 4,
        time: Timespec { sec: at, nsec: 0 },
        open: true,
    }
}

fn commit(h: &mut H, dir: Ino, holder: u64, entries: Vec<HeldCreate>) -> MetaResult<Reply> {
    h.apply(Command::CommitCreates {
        dir,
        holder,
        entries,
        give_back: false,
    })
}

#[test]
fn held_creates_are_checked_whole_and_delegations_travel_in_snapshots() {
    let mut h = H::new();
    let now = h.now();
    let node = NewNode {
        kind: FileKind::Dir,
        perm: 0o2775,
        rdev: 0,
        exclusive: true,
    };
    let mkdir = Command::MkdirHeld {
        parent: ROOT_INO,
        name: n("d"),
        node,
        caller: ME,
        holder: 9,
        now,
    };
    let Ok(Reply::Attr(d)) = h.apply(mkdir) else {
        panic!("mkdir_held")
    };
    let Ok(Reply::Number(first)) = h.apply(Command::ReserveInodes { count: 4 }) else {
        panic!("reserve")
    };
    // The server's own next inode comes after the reserved range.
    assert!(h.mkdir(ROOT_INO, "other").ino >= first + 4);
    let files_before = h.sm.read(queries::files).unwrap();

    commit(&mut h, d.ino, 9, vec![held("a", first, 50)]).unwrap();
    let a = h.lookup(d.ino, "a").unwrap();
    assert_eq!(
        (a.ino, a.perm, a.uid, a.gid, a.nlink),
        (first, 0o600, 3, 4, 1)
    );
    assert_eq!(a.ctime, Timespec { sec: 50, nsec: 0 });
    assert_eq!(h.getattr(d.ino).unwrap().mtime, a.ctime);
    assert_eq!(h.sm.read(queries::files).unwrap(), files_before + 1);
    // Recorded open: an unlink leaves the file (as an orphan) until the holder releases it.
    h.unlink(d.ino, "a").unwrap();
    assert_eq!(h.getattr(first).unwrap().nlink, 0);
    h.apply(Command::Release {
        ino: first,
        session: 9,
    })
    .unwrap();
    assert_eq!(h.getattr(first), Err(MetaError::NotFound));

    // Refused as a whole, nothing applied: a duplicate name, a used or unreserved number.
    let dup = vec![held("b", first + 1, 51), held("b", first + 2, 51)];
    assert_eq!(commit(&mut h, d.ino, 9, dup), Err(MetaError::Exists));
    let used = vec![held("c", first + 1, 51), held("e", d.ino, 51)];
    assert!(matches!(
        commit(&mut h, d.ino, 9, used),
        Err(MetaError::Invalid { .. })
    ));
    assert_eq!(h.names(d.ino), Vec::<String>::new());

    // The row is state: a replica restored from a snapshot keeps honouring it.
    let snap = h.sm.snapshot().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    sm2.restore(&snap).unwrap();
    assert_eq!(sm2.digest().unwrap(), h.sm.digest().unwrap());
    let index = h.sm.digest().unwrap().0;
    let mut h2 = H::from_sm(sm2, other, index);
    assert_eq!(
        commit(&mut h2, d.ino, 8, vec![held("b", first + 1, 52)]),
        Err(MetaError::NotPermitted)
    );
    commit(&mut h2, d.ino, 9, vec![held("b", first + 1, 52)]).unwrap();
    // The session's end ends its delegation.
    h2.apply(Command::EndSession { session: 9 }).unwrap();
    assert_eq!(
        commit(&mut h2, d.ino, 9, vec![held("c", first + 2, 53)]),
        Err(MetaError::NotPermitted)
    );
}
