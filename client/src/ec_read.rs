//! Reads of erasure-coded chunks (RS 4+2, layout in [`crate::erasure`]): healthy reads fetch
//! only the data-shard ranges they need; degraded reads fetch any 4 of the 6 shards and
//! rebuild the range.
//!
//! ```text
//!  read(off, len) ──plan_read──▶ one range per cell touched, each in its data shard
//!     all needed data shards listed, not suspect ──▶ fetch in parallel ──▶ copy ──▶ done
//!     a shard lost (None), suspect, or its fetch fails (corrupt, missing, unreachable, slow)
//!       ──▶ mark it unavailable ──plan_fetch──▶ the same rows from 4 usable shards
//!       ──▶ fetch what is not in hand yet (parallel); another failure ──▶ plan again
//!       ──▶ Codec::reconstruct_into (copies healthy pieces, decodes the rest)
//!     fewer than 4 usable shards ──▶ ClientError::NoReplica
//!  corrupt / missing shards ──▶ drop_replica(shard id): the shard is marked lost
//! ```
//!
//! Bytes past the chunk's logical `length` read as zeros and are never fetched, and neither
//! are shard ranges past a shard's stored length ([`Layout::shard_len`]). Every fetched byte
//! was verified by its chunkserver against the per-block crc32c before it was sent
//! ([`BlockCheck::VerifiedBySource`]); a block that fails there comes back as
//! `DataError::Corrupt`, and the whole shard is then treated as unavailable for this read.

use crate::erasure::{
    BlockCheck, Codec, ErasureError, Layout, ShardData, ShardFetch, DATA_SHARDS, TOTAL_SHARDS,
};
use crate::error::ClientError;
use crate::read_path::Suspects;
use crate::store::Store;
use bytes::{Bytes, BytesMut};
use futures::future::join_all;
use rawfs_chunkserver_api::{DataError, MAX_PAYLOAD};
use rawfs_metadata_api::{ChunkLoc, EcLoc, MetaError, Replica};
use std::sync::OnceLock;

/// The process-wide codec, made on first use: [`Codec::new`] checks the CPU once.
static CODEC: OnceLock<Result<Codec, ErasureError>> = OnceLock::new();

/// The RS 4+2 codec for [`Layout::DEFAULT`], or why this CPU cannot run it.
pub(crate) fn codec() -> Result<&'static Codec, ErasureError> {
    CODEC
        .get_or_init(|| Codec::new(Layout::DEFAULT))
        .as_ref()
        .map_err(|e| *e)
}

/// Runs `f` (encoding or decoding a chunk, CPU work) on tokio's blocking threads so that it
/// does not stall the tasks of other files. A panic in `f` resumes here.
pub(crate) async fn on_blocking_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        ClientError::Meta(MetaError::Unavailable {
            reason: "the client is shutting down".into(),
        })
    })
}

/// The error for a codec failure on chunk `loc`: logged here with its cause, since the
/// [`ClientError`] variants carry chunkserver errors only.
pub(crate) fn erasure_error(
    loc: &ChunkLoc,
    e: ErasureError,
    last: Option<DataError>,
) -> ClientError {
    match e {
        ErasureError::TooFewShards { have, need, .. } => tracing::error!(
            chunk = loc.chunk,
            index = loc.index,
            usable = have,
            need,
            last = ?last,
            "erasure-coded chunk has too few usable shards to read"
        ),
        e => {
            tracing::error!(chunk = loc.chunk, index = loc.index, error = %e, "erasure coding failed")
        }
    }
    ClientError::NoReplica {
        index: loc.index,
        chunk: loc.chunk,
        last,
    }
}

/// The outcome of one read of an erasure-coded chunk.
pub(crate) struct Attempt {
    /// The requested bytes, or why they could not be read.
    pub result: Result<Bytes, ClientError>,
    /// Shards that failed their checksum or were missing on their chunkserver (to report).
    pub bad: Vec<usize>,
    /// A shard said the location may be out of date (stale version or term, or missing).
    pub stale: bool,
}

