//! The transmission phase of one connection: read requests in order, serve them
//! concurrently, reply as each finishes (replies carry the client's handle).
//!
//! ```text
//!  socket ─read─▶ header ─check─▶ (WRITE: payload) ─spawn─▶ export call ─▶ reply ─lock─▶ socket
//!                   │ bad magic / EOF: stop reading, finish what is in flight, close
//!                   └ bad request: error reply, keep going
//! ```
//!
//! Limits: a READ or WRITE carries at most [`MAX_PAYLOAD`] bytes and is checked before any
//! buffer is allocated; at most [`MAX_IN_FLIGHT`] requests and [`IN_FLIGHT_BYTES`] of
//! payload are in flight per connection (reading stops until some finish). Reading the
//! payload of a WRITE and sending a reply each have a deadline; waiting for the next request
//! has none (an attached disk may sit idle for days).

use crate::export::{Export, ExportError};
use crate::handshake::Session;
use crate::payload::{Payload, PayloadPool};
use crate::proto::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinSet;

/// Requests served at the same time on one connection.
pub const MAX_IN_FLIGHT: usize = 128;
/// Payload bytes (READ and WRITE) in flight on one connection.
pub const IN_FLIGHT_BYTES: usize = 256 << 20;
/// Most descriptors in one BLOCK_STATUS reply (the protocol lets us return fewer than asked).
const MAX_EXTENTS: usize = 8192;

/// How a connection's transmission phase ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection (EOF between requests).
    Closed,
    /// The server is shutting down.
    Shutdown,
}

/// Why a connection was dropped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransmitError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad request magic: the stream is out of step")]
    Magic,
    #[error("timed out reading a request's payload")]
    PayloadTimeout,
    #[error("sending a reply failed or timed out")]
    Reply,
}

/// One decoded request, ready to run.
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Payload,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        one: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
}

/// A request the server refuses: NBD error value and a message for humans.
type Refusal = (u32, &'static str);

/// Checks a request header against the session. `Ok` means the request may run (a WRITE's
/// payload still has to be read).
fn check(req: &Request, s: &Session) -> Result<(), Refusal> {
    let allowed = match req.kind {
        CMD_READ if s.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        _ => return Err((EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Err((EINVAL, "flag not valid for this command"));
    }
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && s.flags & FLAG_READ_ONLY != 0 {
        return Err((EPERM, "the export is read-only"));
    }
    if req.kind == CMD_FLUSH {
        return Ok(());
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) && req.len > MAX_PAYLOAD {
        return Err((
            EINVAL,
            "request larger than the maximum block size (32 MiB)",
        ));
    }
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= s.size);
    if !in_range {
        return Err(if writes {
            (ENOSPC, "write past the end of the export")
        } else {
            (EINVAL, "range past the end of the export")
        });
    }
    let fast_zero = CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE;
    if req.kind == CMD_WRITE_ZEROES && req.flags & fast_zero == fast_zero {
        return Err((
            ENOTSUP,
            "zeroes that must not leave a hole are written as data: not fast",
        ));
    }
    if req.kind == CMD_BLOCK_STATUS {
        if !s.base_allocation {
            return Err((EINVAL, "no metadata context was selected"));
        }
        if req.len == 0 {
            return Err((EINVAL, "zero-length block status"));
        }
    }
    Ok(())
}

/// The `NBD_REPLY_TYPE_BLOCK_STATUS` payload for `extents`, clipped to `len` bytes (and to
/// one extent with `one`). At least one descriptor: an export that reported nothing gets
/// "allocated, content unknown" (status 0), which is always true.
fn block_status_payload(extents: &[crate::export::Extent], len: u32, one: bool) -> Vec<u8> {
    let mut out = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    let mut left = u64::from(len);
    let mut count = 0;
    for e in extents.iter().filter(|e| e.len > 0) {
        if left == 0 || count == MAX_EXTENTS || (one && count == 1) {
            break;
        }
        let n = e.len.min(left);
        // `n` ≤ `len`, a u32.
        out.extend_from_slice(&(n as u32).to_be_bytes());
        out.extend_from_slice(&e.flags().to_be_bytes());
        left -= n;
        count += 1;
    }
    if count == 0 {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
    }
    out
}

/// Writes replies; shared by the request tasks of one connection.
struct Replier<W> {
    w: Mutex<W>,
    structured: bool,
    timeout: Duration,
    /// Set when a reply could not be sent: the reader stops.
    broken: watch::Sender<bool>,
}

impl<W: AsyncWrite + Unpin + Send> Replier<W> {
    async fn send(&self, parts: &[&[u8]]) {
        let mut w = self.w.lock().await;
        let sent = tokio::time::timeout(self.timeout, async {
            for p in parts {
                w.write_all(p).await?;
            }
            w.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "sending a reply failed");
                self.broken.send_replace(true);
            }
            Err(_) => {
                tracing::warn!("client did not take a reply in time; dropping the connection");
                self.broken.send_replace(true);
            }
        }
    }

    async fn ok(&self, handle: u64) {
        self.send(&[&simple_reply(0, handle)]).await;
    }

    async fn error(&self, handle: u64, error: u32, message: &str) {
        if self.structured {
            self.send(&[&structured_error(handle, error, message)])
                .await;
        } else {
            self.send(&[&simple_reply(error, handle)]).await;
        }
    }

    async fn data(&self, handle: u64, offset: u64, data: &[u8]) {
        if !self.structured {
            self.send(&[&simple_reply(0, handle), data]).await;
        } else if data.is_empty() {
            self.send(&[&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                handle,
                0,
            )])
            .await;
        } else {
            // `data` ≤ MAX_PAYLOAD, so the length fits.
            let head = structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                handle,
                8 + data.len() as u32,
            );
            self.send(&[&head, &offset.to_be_bytes(), data]).await;
        }
    }

    async fn block_status(&self, handle: u64, payload: &[u8]) {
        // The payload is at most 4 + 8 * MAX_EXTENTS bytes.
        let head = structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            handle,
            payload.len() as u32,
        );
        self.send(&[&head, payload]).await;
    }
}

