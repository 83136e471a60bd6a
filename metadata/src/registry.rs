//! The leader's soft view of the chunkservers (from heartbeats) and chunk placement.
//!
//! Liveness and capacity are not replicated: a new leader learns them from the next round of
//! heartbeats (one second). Until `chunkserver_timeout` has passed since it took over, a
//! leader that has heard from fewer servers than a new chunk wants (and than the cluster has
//! registered) answers `Unavailable` (retryable) rather than placing short or `NoSpace`.
//!
//! FENCE orders for a server wait here for its next heartbeat reply (see
//! `HeartbeatReply::fence`); a new leader starts without them, and the inventory comparison
//! catches any copy still behind the chunk map.
//!
//! Placement is weighted rendezvous hashing: each live, healthy server scores
//! `free / -ln(h)` with `h` a hash of (chunk key, server) in (0, 1) — the key mixes the
//! next chunk id with the file and chunk index —, and the top scores win. Servers
//! with more free space win proportionally more often, and adding a server moves only the
//! chunks it wins, with no global reshuffle.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use rawfs_metadata_api::{ChunkId, Heartbeat, ServerId};

/// What the leader last heard from one chunkserver.
#[derive(Clone, Debug)]
pub(crate) struct Live {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub healthy: bool,
    pub last_seen: Instant,
    /// The server's filesystem (`Heartbeat::disk`).
    pub disk: u64,
}

/// Soft state about chunkservers, kept by the leader.
#[derive(Debug)]
pub(crate) struct Registry {
    servers: HashMap<ServerId, Live>,
    timeout: Duration,
    /// When this replica last became leader (or started).
    since: Instant,
    term: u64,
    /// The healer lease granted by this leader (see `healing.rs`).
    pub lease: Option<crate::healing::Lease>,
    /// FENCE orders waiting for each server's next heartbeat: chunk -> version.
    fences: HashMap<ServerId, BTreeMap<ChunkId, u64>>,
    /// Draining servers (mirrored from their records, see `drain.rs`) and when their
    /// surplus copies were last looked for.
    draining: HashMap<ServerId, Option<Instant>>,
    /// The healers' latest progress reports (see `limits.rs`).
    pub reports: crate::limits::Reports,
    /// Inventories and copies they lack (see `missing.rs`).
    pub suspects: crate::missing::Suspects,
    /// Volume writer leases granted by this leader (see `volume_lease.rs`).
    pub volume_leases: crate::volume_lease::VolumeLeases,
    /// The highest term this process has recorded as granting leases (see `leases.rs`).
    pub lease_term_recorded: u64,
    /// Whether a lease may have been granted before this leader's first look in the term.
    pub leases_before: Option<(u64, bool)>,
}

impl Registry {
    pub fn new(timeout: Duration, now: Instant) -> Self {
        Registry {
            servers: HashMap::new(),
            timeout,
            since: now,
            term: 0,
            lease: None,
            fences: HashMap::new(),
            draining: HashMap::new(),
            reports: Default::default(),
            suspects: Default::default(),
            lease_term_recorded: 0,
            leases_before: None,
            volume_leases: Default::default(),
        }
    }

    /// Notes the current leader term; a new term restarts the warm-up period.
    pub fn note_term(&mut self, term: u64, now: Instant) {
        if term != self.term {
            self.term = term;
            self.since = now;
        }
    }

    pub fn heartbeat(&mut self, hb: &Heartbeat, now: Instant) {
        self.servers.insert(
            hb.server,
            Live {
                total_bytes: hb.total_bytes,
                used_bytes: hb.used_bytes,
                healthy: hb.healthy,
                last_seen: now,
                disk: hb.disk,
            },
        );
    }

    /// Mirrors a server's draining flag.
    pub fn set_draining(&mut self, server: ServerId, draining: bool) {
        if !draining {
            self.draining.remove(&server);
        } else {
            self.draining.entry(server).or_insert(None);
        }
    }

    pub fn is_draining(&self, server: ServerId) -> bool {
        self.draining.contains_key(&server)
    }

    /// Whether a draining server's surplus copies are due for another look (and if so,
    /// notes that they are being looked at now).
    pub fn surplus_scan_due(&mut self, server: ServerId, now: Instant, every: Duration) -> bool {
        match self.draining.get_mut(&server) {
            Some(last) if last.map_or(true, |t| now.saturating_duration_since(t) >= every) => {
                *last = Some(now);
                true
            }
            _ => false,
        }
    }

    /// Queues a FENCE of `chunk` at `version` for `server`'s next heartbeat reply.
    pub fn queue_fence(&mut self, server: ServerId, chunk: ChunkId, version: u64) {
        let v = self
            .fences
            .entry(server)
            .or_default()
            .entry(chunk)
            .or_insert(0);
        *v = (*v).max(version);
    }

    /// Takes up to `max` FENCE orders queued for `server`.
    pub fn take_fences(&mut self, server: ServerId, max: usize) -> Vec<(ChunkId, u64)> {
        let Some(queue) = self.fences.get_mut(&server) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < max {
            match queue.pop_first() {
                Some(order) => out.push(order),
                None => break,
            }
        }
        if queue.is_empty() {
            self.fences.remove(&server);
        }
        out
    }

    pub fn get(&self, id: ServerId) -> Option<&Live> {
        self.servers.get(&id)
    }

