//! In-memory exports: a sparse [`MemExport`] and a fixed [`MemCatalog`] of them. Used by the
//! protocol tests (real NBD clients against a real server with no cluster behind it) and
//! handy for trying a client.
//!
//! Memory is allocated in 64 KiB blocks on first write; a block never written reads as zeros
//! and shows as a hole in `base:allocation`. Trimming or zeroing whole blocks frees them.

use crate::export::{Catalog, Export, ExportError, ExportInfo, Extent};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Allocation unit of a [`MemExport`].
pub const MEM_BLOCK: u64 = 64 << 10;

/// A sparse in-memory block device.
pub struct MemExport {
    size: u64,
    read_only: bool,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// Writes (and trims, zeroes) acknowledged since the last flush: a flush on any
    /// connection brings it to zero, which is what multi-conn promises.
    unflushed: AtomicU64,
    flushes: AtomicU64,
}

impl std::fmt::Debug for MemExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemExport")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single step on the map; a panic elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemExport {
    /// An empty (all-zero, all-hole) export of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> MemExport {
        MemExport {
            size,
            read_only,
            blocks: Mutex::new(BTreeMap::new()),
            unflushed: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// Writes acknowledged since the last flush.
    pub fn unflushed(&self) -> u64 {
        self.unflushed.load(Ordering::Acquire)
    }

    /// Flushes so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Acquire)
    }

    /// Bytes of memory allocated for data.
    pub fn allocated(&self) -> u64 {
        lock(&self.blocks).len() as u64 * MEM_BLOCK
    }

    /// Copies `data` in at `offset` directly (no request accounting): to prepare contents.
    pub fn fill(&self, offset: u64, data: &[u8]) {
        self.put(offset, data);
    }

    fn put(&self, offset: u64, data: &[u8]) {
        let mut blocks = lock(&self.blocks);
        let mut at = 0usize;
        while at < data.len() {
            let pos = offset + at as u64;
            let (b, within) = (pos / MEM_BLOCK, (pos % MEM_BLOCK) as usize);
            let n = (MEM_BLOCK as usize - within).min(data.len() - at);
            let block = blocks
                .entry(b)
                .or_insert_with(|| vec![0u8; MEM_BLOCK as usize].into_boxed_slice());
            block[within..within + n].copy_from_slice(&data[at..at + n]);
            at += n;
        }
    }

    /// Zeroes `offset..offset + len`: whole blocks are freed (if `free`), partial ones zeroed.
    fn zero(&self, offset: u64, len: u64, free: bool) {
        let mut blocks = lock(&self.blocks);
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let (b, within) = (pos / MEM_BLOCK, pos % MEM_BLOCK);
            let n = (MEM_BLOCK - within).min(end - pos);
            if n == MEM_BLOCK && free {
                blocks.remove(&b);
            } else if n == MEM_BLOCK || blocks.contains_key(&b) {
                let block = blocks
                    .entry(b)
                    .or_insert_with(|| vec![0u8; MEM_BLOCK as usize].into_boxed_slice());
                block[within as usize..(within + n) as usize].fill(0);
            }
            pos += n;
        }
    }

    fn get(&self, offset: u64, len: u32) -> Vec<u8> {
        let blocks = lock(&self.blocks);
        let mut out = vec![0u8; len as usize];
        let mut at = 0usize;
        while at < out.len() {
            let pos = offset + at as u64;
            let (b, within) = (pos / MEM_BLOCK, (pos % MEM_BLOCK) as usize);
            let n = (MEM_BLOCK as usize - within).min(out.len() - at);
            if let Some(block) = blocks.get(&b) {
                out[at..at + n].copy_from_slice(&block[within..within + n]);
            }
            at += n;
        }
        out
    }

    fn acked_write(&self, fua: bool) {
        if fua {
            self.flushes.fetch_add(1, Ordering::AcqRel);
            self.unflushed.store(0, Ordering::Release);
        } else {
            self.unflushed.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
        let out = Bytes::from(self.get(offset, len));
        async move { Ok(out) }.boxed()
    }

    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        fua: bool,
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        self.put(offset, data);
        self.acked_write(fua);
        async { Ok(()) }.boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        self.flushes.fetch_add(1, Ordering::AcqRel);
        self.unflushed.store(0, Ordering::Release);
        async { Ok(()) }.boxed()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        self.zero(offset, len, true);
        self.acked_write(fua);
        async { Ok(()) }.boxed()
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        self.zero(offset, len, may_trim);
        self.acked_write(fua);
        async { Ok(()) }.boxed()
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        let blocks = lock(&self.blocks);
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / MEM_BLOCK;
            let n = ((b + 1) * MEM_BLOCK).min(end) - pos;
            let e = if blocks.contains_key(&b) {
                Extent::data(n)
            } else {
                Extent::hole(n)
            };
            match out.last_mut() {
                Some(last) if last.hole == e.hole && last.zero == e.zero => last.len += n,
                _ => out.push(e),
            }
            pos += n;
        }
        drop(blocks);
        async move { Ok(out) }.boxed()
    }
}

