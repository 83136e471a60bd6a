//! Snapshots, clones and copy-on-write: chunk reference counts through the log.

use rawfs_metadata_api::*;

use super::{snapshot, H};
use crate::commands::Command;
use crate::queries;

fn chunks(h: &H, ino: Ino) -> Vec<ChunkLoc> {
    h.sm.read(|rt| queries::chunks(rt, ino, 0, 100, 3)).unwrap()
}

fn cow(h: &mut H, ino: Ino, index: u64, chunk: ChunkId) -> MetaResult<CowLoc> {
    h.apply(Command::CowChunk { ino, index, chunk })?.into_cow()
}

fn cow_done(
    h: &mut H,
    ino: Ino,
    index: u64,
    chunk: ChunkId,
    failed: &[ServerId],
) -> MetaResult<ChunkLoc> {
    h.apply(Command::CowDone {
        ino,
        index,
        chunk,
        failed: failed.to_vec(),
    })?
    .into_chunk()
}

fn all_deletions(h: &H) -> Vec<(ServerId, ChunkId)> {
    let mut out = Vec::new();
    for s in 1..=4 {
        for c in h.deletions(s) {
            out.push((s, c));
        }
    }
    out
}

/// A file of two chunks on servers 1..3, size 100 MiB.
fn file_with_two_chunks(h: &mut H) -> (Attr, Vec<ChunkLoc>) {
    h.register(&[1, 2, 3, 4]);
    let f = h.create(ROOT_INO, "f");
    let a = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    let b = h.allocate(f.ino, 1, &[1, 2, 3]).unwrap();
    let now = h.now();
    let f = h
        .apply(Command::CommitWrite {
            ino: f.ino,
            end: 100 << 20,
            stored_delta: 100 << 20,
            now,
        })
        .unwrap()
        .into_attr()
        .unwrap();
    (f, vec![a, b])
}

#[test]
fn snapshot_shares_every_chunk_and_bumps_its_version() {
    let mut h = H::new();
    let (f, locs) = file_with_two_chunks(&mut h);
    assert!(chunks(&h, f.ino).iter().all(|l| !l.shared));
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    assert_eq!(s.size, f.size);
    assert_eq!(s.perm & 0o222, 0, "a snapshot is read-only: {:o}", s.perm);
    let (fc, sc) = (chunks(&h, f.ino), chunks(&h, s.ino));
    assert_eq!(fc.len(), 2);
    for (i, loc) in locs.iter().enumerate() {
        assert_eq!(fc[i].chunk, loc.chunk, "same chunk ids");
        assert_eq!(sc[i].chunk, loc.chunk);
        assert_eq!(fc[i].version, loc.version + 1, "version bumped (fence)");
        assert_eq!(sc[i].version, fc[i].version);
        assert!(fc[i].shared && sc[i].shared);
        assert_eq!(sc[i].index, i as u64);
    }
    assert!(all_deletions(&h).is_empty());
    // Counted once in the status, not once per reference.
    let (counts, per) =
        h.sm.read(|rt| crate::erasure::chunk_counts(rt, &|_| true))
            .unwrap();
    assert_eq!(counts.replicated, 2);
    assert_eq!(per.get(&1), Some(&2));
    assert_eq!(
        h.sm.read(|rt| Ok(rt.chunk_refs.len()?)).unwrap(),
        2,
        "one extra reference per chunk"
    );
    use redb::ReadableTableMetadata;
}

