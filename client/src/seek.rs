//! Where a file holds data: `SEEK_DATA`/`SEEK_HOLE` on a mount and NBD block status, at the
//! chunkservers' block granularity (4 KiB) rather than the chunk's (64 MiB).
//!
//! The metadata service knows which chunks exist; a chunkserver knows which blocks of a chunk
//! were ever written (WRITTEN). A range reported as a hole must read as zeros, or a sparse
//! copy (`cp`, `tar -S`, `qemu-img convert`, `nbdcopy`) would lose data. So whatever is not
//! known for sure is reported as data: a chunk whose replicas cannot answer, and an
//! erasure-coded chunk up to its length (its shards are not asked).
//!
//! ```text
//!  scan(offset..end) ──chunks(ino, first, n)──▶ metadata: which chunks exist
//!        │ for each existing chunk (up to SCAN_CHUNKS at once, in parallel)
//!        └──WRITTEN(chunk, version, range)──▶ one replica: runs of written blocks
//! ```

use crate::error::ClientError;
use crate::locations::Locations;
use crate::read_path::Suspects;
use crate::store::Store;
use crate::FileIo;
use futures::future::join_all;
use rawfs_chunkserver_api::DataError;
use rawfs_metadata_api::{ChunkLoc, Ino, CHUNK_SIZE};
use std::ops::Range;

/// Chunk indexes first looked up at the metadata service per scan step (16 GiB of file).
const SCAN_INDEXES: u64 = 256;
/// While lookups find no chunk, each asks for 4 times as many indexes, up to this (1 TiB).
const SCAN_INDEXES_MAX: u64 = 16384;
/// A scan step that finds no chunk ends after this many indexes (64 TiB) all the same.
const SCAN_EMPTY_MAX: u64 = 1 << 20;
/// Existing chunks whose replicas are asked per scan step.
const SCAN_CHUNKS: usize = 16;

/// What one scan step found: the data ranges in `from..covered`, ascending and disjoint
/// (neighbours merged). Everything else in `from..covered` reads as zeros.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub data: Vec<Range<u64>>,
    /// The scan looked at everything before this offset (at least one byte past `from` when
    /// `from < end`; `end` when it got that far).
    pub covered: u64,
}

/// Scans `from..end` of file `ino`, stopping early after [`SCAN_CHUNKS`] existing chunks or
/// [`SCAN_EMPTY_MAX`] chunk indexes without one.
pub(crate) async fn scan(
    store: &dyn Store,
    locs: &Locations,
    suspects: &Suspects,
    ino: Ino,
    from: u64,
    end: u64,
) -> Result<Scan, ClientError> {
    if from >= end {
        return Ok(Scan {
            data: Vec::new(),
            covered: end,
        });
    }
    let start = from / CHUNK_SIZE;
    let last = (end - 1) / CHUNK_SIZE;
    // Look up growing windows of indexes until one holds a chunk (a sparse file of
    // terabytes takes a few lookups, not one per 16 GiB). `next` is the first index not
    // looked at yet.
    let (mut next, mut window) = (start, SCAN_INDEXES);
    let mut found = loop {
        let count = (last - next + 1).min(window);
        let found = store.chunks(ino, next, count).await?;
        next += count;
        if !found.is_empty() || next > last || next - start >= SCAN_EMPTY_MAX {
            break found;
        }
        window = (window * 4).min(SCAN_INDEXES_MAX);
    };
    // Chunks this client has in its cache count too (a `consistency=local` lookup may come
    // from a replica that has not heard of a chunk just allocated here); the cached location
    // is the one reads use.
    found.retain(|l| (start..next).contains(&l.index));
    let cached = locs.present(start, next);
    found.retain(|l| !cached.iter().any(|c| c.index == l.index));
    found.extend(cached);
    found.sort_by_key(|l| l.index);
    let mut covered = (next * CHUNK_SIZE).min(end);
    if found.len() > SCAN_CHUNKS {
        found.truncate(SCAN_CHUNKS);
        covered = ((found[SCAN_CHUNKS - 1].index + 1) * CHUNK_SIZE).min(end);
    }
    let asks = found.into_iter().map(|loc| {
        let base = loc.index * CHUNK_SIZE;
        // Casts: both ends lie within this chunk (< 64 MiB).
        let within = (from.max(base) - base) as u32..(covered.min(base + CHUNK_SIZE) - base) as u32;
        async move {
            let runs = chunk_data(store, locs, suspects, loc, within).await;
            runs.into_iter()
                .map(move |r| base + u64::from(r.start)..base + u64::from(r.end))
        }
    });
    let mut data: Vec<Range<u64>> = Vec::new();
    for runs in join_all(asks).await {
        for r in runs {
            match data.last_mut() {
                Some(l) if l.end == r.start => l.end = r.end,
                _ => data.push(r),
            }
        }
    }
    Ok(Scan { data, covered })
}

