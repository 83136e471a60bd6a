//! Orphans, chunks, snapshots and batches.

use rawfs_metadata_api::*;
use serde_bytes::ByteBuf;

use super::{n, H, ME};
use crate::commands::{Command, Reply};
use crate::queries;
use rawfs_replication::{Entry, StateMachine};

use super::open_sm;
use crate::commands::decode_reply;

#[test]
fn orphan_lives_until_last_release_even_across_reopen() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let f = h.create(ROOT_INO, "f");
    let loc = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    h.apply(Command::Open {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    h.apply(Command::Open {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    h.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(h.getattr(f.ino).unwrap().nlink, 0);
    assert!(h.deletions(1).is_empty(), "chunks stay while open");
    let mut h = h.reopen();
    assert_eq!(
        h.getattr(f.ino).unwrap().nlink,
        0,
        "orphan survives restart"
    );
    h.apply(Command::Release {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    assert!(h.getattr(f.ino).is_ok(), "one open left");
    h.apply(Command::Release {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    assert_eq!(h.getattr(f.ino), Err(MetaError::NotFound));
    for s in 1..=3 {
        assert_eq!(h.deletions(s), vec![loc.chunk]);
    }
    // end_session frees every orphan the session held.
    let g = h.create(ROOT_INO, "g");
    h.apply(Command::Open {
        ino: g.ino,
        session: 9,
    })
    .unwrap();
    h.unlink(ROOT_INO, "g").unwrap();
    assert!(h.getattr(g.ino).is_ok());
    h.apply(Command::EndSession { session: 9 }).unwrap();
    assert_eq!(h.getattr(g.ino), Err(MetaError::NotFound));
}

#[test]
fn truncate_releases_whole_chunks_past_the_end() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let f = h.create(ROOT_INO, "f");
    let c: Vec<ChunkLoc> = (0..3)
        .map(|i| h.allocate(f.ino, i, &[1, 2, 3]).unwrap())
        .collect();
    assert_eq!(c[0].term, 3, "locations carry the entry's term");
    assert_eq!(c[1].replicas[0].data_addr, "127.0.0.1:9001");
    let now = h.now();
    let a = h
        .apply(Command::CommitWrite {
            ino: f.ino,
            end: 3 * CHUNK_SIZE,
            stored_delta: (3 * CHUNK_SIZE) as i64,
            now,
        })
        .unwrap()
        .into_attr()
        .unwrap();
    assert_eq!(a.size, 3 * CHUNK_SIZE);
    let now = h.now();
    let t = h
        .apply(Command::SetAttr {
            ino: f.ino,
            set: SetAttr {
                size: Some(CHUNK_SIZE + 10),
                ..Default::default()
            },
            now,
        })
        .unwrap()
        .into_attr()
        .unwrap();
    assert_eq!(t.size, CHUNK_SIZE + 10);
    assert_eq!(t.mtime, now);
    let left =
        h.sm.read(|rt| queries::chunks(rt, f.ino, 0, 100, 1))
            .unwrap();
    assert_eq!(left.iter().map(|l| l.index).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(h.deletions(2), vec![c[2].chunk]);
    // Punching chunk 0 leaves a hole.
    let now = h.now();
    h.apply(Command::ReleaseChunks {
        ino: f.ino,
        first: 0,
        count: 1,
        now,
    })
    .unwrap();
    let left =
        h.sm.read(|rt| queries::chunks(rt, f.ino, 0, u64::MAX, 1))
            .unwrap();
    assert_eq!(left.iter().map(|l| l.index).collect::<Vec<_>>(), vec![1]);
    let d = h.mkdir(ROOT_INO, "d");
    assert_eq!(h.allocate(d.ino, 0, &[1]), Err(MetaError::IsDir));
    assert!(matches!(
        h.allocate(f.ino, 5, &[]),
        Err(MetaError::NoSpace { .. })
    ));
}

#[test]
fn drop_replica_bumps_version_only_when_expected() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let f = h.create(ROOT_INO, "f");
    let loc = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    let drop = |h: &mut H, v, s| {
        h.apply(Command::DropReplica {
            chunk: loc.chunk,
            expected_version: v,
            server: s,
        })
        .unwrap()
        .into_chunk()
        .unwrap()
    };
    let l2 = drop(&mut h, 1, 2);
    assert_eq!(l2.version, 2);
    assert_eq!(
        l2.replicas.iter().map(|r| r.server).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(h.deletions(2), vec![loc.chunk]);
    // A stale expectation changes nothing.
    let same = drop(&mut h, 1, 3);
    assert_eq!(same, l2);
    let l3 = drop(&mut h, 2, 3);
    assert_eq!((l3.version, l3.replicas.len()), (3, 1));
    let last = drop(&mut h, 3, 1);
    assert_eq!(last, l3, "the last replica is kept");
    // Inventory: the dropped server's copy, unknown ids below the counter go; others stay.
    let inv = [(loc.chunk, 1), (999_999, 1), (loc.chunk + 50, 1)];
    let del =
        h.sm.read(|rt| queries::inventory_deletes(rt, 2, &inv))
            .unwrap();
    assert_eq!(del, vec![(loc.chunk, 1)]);
    let del1 =
        h.sm.read(|rt| queries::inventory_deletes(rt, 1, &[(loc.chunk, 1)]))
            .unwrap();
    assert!(del1.is_empty(), "a listed replica is kept");
    h.apply(Command::AckDeletes {
        server: 2,
        chunks: vec![loc.chunk],
    })
    .unwrap();
    assert!(h.deletions(2).is_empty());
}

#[test]
fn snapshot_restores_everything_and_garbage_is_refused() {
    let mut h = H::new();
    h.register(&[1]);
    let d = h.mkdir(ROOT_INO, "d");
    let f = h.create(d.ino, "f");
    h.allocate(f.ino, 0, &[1]).unwrap();
    let snap = h.sm.snapshot().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    assert!(sm2.restore(b"garbage").is_err());
    assert!(sm2.restore(&snap[..snap.len() - 3]).is_err());
    sm2.restore(&snap).unwrap();
    assert_eq!(
        sm2.replication_state().unwrap().as_deref(),
        Some(&b"repl"[..])
    );
    let got = sm2.read(|rt| queries::lookup(rt, d.ino, b"f")).unwrap();
    assert_eq!(got, h.getattr(f.ino).unwrap());
    let chunks = sm2.read(|rt| queries::chunks(rt, f.ino, 0, 1, 0)).unwrap();
    assert_eq!(chunks[0].replicas[0].data_addr, "127.0.0.1:9001");
}

#[test]
fn bad_commands_are_refused_without_stopping_the_batch() {
    let h = H::new();
    let good = Command::Init {
        now: Timespec::default(),
    }
    .encode()
    .unwrap();
    let entries = [
        Entry {
            index: 10,
            term: 1,
            command: Some(&[1, 2, 3]),
        },
        Entry {
            index: 11,
            term: 1,
            command: None,
        },
        Entry {
            index: 12,
            term: 1,
            command: Some(&good),
        },
    ];
    let out = h.sm.apply(&entries, b"s").unwrap();
    assert!(matches!(
        decode_reply(&out[0]).unwrap(),
        Err(MetaError::Invalid { .. })
    ));
    assert!(out[1].is_empty());
    assert_eq!(decode_reply(&out[2]).unwrap(), Ok(Reply::Unit));
}

#[test]
fn a_batch_applies_each_command_and_keeps_failures_apart() {
    let mut h = H::new();
    let now = h.now();
    let mk = |name: &str| Command::Mknod {
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
    };
    let batch = Command::Batch(vec![
        mk("a"),
        mk("a"),
        Command::Symlink {
            parent: ROOT_INO,
            name: n("l"),
            target: ByteBuf::from(b"a".to_vec()),
            caller: ME,
            now,
        },
        Command::Batch(vec![]),
    ]);
    let Ok(Reply::Batch(r)) = h.apply(batch) else {
        panic!("batch reply expected");
    };
    assert!(matches!(r[0], Ok(Reply::Attr(_))));
    assert_eq!(r[1], Err(MetaError::Exists));
    let l = r[2].clone().and_then(Reply::into_attr).unwrap();
    assert_eq!((l.kind, l.size), (FileKind::Symlink, 1));
    assert!(matches!(r[3], Err(MetaError::Invalid { .. })));
    let target = h.sm.read(|rt| queries::readlink(rt, l.ino)).unwrap();
    assert_eq!(target.as_slice(), b"a");
}

#[test]
fn a_store_locked_by_an_exiting_predecessor_opens_once_it_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("meta.redb");
    let first = crate::store::Store::open(&path, 1 << 20).expect("first open");
    let (waiting, waits) = std::sync::mpsc::channel();
    let second = std::thread::spawn({
        let path = path.clone();
        move || {
            crate::store::open_db(&path, 1 << 20, &mut || {
                let _ = waiting.send(());
            })
            .map(|_| ())
        }
    });
    // The second open meets the lock and waits; once the first is closed it gets the store.
    waits
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the second open never found the store locked");
    drop(first);
    second
        .join()
        .expect("the second open panicked")
        .expect("the second open, after the first closed");
}

#[test]
fn a_followers_deferred_applies_are_seen_by_reads_digests_and_a_reopen() {
    // Nobody told these state machines that they lead: they defer their commits.
    let mut follower = H::new();
    let mut leader = H::new();
    leader.sm.set_leading(true);
    for h in [&mut follower, &mut leader] {
        for i in 0..40 {
            h.mknod(ROOT_INO, &format!("f{i}"), FileKind::File, 0o644)
                .unwrap();
            // Every entry is visible to the next read, deferred or not.
            h.lookup(ROOT_INO, &format!("f{i}")).unwrap();
        }
    }
    assert_eq!(
        follower.sm.digest().unwrap(),
        leader.sm.digest().unwrap(),
        "same entries, same state"
    );
    follower
        .mknod(ROOT_INO, "last", FileKind::File, 0o644)
        .unwrap();
    let follower = follower.reopen();
    follower.lookup(ROOT_INO, "last").unwrap();
    follower.sm.store().flush_durable().unwrap();
    assert!(!follower.sm.store().durable_due());
}
