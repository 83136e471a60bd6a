//! Erasure coding: conversions fenced by version and term, writes that cancel them or copy
//! out of an erasure-coded chunk, shards released with their chunk, and the status.

use rawfs_metadata_api::*;
use rawfs_replication::StateMachine;

use super::{open_sm, snapshot, H};
use crate::commands::Command;
use crate::{erasure, healing, queries};

/// The term `H::apply` stamps on every entry.
const TERM: u64 = 3;
/// Servers 4..=9 hold the shards in these tests.
const SHARD_SERVERS: [ServerId; 6] = [4, 5, 6, 7, 8, 9];

fn prepare(
    h: &mut H,
    ino: Ino,
    chunk: ChunkId,
    version: u64,
    servers: &[ServerId],
) -> MetaResult<EcPlan> {
    h.apply(Command::EcPrepare {
        ino,
        index: 0,
        chunk,
        version,
        servers: servers.to_vec(),
    })?
    .into_plan()
}

fn commit(h: &mut H, ino: Ino, chunk: ChunkId, version: u64, term: u64) -> MetaResult<ChunkLoc> {
    h.apply(Command::EcCommit {
        ino,
        index: 0,
        chunk,
        version,
        length: 10 << 20,
        term,
    })?
    .into_chunk()
}

fn cow(h: &mut H, ino: Ino, chunk: ChunkId) -> MetaResult<CowLoc> {
    h.apply(Command::CowChunk {
        ino,
        index: 0,
        chunk,
    })?
    .into_cow()
}

fn chunk0(h: &H, ino: Ino) -> ChunkLoc {
    let mut v =
        h.sm.read(|rt| queries::chunks(rt, ino, 0, 1, TERM))
            .unwrap();
    assert_eq!(v.len(), 1, "chunk 0 of {ino}");
    v.remove(0)
}

fn all_deletions(h: &H) -> Vec<(ServerId, ChunkId)> {
    let mut out = Vec::new();
    for s in 1..=9 {
        for c in h.deletions(s) {
            out.push((s, c));
        }
    }
    out.sort_unstable();
    out
}

/// What an inventory of `server` naming `chunk` would have it delete.
fn inventory_drops(h: &H, server: ServerId, chunk: ChunkId) -> bool {
    let out =
        h.sm.read(|rt| queries::inventory_deletes(rt, server, &[(chunk, 1)]))
            .unwrap();
    out.contains(&(chunk, 1))
}

fn shard_ids(shards: &[Shard]) -> Vec<ChunkId> {
    shards.iter().map(|s| s.chunk).collect()
}

fn shard_pairs(shards: &[Shard]) -> Vec<(ServerId, ChunkId)> {
    let mut v: Vec<_> = shards
        .iter()
        .map(|s| (s.replica.as_ref().unwrap().server, s.chunk))
        .collect();
    v.sort_unstable();
    v
}

/// A file named `name` of 10 MiB in one chunk on servers 1..3.
fn file(h: &mut H, name: &str) -> (Attr, ChunkLoc) {
    let f = h.create(ROOT_INO, name);
    let a = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    let now = h.now();
    h.apply(Command::CommitWrite {
        ino: f.ino,
        end: 10 << 20,
        stored_delta: 30 << 20,
        now,
    })
    .unwrap();
    (f, a)
}

/// `file` converted to RS 4+2 on [`SHARD_SERVERS`]: returns the file and its EC location.
fn ec_file(h: &mut H, name: &str) -> (Attr, ChunkLoc) {
    let (f, a) = file(h, name);
    let plan = prepare(h, f.ino, a.chunk, a.version, &SHARD_SERVERS).unwrap();
    let loc = commit(h, f.ino, a.chunk, plan.loc.version, plan.loc.term).unwrap();
    (f, loc)
}

