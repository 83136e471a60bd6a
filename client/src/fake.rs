//! An in-memory cluster implementing [`Store`] for unit tests: a chunk map like the metadata
//! service's and chunk contents per server, with switches to take servers down, fill them,
//! make them time out, or corrupt a copy. It also plays the metadata side of RS 4+2: conversions
//! (`ec_prepare`/`ec_commit`), copies of erasure-coded chunks (`cow_chunk` with `from_ec`),
//! and shards marked lost (`drop_replica` with a shard id).

use crate::store::{Put, Store};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rawfs_chunkserver_api::DataError;
use rawfs_metadata_api::{
    Attr, ChunkId, ChunkLoc, CowLoc, EcLoc, EcPlan, FileKind, Ino, MetaError, Replica, ServerId,
    Shard, Timespec, EC_SHARDS, REPLICAS,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

const PAGE: usize = 64 << 10;

#[derive(Default)]
pub(crate) struct Stored {
    pub version: u64,
    pages: HashMap<u32, Box<[u8]>>,
}

impl Stored {
    pub fn write(&mut self, off: u32, data: &[u8]) {
        let mut at = off as usize;
        let mut src = data;
        while !src.is_empty() {
            let page = (at / PAGE) as u32;
            let within = at % PAGE;
            let n = (PAGE - within).min(src.len());
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE].into_boxed_slice());
            p[within..within + n].copy_from_slice(&src[..n]);
            src = &src[n..];
            at += n;
        }
    }

    /// The runs of pages ever written within `off..off + len`.
    pub fn written(&self, off: u32, len: u32) -> Vec<std::ops::Range<u32>> {
        let end = off + len;
        let pages = end.div_ceil(PAGE as u32) as usize;
        let flags: Vec<bool> = (0..pages)
            .map(|p| self.pages.contains_key(&(p as u32)))
            .collect();
        rawfs_chunkserver_api::written::runs_of(&flags, PAGE as u32, off..end)
    }

    pub fn read(&self, off: u32, len: u32) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        let mut at = off as usize;
        let mut pos = 0;
        while pos < out.len() {
            let page = (at / PAGE) as u32;
            let within = at % PAGE;
            let n = (PAGE - within).min(out.len() - pos);
            if let Some(p) = self.pages.get(&page) {
                out[pos..pos + n].copy_from_slice(&p[within..within + n]);
            }
            pos += n;
            at += n;
        }
        out
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub next_chunk: u64,
    pub servers: Vec<ServerId>,
    pub down: HashSet<ServerId>,
    pub full: HashSet<ServerId>,
    pub map: BTreeMap<(Ino, u64), ChunkLoc>,
    pub data: HashMap<(ServerId, ChunkId), Stored>,
    pub corrupt: HashSet<(ServerId, ChunkId)>,
    pub synced: Vec<(ServerId, ChunkId)>,
    pub sizes: HashMap<Ino, u64>,
    pub reads: u64,
    /// `chunks` lookups answered.
    pub lookups: u64,
    pub writes: u64,
    pub commits: u64,
    /// Sum of the stored-bytes deltas committed per file.
    pub stored: HashMap<Ino, i64>,
    pub term: u64,
    /// Real data addresses by server (tests against real chunkservers); else `s<n>`.
    pub addrs: HashMap<ServerId, String>,
    /// Servers whose data calls time out.
    pub timeouts: HashSet<ServerId>,
    /// Servers that silently store a wrong first byte of every write (a lying disk).
    pub garble: HashSet<ServerId>,
    /// Copies a server deleted, with the version they had: it refuses to recreate them at
    /// that version or older, as a chunkserver's tombstones do.
    pub tombstones: HashMap<(ServerId, ChunkId), u64>,
    /// Every data read: (server, chunk, offset, len).
    pub read_log: Vec<(ServerId, ChunkId, u32, u32)>,
    /// Every fence: (server, chunk, version).
    pub fences: Vec<(ServerId, ChunkId, u64)>,
    /// Conversions started by `ec_prepare` and not yet committed or cancelled.
    pub converting: HashMap<(Ino, u64), EcPlan>,
    /// Refuse every `ec_commit` (as if a writer had cancelled the conversion).
    pub refuse_ec_commit: bool,
    /// Pending copies out of erasure-coded chunks: (new chunk, source).
    pub cows: HashMap<(Ino, u64), (ChunkLoc, ChunkLoc)>,
    /// Shards reported lost: (shard id, server).
    pub lost_reports: Vec<(ChunkId, ServerId)>,
    /// Files whose new chunks are erasure coded from the start (class `cold`).
    pub cold: HashSet<Ino>,
    /// Refuse every `ec_extend` (as if a snapshot now shared the chunk).
    pub refuse_ec_extend: bool,
    /// `ec_extend` calls that committed.
    pub extends: u64,
}

