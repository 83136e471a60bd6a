//! One re-replication: copy a chunk from a live replica to a new chunkserver, commit the new
//! location, and make sure no write was missed.
//!
//! ```text
//!  for each 4 MiB piece:  source[i] ──READ (crc verified by the chunkserver)──▶ healer
//!                         (a failed or corrupt read: the next source, same piece)
//!                         healer ──WRITE(chunk, version, term)──▶ target (creates the chunk)
//!  SYNC target ─▶ add_replica(chunk, version, target, term) ─▶ version + 1, target listed
//!  FENCE(version + 1) on every listed replica: writers with the old location are refused,
//!        refresh, and from then on write to the target too
//!  VERIFY: target == a source, piece by piece; a difference (a write that reached only the
//!        old replicas before the FENCE) drops the new copy again (drop_replica)
//!  replicas the FENCE could not reach (their server is down) are dropped: when the server
//!        returns, its old copy is no longer listed, never read, and its inventory deletes it
//! ```
//!
//! Bitrot never spreads: every byte copied was read through the chunkserver's checksum
//! check. Nothing is committed before the whole copy is on the target's disk.

use std::collections::HashMap;

use bytes::Bytes;
use rawfs_chunkserver_api::{DataClient, DataError, WriteReq};
use rawfs_metadata_api::{MetaError, MetadataClient};

use crate::pace::Pace;
use crate::planner::{Repair, ServerId};

/// Bytes moved per read and write call.
pub const PIECE: u64 = 4 << 20;

/// Why a repair failed. Every failure leaves the chunk map as it was (or, for `Diverged`,
/// as it was before this repair) and is retried on a later scan.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("no source could serve bytes at {offset}: {last}")]
    NoSource { offset: u64, last: DataError },
    #[error("writing the copy to server {target} failed: {err}")]
    Target { target: ServerId, err: DataError },
    #[error("no data address known for server {0}")]
    NoAddress(ServerId),
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
    #[error("the new copy differs from the source at {offset} (a concurrent write): dropped")]
    Diverged { offset: u64 },
    #[error("stopped")]
    Stopped,
}

/// What a repair needs besides the plan.
pub struct Ctx<'a> {
    pub meta: &'a MetadataClient,
    pub data: &'a DataClient,
    /// Data address of every live server (the others are neither read nor fenced).
    pub addrs: &'a HashMap<ServerId, String>,
    /// The leader term the healer's lease was granted in.
    pub term: u64,
    /// True once the healer must stop (checked between pieces).
    pub stopping: &'a dyn Fn() -> bool,
    /// The repair throttle and this worker's progress (every piece goes through it).
    pub pace: Pace<'a>,
}

impl Ctx<'_> {
    fn addr(&self, s: ServerId) -> Result<&str, RepairError> {
        self.addrs
            .get(&s)
            .map(String::as_str)
            .ok_or(RepairError::NoAddress(s))
    }

    /// Reads `len` bytes at `offset` from the first source that serves them, starting with
    /// `*first` (moved on to the one that worked).
    async fn read_piece(
        &self,
        chunk: u64,
        version: u64,
        sources: &[ServerId],
        first: &mut usize,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RepairError> {
        let mut last = DataError::NotFound;
        for k in 0..sources.len() {
            let i = (*first + k) % sources.len();
            let Ok(addr) = self.addr(sources[i]) else {
                continue;
            };
            // Pieces never cross the 64 MiB chunk, so offsets and lengths fit in u32.
            match self
                .data
                .read(addr, chunk, version, offset as u32, len as u32)
                .await
            {
                Ok(b) => {
                    *first = i;
                    return Ok(b);
                }
                Err(e) => {
                    tracing::warn!(chunk, source = sources[i], offset, error = %e, "source read failed; trying the next");
                    last = e;
                }
            }
        }
        Err(RepairError::NoSource { offset, last })
    }
}

