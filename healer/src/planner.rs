//! The repair planner: which replicated chunks to copy where, most endangered first.
//!
//! A core that does no I/O (see STYLE.md, "Cores that do no I/O"): it takes a snapshot of
//! the chunk map and of the chunkservers' liveness and free space, and returns the copies
//! to make. The driver reads chunks with their checksums verified, writes them, and
//! commits each new location fenced by the chunk's version; a chunk whose version moved
//! meanwhile is simply planned again on the next scan.
//!
//! ```text
//!  chunks (id, version, replicas, wanted copies) ─┐
//!  servers (id, up, free bytes)                  ─┴─▶ plan() ─▶ repairs, ordered:
//!                                                               1 copy left  (critical)
//!                                                               2 copies left ...
//!                                                             + lost (no live copy)
//!                                                             + stuck (no server to copy to)
//! ```
//!
//! Placement follows the metadata service's rule for new chunks: a live server that does
//! not hold the chunk, with the most free space once the copies planned so far are counted,
//! so that one scan spreads its copies instead of piling them on the emptiest server.

use std::collections::BTreeMap;

/// A chunkserver id, as the metadata service numbers them.
pub type ServerId = u64;

/// One replicated chunk as the chunk map has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkState {
    pub chunk: u64,
    /// The version a new copy is written and committed at.
    pub version: u64,
    /// Servers listed as holding a current copy (live or not).
    pub replicas: Vec<ServerId>,
    /// How many copies the chunk should have.
    pub wanted: usize,
    /// Bytes a copy takes (to count against the target's free space).
    pub bytes: u64,
}

/// One chunkserver as the registry has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerState {
    pub id: ServerId,
    /// Heartbeating and healthy: may serve as a source and receive copies.
    pub up: bool,
    pub free_bytes: u64,
}

/// One copy to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub chunk: u64,
    pub version: u64,
    /// Live servers holding the chunk, to read from in this order (the next one if a read
    /// fails or its checksum does not match).
    pub sources: Vec<ServerId>,
    /// The server to write the new copy to.
    pub target: ServerId,
    /// Live copies before this repair: the danger level (1 = one failure from loss).
    pub copies_left: usize,
}

/// One erasure-coded chunk (RS 4+2) as the chunk map has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcState {
    pub chunk: u64,
    /// The version every shard is stored (and a rebuilt one written) at.
    pub version: u64,
    /// Logical bytes of the chunk, which fix each shard's stored length.
    pub length: u64,
    /// By shard number (0..4 data, 4 = P, 5 = Q): the shard's id and the server listed as
    /// holding it (`None` once known lost).
    pub shards: Vec<(u64, Option<ServerId>)>,
}

/// The rebuild of the missing shards of one erasure-coded chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuild {
    pub chunk: u64,
    pub version: u64,
    pub length: u64,
    /// Every shard: id and listed server, as in [`EcState::shards`].
    pub shards: Vec<(u64, Option<ServerId>)>,
    /// Shard numbers on live servers, to read from (data shards first).
    pub sources: Vec<usize>,
    /// Shards to rebuild, each with the server to write it to (distinct, holding no shard).
    pub targets: Vec<(usize, ServerId)>,
}

impl Rebuild {
    /// Shard failures the chunk survives now: 0 with 4 live shards, as critical as a
    /// replicated chunk with one copy left.
    pub fn margin(&self) -> usize {
        self.sources.len().saturating_sub(DATA_SHARDS)
    }
}

impl Repair {
    /// Failures the chunk survives now: 0 with one copy left.
    pub fn margin(&self) -> usize {
        self.copies_left.saturating_sub(1)
    }
}

