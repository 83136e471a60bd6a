//! `cold` files written as RS 4+2 directly (`ec_write.rs`): chunks allocated erasure coded,
//! appends committed by `EcExtend` and fenced by everything that could move under them.

use rawfs_metadata_api::*;

use super::{snapshot, H};
use crate::commands::Command;
use crate::queries;

/// The term `H::apply` stamps on every entry.
const TERM: u64 = 3;
const SHARD_SERVERS: [ServerId; 6] = [4, 5, 6, 7, 8, 9];
const MIB: u64 = 1 << 20;

fn setup() -> H {
    let mut h = H::new();
    h.register(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    h
}

fn allocate_ec(h: &mut H, ino: Ino, servers: &[ServerId]) -> MetaResult<ChunkLoc> {
    h.apply(Command::AllocateEc {
        ino,
        index: 0,
        servers: servers.to_vec(),
    })?
    .into_chunk()
}

fn shards(loc: &ChunkLoc) -> Vec<(ChunkId, ServerId)> {
    loc.ec
        .as_ref()
        .unwrap()
        .shards
        .iter()
        .map(|s| (s.chunk, s.replica.as_ref().map_or(0, |r| r.server)))
        .collect()
}

fn extend(h: &mut H, ino: Ino, loc: &ChunkLoc, from: u64, to: u64) -> MetaResult<ChunkLoc> {
    extend_with(h, ino, loc, shards(loc), (from, to))
}

fn extend_with(
    h: &mut H,
    ino: Ino,
    loc: &ChunkLoc,
    shards: Vec<(ChunkId, ServerId)>,
    (from, to): (u64, u64),
) -> MetaResult<ChunkLoc> {
    h.apply(Command::EcExtend {
        ino,
        index: 0,
        chunk: loc.chunk,
        version: loc.version,
        shards,
        from,
        to,
    })?
    .into_chunk()
}

fn chunk0(h: &H, ino: Ino) -> ChunkLoc {
    let mut v =
        h.sm.read(|rt| queries::chunks(rt, ino, 0, 1, TERM))
            .unwrap();
    v.remove(0)
}

fn is_stale<T: std::fmt::Debug>(r: MetaResult<T>) -> bool {
    matches!(r, Err(MetaError::StaleVersion { .. }))
}

#[test]
fn a_cold_chunk_starts_empty_on_six_servers_and_appends_bump_its_version() {
    let mut h = setup();
    let f = h.create(ROOT_INO, "f");
    let loc = allocate_ec(&mut h, f.ino, &SHARD_SERVERS).unwrap();
    let ec = loc.ec.as_ref().expect("erasure coded");
    assert_eq!(ec.length, 0);
    assert!(loc.replicas.is_empty() && loc.shared);
    let listed = shards(&loc);
    assert_eq!(
        listed.iter().map(|s| s.1).collect::<Vec<_>>(),
        SHARD_SERVERS
    );
    assert!(listed.iter().all(|s| s.0 > loc.chunk), "fresh shard ids");
    // Every shard is known: an inventory keeps it on its server.
    for &(id, server) in &listed {
        let drops =
            h.sm.read(|rt| queries::inventory_deletes(rt, server, &[(id, 1)]))
                .unwrap();
        assert!(drops.is_empty(), "shard {id} kept on {server}");
    }
    // Allocating again returns the same chunk.
    assert_eq!(allocate_ec(&mut h, f.ino, &SHARD_SERVERS).unwrap(), loc);

    let a = extend(&mut h, f.ino, &loc, 0, 8 * MIB).unwrap();
    assert_eq!(a.ec.as_ref().unwrap().length, 8 * MIB);
    assert_eq!((a.chunk, a.version), (loc.chunk, loc.version + 1));
    assert_eq!(chunk0(&h, f.ino), a);
    let b = extend(&mut h, f.ino, &a, 8 * MIB, 9 * MIB + 3).unwrap();
    assert_eq!(b.ec.as_ref().unwrap().length, 9 * MIB + 3);

    // Fenced: an old version, another start, other shards, past the chunk.
    assert!(is_stale(extend(&mut h, f.ino, &a, 9 * MIB + 3, 10 * MIB)));
    assert!(is_stale(extend(&mut h, f.ino, &b, 8 * MIB, 10 * MIB)));
    let mut moved = shards(&b);
    moved[2].1 = 1;
    assert!(is_stale(extend_with(
        &mut h,
        f.ino,
        &b,
        moved,
        (9 * MIB + 3, 10 * MIB)
    )));
    assert!(matches!(
        extend(&mut h, f.ino, &b, 9 * MIB + 3, CHUNK_SIZE + 1),
        Err(MetaError::Invalid { .. })
    ));
    // The length ends inside a stripe: no more appends (the writer copies it to replicas).
    assert!(matches!(
        extend(&mut h, f.ino, &b, 9 * MIB + 3, 10 * MIB),
        Err(MetaError::Invalid { .. })
    ));
    assert_eq!(chunk0(&h, f.ino), b, "refusals change nothing");
}

#[test]
fn fewer_than_six_distinct_servers_are_refused() {
    let mut h = setup();
    let f = h.create(ROOT_INO, "f");
    assert!(matches!(
        allocate_ec(&mut h, f.ino, &[4, 5, 6, 7, 8]),
        Err(MetaError::NoSpace { .. })
    ));
    assert!(matches!(
        allocate_ec(&mut h, f.ino, &[4, 5, 6, 7, 8, 8]),
        Err(MetaError::NoSpace { .. })
    ));
    assert!(h
        .sm
        .read(|rt| queries::chunks(rt, f.ino, 0, 1, TERM))
        .unwrap()
        .is_empty());
}

#[test]
fn no_append_to_a_shared_chunk_or_past_a_lost_shard() {
    let mut h = setup();
    let f = h.create(ROOT_INO, "f");
    let loc = allocate_ec(&mut h, f.ino, &SHARD_SERVERS).unwrap();
    let loc = extend(&mut h, f.ino, &loc, 0, 4 * MIB).unwrap();
    // A snapshot shares the chunk as it is: an append must not reach it.
    snapshot(&mut h, f.ino, "snap", true).unwrap();
    assert!(matches!(
        extend(&mut h, f.ino, &loc, 4 * MIB, 8 * MIB),
        Err(MetaError::Invalid { .. })
    ));

    let g = h.create(ROOT_INO, "g");
    let loc = allocate_ec(&mut h, g.ino, &SHARD_SERVERS).unwrap();
    let loc = extend(&mut h, g.ino, &loc, 0, 4 * MIB).unwrap();
    let (lost, server) = shards(&loc)[3];
    h.apply(Command::DropReplica {
        chunk: lost,
        expected_version: loc.version,
        server,
    })
    .unwrap();
    assert!(is_stale(extend(&mut h, g.ino, &loc, 4 * MIB, 8 * MIB)));
}

#[test]
fn a_shard_rebuilt_from_before_an_append_cannot_commit() {
    let mut h = setup();
    let f = h.create(ROOT_INO, "f");
    let loc = allocate_ec(&mut h, f.ino, &SHARD_SERVERS).unwrap();
    let before = extend(&mut h, f.ino, &loc, 0, 4 * MIB).unwrap();
    // The healer reads the chunk at `before` to move shard 0 to server 1; an append commits.
    let after = extend(&mut h, f.ino, &before, 4 * MIB, 8 * MIB).unwrap();
    let (shard, _) = shards(&before)[0];
    let replace = |h: &mut H, version| {
        h.apply(Command::ReplaceShard {
            chunk: before.chunk,
            version,
            shard,
            server: 1,
            term: TERM,
        })
    };
    assert!(is_stale(replace(&mut h, before.version)));
    assert_eq!(chunk0(&h, f.ino), after);
    // One that read after the append commits, and then an append to the old server is refused.
    replace(&mut h, after.version).unwrap();
    assert!(is_stale(extend(&mut h, f.ino, &after, 8 * MIB, 12 * MIB)));
}

#[test]
fn deleting_a_cold_file_queues_every_shard_for_deletion() {
    let mut h = setup();
    let f = h.create(ROOT_INO, "f");
    let loc = allocate_ec(&mut h, f.ino, &SHARD_SERVERS).unwrap();
    let loc = extend(&mut h, f.ino, &loc, 0, MIB).unwrap();
    h.unlink(ROOT_INO, "f").unwrap();
    for (id, server) in shards(&loc) {
        assert!(h.deletions(server).contains(&id), "shard {id} on {server}");
    }
}