    pub fn is_up(&self, id: ServerId, now: Instant) -> bool {
        self.servers
            .get(&id)
            .is_some_and(|l| now.saturating_duration_since(l.last_seen) < self.timeout)
    }

    /// Every server heard from within the timeout.
    pub fn up_servers(&self, now: Instant) -> HashSet<ServerId> {
        self.servers
            .keys()
            .copied()
            .filter(|&id| self.is_up(id, now))
            .collect()
    }

    /// Up servers that accept new chunks, with their free bytes.
    pub fn candidates(&self, now: Instant) -> Vec<(ServerId, u64)> {
        let mut v: Vec<_> = self
            .servers
            .iter()
            .filter(|(id, l)| l.healthy && self.is_up(**id, now) && !self.is_draining(**id))
            .map(|(id, l)| (*id, l.total_bytes.saturating_sub(l.used_bytes)))
            .filter(|(_, free)| *free > 0)
            .collect();
        v.sort_unstable();
        v
    }

    /// How long this replica has led in its current term (or run, before any term).
    pub fn in_office(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }

    /// True while a fresh leader may not have heard every live server yet.
    pub fn warming_up(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) < self.timeout
    }

    /// (total, free) bytes over up servers. Servers on one disk (`rawfs up` puts all of
    /// them on one) share its free space: it counts once, as the largest figure among them,
    /// or `df` would show the disk as many times as it has servers.
    pub fn capacity(&self, now: Instant) -> (u64, u64) {
        let mut used = 0u64;
        let mut free = 0u64;
        let mut shared: HashMap<u64, u64> = HashMap::new();
        for (_, l) in self.servers.iter().filter(|(id, _)| self.is_up(**id, now)) {
            let room = l.total_bytes.saturating_sub(l.used_bytes);
            used = used.saturating_add(l.used_bytes);
            match l.disk {
                0 => free = free.saturating_add(room),
                disk => {
                    let most = shared.entry(disk).or_default();
                    *most = (*most).max(room);
                }
            }
        }
        let free = free.saturating_add(shared.values().sum::<u64>());
        (used.saturating_add(free), free)
    }
}

/// splitmix64: a fast, well-mixed 64-bit hash step.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Picks up to `n` distinct servers for the chunk `key` from `(server, free bytes)`.
pub(crate) fn place(candidates: &[(ServerId, u64)], key: u64, n: usize) -> Vec<ServerId> {
    let mut scored: Vec<(f64, ServerId)> = candidates
        .iter()
        .map(|&(id, free)| {
            let h = mix(key ^ mix(id));
            // 53 random bits as a float strictly inside (0, 1).
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let weight = (free as f64).max(1.0);
            (weight / -u.ln(), id)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.dedup_by_key(|s| s.1);
    scored.into_iter().take(n).map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(server: ServerId, total: u64, used: u64) -> Heartbeat {
        Heartbeat {
            server,
            data_addr: format!("127.0.0.1:{}", 7000 + server),
            control_addr: String::new(),
            total_bytes: total,
            used_bytes: used,
            healthy: true,
            inventory: None,
            corrupt: vec![],
            disk: 0,
        }
    }

    #[test]
    fn placement_is_distinct_and_stable() {
        let c: Vec<_> = (1..=6).map(|i| (i, 1 << 40)).collect();
        for key in 0..2000 {
            let p = place(&c, key, 3);
            assert_eq!(p.len(), 3);
            let mut d = p.clone();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 3, "distinct servers for {key}: {p:?}");
            assert_eq!(p, place(&c, key, 3));
        }
        // Fewer servers than replicas: all of them.
        assert_eq!(place(&c[..2], 5, 3).len(), 2);
        assert!(place(&[], 5, 3).is_empty());
    }

    #[test]
    fn placement_follows_free_space() {
        let c = vec![(1, 1u64 << 40), (2, 1 << 40), (3, 1 << 30), (4, 1 << 40)];
        let mut wins = [0u32; 5];
        for key in 0..4000 {
            for s in place(&c, key, 1) {
                wins[s as usize] += 1;
            }
        }
        assert!(wins[3] < 40, "nearly full server chosen {} times", wins[3]);
        for s in [1, 2, 4] {
            assert!(wins[s] > 1000, "server {s} won {}", wins[s]);
        }
    }

    #[test]
    fn silent_servers_go_down() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(5), t0);
        r.heartbeat(&hb(1, 100, 10), t0);
        r.heartbeat(&hb(2, 100, 100), t0);
        assert!(r.is_up(1, t0 + Duration::from_secs(4)));
        assert!(!r.is_up(1, t0 + Duration::from_secs(6)));
        assert_eq!(
            r.candidates(t0),
            vec![(1, 90)],
            "full server is no candidate"
        );
        assert_eq!(r.capacity(t0), (200, 90));
        // Two more on one disk: its free space counts once.
        r.heartbeat(
            &Heartbeat {
                disk: 7,
                ..hb(3, 150, 50)
            },
            t0,
        );
        r.heartbeat(
            &Heartbeat {
                disk: 7,
                ..hb(4, 120, 30)
            },
            t0,
        );
        assert_eq!(r.capacity(t0), (200 + 80 + 100, 90 + 100));
        assert!(r.warming_up(t0));
        assert!(!r.warming_up(t0 + Duration::from_secs(6)));
    }
}
