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
    assert_eq!(queued, vec![(c, 1)]);
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
fn a_copy_missing_on_its_server_is_dropped_with_no_deletion_order() {
    let mut h = H::new();
    let (_, locs) = file(&mut h);
    let c = locs[0].chunk;
    let loc = h
        .apply(Command::DropMissing {
            chunk: c,
            expected_version: 1,
            server: 3,
        })
        .unwrap()
        .into_chunk()
        .unwrap();
    assert_eq!((servers(&loc), loc.version), (vec![1, 2], 2));
    // Nothing to delete there: an order would remove the healer's next copy on server 3.
    assert!(h.deletions(3).is_empty());
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

/// Servers 4..=9 hold the shards of [`ec_file`].
const SHARD_SERVERS: [ServerId; 6] = [4, 5, 6, 7, 8, 9];

/// A file of 10 MiB in one chunk, converted to RS 4+2 on [`SHARD_SERVERS`].
fn ec_file(h: &mut H) -> (Attr, ChunkLoc) {
    h.register(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    let f = h.create(ROOT_INO, "cold");
    let a = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    let now = h.now();
    h.apply(Command::CommitWrite {
        ino: f.ino,
        end: 10 << 20,
        stored_delta: 30 << 20,
        now,
    })
    .unwrap();
    let plan = h
        .apply(Command::EcPrepare {
            ino: f.ino,
            index: 0,
            chunk: a.chunk,
            version: a.version,
            servers: SHARD_SERVERS.to_vec(),
        })
        .unwrap()
        .into_plan()
        .unwrap();
    let loc = h
        .apply(Command::EcCommit {
            ino: f.ino,
            index: 0,
            chunk: a.chunk,
            version: plan.loc.version,
            length: 10 << 20,
            term: plan.loc.term,
        })
        .unwrap()
        .into_chunk()
        .unwrap();
    assert!(loc.ec.is_some());
    (f, loc)
}

fn replace(
    h: &mut H,
    loc: &ChunkLoc,
    shard: ChunkId,
    server: ServerId,
    (version, term): (u64, u64),
) -> MetaResult<ChunkLoc> {
    h.apply(Command::ReplaceShard {
        chunk: loc.chunk,
        version,
        shard,
        server,
        term,
    })?
    .into_chunk()
}

fn shard_servers(l: &ChunkLoc) -> Vec<Option<ServerId>> {
    l.ec.as_ref()
        .unwrap()
        .shards
        .iter()
        .map(|s| s.replica.as_ref().map(|r| r.server))
        .collect()
}

#[test]
fn endangered_lists_ec_chunks_missing_shards_with_their_layout() {
    let mut h = H::new();
    let (_, loc) = ec_file(&mut h);
    let list = |h: &H, up: &dyn Fn(ServerId) -> bool| {
        h.sm.read(|rt| healing::endangered(rt, up, 0, 10))
            .unwrap()
            .0
    };
    assert_eq!(list(&h, &|_| true), vec![], "all 6 shards live");
    // One shard's server down: listed with every shard (the down one still named).
    let l = list(&h, &|s| s != 5);
    assert_eq!(l.len(), 1, "{l:?}");
    let e = &l[0];
    assert_eq!((e.chunk, e.version), (loc.chunk, loc.version));
    assert_eq!((e.wanted, e.bytes), (EC_SHARDS as u32, 10 << 20));
    assert_eq!(e.replicas, SHARD_SERVERS.to_vec());
    let ec = e.ec.as_ref().unwrap();
    assert_eq!(ec, loc.ec.as_ref().unwrap(), "shards with their addresses");
    assert!(ec.shards[1]
        .replica
        .as_ref()
        .unwrap()
        .data_addr
        .contains(':'));
    // A shard marked lost (failed its checksum) counts as missing with every server up.
    let lost = ec.shards[2].chunk;
    h.apply(Command::DropReplica {
        chunk: lost,
        expected_version: loc.version,
        server: 6,
    })
    .unwrap();
    let l = list(&h, &|_| true);
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!(l[0].replicas, vec![4, 5, 7, 8, 9]);
    assert_eq!(l[0].ec.as_ref().unwrap().shards[2].replica, None);
    // Fewer than 4 live: still listed, for the healer to report as lost.
    let l = list(&h, &|s| s != 4 && s != 5);
    assert_eq!(l.len(), 1);
    // A replicated chunk beside it is listed as before, without a layout.
    let g = h.create(ROOT_INO, "hot");
    let r = h.allocate(g.ino, 0, &[1, 2, 3]).unwrap();
    let l = list(&h, &|s| s != 1);
    assert_eq!(l.len(), 2, "{l:?}");
    let hot = l.iter().find(|c| c.chunk == r.chunk).unwrap();
    assert_eq!((hot.wanted, hot.ec.is_none()), (3, true));
}

#[test]
fn replace_shard_is_fenced_by_term_version_layout_and_distinct_servers() {
    let mut h = H::new();
    let (f, loc) = ec_file(&mut h);
    let v = loc.version;
    let shards = loc.ec.as_ref().unwrap().shards.clone();
    let s0 = shards[0].chunk;
    assert_eq!(
        replace(&mut h, &loc, s0, 1, (v, TERM - 1)),
        Err(MetaError::StaleTerm { current: TERM }),
        "an order of an older leader"
    );
    assert_eq!(
        replace(&mut h, &loc, s0, 1, (v + 1, TERM)),
        Err(MetaError::StaleVersion { current: v })
    );
    assert_eq!(
        replace(&mut h, &loc, s0, 5, (v, TERM)),
        Err(MetaError::Exists),
        "server 5 holds shard 1"
    );
    assert_eq!(
        replace(&mut h, &loc, 999_999, 1, (v, TERM)),
        Err(MetaError::StaleVersion { current: v }),
        "not a shard of this chunk"
    );
    // Server 4 (shard 0's) died: the rebuilt shard 0 goes to server 1, same id, no bump.
    let new = replace(&mut h, &loc, s0, 1, (v, TERM)).unwrap();
    assert_eq!((new.chunk, new.version), (loc.chunk, v));
    assert_eq!(shard_servers(&new), [1, 5, 6, 7, 8, 9].map(Some).to_vec());
    assert_eq!(new.ec.as_ref().unwrap().shards[0].chunk, s0);
    let map =
        h.sm.read(|rt| queries::chunks(rt, f.ino, 0, 1, TERM))
            .unwrap();
    assert_eq!(map[0], new, "the chunk map has it");
    assert_eq!(h.deletions(4), vec![s0], "the old copy goes if 4 returns");
    assert!(
        !h.sm
            .read(|rt| queries::inventory_deletes(rt, 1, &[(s0, v)]))
            .unwrap()
            .contains(&(s0, v)),
        "server 1 keeps it"
    );
    // A repeat finds it done.
    assert_eq!(replace(&mut h, &loc, s0, 1, (v, TERM)), Ok(new.clone()));
    let listed =
        h.sm.read(|rt| healing::endangered(rt, &|s| s != 4, 0, 10))
            .unwrap();
    assert!(listed.0.is_empty(), "healthy again: {listed:?}");

    // A lost shard rebuilt on its old server: the queued deletion there is cancelled.
    let s2 = shards[2].chunk;
    h.apply(Command::DropReplica {
        chunk: s2,
        expected_version: v,
        server: 6,
    })
    .unwrap();
    assert_eq!(h.deletions(6), vec![s2]);
    let l = replace(&mut h, &loc, s2, 6, (v, TERM)).unwrap();
    assert_eq!(shard_servers(&l)[2], Some(6));
    assert!(h.deletions(6).is_empty(), "the rebuilt shard must stay");

    // A writer turned the chunk back to replicas: a rebuild of the old layout is refused.
    let cow = h
        .apply(Command::CowPlaced {
            ino: f.ino,
            index: 0,
            chunk: loc.chunk,
            servers: vec![1, 2, 3],
        })
        .unwrap()
        .into_cow()
        .unwrap();
    h.apply(Command::CowDone {
        ino: f.ino,
        index: 0,
        chunk: cow.loc.chunk,
        failed: vec![],
    })
    .unwrap();
    let s3 = shards[3].chunk;
    let r = replace(&mut h, &loc, s3, 10, (v, TERM));
    assert!(
        matches!(
            r,
            Err(MetaError::StaleVersion { .. }) | Err(MetaError::NotFound)
        ),
        "{r:?}"
    );
}
