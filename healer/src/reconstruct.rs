//! One shard rebuild: decode the missing shards of an erasure-coded (RS 4+2) chunk from 4
//! healthy ones, write them to new chunkservers, verify, and commit.
//!
//! ```text
//!  for each 4 MiB stripe (the client's layout, rawfs_client::erasure):
//!     plan_fetch: the stripe's rows from 4 usable shards (data shards first)
//!     sources ──READ (crc verified by the chunkserver)──▶ healer
//!        corrupt or missing shard ─▶ not used, drop_replica(shard id): marked lost
//!        unreachable ─▶ not used; another shard, same rows (plan again)
//!     Codec::reconstruct_into ─▶ stripe bytes ─▶ Codec::encode_stripe ─▶ 6 cells
//!     missing shard k's cell ──WRITE(shard id, version, term)──▶ target k
//!  SYNC each target ─▶ read the whole shard back, compare with what was written
//!  replace_shard(chunk, version, shard id, target, term): the shard is on target now
//! ```
//!
//! The shard keeps its id and the chunk's version: an erasure-coded chunk is never written
//! in place, so nothing else writes these bytes and no fence is needed. A rebuild that
//! loses a race (the chunk was turned back to replicas, or converted again) is refused by
//! the version in `replace_shard`, and its orphan shard is garbage collected by the target's
//! next inventory. Nothing is committed before the shard is on the target's disk and
//! compared byte for byte.

use std::time::Instant;

use bytes::Bytes;
use futures::future::join_all;
use rawfs_chunkserver_api::{DataError, WriteReq, MAX_PAYLOAD};
use rawfs_client::erasure::{BlockCheck, Codec, ErasureError, ShardData, ShardFetch, TOTAL_SHARDS};
use rawfs_metadata_api::MetaError;

use crate::copy::Ctx;
use crate::planner::{Rebuild, ServerId};

/// Why a rebuild failed. The chunk map is left as it was for every shard not committed;
/// the chunk is planned again on a later scan.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Fewer than 4 shards could serve some stripe (the others failed or are down).
    #[error("too few usable shards: {0}")]
    TooFewShards(ErasureError),
    /// A source said the healer's view is out of date (the chunk moved on).
    #[error("source shard {shard} is stale: {err}")]
    Stale { shard: usize, err: DataError },
    /// Every target failed (written, synced, read back or committed); see the log.
    #[error("no rebuilt shard could be placed: {0}")]
    Targets(String),
    #[error("erasure coding: {0}")]
    Codec(ErasureError),
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    #[error("stopped")]
    Stopped,
}

/// What a rebuild achieved: the shards committed, and targets that failed (to be avoided
/// for this chunk on the next plan).
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// `(shard number, target)` committed with `replace_shard`.
    pub placed: Vec<(usize, ServerId)>,
    /// Targets that failed, with why.
    pub failed: Vec<(ServerId, String)>,
    /// Servers whose source shard failed its checksum or was missing (reported lost): no
    /// place for a rebuilt shard of this chunk either.
    pub reported: Vec<ServerId>,
}

/// One missing shard being rebuilt on its target.
struct Out {
    shard: usize,
    id: u64,
    target: ServerId,
    addr: String,
    /// Everything written so far (from shard offset 0), to compare the read-back with.
    written: Vec<u8>,
    failed: Option<String>,
}