/// Why shards were unavailable during one read, kept to classify the final error.
#[derive(Default)]
struct Failures {
    bad: Vec<usize>,
    stale: bool,
    last: Option<DataError>,
}

impl Failures {
    fn note(&mut self, suspects: &Suspects, loc: &ChunkLoc, k: usize, r: &Replica, e: DataError) {
        tracing::warn!(chunk = loc.chunk, shard = k, addr = %r.data_addr, error = %e, "shard read failed");
        match &e {
            DataError::Corrupt { .. } => self.bad.push(k),
            DataError::NotFound => {
                self.bad.push(k);
                self.stale = true;
            }
            DataError::StaleVersion { .. } | DataError::StaleTerm { .. } => self.stale = true,
            DataError::Unreachable { .. } | DataError::Timeout => suspects.mark(r.server),
            _ => {}
        }
        self.last = Some(e);
    }
}

/// Reads chunk bytes `off..off + len` of the erasure-coded chunk `loc` (whose `ec` is `ec`).
/// `off + len` must lie within the chunk. Reports nothing: the caller reports `bad` shards
/// (after refreshing its location if `stale`), see [`report_lost`].
pub(crate) async fn read(
    store: &dyn Store,
    suspects: &Suspects,
    loc: &ChunkLoc,
    ec: &EcLoc,
    off: u64,
    len: u64,
) -> Attempt {
    let mut f = Failures::default();
    let result = read_inner(store, suspects, loc, ec, off, len, &mut f).await;
    f.bad.sort_unstable();
    f.bad.dedup();
    Attempt {
        result,
        bad: f.bad,
        stale: f.stale,
    }
}

async fn read_inner(
    store: &dyn Store,
    suspects: &Suspects,
    loc: &ChunkLoc,
    ec: &EcLoc,
    off: u64,
    len: u64,
    f: &mut Failures,
) -> Result<Bytes, ClientError> {
    let layout = Layout::DEFAULT;
    let n = ec.length;
    if n > layout.chunk_size() {
        let e = ErasureError::ChunkTooLarge {
            len: n,
            chunk_size: layout.chunk_size(),
        };
        return Err(erasure_error(loc, e, None));
    }
    let pieces = layout
        .plan_read(off, len)
        .map_err(|e| erasure_error(loc, e, None))?;
    if off >= n {
        return Ok(Bytes::from(vec![0u8; len as usize]));
    }
    let lens = layout.shard_lens(n);
    let replica = |k: usize| ec.shards.get(k).and_then(|s| s.replica.as_ref());
    let lost: [bool; TOTAL_SHARDS] = std::array::from_fn(|k| replica(k).is_none());
    let suspect: [bool; TOTAL_SHARDS] =
        std::array::from_fn(|k| replica(k).is_some_and(|r| suspects.is_suspect(r.server)));
    // Pieces that hold stored bytes (the rest are zeros past a shard's stored length).
    let stored: Vec<_> = pieces
        .iter()
        .filter(|p| p.shard_offset < lens[p.shard])
        .copied()
        .collect();
    let mut unavailable = lost;
    if stored.iter().all(|p| !lost[p.shard] && !suspect[p.shard]) {
        // Healthy: exactly the bytes asked for, from their data shards.
        let fetches: Vec<ShardFetch> = stored
            .iter()
            .map(|p| ShardFetch {
                shard: p.shard,
                shard_offset: p.shard_offset,
                len: p.len.min(lens[p.shard] - p.shard_offset),
            })
            .collect();
        let got = fetch_all(store, suspects, loc, ec, &fetches, f).await;
        if got.iter().all(|g| g.is_some()) {
            if let ([p], [Some(b)]) = (stored.as_slice(), got.as_slice()) {
                if p.len == len && b.len() as u64 == len {
                    return Ok(b.clone());
                }
            }
            let mut out = vec![0u8; len as usize];
            for (p, b) in stored.iter().zip(got.iter().flatten()) {
                let at = (p.chunk_offset - off) as usize;
                out[at..at + b.len()].copy_from_slice(b);
            }
            return Ok(Bytes::from(out));
        }
        for (fe, g) in fetches.iter().zip(&got) {
            if g.is_none() {
                unavailable[fe.shard] = true;
            }
        }
    }
    degraded(store, suspects, loc, ec, off, len, unavailable, suspect, f).await
}

