//! Per-file cache of chunk locations (`ChunkLoc`), keyed by chunk index.
//!
//! Reads look chunks up in batches (`chunks(ino, first, count)`) and remember holes for a
//! short while; writes allocate (`allocate_chunk`). An entry is refreshed after a chunkserver
//! says the version is stale or the chunk is missing, and replaced by the answer of
//! `drop_replica` when a replica is dropped.
//!
//! A chunk can be allocated before any replica holds it: a file created in a held directory
//! gets its first chunk with its create, and its data arrives with the first flush. Reads
//! of such a chunk find it on no replica and read zeros. That answer is remembered for as
//! long as a hole is ([`HOLE_TTL`]), so that reads of the rest of a sparse file being
//! written do not ask every replica each time. A write of the chunk through this cache
//! forgets it, and so does one that ends meanwhile (see [`Locations::write_epoch`]).

use crate::error::ClientError;
use crate::store::Store;
use rawfs_metadata_api::{ChunkLoc, Ino, MetaError, ServerId};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Chunks looked up at once on a read miss (sequential readers need the next ones soon).
const LOOKUP_BATCH: u64 = 16;
/// How long a hole is remembered: another client may allocate the chunk meanwhile.
const HOLE_TTL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
enum Entry {
    Present(ChunkLoc),
    Hole(Instant),
}

/// The chunk map of one file as this client last saw it.
pub(crate) struct Locations {
    ino: Ino,
    map: Mutex<HashMap<u64, Entry>>,
    unwritten: Mutex<Unwritten>,
}

/// Chunks that no replica held when last read: index -> (chunk id, when seen).
#[derive(Default)]
struct Unwritten {
    /// Bumped when a write of any chunk starts and when it ends.
    epoch: u64,
    seen: HashMap<u64, (u64, Instant)>,
}

impl Locations {
    /// The file whose chunks these are.
    pub fn ino(&self) -> Ino {
        self.ino
    }

    pub fn new(ino: Ino) -> Self {
        Locations {
            ino,
            map: Mutex::new(HashMap::new()),
            unwritten: Mutex::new(Unwritten::default()),
        }
    }

    fn unwritten_lock(&self) -> std::sync::MutexGuard<'_, Unwritten> {
        self.unwritten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken by a read before it asks the replicas; [`Locations::mark_unwritten`] needs it.
    pub fn write_epoch(&self) -> u64 {
        self.unwritten_lock().epoch
    }

    /// Remembers that no replica holds `chunk` at `index`, unless a write started or ended
    /// since `epoch` was taken: its data may have landed after the replicas answered.
    pub fn mark_unwritten(&self, index: u64, chunk: u64, epoch: u64) {
        let mut u = self.unwritten_lock();
        if u.epoch == epoch {
            u.seen.insert(index, (chunk, Instant::now()));
        }
    }

    /// True if `chunk` at `index` was found on no replica less than [`HOLE_TTL`] ago.
    pub fn is_unwritten(&self, index: u64, chunk: u64) -> bool {
        let u = self.unwritten_lock();
        matches!(u.seen.get(&index), Some((c, at)) if *c == chunk && at.elapsed() < HOLE_TTL)
    }