/// Makes the copy `r` of a chunk whose data ends `bytes` into it, at `r.version` (which may
/// have moved past the plan's after an earlier copy of the same chunk). Returns the chunk's
/// new version.
pub async fn re_replicate(ctx: &Ctx<'_>, r: &Repair, bytes: u64) -> Result<u64, RepairError> {
    let (chunk, version, target) = (r.chunk, r.version, r.target);
    let taddr = ctx.addr(target)?.to_string();
    let mut src = 0usize;
    let mut offset = 0u64;
    // At least one write, so that an empty chunk exists on the target too.
    loop {
        if (ctx.stopping)() {
            return Err(RepairError::Stopped);
        }
        let len = PIECE.min(bytes - offset);
        ctx.pace.piece(len).await;
        if (ctx.stopping)() {
            return Err(RepairError::Stopped);
        }
        let data = if len == 0 {
            Bytes::new()
        } else {
            ctx.read_piece(chunk, version, &r.sources, &mut src, offset, len)
                .await?
        };
        let w = WriteReq {
            chunk,
            version,
            term: ctx.term,
            offset: offset as u32,
            data,
            sync: false,
        };
        ctx.data
            .write(&taddr, w)
            .await
            .map_err(|err| RepairError::Target { target, err })?;
        offset += len;
        if offset >= bytes {
            break;
        }
    }
    ctx.data
        .sync(&taddr, chunk, version)
        .await
        .map_err(|err| RepairError::Target { target, err })?;
    let loc = ctx
        .meta
        .add_replica(chunk, version, target, ctx.term)
        .await?;
    let new_version = loc.version;
    let mut unfenced = Vec::new();
    for rep in &loc.replicas {
        if !ctx.addrs.contains_key(&rep.server) {
            // The dead server the copy replaces: the usual case, dropped below.
            tracing::debug!(chunk, server = rep.server, "not up: dropped after the copy");
            unfenced.push(rep.server);
            continue;
        }
        let fenced = ctx
            .data
            .fence(&rep.data_addr, chunk, new_version, ctx.term)
            .await;
        if let Err(e) = fenced {
            tracing::warn!(chunk, server = rep.server, error = %e, "fence after the copy failed");
            unfenced.push(rep.server);
        }
    }
    verify(ctx, r, bytes, new_version).await?;
    drop_unfenced(ctx, chunk, new_version, &unfenced).await
}

/// Drops the replicas the FENCE after a copy could not reach (down or failing), once the
/// new copy stands in for them. Listed, such a copy would come back with its old data at an
/// old version when its server returns; unlisted, the server's next inventory has it
/// deleted. Returns the chunk's version after the drops.
async fn drop_unfenced(
    ctx: &Ctx<'_>,
    chunk: u64,
    mut version: u64,
    unfenced: &[ServerId],
) -> Result<u64, RepairError> {
    for &server in unfenced {
        match ctx.meta.drop_replica(chunk, version, server).await {
            Ok(loc) => version = loc.version,
            // A writer moved the chunk on meanwhile (and dropped what it could not write).
            Err(MetaError::StaleVersion { .. }) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(version)
}

/// Compares the new copy with a source after the FENCE; drops the copy if they differ.
async fn verify(ctx: &Ctx<'_>, r: &Repair, bytes: u64, version: u64) -> Result<(), RepairError> {
    let taddr = ctx.addr(r.target)?.to_string();
    let mut src = 0usize;
    let mut offset = 0u64;
    while offset < bytes {
        let len = PIECE.min(bytes - offset);
        let want = ctx
            .read_piece(r.chunk, version, &r.sources, &mut src, offset, len)
            .await?;
        let got = ctx
            .data
            .read(&taddr, r.chunk, version, offset as u32, len as u32)
            .await;
        let same = matches!(&got, Ok(g) if *g == want);
        if !same {
            tracing::warn!(
                chunk = r.chunk,
                target = r.target,
                offset,
                "new copy differs from its source: dropping it"
            );
            ctx.meta.drop_replica(r.chunk, version, r.target).await?;
            return Err(RepairError::Diverged { offset });
        }
        offset += len;
    }
    Ok(())
}