fn setup() -> H {
    let mut h = H::new();
    h.register(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    h
}

#[test]
fn prepare_then_commit_makes_the_chunk_erasure_coded() {
    let mut h = setup();
    let (f, a) = file(&mut h, "f");
    let plan = prepare(&mut h, f.ino, a.chunk, 1, &SHARD_SERVERS).unwrap();
    assert_eq!(plan.loc.chunk, a.chunk);
    assert_eq!(plan.loc.version, 2, "version bumped: fence the replicas");
    assert_eq!(plan.loc.term, TERM);
    assert!(plan.loc.shared && plan.loc.ec.is_none());
    let ids = shard_ids(&plan.shards);
    assert_eq!(ids.len(), EC_SHARDS);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]) && ids[0] > a.chunk,
        "{ids:?}"
    );
    for (s, want) in plan.shards.iter().zip(SHARD_SERVERS) {
        let r = s.replica.as_ref().unwrap();
        assert_eq!(r.server, want);
        assert_eq!(r.data_addr, format!("127.0.0.1:{}", 9000 + want));
    }
    // Writers see a converting chunk as shared; readers still read the replicas.
    let seen = chunk0(&h, f.ino);
    assert!(seen.shared && seen.ec.is_none() && seen.replicas.len() == 3);
    // Reserved shards are kept on their own server only.
    assert!(!inventory_drops(&h, 4, ids[0]));
    assert!(inventory_drops(&h, 5, ids[0]));

    let loc = commit(&mut h, f.ino, a.chunk, 2, TERM).unwrap();
    let ec = loc.ec.clone().expect("erasure coded");
    assert_eq!(ec.length, 10 << 20);
    assert_eq!(ec.shards, plan.shards);
    assert!(loc.replicas.is_empty() && loc.shared);
    assert_eq!((loc.chunk, loc.version), (a.chunk, 2));
    assert_eq!(chunk0(&h, f.ino), loc);
    assert_eq!(
        all_deletions(&h),
        vec![(1, a.chunk), (2, a.chunk), (3, a.chunk)],
        "old replicas queued, no shard"
    );
    for (i, &id) in ids.iter().enumerate() {
        assert!(!inventory_drops(&h, SHARD_SERVERS[i], id), "shard {i} kept");
        assert!(inventory_drops(&h, 1, id), "shard {i} is not server 1's");
    }
    assert!(inventory_drops(&h, 1, a.chunk), "an old replica goes");
    // Not the healer's business (it lists replicated chunks).
    let (listed, _) =
        h.sm.read(|rt| healing::endangered(rt, &|_| true, 0, 100))
            .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    // A repeat under another request id finds it done.
    assert_eq!(commit(&mut h, f.ino, a.chunk, 2, TERM), Ok(loc));
    assert!(
        prepare(&mut h, f.ino, a.chunk, 2, &SHARD_SERVERS).is_err(),
        "erasure coded already"
    );
}

#[test]
fn a_repeated_prepare_request_gets_the_same_plan() {
    let mut h = setup();
    let (f, a) = file(&mut h, "f");
    let req = ReqId { client: 9, seq: 1 };
    let now = h.now();
    let cmd = Command::Tracked {
        req,
        now,
        cmd: Box::new(Command::EcPrepare {
            ino: f.ino,
            index: 0,
            chunk: a.chunk,
            version: 1,
            servers: SHARD_SERVERS.to_vec(),
        }),
    };
    let first = h.apply(cmd.clone()).unwrap().into_plan().unwrap();
    let again = h.apply(cmd).unwrap().into_plan().unwrap();
    assert_eq!(first, again);
    assert_eq!(chunk0(&h, f.ino).version, 2, "applied once");
}