/// The degraded read: plan, fetch what is missing, plan again after failures, rebuild.
#[allow(clippy::too_many_arguments)]
async fn degraded(
    store: &dyn Store,
    suspects: &Suspects,
    loc: &ChunkLoc,
    ec: &EcLoc,
    off: u64,
    len: u64,
    mut unavailable: [bool; TOTAL_SHARDS],
    suspect: [bool; TOTAL_SHARDS],
    f: &mut Failures,
) -> Result<Bytes, ClientError> {
    let layout = Layout::DEFAULT;
    let n = ec.length;
    // Suspect servers are avoided while 4 others can serve; they are asked after all
    // when they are needed (`failed` tells real failures from mere suspicion).
    let mut failed = unavailable;
    for (k, s) in suspect.iter().enumerate() {
        unavailable[k] |= *s;
    }
    let mut fetched: [Option<(u64, Bytes)>; TOTAL_SHARDS] = Default::default();
    // Each round either succeeds, marks a shard failed, or lifts the suspicions (once).
    for _round in 0..=2 * TOTAL_SHARDS {
        let plan = match layout.plan_fetch(off, len, n, unavailable) {
            Ok(plan) => plan,
            Err(ErasureError::TooFewShards { .. }) if unavailable != failed => {
                unavailable = failed;
                continue;
            }
            Err(e) => return Err(erasure_error(loc, e, f.last.clone())),
        };
        let todo: Vec<ShardFetch> = plan
            .into_iter()
            .filter(|fe| {
                !fetched[fe.shard].as_ref().is_some_and(|(at, b)| {
                    *at <= fe.shard_offset && at + b.len() as u64 >= fe.shard_offset + fe.len
                })
            })
            .collect();
        if todo.is_empty() {
            return rebuild(loc, n, off, len, &fetched, &unavailable, f);
        }
        let got = fetch_all(store, suspects, loc, ec, &todo, f).await;
        for (fe, g) in todo.iter().zip(got) {
            match g {
                Some(b) => fetched[fe.shard] = Some((fe.shard_offset, b)),
                None => {
                    unavailable[fe.shard] = true;
                    failed[fe.shard] = true;
                    fetched[fe.shard] = None;
                }
            }
        }
    }
    Err(erasure_error(
        loc,
        ErasureError::TooFewShards {
            have: failed.iter().filter(|x| !**x).count(),
            need: DATA_SHARDS,
            shard: 0,
            shard_offset: 0,
        },
        f.last.clone(),
    ))
}

/// Rebuilds the range from the shards in hand (every fetch the last plan asked for).
fn rebuild(
    loc: &ChunkLoc,
    n: u64,
    off: u64,
    len: u64,
    fetched: &[Option<(u64, Bytes)>; TOTAL_SHARDS],
    unavailable: &[bool; TOTAL_SHARDS],
    f: &Failures,
) -> Result<Bytes, ClientError> {
    let shards: [Option<ShardData<'_>>; TOTAL_SHARDS] = std::array::from_fn(|k| {
        let (at, b) = fetched[k].as_ref().filter(|_| !unavailable[k])?;
        Some(ShardData {
            offset: *at,
            bytes: b,
            check: BlockCheck::VerifiedBySource,
        })
    });
    let codec = codec().map_err(|e| erasure_error(loc, e, f.last.clone()))?;
    let mut out = vec![0u8; len as usize];
    let report = codec
        .reconstruct_into(n, off, &mut out, &shards)
        .map_err(|e| erasure_error(loc, e, f.last.clone()))?;
    tracing::debug!(
        chunk = loc.chunk,
        off,
        len,
        decoded = report.decoded,
        "degraded read of an erasure-coded chunk"
    );
    Ok(Bytes::from(out))
}

