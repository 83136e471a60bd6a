//! Copies the chunk map lists on a chunkserver that the server does not have (a wiped or
//! replaced disk, a chunk file removed by hand): found by comparing its inventory with the
//! map, confirmed by a later inventory, then taken out of the map so the healer restores
//! them.
//!
//! ```text
//!  heartbeat with inventory ──▶ absent(): listed on the server, not in its inventory
//!     first time: a suspect (chunk, version), noted with the time
//!     CONFIRM_AFTER later: the reply asks for an inventory (want_inventory)
//!     still absent at the same version ──▶ replica: DropReplica (only while another listed,
//!                                          live server's last inventory has the chunk)
//!                                          shard:   DropReplica (marked lost)
//!  the chunk is now short of copies ──▶ endangered_chunks ──▶ healer
//! ```
//!
//! Why two inventories: a chunk allocated a moment before the inventory was taken may not
//! have reached the server's disk yet. Why the second holder: a replicated chunk whose
//! writer died between allocation and its first write exists nowhere; dropping its copies
//! would only turn "never written" into "lost". Shards are written and verified before an
//! erasure-coded layout is committed, so a listed shard that is absent is gone.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use redb::ReadableTable;

use rawfs_metadata_api::{ChunkId, MetaResult, ServerId};

use crate::commands::Command;
use crate::server::Server;
use crate::store::{decode, ChunkRec, Op, ReadTables};

/// How long a suspect waits before a second inventory confirms it.
pub(crate) const CONFIRM_AFTER: Duration = Duration::from_secs(15);

/// A copy listed on a server and absent from its inventory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Absent {
    /// The copy's id: the chunk, or the shard's own id.
    pub id: ChunkId,
    pub version: u64,
    /// A shard of an erasure-coded chunk (no other copy), or a replica.
    pub shard: bool,
    /// The other servers listed for a replica.
    pub others: Vec<ServerId>,
}