/// One unit of work of a plan, in the order [`Plan::work`] gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work<'a> {
    Copy(&'a Repair),
    Rebuild(&'a Rebuild),
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Copies to make, most endangered chunk first.
    pub repairs: Vec<Repair>,
    /// Erasure-coded chunks to rebuild shards of, most endangered first.
    pub rebuilds: Vec<Rebuild>,
    /// Chunks with no live copy: nothing to copy from until a holder comes back.
    pub lost: Vec<u64>,
    /// Erasure-coded chunks with fewer than 4 live shards: nothing to decode from until a
    /// holder comes back.
    pub ec_lost: Vec<u64>,
    /// Chunks missing copies or shards for which no live server is left to hold one.
    pub stuck: Vec<u64>,
}

/// Shards needed to decode an RS 4+2 chunk.
const DATA_SHARDS: usize = rawfs_client::erasure::DATA_SHARDS;

impl Plan {
    /// Chunks below their wanted copies, by live copies left (1, 2, ...): the queue length
    /// by danger level that `rawfs status` shows.
    pub fn by_danger(&self) -> BTreeMap<usize, usize> {
        let mut chunks: BTreeMap<usize, std::collections::BTreeSet<u64>> = BTreeMap::new();
        for r in &self.repairs {
            chunks.entry(r.copies_left).or_default().insert(r.chunk);
        }
        chunks.into_iter().map(|(k, v)| (k, v.len())).collect()
    }
}

impl Plan {
    /// Copies and rebuilds interleaved by danger: fewest failures from loss first (an
    /// erasure-coded chunk with 4 live shards ranks with a replicated chunk with one copy
    /// left), then by chunk id; a chunk's copies stay together in plan order.
    pub fn work(&self) -> Vec<Work<'_>> {
        let mut out: Vec<(usize, u64, Work<'_>)> = self
            .repairs
            .iter()
            .map(|r| (r.margin(), r.chunk, Work::Copy(r)))
            .chain(
                self.rebuilds
                    .iter()
                    .map(|r| (r.margin(), r.chunk, Work::Rebuild(r))),
            )
            .collect();
        // Stable: copies of one chunk keep their order.
        out.sort_by_key(|(m, c, _)| (*m, *c));
        out.into_iter().map(|(_, _, w)| w).collect()
    }
}

/// Plans the copies that bring every chunk back to its wanted number of live copies.
pub fn plan(chunks: &[ChunkState], servers: &[ServerState]) -> Plan {
    plan_with(chunks, &[], servers, &BTreeMap::new())
}

/// [`plan`] for replicated chunks and erasure-coded ones (`ec`): rebuilds of every missing
/// shard onto live servers holding no shard of the chunk (nor listed in `avoid` for it:
/// targets that failed before), most free space first. Targets are handed out in order of
/// danger across both kinds, counting the bytes planned so far.
pub fn plan_with(
    chunks: &[ChunkState],
    ec: &[EcState],
    servers: &[ServerState],
    avoid: &BTreeMap<u64, Vec<ServerId>>,
) -> Plan {
    let up: BTreeMap<ServerId, u64> = servers
        .iter()
        .filter(|s| s.up)
        .map(|s| (s.id, s.free_bytes))
        .collect();
    let mut endangered: Vec<(&ChunkState, Vec<ServerId>)> = Vec::new();
    let mut out = Plan::default();
    for c in chunks {
        let live: Vec<ServerId> = c
            .replicas
            .iter()
            .copied()
            .filter(|s| up.contains_key(s))
            .collect();
        if live.len() >= c.wanted {
            continue;
        }
        if live.is_empty() {
            out.lost.push(c.chunk);
            continue;
        }
        endangered.push((c, live));
    }
    let mut degraded: Vec<(&EcState, Vec<usize>)> = Vec::new();
    for c in ec {
        let live: Vec<usize> = (0..c.shards.len())
            .filter(|&k| c.shards[k].1.is_some_and(|s| up.contains_key(&s)))
            .collect();
        if live.len() >= c.shards.len() {
            continue;
        }
        if live.len() < DATA_SHARDS {
            out.ec_lost.push(c.chunk);
            continue;
        }
        degraded.push((c, live));
    }
    // Fewest copies left first; among equals, by chunk id, so plans are reproducible.
    endangered.sort_by_key(|(c, live)| (live.len(), c.chunk));
    degraded.sort_by_key(|(c, live)| (live.len(), c.chunk));
    let mut free = up;
    // Rebuilds with no failure to spare take their targets first, then the copies of
    // chunks with one copy left, and so on by margin.
    let (critical, rest): (Vec<_>, Vec<_>) = degraded
        .into_iter()
        .partition(|(_, live)| live.len() == DATA_SHARDS);
    for (c, live) in critical {
        plan_rebuild(&mut out, &mut free, c, live, avoid);
    }
    for (c, live) in endangered {
        let mut holders: Vec<ServerId> = c.replicas.clone();
        let mut planned = 0;
        for _ in live.len()..c.wanted {
            let Some(target) = pick_target(&free, &holders, c.bytes) else {
                break;
            };
            if let Some(f) = free.get_mut(&target) {
                *f = f.saturating_sub(c.bytes);
            }
            holders.push(target);
            out.repairs.push(Repair {
                chunk: c.chunk,
                version: c.version,
                sources: live.clone(),
                target,
                copies_left: live.len(),
            });
            planned += 1;
        }
        if planned == 0 {
            out.stuck.push(c.chunk);
        }
    }
    for (c, live) in rest {
        plan_rebuild(&mut out, &mut free, c, live, avoid);
    }
    out
}

/// Picks a target for every missing shard of `c` (live shards `live`).
fn plan_rebuild(
    out: &mut Plan,
    free: &mut BTreeMap<ServerId, u64>,
    c: &EcState,
    live: Vec<usize>,
    avoid: &BTreeMap<u64, Vec<ServerId>>,
) {
    let layout = rawfs_client::erasure::Layout::DEFAULT;
    // Shards must end up on distinct servers: every listed holder (live or not) and every
    // target already picked is excluded.
    let mut holders: Vec<ServerId> = c.shards.iter().filter_map(|s| s.1).collect();
    holders.extend(avoid.get(&c.chunk).into_iter().flatten());
    let mut targets = Vec::new();
    for k in (0..c.shards.len()).filter(|k| !live.contains(k)) {
        let bytes = layout.shard_len(k, c.length);
        let Some(target) = pick_target(free, &holders, bytes) else {
            continue;
        };
        if let Some(f) = free.get_mut(&target) {
            *f = f.saturating_sub(bytes);
        }
        holders.push(target);
        targets.push((k, target));
    }
    if targets.is_empty() {
        out.stuck.push(c.chunk);
        return;
    }
    out.rebuilds.push(Rebuild {
        chunk: c.chunk,
        version: c.version,
        length: c.length,
        shards: c.shards.clone(),
        sources: live,
        targets,
    });
}

/// The live server with the most free space that holds no copy and has room for `bytes`.
fn pick_target(
    free: &BTreeMap<ServerId, u64>,
    holders: &[ServerId],
    bytes: u64,
) -> Option<ServerId> {
    free.iter()
        .filter(|(id, f)| !holders.contains(id) && **f >= bytes)
        .max_by_key(|(id, f)| (**f, std::cmp::Reverse(**id)))
        .map(|(id, _)| *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn chunk(chunk: u64, replicas: &[ServerId]) -> ChunkState {
        ChunkState {
            chunk,
            version: 7,
            replicas: replicas.to_vec(),
            wanted: 3,
            bytes: 64 * MIB,
        }
    }

    fn servers(up: &[(ServerId, u64)], down: &[ServerId]) -> Vec<ServerState> {
        let mut s: Vec<ServerState> = up
            .iter()
            .map(|&(id, gib)| ServerState {
                id,
                up: true,
                free_bytes: gib << 30,
            })
            .collect();
        s.extend(down.iter().map(|&id| ServerState {
            id,
            up: false,
            free_bytes: 100 << 30,
        }));
        s
    }

    #[test]
    fn healthy_chunks_need_nothing() {
        let p = plan(
            &[chunk(1, &[1, 2, 3])],
            &servers(&[(1, 9), (2, 9), (3, 9), (4, 9)], &[]),
        );
        assert_eq!(p, Plan::default());
    }

    #[test]
    fn one_copy_left_goes_before_two_and_copies_come_from_live_holders() {
        let s = servers(&[(1, 9), (4, 9), (5, 9), (6, 9)], &[2, 3]);
        let p = plan(&[chunk(10, &[1, 2, 4]), chunk(20, &[1, 2, 3])], &s);
        let order: Vec<(u64, usize)> = p.repairs.iter().map(|r| (r.chunk, r.copies_left)).collect();
        assert_eq!(order, vec![(20, 1), (20, 1), (10, 2)]);
        for r in &p.repairs {
            assert!(r.sources.iter().all(|s| [1, 4].contains(s)), "{r:?}");
            assert!(
                ![2, 3].contains(&r.target),
                "a down server is no target: {r:?}"
            );
            assert_eq!(r.version, 7);
        }
        let t20: Vec<ServerId> = p.repairs[..2].iter().map(|r| r.target).collect();
        assert_ne!(t20[0], t20[1], "two copies of one chunk on one server");
        assert!(!t20.contains(&1), "a holder is no target");
        assert_eq!(p.by_danger(), BTreeMap::from([(1, 1), (2, 1)]));
    }

    #[test]
    fn targets_spread_by_free_space_counting_planned_copies() {
        // Server 4 has room for one more copy than 5; after one copy they are even.
        let s = vec![
            ServerState {
                id: 1,
                up: true,
                free_bytes: 0,
            },
            ServerState {
                id: 4,
                up: true,
                free_bytes: 256 * MIB,
            },
            ServerState {
                id: 5,
                up: true,
                free_bytes: 192 * MIB,
            },
        ];
        let chunks: Vec<ChunkState> = (0..4)
            .map(|i| ChunkState {
                wanted: 2,
                ..chunk(i, &[1])
            })
            .collect();
        let p = plan(&chunks, &s);
        let targets: Vec<ServerId> = p.repairs.iter().map(|r| r.target).collect();
        assert_eq!(targets, vec![4, 4, 5, 4], "{p:?}");
    }

    #[test]
    fn lost_and_stuck_chunks_are_reported_not_planned() {
        let s = servers(&[(1, 9), (2, 9)], &[3, 4]);
        let p = plan(&[chunk(1, &[3, 4]), chunk(2, &[1, 2, 3])], &s);
        assert_eq!(p.lost, vec![1]);
        assert_eq!(p.stuck, vec![2], "no third live server to copy to");
        assert!(p.repairs.is_empty());
    }

    fn ec(chunk: u64, servers: [Option<ServerId>; 6]) -> EcState {
        EcState {
            chunk,
            version: 3,
            length: 10 * MIB,
            shards: (0..6)
                .map(|k| (100 * chunk + k as u64, servers[k]))
                .collect(),
        }
    }

    #[test]
    fn missing_shards_go_to_distinct_servers_holding_none() {
        // Server 2 is down, shard 4 is lost; 7 and 8 are free, 7 has the most room.
        let s = servers(
            &[(1, 9), (3, 9), (4, 9), (5, 9), (6, 9), (7, 20), (8, 10)],
            &[2],
        );
        let c = ec(1, [Some(1), Some(2), Some(3), Some(4), None, Some(6)]);
        let p = plan_with(&[], &[c], &s, &BTreeMap::new());
        assert_eq!(p.rebuilds.len(), 1, "{p:?}");
        let r = &p.rebuilds[0];
        assert_eq!(r.sources, vec![0, 2, 3, 5]);
        assert_eq!(r.targets, vec![(1, 7), (4, 8)]);
        assert_eq!((r.version, r.length, r.margin()), (3, 10 * MIB, 0));
        // Avoiding 7 (a failed target): 8, then 5, the last server holding no shard.
        let avoid = BTreeMap::from([(1, vec![7])]);
        let c = ec(1, [Some(1), Some(2), Some(3), Some(4), None, Some(6)]);
        let p = plan_with(&[], std::slice::from_ref(&c), &s, &avoid);
        assert_eq!(p.rebuilds[0].targets, vec![(1, 8), (4, 5)]);
        let avoid = BTreeMap::from([(1, vec![5, 7])]);
        let p = plan_with(&[], &[c], &s, &avoid);
        assert_eq!(
            p.rebuilds[0].targets,
            vec![(1, 8)],
            "one target: one shard now"
        );
    }

    #[test]
    fn four_live_shards_rank_with_one_copy_left_and_fewer_are_lost() {
        let s = servers(
            &[
                (1, 9),
                (2, 9),
                (3, 9),
                (4, 9),
                (5, 9),
                (6, 9),
                (7, 9),
                (8, 9),
                (9, 9),
            ],
            &[10, 11, 12],
        );
        let ec_one_down = ec(5, [Some(1), Some(2), Some(3), Some(4), Some(5), Some(10)]);
        let ec_two_down = ec(6, [Some(1), Some(2), Some(3), Some(4), Some(10), Some(11)]);
        let ec_three_down = ec(7, [Some(1), Some(2), Some(3), Some(10), Some(11), Some(12)]);
        let one_left = chunk(8, &[1, 10, 11]);
        let two_left = chunk(4, &[1, 2, 10]);
        let p = plan_with(
            &[two_left, one_left],
            &[ec_one_down, ec_two_down, ec_three_down],
            &s,
            &BTreeMap::new(),
        );
        assert_eq!(p.ec_lost, vec![7]);
        let order: Vec<(&str, u64)> = p
            .work()
            .iter()
            .map(|w| match w {
                Work::Copy(r) => ("copy", r.chunk),
                Work::Rebuild(r) => ("rebuild", r.chunk),
            })
            .collect();
        assert_eq!(
            order,
            vec![
                ("rebuild", 6),
                ("copy", 8),
                ("copy", 8),
                ("copy", 4),
                ("rebuild", 5)
            ],
            "by margin (0, then 1), then chunk id"
        );
    }

    #[test]
    fn a_full_server_is_no_target() {
        let s = vec![
            ServerState {
                id: 1,
                up: true,
                free_bytes: 1 << 30,
            },
            ServerState {
                id: 2,
                up: true,
                free_bytes: MIB,
            },
        ];
        let p = plan(
            &[ChunkState {
                wanted: 2,
                ..chunk(1, &[1])
            }],
            &s,
        );
        assert_eq!(p.stuck, vec![1]);
    }
}
