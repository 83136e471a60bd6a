//! What the protocol layer serves: an [`Export`] (one block device) found by name in a
//! [`Catalog`]. The server checks ranges, flags and read-only before calling an export, so
//! implementations see only well-formed requests inside `0..size`.

use crate::proto;
use bytes::Bytes;
use futures::future::BoxFuture;
use std::sync::Arc;

/// Why an export operation failed; each maps to one NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A write to a read-only export (`EPERM`).
    #[error("the export is read-only")]
    ReadOnly,
    /// The range reaches past the end of the export.
    #[error("range {offset}+{len} is past the end of the export")]
    OutOfRange { offset: u64, len: u64 },
    /// The storage has no room for the data (`ENOSPC`).
    #[error("no space left for the data")]
    NoSpace,
    /// The backing storage failed (`EIO`); the source says how.
    #[error("storage error: {0}")]
    Io(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The export is going away: the server is shutting down or the export was deleted.
    #[error("the export is shutting down")]
    Shutdown,
}

impl ExportError {
    /// The NBD error value sent to the client.
    pub fn nbd_error(&self) -> u32 {
        match self {
            ExportError::ReadOnly => proto::EPERM,
            ExportError::OutOfRange { .. } => proto::EINVAL,
            ExportError::NoSpace => proto::ENOSPC,
            ExportError::Io(_) => proto::EIO,
            ExportError::Shutdown => proto::ESHUTDOWN,
        }
    }
}

/// One run of bytes with the same `base:allocation` state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated in the backing storage (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Known to read as zeros (`NBD_STATE_ZERO`).
    pub zero: bool,
}

impl Extent {
    /// Allocated data of unknown content.
    pub fn data(len: u64) -> Extent {
        Extent {
            len,
            hole: false,
            zero: false,
        }
    }

    /// An unallocated range that reads as zeros.
    pub fn hole(len: u64) -> Extent {
        Extent {
            len,
            hole: true,
            zero: true,
        }
    }

    /// The `base:allocation` status flags.
    pub fn flags(&self) -> u32 {
        (if self.hole { proto::STATE_HOLE } else { 0 })
            | (if self.zero { proto::STATE_ZERO } else { 0 })
    }
}

/// A block device served over NBD. Shared by every connection to it (so that a FLUSH on any
/// connection covers writes acknowledged on all of them: the server advertises
/// `NBD_FLAG_CAN_MULTI_CONN` only when [`Export::multi_conn`] says the state is shared).
///
/// Calls may run concurrently; the server never calls with a range outside `0..size()` as
/// it was when the connection started, never writes to a read-only export, and handles
/// `NBD_CMD_FLAG_FUA` itself only through the `fua` arguments.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes are refused (`NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;
    /// Every connection to this export sees the same data and a flush on one makes the
    /// writes acknowledged on all durable (`NBD_FLAG_CAN_MULTI_CONN`).
    fn multi_conn(&self) -> bool;
    /// `len` bytes at `offset` (exactly `len`).
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>>;
    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        fua: bool,
    ) -> BoxFuture<'a, Result<(), ExportError>>;
    /// Makes every write acknowledged so far (on any connection) durable.
    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>>;
    /// The client no longer needs `offset..offset + len`; it may read back as anything
    /// until written again (here: zeros). With `fua`, durable before returning.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> BoxFuture<'_, Result<(), ExportError>>;
    /// `offset..offset + len` reads as zeros afterwards. `may_trim` (no `NBD_CMD_FLAG_NO_HOLE`)
    /// allows releasing the space instead of writing zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>>;
    /// Allocation status of `offset..offset + len`: consecutive extents starting at
    /// `offset`, covering at least one byte and at most `len` (the server clips).
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>>;
}

/// What `NBD_OPT_INFO` and `NBD_OPT_LIST` tell about an export without opening it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    pub read_only: bool,
    pub multi_conn: bool,
    /// Shown to humans (`NBD_INFO_DESCRIPTION`, the description in `NBD_REP_SERVER`).
    pub description: String,
}

/// Finds exports by name. `open` and `close` bracket one connection's use of an export, so
/// the catalog can keep one shared [`Export`] per name while any connection uses it.
pub trait Catalog: Send + Sync + 'static {
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> BoxFuture<'_, Result<Vec<ExportInfo>, ExportError>>;
    /// One export's description, or `None` if there is no export of that name.
    fn info<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<ExportInfo>, ExportError>>;
    /// The export a new connection will use, or `None` if there is no export of that name.
    fn open<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Export>>, ExportError>>;
    /// A connection that `open`ed `export` under `name` has ended (its requests are done).
    fn close<'a>(&'a self, name: &'a str, export: Arc<dyn Export>) -> BoxFuture<'a, ()>;
}