    /// Called when a write of chunk `index` starts and again when it ends.
    pub fn writing(&self, index: u64) {
        let mut u = self.unwritten_lock();
        u.epoch += 1;
        u.seen.remove(&index);
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts).
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, index: u64) -> Option<Option<ChunkLoc>> {
        match self.map().get(&index) {
            Some(Entry::Present(loc)) => Some(Some(loc.clone())),
            Some(Entry::Hole(at)) if at.elapsed() < HOLE_TTL => Some(None),
            _ => None,
        }
    }

    /// The cached locations of chunks `first..end`: chunks this client knows to exist (it may
    /// have allocated them moments ago, before a lagging metadata replica heard of them).
    pub fn present(&self, first: u64, end: u64) -> Vec<ChunkLoc> {
        self.map()
            .iter()
            .filter_map(|(i, e)| match e {
                Entry::Present(loc) if (first..end).contains(i) => Some(loc.clone()),
                _ => None,
            })
            .collect()
    }

    /// Records `loc` (an answer from the metadata service) unless a newer version is cached.
    pub fn update(&self, loc: &ChunkLoc) {
        let mut map = self.map();
        if let Some(Entry::Present(old)) = map.get(&loc.index) {
            if old.chunk == loc.chunk && old.version > loc.version {
                return;
            }
        }
        map.insert(loc.index, Entry::Present(loc.clone()));
    }

    /// Forgets every chunk with index `>= first` (after a truncate released them).
    pub fn forget_from(&self, first: u64) {
        self.map().retain(|index, _| *index < first);
    }

    /// Forgets everything: locations, holes and chunks seen unwritten (another client
    /// changed the file).
    pub fn forget_all(&self) {
        self.map().clear();
        let mut u = self.unwritten_lock();
        u.epoch += 1;
        u.seen.clear();
    }

    /// Forgets chunks `first..first + count` (after a punch released them).
    pub fn forget_range(&self, first: u64, count: u64) {
        self.map()
            .retain(|index, _| *index < first || *index - first >= count);
    }

    /// The location of chunk `index` for reading: `None` if the file has a hole there.
    pub async fn for_read(
        &self,
        store: &dyn Store,
        index: u64,
    ) -> Result<Option<ChunkLoc>, ClientError> {
        if let Some(hit) = self.cached(index) {
            return Ok(hit);
        }
        let found = store.chunks(self.ino, index, LOOKUP_BATCH).await?;
        let result = found.iter().find(|l| l.index == index).cloned();
        self.learn(index, LOOKUP_BATCH, found);
        Ok(result)
    }

    /// Takes what the metadata service answered for chunks `first..first + count`: the
    /// locations `found`, and holes at the other indexes.
    pub fn learn(&self, first: u64, count: u64, found: Vec<ChunkLoc>) {
        let now = Instant::now();
        let mut map = self.map();
        for i in first..first.saturating_add(count) {
            if !matches!(map.get(&i), Some(Entry::Present(_))) {
                map.insert(i, Entry::Hole(now));
            }
        }
        for loc in found {
            map.insert(loc.index, Entry::Present(loc));
        }
    }

    /// Asks the metadata service again for chunk `index` (after a stale version or a missing
    /// chunk on a chunkserver).
    pub async fn refresh(
        &self,
        store: &dyn Store,
        index: u64,
    ) -> Result<Option<ChunkLoc>, ClientError> {
        let found = store.chunks(self.ino, index, 1).await?;
        let loc = found.into_iter().find(|l| l.index == index);
        let mut map = self.map();
        match &loc {
            Some(l) => map.insert(index, Entry::Present(l.clone())),
            None => map.insert(index, Entry::Hole(Instant::now())),
        };
        Ok(loc)
    }

    /// The location of chunk `index` for writing, allocating the chunk if it does not exist.
    pub async fn for_write(&self, store: &dyn Store, index: u64) -> Result<ChunkLoc, ClientError> {
        if let Some(Some(loc)) = self.cached(index) {
            return Ok(loc);
        }
        let loc = store.allocate_chunk(self.ino, index).await?;
        self.update(&loc);
        Ok(loc)
    }

    /// Removes `server` from the replicas of `loc` at the metadata service; returns the new
    /// location (with a bumped version). If someone else changed the chunk meanwhile, the
    /// fresh location is fetched and the drop retried once against it.
    pub async fn drop_replica(
        &self,
        store: &dyn Store,
        loc: &ChunkLoc,
        server: ServerId,
    ) -> Result<ChunkLoc, ClientError> {
        tracing::warn!(
            ino = self.ino,
            chunk = loc.chunk,
            version = loc.version,
            server,
            "dropping a failed replica"
        );
        // The answer names the chunk's owner's index (a shared chunk has several); this
        // file's index is the one that belongs in this cache.
        let ours = |mut new: ChunkLoc| {
            new.index = loc.index;
            new.shared |= loc.shared;
            new
        };
        match store.drop_replica(loc.chunk, loc.version, server).await {
            Ok(new) => {
                let new = ours(new);
                self.update(&new);
                Ok(new)
            }
            Err(MetaError::StaleVersion { current }) => {
                tracing::debug!(chunk = loc.chunk, current, "drop_replica raced; refreshing");
                let Some(fresh) = self.refresh(store, loc.index).await? else {
                    return Err(ClientError::NoReplica {
                        index: loc.index,
                        chunk: loc.chunk,
                        last: None,
                    });
                };
                if fresh.chunk != loc.chunk || !fresh.replicas.iter().any(|r| r.server == server) {
                    return Ok(fresh);
                }
                let new = ours(
                    store
                        .drop_replica(fresh.chunk, fresh.version, server)
                        .await?,
                );
                self.update(&new);
                Ok(new)
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rawfs_metadata_api::Replica;

    fn loc(index: u64, version: u64) -> ChunkLoc {
        ChunkLoc {
            index,
            chunk: 100 + index,
            version,
            term: 1,
            shared: false,
            ec: None,
            replicas: vec![Replica {
                server: 1,
                data_addr: "a".into(),
            }],
        }
    }

    #[test]
    fn update_keeps_the_newest_version() {
        let l = Locations::new(7);
        l.update(&loc(0, 5));
        l.update(&loc(0, 3));
        assert_eq!(l.cached(0), Some(Some(loc(0, 5))));
        l.update(&loc(0, 6));
        assert_eq!(l.cached(0).unwrap().unwrap().version, 6);
    }

    #[test]
    fn an_unwritten_chunk_is_not_remembered_across_a_write() {
        let l = Locations::new(7);
        let before = l.write_epoch();
        l.mark_unwritten(0, 100, before);
        assert!(l.is_unwritten(0, 100));
        assert!(!l.is_unwritten(0, 101), "another chunk at the same index");
        l.writing(0);
        assert!(!l.is_unwritten(0, 100), "a write forgets it");
        // A read that asked the replicas before a write started or ended marks nothing.
        let stale = l.write_epoch();
        l.writing(1);
        l.mark_unwritten(0, 100, stale);
        assert!(!l.is_unwritten(0, 100));
    }

    #[test]
    fn forget_drops_released_chunks() {
        let l = Locations::new(7);
        for i in 0..6 {
            l.update(&loc(i, 1));
        }
        l.forget_range(1, 2);
        assert!(l.cached(1).is_none() && l.cached(2).is_none());
        assert!(l.cached(0).is_some() && l.cached(3).is_some());
        l.forget_from(4);
        assert!(l.cached(4).is_none() && l.cached(5).is_none());
        assert!(l.cached(3).is_some());
    }
}