/// A fixed set of named in-memory exports.
#[derive(Debug, Default)]
pub struct MemCatalog {
    exports: Vec<(String, Arc<MemExport>)>,
    open: Mutex<BTreeMap<String, usize>>,
}

impl MemCatalog {
    /// A catalog of `exports` (name, export).
    pub fn new(exports: Vec<(String, Arc<MemExport>)>) -> MemCatalog {
        MemCatalog {
            exports,
            open: Mutex::new(BTreeMap::new()),
        }
    }

    /// Connections currently using export `name`.
    pub fn connections(&self, name: &str) -> usize {
        lock(&self.open).get(name).copied().unwrap_or(0)
    }

    fn find(&self, name: &str) -> Option<&Arc<MemExport>> {
        self.exports.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }

    fn describe(name: &str, e: &MemExport) -> ExportInfo {
        ExportInfo {
            name: name.to_string(),
            size: e.size,
            read_only: e.read_only,
            multi_conn: true,
            description: "in-memory export".to_string(),
        }
    }
}

impl Catalog for MemCatalog {
    fn list(&self) -> BoxFuture<'_, Result<Vec<ExportInfo>, ExportError>> {
        let all = self
            .exports
            .iter()
            .map(|(n, e)| Self::describe(n, e))
            .collect();
        async move { Ok(all) }.boxed()
    }

    fn info<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<ExportInfo>, ExportError>> {
        let info = self.find(name).map(|e| Self::describe(name, e));
        async move { Ok(info) }.boxed()
    }

    fn open<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Export>>, ExportError>> {
        let found = self.find(name).cloned();
        if found.is_some() {
            *lock(&self.open).entry(name.to_string()).or_insert(0) += 1;
        }
        async move { Ok(found.map(|e| e as Arc<dyn Export>)) }.boxed()
    }

    fn close<'a>(&'a self, name: &'a str, _export: Arc<dyn Export>) -> BoxFuture<'a, ()> {
        let mut open = lock(&self.open);
        if let Some(n) = open.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(name);
            }
        }
        async {}.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sparse_reads_writes_trims_and_status() {
        let e = MemExport::new(4 * MEM_BLOCK, false);
        assert_eq!(
            e.block_status(0, 4 * MEM_BLOCK).await.unwrap(),
            vec![Extent::hole(4 * MEM_BLOCK)]
        );
        e.write(MEM_BLOCK - 2, &[7u8; 4], false).await.unwrap();
        assert_eq!(e.unflushed(), 1);
        let r = e.read(MEM_BLOCK - 4, 8).await.unwrap();
        assert_eq!(r, vec![0, 0, 7, 7, 7, 7, 0, 0]);
        assert_eq!(
            e.block_status(0, 4 * MEM_BLOCK).await.unwrap(),
            vec![Extent::data(2 * MEM_BLOCK), Extent::hole(2 * MEM_BLOCK)]
        );
        // A partial trim zeroes, a whole-block trim frees.
        e.trim(MEM_BLOCK - 1, 1, false).await.unwrap();
        assert_eq!(e.read(MEM_BLOCK - 2, 2).await.unwrap(), vec![7, 0]);
        e.trim(MEM_BLOCK, MEM_BLOCK, false).await.unwrap();
        assert_eq!(e.allocated(), MEM_BLOCK);
        // NO_HOLE zeroing allocates.
        e.write_zeroes(3 * MEM_BLOCK, MEM_BLOCK, false, true)
            .await
            .unwrap();
        assert_eq!(e.allocated(), 2 * MEM_BLOCK);
        assert_eq!(e.unflushed(), 0, "fua flushed");
        e.flush().await.unwrap();
        assert_eq!(e.flushes(), 2);
    }
}
