//! [`ReadOnlyView`]: a read-only connection to a volume that another client is writing.
//!
//! A volume without multi-conn has one writer at a time. Any other connection gets this
//! view of the same shared export: it reads the writer's data (buffered writes included,
//! since the export is shared), is advertised with `NBD_FLAG_READ_ONLY`, and its writes are
//! refused with `EPERM` by the server before they reach the volume.

use crate::export::{Export, ExportError, Extent};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

/// A read-only connection's view of a shared export.
pub(crate) struct ReadOnlyView {
    inner: Arc<dyn Export>,
}

impl ReadOnlyView {
    pub(crate) fn new(inner: Arc<dyn Export>) -> ReadOnlyView {
        ReadOnlyView { inner }
    }
}

fn refused() -> BoxFuture<'static, Result<(), ExportError>> {
    async { Err(ExportError::ReadOnly) }.boxed()
}

impl Export for ReadOnlyView {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        true
    }

    /// Another client writes: connections of this one are not a coherent multi-conn set.
    fn multi_conn(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
        self.inner.read(offset, len)
    }

    fn write<'a>(&'a self, _: u64, _: &'a [u8], _: bool) -> BoxFuture<'a, Result<(), ExportError>> {
        refused()
    }

    /// Nothing of ours to make durable; succeeds as on any read-only export.
    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        async { Ok(()) }.boxed()
    }

    fn trim(&self, _: u64, _: u64, _: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        refused()
    }

    fn write_zeroes(
        &self,
        _: u64,
        _: u64,
        _: bool,
        _: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        refused()
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        self.inner.block_status(offset, len)
    }
}
