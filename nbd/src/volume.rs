//! [`VolumeExport`]: one rawfs volume as an NBD [`Export`], over the client library's
//! [`FileIo`] (one per volume, shared by every connection to it).
//!
//! ```text
//!  READ ──────────▶ FileIo::read (buffered writes visible; holes read as zeros)
//!  WRITE ─────────▶ FileIo::write (buffered) ──FUA──▶ durable()
//!  FLUSH ─────────▶ durable(): FileIo::fsync (≥ 2 replicas on disk) + metadata sync
//!  TRIM / ZEROES ─▶ FileIo::punch (whole chunks released, ZERO inside them) or written zeros
//!  BLOCK_STATUS ──▶ FileIo::data_ranges: missing chunks and never-written blocks are holes
//! ```
//!
//! Because all connections share the `FileIo` (and its write buffer), a flush on any of them
//! covers writes acknowledged on all: multi-conn holds within one `rawfs nbd` process.
//! Allocation is reported at the chunkservers' block granularity (4 KiB): what was never
//! written, or was trimmed, is a hole; zeros written are data.

use crate::export::{Export, ExportError, Extent};
use crate::lease::WriterLease;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use rawfs_client::{ClientError, FileIo};
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{Ino, MetaError};
use std::sync::Arc;

/// Zeros written per call for `WRITE_ZEROES` with `NO_HOLE`.
const ZERO_STEP: u64 = 4 << 20;

/// A volume served over NBD.
pub struct VolumeExport {
    name: String,
    ino: Ino,
    io: FileIo,
    meta: MetadataClient,
    read_only: bool,
    /// Several connections may write (the volume's multi-conn setting).
    multi_conn: bool,
    /// This server's right to write a single-writer volume (see `lease.rs`).
    lease: Option<Arc<WriterLease>>,
}

impl std::fmt::Debug for VolumeExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeExport")
            .field("name", &self.name)
            .field("ino", &self.ino)
            .field("size", &self.io.size())
            .finish_non_exhaustive()
    }
}

/// Maps a client library error to the export error the NBD client sees.
fn export_error(e: ClientError) -> ExportError {
    match e {
        ClientError::NoSpace { .. } | ClientError::Meta(MetaError::NoSpace { .. }) => {
            ExportError::NoSpace
        }
        ClientError::TooLarge { offset, len } => ExportError::OutOfRange { offset, len },
        // The metadata service refuses changes to a read-only snapshot.
        ClientError::Meta(MetaError::NotPermitted) => ExportError::ReadOnly,
        other => ExportError::Io(Box::new(other)),
    }
}

fn meta_error(e: MetaError) -> ExportError {
    export_error(ClientError::Meta(e))
}

impl VolumeExport {
    /// The export of volume `name` (inode `ino`) through `io`; `meta` is the same cluster's
    /// metadata client (for the chunk map and the sync barrier).
    pub fn new(name: String, ino: Ino, io: FileIo, meta: MetadataClient) -> VolumeExport {
        VolumeExport {
            name,
            ino,
            io,
            meta,
            read_only: false,
            multi_conn: true,
            lease: None,
        }
    }

    /// The same export, written only while `lease` holds.
    pub fn with_lease(mut self, lease: Arc<WriterLease>) -> VolumeExport {
        self.lease = Some(lease);
        self
    }

    /// The writer lease this export holds, if any.
    pub fn lease(&self) -> Option<&Arc<WriterLease>> {
        self.lease.as_ref()
    }

    /// Refuses a change once the writer lease ran out.
    fn may_write(&self) -> Result<(), ExportError> {
        self.lease.as_ref().map_or(Ok(()), |l| l.check())
    }

    /// The same export for a volume written by one client at a time: not advertised as
    /// multi-conn (the catalog gives other connections a read-only view).
    pub fn single_writer(mut self) -> VolumeExport {
        self.multi_conn = false;
        self
    }

    /// The same export, read-only (a snapshot): advertised with `NBD_FLAG_READ_ONLY`, and
    /// writes are refused with `EPERM` before they reach the volume.
    pub fn into_read_only(mut self) -> VolumeExport {
        self.read_only = true;
        self
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume's inode.
    pub fn ino(&self) -> Ino {
        self.ino
    }

    /// Takes a larger size (the volume was resized); a smaller one is ignored: connections
    /// were told the old size and volumes only grow.
    pub fn grow_to(&self, size: u64) {
        if size > self.io.size() {
            self.io.set_size(size);
        }
    }

    /// Sends buffered writes to the chunkservers (not a durability barrier).
    pub async fn flush_buffers(&self) -> Result<(), ExportError> {
        self.io.flush().await.map(|_| ()).map_err(export_error)
    }

    /// Makes every write acknowledged so far durable: the data on at least 2 replicas of
    /// each written chunk, and the metadata (chunk allocations, size) on the leader's disk.
    async fn durable(&self) -> Result<(), ExportError> {
        self.io.fsync().await.map_err(export_error)?;
        self.meta.sync().await.map_err(meta_error)
    }

    async fn write_zeros(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        let zeros = vec![0u8; ZERO_STEP.min(len) as usize];
        let mut at = 0;
        while at < len {
            let n = ZERO_STEP.min(len - at) as usize;
            self.io
                .write(offset + at, &zeros[..n])
                .await
                .map_err(export_error)?;
            at += n as u64;
        }
        Ok(())
    }

    async fn status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, ExportError> {
        let end = offset.saturating_add(len).min(self.io.size());
        if offset >= end {
            return Ok(Vec::new());
        }
        // Buffered writes have no chunk yet: store them first, or they would show as holes
        // (and a sparse copy would skip them). One scan step may cover less than asked,
        // which the protocol allows (the client asks again from where the reply ended).
        self.flush_buffers().await?;
        let step = self
            .io
            .data_ranges(offset, end)
            .await
            .map_err(export_error)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for r in &step.data {
            if r.start > pos {
                out.push(Extent::hole(r.start - pos));
            }
            out.push(Extent::data(r.end - r.start));
            pos = r.end;
        }
        if pos < step.covered {
            out.push(Extent::hole(step.covered - pos));
        }
        Ok(out)
    }
}

impl Export for VolumeExport {
    fn size(&self) -> u64 {
        self.io.size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn multi_conn(&self) -> bool {
        self.multi_conn || self.read_only
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
        async move {
            // Short only if the file shrank behind our back; the transmission layer answers
            // what is gone as zeros.
            self.io.read(offset, len).await.map_err(export_error)
        }
        .boxed()
    }

    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        fua: bool,
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        async move {
            self.may_write()?;
            self.io.write(offset, data).await.map_err(export_error)?;
            if fua {
                self.durable().await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        self.durable().boxed()
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        async move {
            self.may_write()?;
            self.io.punch(offset, len).await.map_err(export_error)?;
            if fua {
                self.durable().await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        async move {
            self.may_write()?;
            if may_trim {
                self.io.punch(offset, len).await.map_err(export_error)?;
            } else {
                self.write_zeros(offset, len).await?;
            }
            if fua {
                self.durable().await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        self.status(offset, len).boxed()
    }
}