#[test]
fn write_to_a_shared_chunk_copies_it_first() {
    let mut h = H::new();
    let (f, locs) = file_with_two_chunks(&mut h);
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    let old = locs[0].chunk;
    let c = cow(&mut h, f.ino, 0, old).unwrap();
    let src = c.source.expect("a copy to make");
    assert_eq!((src.chunk, src.version), (old, locs[0].version + 1));
    assert_ne!(c.loc.chunk, old);
    assert!(!c.loc.shared);
    assert_eq!(
        c.loc.replicas.iter().map(|r| r.server).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "the copy is made where the source is"
    );
    // Asked again (a retry, or another writer): the same pending copy.
    assert_eq!(cow(&mut h, f.ino, 0, old).unwrap(), c);
    // Meanwhile readers still see the source, and writers must not write it.
    let pending = &chunks(&h, f.ino)[0];
    assert_eq!(pending.chunk, old);
    assert!(pending.shared);
    // The inventory keeps both (the new one is known before any server holds it).
    let inv = [(old, 1), (c.loc.chunk, 1)];
    assert!(h
        .sm
        .read(|rt| queries::inventory_deletes(rt, 2, &inv))
        .unwrap()
        .is_empty());
    let done = cow_done(&mut h, f.ino, 0, c.loc.chunk, &[]).unwrap();
    assert_eq!(done.chunk, c.loc.chunk);
    assert!(!done.shared);
    let fc = chunks(&h, f.ino);
    assert_eq!(fc[0].chunk, c.loc.chunk);
    assert!(!fc[0].shared, "private now");
    assert!(fc[1].shared, "the other chunk is still shared");
    let sc = chunks(&h, s.ino);
    assert_eq!(sc[0].chunk, old, "the snapshot keeps the old data");
    assert!(sc[0].shared, "a snapshot is never written in place");
    // The old chunk is the snapshot's alone now, and still alive.
    assert!(all_deletions(&h).is_empty());
    assert_eq!(
        h.sm.read(|rt| queries::chunk_by_id(rt, old))
            .unwrap()
            .map(|r| r.chunk),
        Some(old)
    );
    // A not-shared chunk needs no copy.
    let again = cow(&mut h, f.ino, 0, c.loc.chunk).unwrap();
    assert!(again.source.is_none());
    assert_eq!(again.loc.chunk, c.loc.chunk);
}

