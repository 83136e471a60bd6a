//! `cold` files written as RS 4+2 directly: a new chunk of a cold file is allocated erasure
//! coded (length 0, 6 shards placed), and the client commits each append to it with
//! `ec_extend` (the client side is the client crate's `ec_write.rs`).
//!
//! ```text
//!  allocate_chunk, file class cold, ≥ 6 live servers ──▶ log: AllocateEc (ids, 6 shards)
//!                                       otherwise     ──▶ log: AllocateChunk (3 replicas,
//!                                                           converted later by the healer)
//!  ec_extend(chunk, version, shards, from, to) ──▶ log: EcExtend ──▶ length = to, version + 1
//! ```
//!
//! `EcExtend` is fenced by everything a concurrent change could move: the chunk id and
//! version (a conversion back to replicas, a copy), the length (another append), the exact
//! shard list with every shard live (a rebuild or move by the healer, a shard marked lost),
//! no copy pending and no other reference (a snapshot or clone shares the chunk unbumped, so
//! it must not see bytes appended after it). The version bump in turn refuses the commit of a
//! shard rebuild that read the chunk before the append (`ReplaceShard` is fenced by version).

use rawfs_metadata_api::{
    ChunkId, ChunkLoc, Ino, MetaError, MetaResult, ReqId, ServerId, StorageClass, Timespec,
    CHUNK_SIZE, EC_SHARDS,
};

use redb::ReadableTable;

use crate::commands::Command;
use crate::erasure::{fenced, visible, EcRec, ShardRec};
use crate::namespace::invalid;
use crate::server::{tracked, Server};
use crate::store::{Fail, Op, ReadTables, Tables, NEXT_CHUNK};

/// An RS 4+2 stripe of the client's layout (4 data cells of 1 MiB): appends start on one.
const STRIPE: u64 = 4 << 20;

/// Applies `AllocateEc`: chunk `index` of `ino` becomes an erasure-coded chunk of length 0
/// with one shard on each of `servers` (6 distinct). An existing chunk is returned as is.
pub(crate) fn allocate(
    t: &mut Tables,
    ino: Ino,
    index: u64,
    servers: &[ServerId],
    term: u64,
) -> Op<ChunkLoc> {
    if let Some(loc) = crate::chunks::allocated(t, ino, index, term)? {
        return Ok(loc);
    }
    let mut distinct = servers.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() != EC_SHARDS || servers.len() != EC_SHARDS {
        return Err(MetaError::NoSpace {
            reason: format!("RS 4+2 needs {EC_SHARDS} distinct live chunkservers"),
        }
        .into());
    }
    let chunk = t.counter(NEXT_CHUNK)?.max(1);
    t.set_counter(NEXT_CHUNK, chunk + 1 + EC_SHARDS as u64)?;
    let shards: Vec<ShardRec> = servers
        .iter()
        .zip(chunk + 1..)
        .map(|(&server, id)| ShardRec {
            chunk: id,
            server: Some(server),
        })
        .collect();
    t.chunk_owner.insert(chunk, (ino, index))?;
    for s in &shards {
        t.chunk_owner.insert(s.chunk, (ino, index))?;
    }
    let rec = crate::store::ChunkRec {
        chunk,
        version: 1,
        servers: Vec::new(),
        pending: None,
        ec: Some(EcRec { length: 0, shards }),
        converting: None,
    };
    t.put_chunk(ino, index, &rec)?;
    visible(t, ino, index, &rec, term)
}

/// Applies `EcExtend` (see the module docs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn extend(
    t: &mut Tables,
    (ino, index): (Ino, u64),
    chunk: ChunkId,
    version: u64,
    shards: &[(ChunkId, ServerId)],
    (from, to): (u64, u64),
    term: u64,
) -> Op<ChunkLoc> {
    if to > CHUNK_SIZE || to < from {
        return Err(invalid("erasure-coded append outside the chunk"));
    }
    crate::chunks::file_rec(t, ino)?;
    let mut rec = fenced(t, ino, index, chunk, version)?;
    let stale = || -> Fail {
        MetaError::StaleVersion {
            current: rec.version,
        }
        .into()
    };
    let matches = |ec: &EcRec| {
        ec.length == from
            && ec.shards.len() == shards.len()
            && ec
                .shards
                .iter()
                .zip(shards)
                .all(|(s, &(id, server))| s.chunk == id && s.server == Some(server))
    };
    match &rec.ec {
        Some(ec) if rec.pending.is_none() && matches(ec) => {}
        _ => return Err(stale()),
    }
    if from % STRIPE != 0 {
        // Appending inside a stripe would rewrite parity that covers committed bytes.
        return Err(invalid("erasure-coded append inside a stripe"));
    }
    let owned = t.chunk_owner.get(chunk)?.map(|g| g.value()) == Some((ino, index));
    if !owned || crate::shares::has_extra_refs(&t.chunk_refs, chunk)? {
        return Err(invalid("chunk is shared with a snapshot or clone"));
    }
    if let Some(ec) = rec.ec.as_mut() {
        ec.length = to;
    }
    rec.version += 1;
    t.put_chunk(ino, index, &rec)?;
    visible(t, ino, index, &rec, term)
}

/// Whether new chunks of `ino` are erasure coded from the start.
pub(crate) fn is_cold(rt: &ReadTables, ino: Ino) -> Op<bool> {
    Ok(crate::store::inode(&rt.inodes, ino)?.class == StorageClass::Cold)
}

impl Server {
    /// `ec_extend`: see the module docs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn do_ec_extend(
        &self,
        (ino, index): (Ino, u64),
        chunk: ChunkId,
        version: u64,
        shards: Vec<(ChunkId, ServerId)>,
        from: u64,
        to: u64,
        req: ReqId,
    ) -> MetaResult<ChunkLoc> {
        let cmd = Command::EcExtend {
            ino,
            index,
            chunk,
            version,
            shards,
            from,
            to,
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_chunk()
    }
}