#[test]
fn stale_versions_terms_and_unfit_chunks_are_refused() {
    let mut h = setup();
    let (f, a) = file(&mut h, "f");
    assert_eq!(
        prepare(&mut h, f.ino, a.chunk, 7, &SHARD_SERVERS),
        Err(MetaError::StaleVersion { current: 1 })
    );
    assert_eq!(
        prepare(&mut h, f.ino, a.chunk + 100, 1, &SHARD_SERVERS),
        Err(MetaError::StaleVersion { current: 1 }),
        "another chunk there"
    );
    assert!(matches!(
        prepare(&mut h, f.ino, a.chunk, 1, &SHARD_SERVERS[..5]),
        Err(MetaError::NoSpace { .. })
    ));
    assert!(matches!(
        prepare(&mut h, f.ino, a.chunk, 1, &[4, 5, 6, 7, 8, 8]),
        Err(MetaError::NoSpace { .. })
    ));
    let g = h.create(ROOT_INO, "g");
    assert_eq!(
        prepare(&mut h, g.ino, 1, 1, &SHARD_SERVERS),
        Err(MetaError::NotFound)
    );
    assert_eq!(chunk0(&h, f.ino).version, 1, "refusals change nothing");

    let plan = prepare(&mut h, f.ino, a.chunk, 1, &SHARD_SERVERS).unwrap();
    assert_eq!(
        commit(&mut h, f.ino, a.chunk, 1, TERM),
        Err(MetaError::StaleVersion { current: 2 })
    );
    assert_eq!(
        commit(&mut h, f.ino, a.chunk, 2, TERM - 1),
        Err(MetaError::StaleTerm { current: TERM }),
        "a plan of another term"
    );
    assert!(h
        .apply(Command::EcCommit {
            ino: f.ino,
            index: 0,
            chunk: a.chunk,
            version: 2,
            length: CHUNK_SIZE + 1,
            term: TERM,
        })
        .is_err());
    // A second prepare replaces the first plan: its shards go, its commit is refused.
    let plan2 = prepare(&mut h, f.ino, a.chunk, 2, &SHARD_SERVERS).unwrap();
    let mut gone = shard_pairs(&plan.shards);
    gone.sort_unstable();
    assert_eq!(all_deletions(&h), gone);
    assert_eq!(
        commit(&mut h, f.ino, a.chunk, 2, TERM),
        Err(MetaError::StaleVersion { current: 3 })
    );
    assert!(commit(&mut h, f.ino, a.chunk, plan2.loc.version, TERM).is_ok());

    // A chunk shared with a snapshot is not converted.
    let (s, b) = file(&mut h, "s");
    snapshot(&mut h, s.ino, "s.snap", true).unwrap();
    assert!(matches!(
        prepare(&mut h, s.ino, b.chunk, 2, &SHARD_SERVERS),
        Err(MetaError::Invalid { .. })
    ));
}

#[test]
fn a_snapshot_cancels_a_conversion() {
    let mut h = setup();
    let (f, a) = file(&mut h, "f");
    let plan = prepare(&mut h, f.ino, a.chunk, 1, &SHARD_SERVERS).unwrap();
    snapshot(&mut h, f.ino, "snap", true).unwrap();
    assert_eq!(all_deletions(&h), shard_pairs(&plan.shards));
    assert_eq!(
        commit(&mut h, f.ino, a.chunk, 2, TERM),
        Err(MetaError::StaleVersion { current: 3 })
    );
    assert!(inventory_drops(&h, 4, plan.shards[0].chunk));
}

#[test]
fn a_write_during_a_conversion_cancels_it() {
    let mut h = setup();
    let (f, a) = file(&mut h, "f");
    let plan = prepare(&mut h, f.ino, a.chunk, 1, &SHARD_SERVERS).unwrap();
    let c = cow(&mut h, f.ino, a.chunk).unwrap();
    assert_eq!((c.loc.chunk, c.loc.version), (a.chunk, 3), "bumped again");
    assert!(!c.loc.shared && c.source.is_none() && c.from_ec.is_none());
    assert_eq!(c.loc.replicas.len(), 3);
    assert_eq!(all_deletions(&h), shard_pairs(&plan.shards));
    assert_eq!(
        commit(&mut h, f.ino, a.chunk, 2, TERM),
        Err(MetaError::StaleVersion { current: 3 })
    );
    assert_eq!(chunk0(&h, f.ino), c.loc);
    assert!(inventory_drops(&h, 4, plan.shards[0].chunk));
    assert!(!inventory_drops(&h, 1, a.chunk), "the replicas stay");
}

#[test]
fn a_write_to_an_erasure_coded_chunk_copies_it_out() {
    let mut h = setup();
    let (f, ec) = ec_file(&mut h, "f");
    let shards = ec.ec.clone().unwrap().shards;
    let before = all_deletions(&h);
    let c = h
        .apply(Command::CowPlaced {
            ino: f.ino,
            index: 0,
            chunk: ec.chunk,
            servers: vec![1, 2, 3],
        })
        .unwrap()
        .into_cow()
        .unwrap();
    assert_ne!(c.loc.chunk, ec.chunk);
    assert!(!c.loc.shared && c.loc.ec.is_none() && c.source.is_none());
    let servers: Vec<_> = c.loc.replicas.iter().map(|r| r.server).collect();
    assert_eq!(servers, vec![1, 2, 3]);
    assert_eq!(c.from_ec.as_ref(), Some(&ec), "decode this");
    // Repeats (without placement too) get the same answer; readers keep the EC chunk.
    assert_eq!(cow(&mut h, f.ino, ec.chunk), Ok(c.clone()));
    assert_eq!(chunk0(&h, f.ino), ec);
    assert!(!inventory_drops(&h, 1, c.loc.chunk));
    assert!(!inventory_drops(&h, 4, shards[0].chunk));
    assert_eq!(all_deletions(&h), before);

    let done = h
        .apply(Command::CowDone {
            ino: f.ino,
            index: 0,
            chunk: c.loc.chunk,
            failed: vec![],
        })
        .unwrap()
        .into_chunk()
        .unwrap();
    assert_eq!(done.chunk, c.loc.chunk);
    assert!(done.ec.is_none() && !done.shared && done.replicas.len() == 3);
    assert_eq!(chunk0(&h, f.ino), done);
    let mut want = before;
    want.extend(shard_pairs(&shards));
    want.sort_unstable();
    assert_eq!(all_deletions(&h), want, "every shard queued");
    assert!(inventory_drops(&h, 4, shards[0].chunk));
}