/// The data in `within` (chunk byte offsets) of the existing chunk `loc`: what its first
/// replica that answers says, the whole range if none does, nothing if the chunk is gone
/// (released meanwhile, or allocated but never written: it reads as zeros, see `read_path`).
async fn chunk_data(
    store: &dyn Store,
    locs: &Locations,
    suspects: &Suspects,
    mut loc: ChunkLoc,
    within: Range<u32>,
) -> Vec<Range<u32>> {
    if within.is_empty() {
        return Vec::new();
    }
    let mut refreshed = false;
    loop {
        if let Some(ec) = &loc.ec {
            // Shards are not asked: data up to the chunk's length, as a read would see it.
            let length = u32::try_from(ec.length.min(CHUNK_SIZE)).unwrap_or(u32::MAX);
            let data = within.start..within.end.min(length);
            return if data.is_empty() {
                Vec::new()
            } else {
                vec![data]
            };
        }
        let mut missing = 0;
        for i in suspects.order(&loc) {
            let r = &loc.replicas[i];
            let len = within.end - within.start;
            match store
                .written(&r.data_addr, loc.chunk, loc.version, within.start, len)
                .await
            {
                Ok(runs) => return runs,
                Err(DataError::NotFound) => missing += 1,
                Err(e) => {
                    tracing::debug!(chunk = loc.chunk, addr = %r.data_addr, error = %e, "WRITTEN failed; trying the next replica");
                }
            }
        }
        if loc.replicas.is_empty() || missing < loc.replicas.len() {
            // Nobody could say: data, to be safe.
            return vec![within];
        }
        // No replica has it: it may have moved (a drain) since the location was looked up.
        // Look once more, as a read does, before calling it empty.
        if refreshed {
            return Vec::new();
        }
        refreshed = true;
        match locs.refresh(store, loc.index).await {
            Ok(None) => return Vec::new(),
            Ok(Some(fresh)) if fresh != loc => loc = fresh,
            Ok(Some(_)) => return Vec::new(),
            Err(_) => return vec![within],
        }
    }
}

impl FileIo {
    /// `SEEK_DATA`: the first offset at or after `offset` that holds data, or `None` if there
    /// is none before the end of the file (ENXIO). Buffered writes are flushed first.
    pub async fn seek_data(&self, offset: u64) -> Result<Option<u64>, ClientError> {
        let mut pos = offset;
        loop {
            let size = self.size();
            if pos >= size {
                return Ok(None);
            }
            let step = self.data_ranges(pos, size).await?;
            if let Some(r) = step.data.first() {
                return Ok(Some(r.start.max(pos)));
            }
            pos = step.covered;
        }
    }

    /// `SEEK_HOLE`: the first offset at or after `offset` that reads as zeros because nothing
    /// was written there, or the file's size (the hole every file ends with); `None` if
    /// `offset` is at or past the end (ENXIO). Buffered writes are flushed first.
    pub async fn seek_hole(&self, offset: u64) -> Result<Option<u64>, ClientError> {
        if offset >= self.size() {
            return Ok(None);
        }
        let mut pos = offset;
        loop {
            let size = self.size();
            if pos >= size {
                return Ok(Some(size.max(offset)));
            }
            let step = self.data_ranges(pos, size).await?;
            for r in &step.data {
                if r.start > pos {
                    return Ok(Some(pos));
                }
                pos = pos.max(r.end);
            }
            if pos < step.covered {
                return Ok(Some(pos));
            }
            pos = step.covered;
        }
    }
}