/// Rebuilds the missing shards of `r` on their targets and commits each.
pub async fn rebuild(ctx: &Ctx<'_>, codec: &Codec, r: &Rebuild) -> Result<Rebuilt, RebuildError> {
    let layout = *codec.layout();
    let n = r.length;
    let mut unavailable = [true; TOTAL_SHARDS];
    for &k in &r.sources {
        if k < TOTAL_SHARDS && server_of(r, k).is_some_and(|s| ctx.addrs.contains_key(&s)) {
            unavailable[k] = false;
        }
    }
    let mut outs = Vec::new();
    let mut done = Rebuilt::default();
    for &(k, target) in &r.targets {
        match ctx.addrs.get(&target) {
            Some(a) => outs.push(Out {
                shard: k,
                id: r.shards.get(k).map_or(0, |s| s.0),
                target,
                addr: a.clone(),
                written: Vec::new(),
                failed: None,
            }),
            None => done
                .failed
                .push((target, "no data address (down)".to_string())),
        }
    }
    let started = Instant::now();
    let cell = layout.cell_size();
    let stripe = layout.stripe_size();
    for s in 0..layout.stripes(n) {
        if (ctx.stopping)() {
            return Err(RebuildError::Stopped);
        }
        let off = s * stripe;
        let len = stripe.min(n - off);
        ctx.pace.piece(len).await;
        let data = read_stripe(
            ctx,
            codec,
            r,
            (off, len),
            &mut unavailable,
            &mut done.reported,
        )
        .await?;
        let cells = codec.encode_stripe(&data).map_err(RebuildError::Codec)?;
        for o in outs.iter_mut().filter(|o| o.failed.is_none()) {
            let Some(c) = cells.get(o.shard).filter(|c| !c.is_empty()) else {
                continue;
            };
            write(ctx, r, o, s * cell, Bytes::copy_from_slice(c)).await;
            o.written.extend_from_slice(c);
        }
    }
    for o in outs.iter_mut().filter(|o| o.failed.is_none()) {
        if o.written.is_empty() {
            // A shard that stores nothing (a short chunk) must still exist on its target.
            write(ctx, r, o, 0, Bytes::new()).await;
        }
        if o.failed.is_none() {
            if let Err(e) = verify(ctx, r, o).await {
                o.failed = Some(e);
            }
        }
    }
    for o in outs {
        if let Some(why) = o.failed {
            tracing::warn!(chunk = r.chunk, shard = o.shard, shard_id = o.id, target = o.target, error = %why, "shard rebuild failed on its target");
            done.failed.push((o.target, why));
            continue;
        }
        match ctx
            .meta
            .replace_shard(r.chunk, r.version, o.id, o.target, ctx.term)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    chunk = r.chunk,
                    shard = o.shard,
                    shard_id = o.id,
                    target = o.target,
                    live_shards = r.sources.len(),
                    bytes = o.written.len() as u64,
                    ms = started.elapsed().as_millis() as u64,
                    "rebuilt shard"
                );
                done.placed.push((o.shard, o.target));
            }
            Err(MetaError::Exists) => {
                done.failed
                    .push((o.target, "holds another shard of the chunk".into()));
            }
            // The chunk moved on or the leader changed: nothing else will commit either.
            Err(e) => return Err(e.into()),
        }
    }
    if done.placed.is_empty() {
        let why: Vec<String> = done
            .failed
            .iter()
            .map(|(t, e)| format!("server {t}: {e}"))
            .collect();
        return Err(RebuildError::Targets(why.join("; ")));
    }
    Ok(done)
}

fn server_of(r: &Rebuild, k: usize) -> Option<ServerId> {
    r.shards.get(k).and_then(|s| s.1)
}

/// Writes `data` at shard offset `at` of `o`'s target; a failure marks `o` failed.
async fn write(ctx: &Ctx<'_>, r: &Rebuild, o: &mut Out, at: u64, data: Bytes) {
    let Ok(offset) = u32::try_from(at) else {
        o.failed = Some(format!("shard offset {at} out of range"));
        return;
    };
    let w = WriteReq {
        chunk: o.id,
        version: r.version,
        term: ctx.term,
        offset,
        data,
        sync: false,
    };
    if let Err(e) = ctx.data.write(&o.addr, w).await {
        o.failed = Some(format!("write at {at}: {e}"));
    }
}

/// Syncs `o`'s target and compares the whole shard read back with what was written.
async fn verify(ctx: &Ctx<'_>, r: &Rebuild, o: &Out) -> Result<(), String> {
    ctx.data
        .sync(&o.addr, o.id, r.version)
        .await
        .map_err(|e| format!("sync: {e}"))?;
    let total = o.written.len() as u64;
    let mut at = 0u64;
    while at < total {
        let n = (total - at).min(u64::from(MAX_PAYLOAD));
        let got = ctx
            .data
            .read(&o.addr, o.id, r.version, at as u32, n as u32)
            .await
            .map_err(|e| format!("read back at {at}: {e}"))?;
        if got[..] != o.written[at as usize..(at + n) as usize] {
            return Err(format!("read back differs from what was written at {at}"));
        }
        at += n;
    }
    Ok(())
}

