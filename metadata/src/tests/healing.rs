//! The healer's commands: new copies committed fenced by version and term, and the scan of
//! endangered chunks.

use rawfs_metadata_api::*;

use super::{snapshot, H};
use crate::commands::Command;
use crate::healing;
use crate::queries;

/// The term `H::apply` stamps on every entry.
const TERM: u64 = 3;

fn add(
    h: &mut H,
    chunk: ChunkId,
    version: u64,
    server: ServerId,
    term: u64,
) -> MetaResult<ChunkLoc> {
    h.apply(Command::AddReplica {
        chunk,
        version,
        server,
        term,
    })?
    .into_chunk()
}

fn servers(l: &ChunkLoc) -> Vec<ServerId> {
    l.replicas.iter().map(|r| r.server).collect()
}

/// A file of 100 MiB: two chunks on servers 1..3.
fn file(h: &mut H) -> (Attr, Vec<ChunkLoc>) {
    h.register(&[1, 2, 3, 4, 5]);
    let f = h.create(ROOT_INO, "f");
    let a = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    let b = h.allocate(f.ino, 1, &[1, 2, 3]).unwrap();
    let now = h.now();
    h.apply(Command::CommitWrite {
        ino: f.ino,
        end: 100 << 20,
        stored_delta: 100 << 20,
        now,
    })
    .unwrap();
    (f, vec![a, b])
}

#[test]
fn add_replica_is_fenced_by_version_term_and_holders() {
    let mut h = H::new();
    let (f, locs) = file(&mut h);
    let c = locs[0].chunk;
    assert_eq!(
        add(&mut h, c, 7, 4, TERM),
        Err(MetaError::StaleVersion { current: 1 }),
        "version moved meanwhile"
    );
    assert_eq!(
        add(&mut h, c, 1, 2, TERM),
        Err(MetaError::Exists),
        "already a holder"
    );
    assert_eq!(
        add(&mut h, c, 1, 4, TERM - 1),
        Err(MetaError::StaleTerm { current: TERM }),
        "an order of an older leader"
    );
    assert_eq!(add(&mut h, 999_999, 1, 4, TERM), Err(MetaError::NotFound));
    let loc = add(&mut h, c, 1, 4, TERM).unwrap();
    assert_eq!((loc.version, servers(&loc)), (2, vec![1, 2, 3, 4]));
    let now =
        h.sm.read(|rt| queries::chunks(rt, f.ino, 0, 1, TERM))
            .unwrap();
    assert_eq!(now[0], loc, "the chunk map has it");
    // A repeat (a second healer, or a retry without the request id) is refused.
    assert_eq!(
        add(&mut h, c, 1, 4, TERM),
        Err(MetaError::StaleVersion { current: 2 })
    );
    assert_eq!(add(&mut h, c, 2, 4, TERM), Err(MetaError::Exists));
    // The other chunk is untouched.
    let other =
        h.sm.read(|rt| queries::chunks(rt, f.ino, 1, 1, TERM))
            .unwrap();
    assert_eq!((other[0].version, servers(&other[0])), (1, vec![1, 2, 3]));
}

#[test]
fn a_queued_deletion_of_the_new_copy_is_cancelled() {
    let mut h = H::new();
    let (_, locs) = file(&mut h);
    let c = locs[0].chunk;
    // Server 4 reported the half-written copy in an inventory: it was queued for deletion.
    let queued =
        h.sm.read(|rt| queries::inventory_deletes(rt, 4, &[(c, 1)]))
            .unwrap();
    assert_eq!(queued, vec![c]);
    h.apply(Command::DropReplica {
        chunk: c,
        expected_version: 1,
        server: 3,
    })
    .unwrap();
    assert_eq!(h.deletions(3), vec![c]);
    let loc = add(&mut h, c, 2, 3, TERM).unwrap();
    assert_eq!(servers(&loc), vec![1, 2, 3]);
    assert!(
        h.deletions(3).is_empty(),
        "the new copy must not be deleted"
    );
}

#[test]
fn shared_chunks_change_in_every_reference() {
    let mut h = H::new();
    let (f, locs) = file(&mut h);
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    let c = locs[1].chunk;
    // The snapshot bumped every version.
    let loc = add(&mut h, c, 2, 5, TERM).unwrap();
    assert_eq!(loc.version, 3);
    for ino in [f.ino, s.ino] {
        let l =
            h.sm.read(|rt| queries::chunks(rt, ino, 1, 1, TERM))
                .unwrap();
        assert_eq!((l[0].chunk, l[0].version), (c, 3), "ino {ino}");
        assert_eq!(servers(&l[0]), vec![1, 2, 3, 5], "ino {ino}");
    }
}

#[test]
fn endangered_lists_chunks_below_their_copies_once_paged() {
    let mut h = H::new();
    let (f, locs) = file(&mut h);
    snapshot(&mut h, f.ino, "s", true).unwrap();
    let all_up = |_| true;
    let none =
        h.sm.read(|rt| healing::endangered(rt, &all_up, 0, 10))
            .unwrap();
    assert_eq!(none, (vec![], None));
    let two_down = |s| s != 1 && s != 2;
    let (list, next) =
        h.sm.read(|rt| healing::endangered(rt, &two_down, 0, 10))
            .unwrap();
    assert_eq!(next, None);
    // Counted once despite the snapshot; the second chunk holds the last 36 MiB.
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0].chunk, locs[0].chunk);
    assert_eq!(list[0].bytes, CHUNK_SIZE);
    assert_eq!(list[1].bytes, (100 << 20) - CHUNK_SIZE);
    assert_eq!(list[1].replicas, vec![1, 2, 3]);
    assert_eq!(list[1].version, 2);
    assert_eq!(list[1].wanted, 3);
    // Paged.
    let (p1, next) =
        h.sm.read(|rt| healing::endangered(rt, &two_down, 0, 1))
            .unwrap();
    assert_eq!((p1.len(), next), (1, Some(locs[0].chunk)));
    let (p2, next) =
        h.sm.read(|rt| healing::endangered(rt, &two_down, locs[0].chunk, 1))
            .unwrap();
    assert_eq!((p2[0].chunk, next), (locs[1].chunk, None));
}
