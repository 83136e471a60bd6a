//! One re-replication: copy a chunk from a live replica to a new chunkserver, commit the new
//! location, and make sure no write was missed.
//!
//! ```text
//!  WRITTEN: the byte ranges a source holds (what is copied, whatever the file's size says)
//!  for each 4 MiB piece of them:  source[i] ──READ (crc verified)──▶ healer
//!                         (a failed or corrupt read: the next source, same piece)
//!                         healer ──WRITE(chunk, version, term)──▶ target (creates the chunk)
//!  SYNC target ─▶ add_replica(chunk, version, target, term) ─▶ version + 1, target listed
//!  FENCE(version + 1) on every listed replica: writers with the old location are refused,
//!        refresh, and from then on write to the target too
//!  VERIFY: target == a source, piece by piece, over what was copied and what the source
//!        holds now; a difference (a write that reached only the old replicas before the
//!        FENCE) drops the new copy again (drop_replica)
//!  replicas the FENCE could not reach (their server is down) are dropped: when the server
//!        returns, its old copy is no longer listed, never read, and its inventory deletes it
//! ```
//!
//! Bitrot never spreads: every byte copied was read through the chunkserver's checksum
//! check. Nothing is committed before the whole copy is on the target's disk.

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;
use rawfs_chunkserver_api::{DataClient, DataError, WriteReq};
use rawfs_metadata_api::{MetaError, MetadataClient, CHUNK_SIZE};

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

    /// Asks the sources in turn, starting with `*first`, until one answers (`*first` then
    /// names it); otherwise the last error (`NotFound` if none has an address). `what` says
    /// in the log what failed.
    async fn ask_sources<T, F, Fut>(
        &self,
        chunk: u64,
        sources: &[ServerId],
        first: &mut usize,
        what: &str,
        mut ask: F,
    ) -> Result<T, DataError>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, DataError>>,
    {
        let mut last = DataError::NotFound;
        for k in 0..sources.len() {
            let i = (*first + k) % sources.len();
            let Ok(addr) = self.addr(sources[i]) else {
                continue;
            };
            match ask(addr.to_string()).await {
                Ok(v) => {
                    *first = i;
                    return Ok(v);
                }
                Err(e) => {
                    tracing::warn!(chunk, source = sources[i], error = %e, "source {what} failed; trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// The byte ranges of the chunk a source holds (ascending). A chunk no source has
    /// (allocated, never written) holds nothing.
    async fn written(
        &self,
        chunk: u64,
        version: u64,
        sources: &[ServerId],
        first: &mut usize,
    ) -> Result<Vec<Range<u32>>, RepairError> {
        let data = self.data;
        let asked = self
            .ask_sources(chunk, sources, first, "extent query", |addr| async move {
                data.written(&addr, chunk, version, 0, CHUNK_SIZE as u32)
                    .await
            })
            .await;
        match asked {
            Ok(ranges) => Ok(ranges),
            Err(DataError::NotFound) => Ok(Vec::new()),
            Err(last) => Err(RepairError::NoSource { offset: 0, last }),
        }
    }

    /// Reads `len` bytes at `offset` from a source that serves them.
    async fn read_piece(
        &self,
        chunk: u64,
        version: u64,
        sources: &[ServerId],
        first: &mut usize,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, RepairError> {
        let data = self.data;
        // Pieces never cross the 64 MiB chunk, so offsets and lengths fit in u32.
        self.ask_sources(chunk, sources, first, "read", |addr| async move {
            data.read(&addr, chunk, version, offset as u32, len as u32)
                .await
        })
        .await
        .map_err(|last| RepairError::NoSource { offset, last })
    }
}

/// A copy made: the chunk's new version and the bytes moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    pub version: u64,
    pub bytes: u64,
}

/// Makes the copy `r` of a chunk at `r.version` (which may have moved past the plan's after
/// an earlier copy of the same chunk): every block a source holds, holes left holes.
///
/// The copy follows what the source holds, not the file's size: a writer's data reaches
/// the replicas before its new size is committed, so a copy cut at the size missed it (seen
/// in a fault run: a file being written when one of its replicas died got a new copy with
/// no data at all, which then read as zeros).
pub async fn re_replicate(ctx: &Ctx<'_>, r: &Repair) -> Result<Copied, RepairError> {
    let (chunk, version, target) = (r.chunk, r.version, r.target);
    let taddr = ctx.addr(target)?.to_string();
    let mut src = 0usize;
    let held = ctx.written(chunk, version, &r.sources, &mut src).await?;
    let mut bytes = 0u64;
    // At least one write, so that an empty chunk exists on the target too.
    if held.is_empty() {
        write_piece(ctx, &taddr, r, 0, Bytes::new()).await?;
    }
    for range in &held {
        let mut offset = u64::from(range.start);
        while offset < u64::from(range.end) {
            if (ctx.stopping)() {
                return Err(RepairError::Stopped);
            }
            let len = PIECE.min(u64::from(range.end) - offset);
            ctx.pace.piece(len).await;
            if (ctx.stopping)() {
                return Err(RepairError::Stopped);
            }
            let data = ctx
                .read_piece(chunk, version, &r.sources, &mut src, offset, len)
                .await?;
            write_piece(ctx, &taddr, r, offset, data).await?;
            offset += len;
            bytes += len;
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
    verify(ctx, r, &held, new_version).await?;
    let version = drop_unfenced(ctx, chunk, new_version, &unfenced).await?;
    Ok(Copied { version, bytes })
}

async fn write_piece(
    ctx: &Ctx<'_>,
    taddr: &str,
    r: &Repair,
    offset: u64,
    data: Bytes,
) -> Result<(), RepairError> {
    let w = WriteReq {
        chunk: r.chunk,
        version: r.version,
        term: ctx.term,
        offset: offset as u32,
        data,
        sync: false,
    };
    ctx.data
        .write(taddr, w)
        .await
        .map_err(|err| RepairError::Target {
            target: r.target,
            err,
        })
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

/// Compares the new copy with a source after the FENCE, over everything either holds: what
/// was copied, and what the source holds now (a write that reached only the old replicas
/// before the FENCE, in a hole of the copy or past its end, shows there). Drops the copy if
/// they differ.
async fn verify(
    ctx: &Ctx<'_>,
    r: &Repair,
    copied: &[Range<u32>],
    version: u64,
) -> Result<(), RepairError> {
    let taddr = ctx.addr(r.target)?.to_string();
    let mut src = 0usize;
    let mut ranges = ctx.written(r.chunk, version, &r.sources, &mut src).await?;
    ranges.extend_from_slice(copied);
    for range in merge(ranges) {
        let mut offset = u64::from(range.start);
        while offset < u64::from(range.end) {
            let len = PIECE.min(u64::from(range.end) - offset);
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
    }
    Ok(())
}

/// `ranges` sorted and with overlapping or touching ones joined.
fn merge(mut ranges: Vec<Range<u32>>) -> Vec<Range<u32>> {
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u32>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn merge_joins_overlapping_and_touching_ranges() {
        assert_eq!(
            merge(vec![10..20, 0..4, 4..6, 15..30, 40..41]),
            vec![0..6, 10..30, 40..41]
        );
        assert!(merge(vec![]).is_empty());
    }
}