#[test]
fn a_copy_out_without_placement_goes_to_shard_servers() {
    let mut h = setup();
    let (f, ec) = ec_file(&mut h, "f");
    let c = cow(&mut h, f.ino, ec.chunk).unwrap();
    assert_eq!(c.loc.replicas.len(), 3);
    for r in &c.loc.replicas {
        assert!(SHARD_SERVERS.contains(&r.server), "{r:?}");
    }
    assert_eq!(c.from_ec, Some(ec));
}

#[test]
fn unlink_and_truncate_release_every_shard() {
    let mut h = setup();
    let (f, ec) = ec_file(&mut h, "f");
    let shards = ec.ec.unwrap().shards;
    let olds = all_deletions(&h);
    h.unlink(ROOT_INO, "f").unwrap();
    let mut want = olds.clone();
    want.extend(shard_pairs(&shards));
    want.sort_unstable();
    assert_eq!(all_deletions(&h), want);
    assert!(inventory_drops(&h, 4, shards[0].chunk));
    assert!(h.getattr(f.ino).is_err());

    // Truncation releases a converting chunk's reserved shards.
    let (g, b) = file(&mut h, "g");
    let plan = prepare(&mut h, g.ino, b.chunk, 1, &SHARD_SERVERS).unwrap();
    let now = h.now();
    h.apply(Command::SetAttr {
        ino: g.ino,
        set: SetAttr {
            size: Some(0),
            ..SetAttr::default()
        },
        now,
    })
    .unwrap();
    let mut want2 = want.clone();
    want2.extend(shard_pairs(&plan.shards));
    want2.extend([(1, b.chunk), (2, b.chunk), (3, b.chunk)]);
    want2.sort_unstable();
    assert_eq!(all_deletions(&h), want2);
}

#[test]
fn a_snapshot_shares_an_erasure_coded_chunk_until_its_last_reference() {
    let mut h = setup();
    let (f, ec) = ec_file(&mut h, "f");
    let shards = ec.ec.clone().unwrap().shards;
    let s = snapshot(&mut h, f.ino, "snap", true).unwrap();
    let seen = chunk0(&h, s.ino);
    assert_eq!(
        seen, ec,
        "same chunk, same version (never written in place)"
    );
    let olds = all_deletions(&h);
    h.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(
        all_deletions(&h),
        olds,
        "the snapshot still holds the shards"
    );
    for (i, sh) in shards.iter().enumerate() {
        assert!(
            !inventory_drops(&h, SHARD_SERVERS[i], sh.chunk),
            "owner moved"
        );
    }
    h.unlink(ROOT_INO, "snap").unwrap();
    let mut want = olds;
    want.extend(shard_pairs(&shards));
    want.sort_unstable();
    assert_eq!(all_deletions(&h), want);
}

#[test]
fn drop_replica_of_a_shard_marks_it_lost() {
    let mut h = setup();
    let (f, ec) = ec_file(&mut h, "f");
    let shard = ec.ec.as_ref().unwrap().shards[2].chunk;
    let drop = |h: &mut H, version, server| {
        h.apply(Command::DropReplica {
            chunk: shard,
            expected_version: version,
            server,
        })
        .unwrap()
        .into_chunk()
        .unwrap()
    };
    assert_eq!(
        drop(&mut h, ec.version + 1, 6),
        ec,
        "stale version: unchanged"
    );
    assert_eq!(drop(&mut h, ec.version, 7), ec, "not its server: unchanged");
    let loc = drop(&mut h, ec.version, 6);
    assert_eq!((loc.chunk, loc.version), (ec.chunk, ec.version), "no bump");
    let shards = loc.ec.as_ref().unwrap().shards.clone();
    assert_eq!(shards[2].replica, None);
    assert_eq!(shards.iter().filter(|s| s.replica.is_some()).count(), 5);
    assert_eq!(chunk0(&h, f.ino), loc);
    assert!(h.deletions(6).contains(&shard));
    assert!(inventory_drops(&h, 6, shard));
    // The healer's add_replica is for replicated chunks only.
    assert!(h
        .apply(Command::AddReplica {
            chunk: shard,
            version: ec.version,
            server: 1,
            term: TERM,
        })
        .is_err());
}