impl State {
    /// The location of chunk `index` of `ino`, or `NotFound`.
    fn loc_at(&self, ino: Ino, index: u64) -> Result<ChunkLoc, MetaError> {
        self.map
            .get(&(ino, index))
            .cloned()
            .ok_or(MetaError::NotFound)
    }

    /// `server`'s copy of `chunk`, for a caller at `version` (refused like a chunkserver
    /// refuses an older version).
    fn stored_at(
        &self,
        server: ServerId,
        chunk: ChunkId,
        version: u64,
    ) -> Result<&Stored, DataError> {
        let stored = self.data.get(&(server, chunk)).ok_or(DataError::NotFound)?;
        if stored.version > version {
            return Err(DataError::StaleVersion {
                current: stored.version,
            });
        }
        Ok(stored)
    }

    pub fn addr(&self, server: ServerId) -> String {
        self.addrs
            .get(&server)
            .cloned()
            .unwrap_or_else(|| format!("s{server}"))
    }

    fn new_replicated(&mut self, index: u64) -> ChunkLoc {
        let chunk = self.next_chunk;
        self.next_chunk += 1;
        let replicas = self
            .servers
            .iter()
            .take(REPLICAS)
            .map(|&s| Replica {
                server: s,
                data_addr: self.addr(s),
            })
            .collect();
        ChunkLoc {
            index,
            chunk,
            version: 1,
            replicas,
            term: self.term,
            shared: false,
            ec: None,
        }
    }
}

impl State {
    /// An erasure-coded chunk of length 0 with a shard on each of the first 6 servers.
    fn new_erasure_coded(&mut self, index: u64) -> ChunkLoc {
        let chunk = self.next_chunk;
        self.next_chunk += 1 + EC_SHARDS as u64;
        let shards = (0..EC_SHARDS)
            .map(|k| Shard {
                chunk: chunk + 1 + k as u64,
                replica: Some(Replica {
                    server: self.servers[k],
                    data_addr: self.addr(self.servers[k]),
                }),
            })
            .collect();
        ChunkLoc {
            index,
            chunk,
            version: 1,
            replicas: Vec::new(),
            term: self.term,
            shared: true,
            ec: Some(EcLoc { length: 0, shards }),
        }
    }
}

/// The fake cluster. Server `n` has data address `s<n>`.
pub(crate) struct Fake {
    pub state: Mutex<State>,
}

fn server_of(addr: &str) -> Option<ServerId> {
    addr.strip_prefix('s')?.parse().ok()
}

impl Fake {
    pub fn new(servers: u64) -> Self {
        Fake {
            state: Mutex::new(State {
                next_chunk: 100,
                servers: (1..=servers).collect(),
                term: 1,
                ..State::default()
            }),
        }
    }

    pub fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn loc(&self, ino: Ino, index: u64) -> Option<ChunkLoc> {
        self.st().map.get(&(ino, index)).cloned()
    }

    fn attr(ino: Ino, size: u64) -> Attr {
        Attr {
            ino,
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size,
            rdev: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            stored: 0,
            no_xattrs: true,
        }
    }

    fn data_check(st: &State, addr: &str) -> Result<ServerId, DataError> {
        let server = server_of(addr).ok_or(DataError::Protocol {
            reason: "bad addr".into(),
        })?;
        if st.down.contains(&server) {
            return Err(DataError::Unreachable {
                addr: addr.to_string(),
                reason: "down".into(),
            });
        }
        if st.timeouts.contains(&server) {
            return Err(DataError::Timeout);
        }
        Ok(server)
    }
}