/// Runs one request against the export and sends its reply.
async fn serve<W: AsyncWrite + Unpin + Send>(
    export: Arc<dyn Export>,
    rep: Arc<Replier<W>>,
    handle: u64,
    op: Op,
) {
    let failed = |e: ExportError| {
        tracing::warn!(error = %e, "request failed");
        e
    };
    match op {
        Op::Read { offset, len } => match export.read(offset, len).await {
            Ok(data) if data.len() == len as usize => rep.data(handle, offset, &data).await,
            Ok(short) => {
                // The export ended early (a volume shrank behind our back): zeros.
                let mut data = short.to_vec();
                data.resize(len as usize, 0);
                rep.data(handle, offset, &data).await;
            }
            Err(e) => {
                let e = failed(e);
                rep.error(handle, e.nbd_error(), &e.to_string()).await
            }
        },
        Op::BlockStatus { offset, len, one } => {
            match export.block_status(offset, u64::from(len)).await {
                Ok(extents) => {
                    let payload = block_status_payload(&extents, len, one);
                    rep.block_status(handle, &payload).await;
                }
                Err(e) => {
                    let e = failed(e);
                    rep.error(handle, e.nbd_error(), &e.to_string()).await
                }
            }
        }
        op => {
            let r = match op {
                Op::Write { offset, data, fua } => export.write(offset, &data, fua).await,
                Op::Flush => export.flush().await,
                Op::Trim { offset, len, fua } => export.trim(offset, len, fua).await,
                Op::Zeroes {
                    offset,
                    len,
                    may_trim,
                    fua,
                } => export.write_zeroes(offset, len, may_trim, fua).await,
                Op::Cache { offset, len } => cache(&*export, offset, len).await,
                Op::Read { .. } | Op::BlockStatus { .. } => Ok(()),
            };
            match r {
                Ok(()) => rep.ok(handle).await,
                Err(e) => {
                    let e = failed(e);
                    rep.error(handle, e.nbd_error(), &e.to_string()).await
                }
            }
        }
    }
}

/// Bytes one CACHE request reads at a time.
const CACHE_PIECE: u32 = 4 << 20;

/// NBD_CMD_CACHE: reads `len` bytes at `offset` a piece at a time and drops them, so that
/// the chunkservers' page caches hold them for the reads the client announced. Errors are
/// the read's (a range that cannot be read now will not be read later either).
async fn cache(export: &dyn Export, offset: u64, len: u32) -> Result<(), ExportError> {
    let mut done = 0;
    while done < len {
        let piece = CACHE_PIECE.min(len - done);
        export.read(offset + u64::from(done), piece).await?;
        done += piece;
    }
    Ok(())
}