#[test]
fn status_counts_erasure_coded_and_replicated_chunks_with_logical_bytes() {
    let mut h = setup();
    let (_, ec) = ec_file(&mut h, "f");
    file(&mut h, "g");
    let counts = |h: &H, up: &dyn Fn(ServerId) -> bool| {
        h.sm.read(|rt| erasure::chunk_counts(rt, up)).unwrap()
    };
    let (c, per) = counts(&h, &|_| true);
    assert_eq!((c.ec, c.replicated, c.healthy), (1, 1, 2));
    assert_eq!((c.ec_bytes, c.replicated_bytes), (10 << 20, 10 << 20));
    assert_eq!((c.degraded, c.lost, c.under_replicated), (0, 0, 0));
    assert_eq!(per.get(&4), Some(&1), "a shard counts on its server");
    assert_eq!(per.get(&1), Some(&1));
    let (c, _) = counts(&h, &|s| s != 4 && s != 5);
    assert_eq!((c.healthy, c.degraded, c.lost), (1, 1, 0), "4 of 6 shards");
    let (c, _) = counts(&h, &|s| s > 6);
    assert_eq!((c.degraded, c.lost), (0, 2), "3 shards and no replica");
    // A shard known lost is not live, whatever its server.
    let shard = ec.ec.unwrap().shards[0].chunk;
    h.apply(Command::DropReplica {
        chunk: shard,
        expected_version: ec.version,
        server: 4,
    })
    .unwrap();
    let (c, _) = counts(&h, &|_| true);
    assert_eq!((c.healthy, c.degraded), (1, 1));
}

#[test]
fn erasure_coded_state_survives_restart_and_snapshot_restore() {
    let mut h = setup();
    let (f, ec) = ec_file(&mut h, "f");
    let (g, b) = file(&mut h, "g");
    prepare(&mut h, g.ino, b.chunk, 1, &SHARD_SERVERS).unwrap();
    let digest = h.sm.digest().unwrap();
    let snap = h.sm.snapshot().unwrap();
    let h = h.reopen();
    assert_eq!(h.sm.digest().unwrap(), digest);
    assert_eq!(chunk0(&h, f.ino), ec);
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    sm2.restore(&snap).unwrap();
    assert_eq!(sm2.digest().unwrap(), digest);
    let seen = sm2
        .read(|rt| queries::chunks(rt, g.ino, 0, 1, TERM))
        .unwrap();
    assert!(seen[0].shared, "still converting after restore");
}

#[test]
fn a_clone_keeps_the_shards_when_its_origin_copies_out() {
    let mut h = setup();
    let (f, ec) = ec_file(&mut h, "f");
    let shards = ec.ec.clone().unwrap().shards;
    let c = snapshot(&mut h, f.ino, "clone", false).unwrap();
    let olds = all_deletions(&h);
    // The origin (the chunk's owner) copies out: ownership, shards included, passes on.
    let w = cow(&mut h, f.ino, ec.chunk).unwrap();
    assert_eq!(w.from_ec.as_ref(), Some(&ec));
    h.apply(Command::CowDone {
        ino: f.ino,
        index: 0,
        chunk: w.loc.chunk,
        failed: vec![],
    })
    .unwrap();
    assert_eq!(all_deletions(&h), olds, "the clone still reads the shards");
    for (i, sh) in shards.iter().enumerate() {
        assert!(
            !inventory_drops(&h, SHARD_SERVERS[i], sh.chunk),
            "shard {i}"
        );
    }
    assert_eq!(chunk0(&h, c.ino).ec, ec.ec);
    h.unlink(ROOT_INO, "clone").unwrap();
    let mut want = olds;
    want.extend(shard_pairs(&shards));
    want.sort_unstable();
    assert_eq!(all_deletions(&h), want);
}
