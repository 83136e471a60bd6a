//! An in-memory cluster implementing [`Store`] for unit tests: a chunk map like the metadata
//! service's and chunk contents per server, with switches to take servers down, fill them,
//! or corrupt a copy.

use crate::store::{Put, Store};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rawfs_chunkserver_api::DataError;
use rawfs_metadata_api::{
    Attr, ChunkId, ChunkLoc, FileKind, Ino, MetaError, Replica, ServerId, Timespec, REPLICAS,
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
    fn write(&mut self, off: u32, data: &[u8]) {
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
    pub writes: u64,
    pub commits: u64,
    pub term: u64,
    /// Real data addresses by server (tests against real chunkservers); else `s<n>`.
    pub addrs: HashMap<ServerId, String>,
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
        let st = self.st();
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
                let chunk = st.next_chunk;
                st.next_chunk += 1;
                let replicas = st
                    .servers
                    .iter()
                    .take(REPLICAS)
                    .map(|&s| Replica {
                        server: s,
                        data_addr: st.addrs.get(&s).cloned().unwrap_or_else(|| format!("s{s}")),
                    })
                    .collect();
                let l = ChunkLoc {
                    index,
                    chunk,
                    version: 1,
                    replicas,
                    term: st.term,
                    shared: false,
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
        _delta: i64,
    ) -> BoxFuture<'_, Result<Attr, MetaError>> {
        let mut st = self.st();
        st.commits += 1;
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

    // The fake cluster never shares a chunk (it has no snapshots), so a copy-on-write call
    // means the client asked for one it did not need.
    fn cow_chunk(
        &self,
        _ino: Ino,
        _index: u64,
        _chunk: ChunkId,
    ) -> BoxFuture<'_, Result<rawfs_metadata_api::CowLoc, MetaError>> {
        async {
            Err(MetaError::Invalid {
                reason: "the fake shares no chunks".into(),
            })
        }
        .boxed()
    }

    fn cow_done(
        &self,
        _ino: Ino,
        _index: u64,
        _chunk: ChunkId,
        _failed: Vec<ServerId>,
    ) -> BoxFuture<'_, Result<ChunkLoc, MetaError>> {
        async {
            Err(MetaError::Invalid {
                reason: "the fake shares no chunks".into(),
            })
        }
        .boxed()
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
            let stored = st.data.entry((server, put.chunk)).or_default();
            if stored.version > put.version {
                return Err(DataError::StaleVersion {
                    current: stored.version,
                });
            }
            stored.version = put.version;
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
            let stored = st.data.get(&(server, chunk)).ok_or(DataError::NotFound)?;
            if stored.version > version {
                return Err(DataError::StaleVersion {
                    current: stored.version,
                });
            }
            if st.corrupt.contains(&(server, chunk)) {
                return Err(DataError::Corrupt {
                    offset: u64::from(offset),
                });
            }
            Ok(Bytes::from(stored.read(offset, len)))
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