/// Fetches every range in parallel; `None` where a fetch failed (noted in `f`).
async fn fetch_all(
    store: &dyn Store,
    suspects: &Suspects,
    loc: &ChunkLoc,
    ec: &EcLoc,
    fetches: &[ShardFetch],
    f: &mut Failures,
) -> Vec<Option<Bytes>> {
    let outcomes = join_all(fetches.iter().map(|fe| async move {
        let shard = ec.shards.get(fe.shard);
        let (id, r) = shard.and_then(|s| Some((s.chunk, s.replica.as_ref()?)))?;
        Some((
            r,
            read_shard(
                store,
                &r.data_addr,
                id,
                loc.version,
                fe.shard_offset,
                fe.len,
            )
            .await,
        ))
    }))
    .await;
    fetches
        .iter()
        .zip(outcomes)
        .map(|(fe, o)| match o {
            Some((r, Ok(b))) => {
                suspects.clear(r.server);
                Some(b)
            }
            Some((r, Err(e))) => {
                f.note(suspects, loc, fe.shard, r, e);
                None
            }
            None => None,
        })
        .collect()
}

/// Reads `len` bytes at `offset` of one shard (a chunk of its own), in calls of at most
/// [`MAX_PAYLOAD`] bytes.
pub(crate) async fn read_shard(
    store: &dyn Store,
    addr: &str,
    chunk: u64,
    version: u64,
    offset: u64,
    len: u64,
) -> Result<Bytes, DataError> {
    let too_far = || DataError::Protocol {
        reason: format!("shard range {offset}+{len} is outside a chunk"),
    };
    if len <= u64::from(MAX_PAYLOAD) {
        let at = u32::try_from(offset).map_err(|_| too_far())?;
        return store.read(addr, chunk, version, at, len as u32).await;
    }
    let mut out = BytesMut::with_capacity(len as usize);
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(u64::from(MAX_PAYLOAD));
        let a = u32::try_from(at).map_err(|_| too_far())?;
        out.extend_from_slice(&store.read(addr, chunk, version, a, n as u32).await?);
        at += n;
    }
    Ok(out.freeze())
}

/// Reports shards of `loc` that failed their checksum or were missing: each is marked lost
/// (`drop_replica` with the shard's id) for the healer to rebuild. Returns the last answer
/// (the chunk's location with those shards lost), to refresh a cache with. Failures to
/// report are only logged: the read already has its outcome.
pub(crate) async fn report_lost(
    store: &dyn Store,
    loc: &ChunkLoc,
    bad: &[usize],
) -> Option<ChunkLoc> {
    let ec = loc.ec.as_ref()?;
    let mut answer = None;
    for &k in bad {
        let Some(shard) = ec.shards.get(k) else {
            continue;
        };
        let Some(server) = shard.replica.as_ref().map(|r| r.server) else {
            continue;
        };
        tracing::warn!(
            chunk = loc.chunk,
            shard = k,
            shard_chunk = shard.chunk,
            server,
            "reporting a lost shard"
        );
        match store.drop_replica(shard.chunk, loc.version, server).await {
            Ok(mut new) => {
                // The answer names the owner's index; this caller's is the one to cache.
                new.index = loc.index;
                new.shared |= loc.shared;
                answer = Some(new);
            }
            Err(e) => {
                tracing::warn!(chunk = loc.chunk, shard = k, error = %e, "could not report a lost shard");
            }
        }
    }
    answer
}
