//! Request ids (applied once), the digest, and the snapshot of those tables.

use rawfs_metadata_api::*;
use rawfs_replication::StateMachine;

use super::{n, open_sm, H, ME};
use crate::commands::{Command, Reply};
use crate::requests::KEEP_SECS;

fn tracked(req: ReqId, sec: i64, cmd: Command) -> Command {
    Command::Tracked {
        req,
        now: Timespec { sec, nsec: 0 },
        cmd: Box::new(cmd),
    }
}

fn mkfile(h: &mut H, name: &str) -> Command {
    let now = h.now();
    Command::Mknod {
        parent: ROOT_INO,
        name: n(name),
        node: NewNode {
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            exclusive: true,
        },
        caller: ME,
        now,
    }
}

const R1: ReqId = ReqId { client: 7, seq: 1 };

#[test]
fn a_repeated_request_is_applied_once_with_the_same_reply() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f");
    let now = h.now();
    let write = Command::CommitWrite {
        ino: f.ino,
        end: 1 << 20,
        stored_delta: 4096,
        now,
    };
    let first = h.apply(tracked(R1, 5_000, write.clone()));
    let again = h.apply(tracked(R1, 5_001, write.clone()));
    assert_eq!(first, again, "the remembered reply");
    assert_eq!(h.getattr(f.ino).unwrap().stored, 4096, "applied once");
    // Another request id is another operation.
    let other = ReqId { client: 7, seq: 2 };
    h.apply(tracked(other, 5_002, write)).unwrap();
    assert_eq!(h.getattr(f.ino).unwrap().stored, 8192);

    // A rename retried after its reply was lost succeeds instead of failing with NotFound.
    let now = h.now();
    let rename = Command::Rename {
        parent: ROOT_INO,
        name: n("f"),
        newparent: ROOT_INO,
        newname: n("g"),
        flags: RenameFlags::default(),
        now,
    };
    let r3 = ReqId { client: 9, seq: 1 };
    assert_eq!(h.apply(tracked(r3, 5_003, rename.clone())), Ok(Reply::Unit));
    assert_eq!(h.apply(tracked(r3, 5_004, rename.clone())), Ok(Reply::Unit));
    // Without the id, the repeat really is applied again.
    assert_eq!(h.apply(rename), Err(MetaError::NotFound));

    // Errors are remembered too, and a repeat inside one batch is caught.
    let mk = mkfile(&mut h, "g");
    let r4 = ReqId { client: 9, seq: 2 };
    let Ok(Reply::Batch(r)) = h.apply(Command::Batch(vec![
        tracked(r4, 5_005, mk.clone()),
        tracked(r4, 5_005, mk),
    ])) else {
        panic!("batch reply expected");
    };
    assert_eq!(r, vec![Err(MetaError::Exists), Err(MetaError::Exists)]);
    // Tracked commands do not nest.
    let nested = tracked(R1, 5_006, tracked(R1, 5_006, Command::Batch(vec![])));
    assert!(matches!(h.apply(nested), Err(MetaError::Invalid { .. })));
}

#[test]
fn request_ids_are_forgotten_after_the_keep_time() {
    let mut h = H::new();
    let mk = mkfile(&mut h, "a");
    let t0 = 100_000;
    let a = h.apply(tracked(R1, t0, mk.clone())).unwrap();
    h.unlink(ROOT_INO, "a").unwrap();
    // Still remembered just before the keep time ends: the repeat changes nothing.
    let other = ReqId { client: 8, seq: 1 };
    let last = t0 + KEEP_SECS as i64 - 1;
    let b = mkfile(&mut h, "b");
    h.apply(tracked(other, last, b)).unwrap();
    assert_eq!(h.apply(tracked(R1, last, mk.clone())), Ok(a.clone()));
    assert_eq!(h.lookup(ROOT_INO, "a"), Err(MetaError::NotFound));
    // Any tracked command past it prunes: the id is new again.
    let later = ReqId { client: 8, seq: 2 };
    let c = mkfile(&mut h, "c");
    h.apply(tracked(later, t0 + KEEP_SECS as i64 + 1, c))
        .unwrap();
    let fresh = h.apply(tracked(R1, t0 + KEEP_SECS as i64 + 2, mk)).unwrap();
    assert_ne!(fresh.into_attr().unwrap().ino, a.into_attr().unwrap().ino);
    assert!(h.lookup(ROOT_INO, "a").is_ok());
}

#[test]
fn digest_follows_the_state_and_survives_a_snapshot() {
    let mut h = H::new();
    h.register(&[1]);
    let f = h.create(ROOT_INO, "f");
    let g = mkfile(&mut h, "g");
    h.apply(tracked(R1, 1_000, g.clone())).unwrap();
    h.allocate(f.ino, 0, &[1]).unwrap();
    let (applied, d1) = h.sm.digest().unwrap();
    assert!(applied > 0, "the applied index is recorded");
    // A read changes nothing; a mutation changes the digest.
    assert_eq!(h.sm.digest().unwrap(), (applied, d1));
    h.mkdir(ROOT_INO, "d");
    let (applied2, d2) = h.sm.digest().unwrap();
    assert_eq!(applied2, applied + 1);
    assert_ne!(d2, d1);

    // A replica restored from a snapshot has the same digest and remembers the request.
    let snap = h.sm.snapshot().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    sm2.restore(&snap).unwrap();
    assert_eq!(sm2.digest().unwrap(), (applied2, d2));
    let mut h2 = H::from_sm(sm2, other, applied2);
    let repeat = h2.apply(tracked(R1, 1_001, g));
    assert!(matches!(repeat, Ok(Reply::Attr(_))), "{repeat:?}");
}

#[test]
fn a_version_1_snapshot_still_restores() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f");
    let g = mkfile(&mut h, "g");
    h.apply(tracked(R1, 1_000, g)).unwrap();
    let snap = h.sm.snapshot().unwrap();
    // Rebuild the snapshot as format 1 wrote it: without the tables format 2 added.
    let v1 = super::to_format_1(&snap);
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    sm2.restore(&v1).unwrap();
    let got = sm2.read(|rt| crate::queries::getattr(rt, f.ino)).unwrap();
    assert_eq!(got.ino, f.ino);
    assert!(sm2.replication_state().unwrap().is_some());
}