/// Chunk bytes `off..off + len` (one stripe), decoded from usable shards. A shard that
/// fails is marked unavailable for the rest of the rebuild (and reported if it is corrupt
/// or missing), and the stripe is planned again without it.
async fn read_stripe(
    ctx: &Ctx<'_>,
    codec: &Codec,
    r: &Rebuild,
    (off, len): (u64, u64),
    unavailable: &mut [bool; TOTAL_SHARDS],
    reported: &mut Vec<ServerId>,
) -> Result<Vec<u8>, RebuildError> {
    let layout = codec.layout();
    loop {
        let plan = layout
            .plan_fetch(off, len, r.length, *unavailable)
            .map_err(RebuildError::TooFewShards)?;
        let got = join_all(plan.iter().map(|f| fetch(ctx, r, f))).await;
        let mut failed = false;
        for (f, g) in plan.iter().zip(&got) {
            let Err(e) = g else { continue };
            failed = true;
            unavailable[f.shard] = true;
            tracing::warn!(chunk = r.chunk, shard = f.shard, error = %e, "source shard read failed");
            match e {
                DataError::StaleVersion { .. } | DataError::StaleTerm { .. } => {
                    return Err(RebuildError::Stale {
                        shard: f.shard,
                        err: e.clone(),
                    })
                }
                DataError::Corrupt { .. } | DataError::NotFound => {
                    reported.extend(report(ctx, r, f.shard).await)
                }
                _ => {}
            }
        }
        if failed {
            continue;
        }
        let mut shards: [Option<ShardData<'_>>; TOTAL_SHARDS] = Default::default();
        for (f, g) in plan.iter().zip(&got) {
            if let Ok(b) = g {
                shards[f.shard] = Some(ShardData {
                    offset: f.shard_offset,
                    bytes: b,
                    check: BlockCheck::VerifiedBySource,
                });
            }
        }
        let mut out = vec![0u8; len as usize];
        codec
            .reconstruct_into(r.length, off, &mut out, &shards)
            .map_err(RebuildError::Codec)?;
        return Ok(out);
    }
}

/// Reads one planned range of a source shard (at most a cell: one call).
async fn fetch(ctx: &Ctx<'_>, r: &Rebuild, f: &ShardFetch) -> Result<Bytes, DataError> {
    let (id, server) = r
        .shards
        .get(f.shard)
        .and_then(|s| Some((s.0, s.1?)))
        .ok_or(DataError::NotFound)?;
    let addr = ctx.addrs.get(&server).ok_or(DataError::Unreachable {
        addr: format!("server {server}"),
        reason: "down".into(),
    })?;
    let too_far = || DataError::Protocol {
        reason: format!(
            "shard range {}+{} is outside a chunk",
            f.shard_offset, f.len
        ),
    };
    let at = u32::try_from(f.shard_offset).map_err(|_| too_far())?;
    let n = u32::try_from(f.len)
        .ok()
        .filter(|&n| n <= MAX_PAYLOAD)
        .ok_or_else(too_far)?;
    ctx.data.read(addr, id, r.version, at, n).await
}

/// Marks shard `k` of `r` lost (it failed its checksum or is missing on its server), so
/// that readers stop asking it and the next scan rebuilds it too.
/// Returns the shard's server.
async fn report(ctx: &Ctx<'_>, r: &Rebuild, k: usize) -> Option<ServerId> {
    let Some((id, Some(server))) = r.shards.get(k).copied() else {
        return None;
    };
    tracing::warn!(
        chunk = r.chunk,
        shard = k,
        shard_id = id,
        server,
        "reporting a corrupt or missing source shard"
    );
    if let Err(e) = ctx.meta.drop_replica(id, r.version, server).await {
        tracing::warn!(chunk = r.chunk, shard = k, error = %e, "could not report the shard");
    }
    Some(server)
}