/// Serves requests until the client disconnects, the connection breaks or `shutdown`
/// turns true; then waits for the requests in flight and flushes the replies.
pub(crate) async fn transmit<R, W>(
    r: &mut R,
    w: W,
    session: &Session,
    mut shutdown: watch::Receiver<bool>,
    io_timeout: Duration,
) -> Result<End, TransmitError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (broken_tx, mut broken) = watch::channel(false);
    let rep = Arc::new(Replier {
        w: Mutex::new(w),
        structured: session.structured,
        timeout: io_timeout,
        broken: broken_tx,
    });
    let requests = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let payloads = Arc::new(PayloadPool::default());
    let bytes = Arc::new(Semaphore::new(IN_FLIGHT_BYTES >> 10));
    let mut tasks = JoinSet::new();
    let result = loop {
        // Reap finished tasks so the set does not grow with the connection's age.
        while tasks.try_join_next().is_some() {}
        let mut head = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => break Ok(End::Shutdown),
            _ = broken.wait_for(|b| *b) => break Err(TransmitError::Reply),
            r = r.read_exact(&mut head) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(End::Closed),
            Err(e) => break Err(e.into()),
        }
        let Some(req) = Request::decode(&head) else {
            break Err(TransmitError::Magic);
        };
        if req.kind == CMD_DISC {
            break Ok(End::Disconnect);
        }
        if let Err((error, message)) = check(&req, session) {
            tracing::debug!(?req, error, message, "refused request");
            if req.kind == CMD_WRITE {
                // The payload follows whatever we think of the request: skip it.
                let mut rest = (&mut *r).take(u64::from(req.len));
                let mut sink = tokio::io::sink();
                let skip = tokio::io::copy(&mut rest, &mut sink);
                match tokio::time::timeout(io_timeout, skip).await {
                    Ok(Ok(n)) if n == u64::from(req.len) => {}
                    Ok(Ok(_)) => break Ok(End::Closed),
                    Ok(Err(e)) => break Err(e.into()),
                    Err(_) => break Err(TransmitError::PayloadTimeout),
                }
            }
            rep.error(req.handle, error, message).await;
            continue;
        }
        // Both semaphores live as long as this function and are never closed.
        let Ok(slot) = requests.clone().acquire_owned().await else {
            break Err(TransmitError::Reply);
        };
        let payload = if matches!(req.kind, CMD_READ | CMD_WRITE) {
            req.len as usize
        } else {
            0
        };
        let Ok(budget) = bytes
            .clone()
            .acquire_many_owned(payload.div_ceil(1024) as u32)
            .await
        else {
            break Err(TransmitError::Reply);
        };
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let op = match req.kind {
            CMD_READ => Op::Read {
                offset: req.offset,
                len: req.len,
            },
            CMD_WRITE => {
                let mut data = payloads.take(payload);
                match tokio::time::timeout(io_timeout, r.read_exact(&mut data)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        tracing::debug!("client left in the middle of a write");
                        break Ok(End::Closed);
                    }
                    Ok(Err(e)) => break Err(e.into()),
                    Err(_) => break Err(TransmitError::PayloadTimeout),
                }
                Op::Write {
                    offset: req.offset,
                    data,
                    fua,
                }
            }
            CMD_FLUSH => Op::Flush,
            CMD_TRIM => Op::Trim {
                offset: req.offset,
                len: u64::from(req.len),
                fua,
            },
            CMD_WRITE_ZEROES => Op::Zeroes {
                offset: req.offset,
                len: u64::from(req.len),
                may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
                fua,
            },
            CMD_CACHE => Op::Cache {
                offset: req.offset,
                len: req.len,
            },
            // `check` let through only the commands above and BLOCK_STATUS.
            _ => Op::BlockStatus {
                offset: req.offset,
                len: req.len,
                one: req.flags & CMD_FLAG_REQ_ONE != 0,
            },
        };
        let export = session.export.clone();
        let rep = rep.clone();
        let mut request = Box::pin(async move {
            serve(export, rep, req.handle, op).await;
            drop((slot, budget));
        });
        // Polled once here: a read the page cache answers (see the client's local reads)
        // completes at once, and handing it to another task would cost two thread wakeups
        // for nothing. Whatever has to wait becomes a task of its own, so requests overlap.
        if futures::poll!(request.as_mut()).is_pending() {
            tasks.spawn(request);
        }
    };
    // Requests already read are answered before the connection closes (for DISC the
    // protocol requires it; otherwise the client may still be reading).
    while tasks.join_next().await.is_some() {}
    let _ = tokio::time::timeout(io_timeout, async {
        let mut w = rep.w.lock().await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    })
    .await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::Extent;
    use crate::mem::MemExport;

    fn session(size: u64, read_only: bool, structured: bool, meta: bool) -> Session {
        let flags = if read_only { FLAG_READ_ONLY } else { 0 } | FLAG_HAS_FLAGS;
        Session {
            name: "m".into(),
            export: Arc::new(MemExport::new(size, read_only)),
            size,
            flags,
            structured,
            base_allocation: meta,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 1,
            offset,
            len,
        }
    }

    #[test]
    fn requests_are_checked_before_running() {
        let s = session(1 << 20, false, false, false);
        assert!(check(&req(CMD_READ, 0, 0, 4096), &s).is_ok());
        assert!(check(&req(CMD_WRITE, CMD_FLAG_FUA, (1 << 20) - 1, 1), &s).is_ok());
        assert_eq!(
            check(&req(CMD_READ, 0, 1 << 20, 1), &s).unwrap_err().0,
            EINVAL
        );
        assert_eq!(
            check(&req(CMD_WRITE, 0, 1 << 20, 1), &s).unwrap_err().0,
            ENOSPC
        );
        assert_eq!(
            check(&req(CMD_READ, 0, u64::MAX, 2), &s).unwrap_err().0,
            EINVAL,
            "offset + len overflows"
        );
        assert_eq!(
            check(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &s).unwrap_err().0,
            EINVAL,
            "DF needs structured replies"
        );
        assert_eq!(
            check(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &s)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert_eq!(check(&req(99, 0, 0, 0), &s).unwrap_err().0, EINVAL);
        assert!(check(&req(CMD_CACHE, 0, 0, 1 << 20), &s).is_ok());
        assert_eq!(
            check(&req(CMD_CACHE, 0, 1 << 20, 1), &s).unwrap_err().0,
            EINVAL,
            "CACHE past the end"
        );
        assert!(check(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 1), &s).is_ok());
        assert_eq!(
            check(
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                    0,
                    1
                ),
                &s
            )
            .unwrap_err()
            .0,
            ENOTSUP,
            "a zero that must not leave a hole is not fast"
        );
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, 0, 0, 1), &s).unwrap_err().0,
            EINVAL,
            "no context"
        );
        assert!(check(&req(CMD_FLUSH, 0, 0, 0), &s).is_ok());
        let big = session(1 << 30, false, true, true);
        assert_eq!(
            check(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &big)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert!(
            check(&req(CMD_TRIM, 0, 0, MAX_PAYLOAD + 1), &big).is_ok(),
            "no payload"
        );
        assert!(check(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &big).is_ok());
        assert!(check(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1), &big).is_ok());
        assert_eq!(
            check(&req(CMD_BLOCK_STATUS, 0, 0, 0), &big).unwrap_err().0,
            EINVAL
        );
        let ro = session(1 << 20, true, false, false);
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(check(&req(kind, 0, 0, 1), &ro).unwrap_err().0, EPERM);
        }
        assert!(check(&req(CMD_READ, 0, 0, 1), &ro).is_ok());
    }

    #[test]
    fn block_status_is_clipped_and_never_empty() {
        let ext = [Extent::data(100), Extent::hole(1000), Extent::data(5)];
        let p = block_status_payload(&ext, 150, false);
        assert_eq!(p.len(), 4 + 16);
        assert_eq!(&p[4..8], &100u32.to_be_bytes());
        assert_eq!(&p[8..12], &0u32.to_be_bytes());
        assert_eq!(&p[12..16], &50u32.to_be_bytes());
        assert_eq!(&p[16..20], &(STATE_HOLE | STATE_ZERO).to_be_bytes());
        assert_eq!(block_status_payload(&ext, 150, true).len(), 4 + 8);
        let empty = block_status_payload(&[], 7, false);
        assert_eq!(&empty[4..8], &7u32.to_be_bytes());
        assert_eq!(&empty[8..12], &0u32.to_be_bytes());
    }
}