impl Store for Fake {
    fn chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<Vec<ChunkLoc>, MetaError>> {
        let mut st = self.st();
        st.lookups += 1;
        let v = st
            .map
            .range((ino, first)..(ino, first.saturating_add(count)))
            .map(|(_, l)| l.clone())
            .collect();
        async move { Ok(v) }.boxed()
    }

    fn allocate_chunk(&self, ino: Ino, index: u64) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        let mut st = self.st();
        let loc = match st.map.get(&(ino, index)) {
            Some(l) => l.clone(),
            None => {
                let l = if st.cold.contains(&ino) && st.servers.len() >= EC_SHARDS {
                    st.new_erasure_coded(index)
                } else {
                    st.new_replicated(index)
                };
                st.map.insert((ino, index), l.clone());
                l
            }
        };
        async move { Ok(loc) }.boxed()
    }

    fn commit_write(
        &self,
        ino: Ino,
        end: u64,
        delta: i64,
    ) -> BoxFuture<'_, Result<Attr, MetaError>> {
        let mut st = self.st();
        st.commits += 1;
        *st.stored.entry(ino).or_default() += delta;
        let size = st.sizes.entry(ino).or_default();
        *size = (*size).max(end);
        let a = Fake::attr(ino, *size);
        async move { Ok(a) }.boxed()
    }

    fn release_chunks(
        &self,
        ino: Ino,
        first: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<(), MetaError>> {
        let mut st = self.st();
        st.map
            .retain(|(i, x), _| *i != ino || *x < first || *x >= first + count);
        async move { Ok(()) }.boxed()
    }

    fn drop_replica(
        &self,
        chunk: ChunkId,
        version: u64,
        server: ServerId,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        let mut st = self.st();
        let State {
            map, lost_reports, ..
        } = &mut *st;
        let owner = |l: &&mut ChunkLoc| {
            l.ec.as_ref()
                .is_some_and(|e| e.shards.iter().any(|s| s.chunk == chunk))
        };
        if let Some(l) = map.values_mut().find(owner) {
            for s in l.ec.iter_mut().flat_map(|e| e.shards.iter_mut()) {
                if s.chunk == chunk && s.replica.as_ref().is_some_and(|r| r.server == server) {
                    s.replica = None;
                    lost_reports.push((chunk, server));
                }
            }
            let l = l.clone();
            return async move { Ok(l) }.boxed();
        }
        let r = match st.map.values_mut().find(|l| l.chunk == chunk) {
            None => Err(MetaError::NotFound),
            Some(l) => {
                if l.version == version
                    && l.replicas.len() > 1
                    && l.replicas.iter().any(|r| r.server == server)
                {
                    l.replicas.retain(|r| r.server != server);
                    l.version += 1;
                }
                Ok(l.clone())
            }
        };
        async move { r }.boxed()
    }

    // Only erasure-coded and converting chunks are shared here (the fake has no snapshots).
    fn cow_chunk(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
    ) -> BoxFuture<'_, Result<CowLoc, MetaError>> {
        let r = (|| {
            let mut st = self.st();
            let mut loc = st.loc_at(ino, index)?;
            let plain = |loc: ChunkLoc| CowLoc {
                loc,
                source: None,
                from_ec: None,
            };
            if loc.chunk != chunk {
                return Ok(plain(loc));
            }
            if st.converting.remove(&(ino, index)).is_some() {
                // A writer cancels the conversion; the version bump voids its commit.
                loc.version += 1;
                loc.shared = false;
                st.map.insert((ino, index), loc.clone());
                return Ok(plain(loc));
            }
            if !loc.shared {
                return Ok(plain(loc));
            }
            if loc.ec.is_none() {
                return Err(MetaError::Invalid {
                    reason: "the fake shares no replicated chunks".into(),
                });
            }
            let (new, src) = match st.cows.get(&(ino, index)) {
                Some(pending) => pending.clone(),
                None => {
                    let new = st.new_replicated(index);
                    st.cows.insert((ino, index), (new.clone(), loc.clone()));
                    (new, loc)
                }
            };
            Ok(CowLoc {
                loc: new,
                source: None,
                from_ec: Some(src),
            })
        })();
        async move { r }.boxed()
    }

    fn cow_done(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        failed: Vec<ServerId>,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        let r = (|| {
            let mut st = self.st();
            match st.cows.get(&(ino, index)) {
                Some((new, _)) if new.chunk == chunk => {}
                _ => return Err(MetaError::NotFound),
            }
            let (mut new, src) = st.cows.remove(&(ino, index)).ok_or(MetaError::NotFound)?;
            if !failed.is_empty() {
                new.replicas.retain(|r| !failed.contains(&r.server));
                new.version += 1;
            }
            st.map.insert((ino, index), new.clone());
            // The source's shards are deleted, as the metadata service's garbage collection
            // would: nothing can read the old layout any more.
            for s in src.ec.iter().flat_map(|e| e.shards.iter()) {
                if let Some(r) = &s.replica {
                    st.data.remove(&(r.server, s.chunk));
                }
            }
            Ok(new)
        })();
        async move { r }.boxed()
    }

    fn ec_prepare(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
    ) -> BoxFuture<'_, Result<EcPlan, MetaError>> {
        let r = (|| {
            let mut st = self.st();
            let mut loc = st.loc_at(ino, index)?;
            if loc.chunk != chunk || loc.version != version {
                return Err(MetaError::StaleVersion {
                    current: loc.version,
                });
            }
            if loc.shared || loc.ec.is_some() {
                return Err(MetaError::Invalid {
                    reason: "already converting or erasure coded".into(),
                });
            }
            if st.servers.len() < EC_SHARDS {
                return Err(MetaError::NoSpace {
                    reason: "fewer than 6 chunkservers".into(),
                });
            }
            loc.version += 1;
            loc.shared = true;
            loc.term = st.term;
            let servers: Vec<ServerId> = st.servers.iter().take(EC_SHARDS).copied().collect();
            let shards = servers
                .into_iter()
                .map(|s| {
                    let id = st.next_chunk;
                    st.next_chunk += 1;
                    Shard {
                        chunk: id,
                        replica: Some(Replica {
                            server: s,
                            data_addr: st.addr(s),
                        }),
                    }
                })
                .collect();
            let plan = EcPlan {
                loc: loc.clone(),
                shards,
            };
            st.map.insert((ino, index), loc);
            st.converting.insert((ino, index), plan.clone());
            Ok(plan)
        })();
        async move { r }.boxed()
    }

    fn ec_extend(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        shards: Vec<(ChunkId, ServerId)>,
        from: u64,
        to: u64,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        let r = (|| {
            let mut st = self.st();
            let mut loc = st.loc_at(ino, index)?;
            let stale = MetaError::StaleVersion {
                current: loc.version,
            };
            let Some(ec) = loc.ec.as_mut() else {
                return Err(stale);
            };
            let listed: Vec<(ChunkId, ServerId)> = ec
                .shards
                .iter()
                .filter_map(|s| Some((s.chunk, s.replica.as_ref()?.server)))
                .collect();
            let all_live = listed.len() == ec.shards.len();
            if st.refuse_ec_extend
                || loc.chunk != chunk
                || loc.version != version
                || ec.length != from
                || listed != shards
                || !all_live
                || to < from
            {
                return Err(stale);
            }
            ec.length = to;
            loc.version += 1;
            st.extends += 1;
            st.map.insert((ino, index), loc.clone());
            Ok(loc)
        })();
        async move { r }.boxed()
    }

    fn ec_commit(
        &self,
        ino: Ino,
        index: u64,
        chunk: ChunkId,
        version: u64,
        length: u64,
        term: u64,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        let r = (|| {
            let mut st = self.st();
            let loc = st.loc_at(ino, index)?;
            let stale = MetaError::StaleVersion {
                current: loc.version,
            };
            if st.refuse_ec_commit || loc.chunk != chunk || loc.version != version {
                return Err(stale);
            }
            let plan = st.converting.get(&(ino, index)).cloned().ok_or(stale)?;
            if term != plan.loc.term {
                return Err(MetaError::StaleTerm { current: st.term });
            }
            st.converting.remove(&(ino, index));
            let new = ChunkLoc {
                index,
                chunk,
                version,
                replicas: Vec::new(),
                term: st.term,
                shared: true,
                ec: Some(EcLoc {
                    length,
                    shards: plan.shards,
                }),
            };
            // The replicas are deleted (the real service queues them for deletion).
            for r in &loc.replicas {
                st.data.remove(&(r.server, chunk));
            }
            st.map.insert((ino, index), new.clone());
            Ok(new)
        })();
        async move { r }.boxed()
    }

    fn fence<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        let r = (|| {
            let mut st = self.st();
            let server = Fake::data_check(&st, addr)?;
            if term < st.term {
                return Err(DataError::StaleTerm { current: st.term });
            }
            let stored = st
                .data
                .get_mut(&(server, chunk))
                .ok_or(DataError::NotFound)?;
            if stored.version > version {
                return Err(DataError::StaleVersion {
                    current: stored.version,
                });
            }
            stored.version = version;
            st.fences.push((server, chunk, version));
            Ok(())
        })();
        async move { r }.boxed()
    }

    fn clone_chunk<'a>(
        &'a self,
        _addr: &'a str,
        _src: (ChunkId, u64),
        _dst: (ChunkId, u64),
        _term: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        async { Err(DataError::NotFound) }.boxed()
    }

    fn write<'a>(&'a self, addr: &'a str, put: Put) -> BoxFuture<'a, Result<(), DataError>> {
        let r = (|| {
            let mut st = self.st();
            let server = Fake::data_check(&st, addr)?;
            if st.full.contains(&server) {
                return Err(DataError::NoSpace);
            }
            if put.term < st.term {
                return Err(DataError::StaleTerm { current: st.term });
            }
            st.writes += 1;
            if let Some(&deleted_at) = st.tombstones.get(&(server, put.chunk)) {
                if put.version <= deleted_at {
                    return Err(DataError::StaleVersion {
                        current: deleted_at,
                    });
                }
            }
            let garble = st.garble.contains(&server) && !put.data.is_empty();
            let stored = st.data.entry((server, put.chunk)).or_default();
            if stored.version > put.version {
                return Err(DataError::StaleVersion {
                    current: stored.version,
                });
            }
            stored.version = put.version;
            if garble {
                let mut data = put.data.to_vec();
                data[0] ^= 1;
                stored.write(put.offset, &data);
                return Ok(());
            }
            stored.write(put.offset, &put.data);
            Ok(())
        })();
        async move { r }.boxed()
    }

    fn read<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Bytes, DataError>> {
        let r = (|| {
            let mut st = self.st();
            let server = Fake::data_check(&st, addr)?;
            st.reads += 1;
            st.read_log.push((server, chunk, offset, len));
            let stored = st.stored_at(server, chunk, version)?;
            if st.corrupt.contains(&(server, chunk)) {
                return Err(DataError::Corrupt {
                    offset: u64::from(offset),
                });
            }
            Ok(Bytes::from(stored.read(offset, len)))
        })();
        async move { r }.boxed()
    }

    fn written<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        version: u64,
        offset: u32,
        len: u32,
    ) -> BoxFuture<'a, Result<Vec<std::ops::Range<u32>>, DataError>> {
        let r = (|| {
            let st = self.st();
            let server = Fake::data_check(&st, addr)?;
            Ok(st.stored_at(server, chunk, version)?.written(offset, len))
        })();
        async move { r }.boxed()
    }

    fn sync<'a>(
        &'a self,
        addr: &'a str,
        chunk: ChunkId,
        _version: u64,
    ) -> BoxFuture<'a, Result<(), DataError>> {
        let r = (|| {
            let mut st = self.st();
            let server = Fake::data_check(&st, addr)?;
            if !st.data.contains_key(&(server, chunk)) {
                return Err(DataError::NotFound);
            }
            st.synced.push((server, chunk));
            Ok(())
        })();
        async move { r }.boxed()
    }
}