#[test]
fn a_failed_replica_copy_is_dropped() {
    let mut h = H::new();
    let (f, locs) = file_with_two_chunks(&mut h);
    snapshot(&mut h, f.ino, "s", true).unwrap();
    let c = cow(&mut h, f.ino, 1, locs[1].chunk).unwrap();
    assert!(cow_done(&mut h, f.ino, 1, c.loc.chunk, &[1, 2, 3]).is_err());
    let done = cow_done(&mut h, f.ino, 1, c.loc.chunk, &[2]).unwrap();
    assert_eq!(
        done.replicas.iter().map(|r| r.server).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(done.version, c.loc.version + 1, "a dropped copy is stale");
    assert_eq!(h.deletions(2), vec![c.loc.chunk]);
}

#[test]
fn a_snapshot_refuses_every_change_to_its_data() {
    let mut h = H::new();
    let (f, locs) = file_with_two_chunks(&mut h);
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    let refused = Err(MetaError::NotPermitted);
    assert_eq!(h.allocate(s.ino, 5, &[1, 2, 3]).map(|_| ()), refused);
    assert_eq!(cow(&mut h, s.ino, 0, locs[0].chunk).map(|_| ()), refused);
    let now = h.now();
    assert_eq!(
        h.apply(Command::CommitWrite {
            ino: s.ino,
            end: 1 << 30,
            stored_delta: 0,
            now
        })
        .map(|_| ()),
        refused
    );
    assert_eq!(
        h.apply(Command::ReleaseChunks {
            ino: s.ino,
            first: 0,
            count: 1,
            now
        })
        .map(|_| ()),
        refused
    );
    let shrink = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    assert_eq!(
        h.apply(Command::SetAttr {
            ino: s.ino,
            set: shrink,
            now
        })
        .map(|_| ()),
        refused
    );
    // Other attributes may change; the same size is not a change.
    let same = SetAttr {
        size: Some(s.size),
        mtime: Some(TimeSet::Now),
        ..SetAttr::default()
    };
    h.apply(Command::SetAttr {
        ino: s.ino,
        set: same,
        now,
    })
    .unwrap();
    assert_eq!(chunks(&h, s.ino).len(), 2);
}

#[test]
fn deleting_the_origin_keeps_the_snapshot_and_the_last_reference_frees_the_data() {
    let mut h = H::new();
    let (f, locs) = file_with_two_chunks(&mut h);
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    // The origin writes chunk 0 (a private copy); then it is deleted.
    let c = cow(&mut h, f.ino, 0, locs[0].chunk).unwrap();
    cow_done(&mut h, f.ino, 0, c.loc.chunk, &[]).unwrap();
    h.unlink(ROOT_INO, "f").unwrap();
    let mut gone = all_deletions(&h);
    gone.sort_unstable();
    assert_eq!(
        gone,
        vec![(1, c.loc.chunk), (2, c.loc.chunk), (3, c.loc.chunk)],
        "only the origin's private copy goes"
    );
    let sc = chunks(&h, s.ino);
    assert_eq!(
        sc.iter().map(|l| l.chunk).collect::<Vec<_>>(),
        vec![locs[0].chunk, locs[1].chunk]
    );
    // The snapshot owns its chunks now: the inventory keeps them, drops still work.
    for l in &sc {
        let rec = h.sm.read(|rt| queries::chunk_by_id(rt, l.chunk)).unwrap();
        assert_eq!(rec.map(|r| r.servers), Some(vec![1, 2, 3]));
    }
    let dropped = h
        .apply(Command::DropReplica {
            chunk: sc[1].chunk,
            expected_version: sc[1].version,
            server: 3,
        })
        .unwrap()
        .into_chunk()
        .unwrap();
    assert_eq!(dropped.replicas.len(), 2);
    assert_eq!(chunks(&h, s.ino)[1].version, sc[1].version + 1);
    // The last reference: now the shared data goes.
    h.unlink(ROOT_INO, "s").unwrap();
    let mut gone = all_deletions(&h);
    gone.sort_unstable();
    let mut want = vec![
        (1, c.loc.chunk),
        (2, c.loc.chunk),
        (3, c.loc.chunk),
        (1, locs[0].chunk),
        (2, locs[0].chunk),
        (3, locs[0].chunk),
        (1, locs[1].chunk),
        (2, locs[1].chunk),
        (3, locs[1].chunk),
    ];
    want.sort_unstable();
    assert_eq!(gone, want);
    assert_eq!(h.sm.read(|rt| Ok(rt.chunk_owner.len()?)).unwrap(), 0);
    assert_eq!(h.sm.read(|rt| Ok(rt.chunk_refs.len()?)).unwrap(), 0);
    use redb::ReadableTableMetadata;
}

#[test]
fn a_clone_is_writable_and_independent_and_truncate_releases_references() {
    let mut h = H::new();
    let (f, locs) = file_with_two_chunks(&mut h);
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    let c = snapshot(&mut h, s.ino, "c", false).unwrap();
    assert_ne!(c.perm & 0o200, 0, "a clone is writable: {:o}", c.perm);
    let cc = chunks(&h, c.ino);
    assert!(cc.iter().all(|l| l.shared));
    // Three references each; the clone copies chunk 1 when it writes there.
    let w = cow(&mut h, c.ino, 1, locs[1].chunk).unwrap();
    let w = cow_done(&mut h, c.ino, 1, w.loc.chunk, &[]).unwrap();
    assert!(!w.shared);
    assert_eq!(
        chunks(&h, f.ino)[1].chunk,
        locs[1].chunk,
        "origin unchanged"
    );
    assert_eq!(
        chunks(&h, s.ino)[1].chunk,
        locs[1].chunk,
        "snapshot unchanged"
    );
    // Truncating the clone to nothing releases its references only.
    let now = h.now();
    let zero = SetAttr {
        size: Some(0),
        ..SetAttr::default()
    };
    h.apply(Command::SetAttr {
        ino: c.ino,
        set: zero,
        now,
    })
    .unwrap();
    assert!(chunks(&h, c.ino).is_empty());
    let gone = all_deletions(&h);
    assert!(
        gone.iter().all(|(_, chunk)| *chunk == w.chunk) && gone.len() == 3,
        "only the clone's private chunk goes: {gone:?}"
    );
    // A pending copy holds its source: deleting the file in the middle releases both.
    let p = cow(&mut h, f.ino, 0, locs[0].chunk).unwrap();
    h.unlink(ROOT_INO, "s").unwrap();
    h.unlink(ROOT_INO, "f").unwrap();
    let gone = all_deletions(&h);
    for chunk in [p.loc.chunk, locs[0].chunk, locs[1].chunk] {
        assert_eq!(
            gone.iter().filter(|(_, c)| *c == chunk).count(),
            3,
            "{chunk} released: {gone:?}"
        );
    }
}

#[test]
fn references_survive_a_state_snapshot_and_reopen() {
    let mut h = H::new();
    let (f, _) = file_with_two_chunks(&mut h);
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    let image = rawfs_replication::StateMachine::snapshot(&h.sm).unwrap();
    let before = h.sm.digest().unwrap().1;
    let mut h = h.reopen();
    rawfs_replication::StateMachine::restore(&h.sm, &image).unwrap();
    assert_eq!(h.sm.digest().unwrap().1, before);
    h.unlink(ROOT_INO, "f").unwrap();
    assert!(
        all_deletions(&h).is_empty(),
        "the snapshot still holds them"
    );
    assert_eq!(chunks(&h, s.ino).len(), 2);
}
