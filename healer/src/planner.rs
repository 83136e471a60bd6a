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

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Copies to make, most endangered chunk first.
    pub repairs: Vec<Repair>,
    /// Chunks with no live copy: nothing to copy from until a holder comes back.
    pub lost: Vec<u64>,
    /// Chunks missing copies for which no live server is left to hold one.
    pub stuck: Vec<u64>,
}

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

/// Plans the copies that bring every chunk back to its wanted number of live copies.
pub fn plan(chunks: &[ChunkState], servers: &[ServerState]) -> Plan {
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
    // Fewest copies left first; among equals, by chunk id, so plans are reproducible.
    endangered.sort_by_key(|(c, live)| (live.len(), c.chunk));
    let mut free = up;
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
    out
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