/// Every copy the chunk map lists on `server` (replicas of chunks no copy-on-write is
/// pending on, and committed shards) that `inventory` lacks, below `next_chunk`. Scans the
/// whole chunk map.
pub(crate) fn absent(
    rt: &ReadTables,
    server: ServerId,
    inventory: &HashSet<ChunkId>,
) -> Op<Vec<Absent>> {
    let mut out = Vec::new();
    for item in rt.chunks.iter()? {
        let (k, v) = item?;
        let rec: ChunkRec = decode("chunk", v.value())?;
        // A shared chunk is listed by each reference: look at it once, at its owner.
        if rec.pending.is_some()
            || rt.chunk_owner.get(rec.chunk)?.map(|g| g.value()) != Some(k.value())
        {
            continue;
        }
        if let Some(ec) = &rec.ec {
            for s in &ec.shards {
                if s.server == Some(server) && !inventory.contains(&s.chunk) {
                    out.push(Absent {
                        id: s.chunk,
                        version: rec.version,
                        shard: true,
                        others: Vec::new(),
                    });
                }
            }
        } else if rec.servers.contains(&server) && !inventory.contains(&rec.chunk) {
            out.push(Absent {
                id: rec.chunk,
                version: rec.version,
                shard: false,
                others: rec
                    .servers
                    .iter()
                    .copied()
                    .filter(|&s| s != server)
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// Per server: the last inventory, and the suspects waiting for confirmation.
#[derive(Debug, Default)]
pub(crate) struct Suspects {
    inventories: HashMap<ServerId, HashSet<ChunkId>>,
    /// server -> (copy id -> version), and when they were first seen absent.
    waiting: HashMap<ServerId, (HashMap<ChunkId, u64>, Instant)>,
}

impl Suspects {
    /// Whether `server`'s next heartbeat should carry an inventory to confirm suspects.
    pub fn want_inventory(&self, server: ServerId, now: Instant) -> bool {
        self.waiting.get(&server).is_some_and(|(s, at)| {
            !s.is_empty() && now.saturating_duration_since(*at) >= CONFIRM_AFTER
        })
    }

    /// Whether `server`'s last inventory has `chunk`.
    pub fn holds(&self, server: ServerId, chunk: ChunkId) -> bool {
        self.inventories
            .get(&server)
            .is_some_and(|inv| inv.contains(&chunk))
    }

    pub fn note_inventory(&mut self, server: ServerId, inventory: HashSet<ChunkId>) {
        self.inventories.insert(server, inventory);
    }

    /// Takes the absent copies of a new inventory: returns those confirmed (absent at the
    /// same version in an inventory at least [`CONFIRM_AFTER`] after they were first seen)
    /// and keeps the others as suspects.
    pub fn confirm(&mut self, server: ServerId, found: Vec<Absent>, now: Instant) -> Vec<Absent> {
        let (before, since) = self
            .waiting
            .remove(&server)
            .unwrap_or_else(|| (HashMap::new(), now));
        let ripe = now.saturating_duration_since(since) >= CONFIRM_AFTER;
        let (confirmed, fresh): (Vec<Absent>, Vec<Absent>) = found
            .into_iter()
            .partition(|a| ripe && before.get(&a.id) == Some(&a.version));
        if !fresh.is_empty() {
            // Suspects still waiting keep their time; new ones start the clock again.
            let keep_time = fresh.iter().all(|a| before.contains_key(&a.id)) && !ripe;
            let at = if keep_time { since } else { now };
            let ids = fresh.into_iter().map(|a| (a.id, a.version)).collect();
            self.waiting.insert(server, (ids, at));
        }
        confirmed
    }
}

impl Server {
    /// Compares `server`'s inventory with the chunk map (in the background: a full scan)
    /// and drops the copies confirmed missing.
    pub(crate) async fn check_missing(&self, server: ServerId, inventory: Vec<(ChunkId, u64)>) {
        let inv: HashSet<ChunkId> = inventory.into_iter().map(|(c, _)| c).collect();
        let me = self.clone();
        // The set goes to the scan and comes back, to be kept for the "another holder" guard.
        let scan = tokio::task::spawn_blocking(move || {
            let found = me.0.sm.read(|rt| absent(rt, server, &inv));
            (found, inv)
        })
        .await;
        let (found, inv) = match scan {
            Ok((Ok(f), inv)) => (f, inv),
            Ok((Err(e), _)) => return tracing::warn!(server, error = %e, "inventory check failed"),
            Err(e) => return tracing::warn!(server, error = %e, "inventory check failed"),
        };
        let now = Instant::now();
        let (confirmed, keep) = {
            let mut reg = self.registry();
            reg.suspects.note_inventory(server, inv);
            let confirmed = reg.suspects.confirm(server, found, now);
            // A replica is dropped only while another live server is known to hold it.
            let keep: Vec<bool> = confirmed
                .iter()
                .map(|a| {
                    a.shard
                        || a.others
                            .iter()
                            .any(|&o| reg.is_up(o, now) && reg.suspects.holds(o, a.id))
                })
                .collect();
            (confirmed, keep)
        };
        for (a, droppable) in confirmed.into_iter().zip(keep) {
            if !droppable {
                tracing::warn!(
                    chunk = a.id,
                    server,
                    "listed copy missing, and no other holder known: kept"
                );
                continue;
            }
            tracing::warn!(
                chunk = a.id,
                server,
                shard = a.shard,
                "listed copy missing on its server: dropped for repair"
            );
            if let Err(e) = self.drop_missing(a.id, a.version, server).await {
                tracing::debug!(chunk = a.id, server, error = %e, "missing copy not dropped");
            }
        }
    }

    /// Drops the copy `server` lacks (`DropMissing`: no deletion order for a copy that is not
    /// there, which would otherwise delete, and tombstone, the copy the healer makes there
    /// next).
    async fn drop_missing(&self, chunk: ChunkId, version: u64, server: ServerId) -> MetaResult<()> {
        self.propose(Command::DropMissing {
            chunk,
            expected_version: version,
            server,
        })
        .await?
        .into_chunk()
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn absent(id: ChunkId, version: u64) -> Absent {
        Absent {
            id,
            version,
            shard: false,
            others: vec![2],
        }
    }

    #[test]
    fn a_copy_is_confirmed_missing_by_a_later_inventory_at_the_same_version() {
        let t0 = Instant::now();
        let mut s = Suspects::default();
        assert!(s
            .confirm(1, vec![absent(5, 1), absent(6, 1)], t0)
            .is_empty());
        assert!(!s.want_inventory(1, t0 + Duration::from_secs(1)));
        assert!(s.want_inventory(1, t0 + CONFIRM_AFTER));
        // Too early: nothing confirmed, the clock keeps running.
        assert!(s
            .confirm(
                1,
                vec![absent(5, 1), absent(6, 1)],
                t0 + Duration::from_secs(2)
            )
            .is_empty());
        // Chunk 6 arrived; chunk 5 is still absent but at a new version (written since).
        let later = t0 + CONFIRM_AFTER + Duration::from_secs(1);
        assert!(s.confirm(1, vec![absent(5, 2)], later).is_empty());
        let confirmed = s.confirm(1, vec![absent(5, 2)], later + CONFIRM_AFTER);
        assert_eq!(confirmed, vec![absent(5, 2)]);
        assert!(
            !s.want_inventory(1, later + CONFIRM_AFTER * 3),
            "nothing left to confirm"
        );
    }

    #[test]
    fn inventories_are_remembered_per_server() {
        let mut s = Suspects::default();
        s.note_inventory(2, [7, 8].into_iter().collect());
        assert!(s.holds(2, 7) && !s.holds(2, 9) && !s.holds(3, 7));
    }
}
