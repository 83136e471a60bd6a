//! [`DataClient`]: the client side of the framed data protocol.
//!
//! Each chunkserver address gets a small pool of TCP connections. A call takes an idle
//! connection (or opens one), sends one request, reads its response, and puts the connection
//! back; so concurrent calls to one address run on parallel connections, up to
//! [`MAX_CONNS_PER_ADDR`]. A connection that saw any error (I/O, protocol, timeout) is dropped,
//! never reused, because its stream position is unknown.

use crate::frame::{self, FrameError, Opcode, Request, Response, Status, FLAG_SYNC, MAX_PAYLOAD};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Most connections open at once to one chunkserver from one `DataClient`.
pub const MAX_CONNS_PER_ADDR: usize = 16;
/// Most idle connections kept per chunkserver.
const MAX_IDLE_PER_ADDR: usize = 8;
/// Buffer size of a connection; bigger payloads bypass the buffer.
const CONN_BUFFER: usize = 64 << 10;

/// A write of `data` at `offset` within chunk `chunk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteReq {
    pub chunk: u64,
    /// The chunk version from the caller's chunk map.
    pub version: u64,
    /// The metadata leader's term (fencing token).
    pub term: u64,
    /// Byte offset within the chunk.
    pub offset: u32,
    pub data: Bytes,
    /// fsync the chunk file before answering.
    pub sync: bool,
}

/// The pieces of one write request encoded once, with the payload's crc32c, to be sent to
/// every replica as it is ([`DataClient::write_encoded`]).
#[derive(Clone, Debug)]
pub struct EncodedWrite {
    op: Opcode,
    offset: u32,
    /// The request's `length`: the payload's, or the bytes a ZERO clears.
    length: u32,
    payload: Bytes,
    crc: u32,
}

impl EncodedWrite {
    /// One piece as a WRITE (its data as it is), several as a WRITEV; the encoding must fit
    /// one frame: at most [`crate::MAX_PIECES`] pieces and [`MAX_PAYLOAD`] bytes.
    pub fn new(pieces: &[crate::Piece]) -> Result<EncodedWrite, DataError> {
        let len = crate::vector::encoded_len(pieces);
        let fits = match pieces {
            [one] => one.data.len() <= MAX_PAYLOAD as usize,
            _ => {
                !pieces.is_empty()
                    && pieces.len() <= crate::MAX_PIECES
                    && len <= MAX_PAYLOAD as usize
            }
        };
        if !fits {
            return Err(DataError::Protocol {
                reason: format!(
                    "a write of {} pieces and {len} bytes does not fit one frame",
                    pieces.len()
                ),
            });
        }
        let (op, offset, payload) = match pieces {
            [one] => (Opcode::Write, one.offset, one.data.clone()),
            _ => (Opcode::WriteV, 0, crate::vector::encode(pieces)),
        };
        let crc = crc32c::crc32c(&payload);
        Ok(EncodedWrite {
            op,
            offset,
            // Bounded by MAX_PAYLOAD above.
            length: payload.len() as u32,
            payload,
            crc,
        })
    }

    /// `(offset, len)` if this is a ZERO.
    pub fn zeroes(&self) -> Option<(u32, u32)> {
        (self.op == Opcode::Zero).then_some((self.offset, self.length))
    }

    /// A ZERO of `len` bytes at `offset`: they read as zeros afterwards, and the chunkserver
    /// gives the space of whole blocks back to its filesystem (see [`Opcode::Zero`]).
    pub fn zero(offset: u32, len: u32) -> EncodedWrite {
        EncodedWrite {
            op: Opcode::Zero,
            offset,
            length: len,
            payload: Bytes::new(),
            crc: crc32c::crc32c(&[]),
        }
    }
}

/// Why a data call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataError {
    /// The chunkserver could not be reached, or the connection broke during the call.
    #[error("chunkserver {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    /// The call did not finish within the client's deadline.
    #[error("chunkserver call timed out")]
    Timeout,
    /// The chunkserver stores a newer version of the chunk: the caller's map is stale.
    #[error("stale chunk version (current {current})")]
    StaleVersion { current: u64 },
    /// The chunkserver has seen a newer metadata term: the caller's term is stale.
    #[error("stale term (current {current})")]
    StaleTerm { current: u64 },
    /// The chunkserver does not hold the chunk.
    #[error("chunk not found")]
    NotFound,
    /// A block failed its checksum on the chunkserver; `offset` is within the chunk.
    #[error("corrupt block at chunk offset {offset}")]
    Corrupt { offset: u64 },
    /// The chunkserver's disk is full.
    #[error("chunkserver out of space")]
    NoSpace,
    /// The chunkserver's disk failed the operation.
    #[error("chunkserver disk error: {reason}")]
    Disk { reason: String },
    /// The peer broke the protocol (bad frame, mismatched id or length, refused request).
    #[error("protocol error: {reason}")]
    Protocol { reason: String },
}

impl DataError {
    /// True for errors that mean "this replica is bad or gone": the caller should use another
    /// replica and report this one. False for stale fences, which mean the *caller* is out of
    /// date and must refresh its chunk map or term instead.
    pub fn is_replica_failure(&self) -> bool {
        !matches!(
            self,
            DataError::StaleVersion { .. } | DataError::StaleTerm { .. }
        )
    }
}

struct Conn {
    stream: BufStream<TcpStream>,
}

struct Pool {
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
}

struct Inner {
    timeout: Duration,
    /// Reads from chunkservers on this host go to their files directly (`None`: never).
    local: Option<crate::local::LocalReads>,
    next_id: AtomicU64,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
}

/// A client for chunkservers' data ports. Cheap to clone; clones share the connection pools.
///
/// One call moves at most [`MAX_PAYLOAD`] (8 MiB) of data; callers split bigger I/O.
#[derive(Clone)]
pub struct DataClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DataClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataClient")
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

impl DataClient {
    /// A client whose every call (including connecting and waiting for a pool slot) must finish
    /// within `timeout`. Reads from chunkservers on this host read their chunk files directly
    /// (see [`crate::local`]).
    pub fn new(timeout: Duration) -> Self {
        Self::with_local_reads(timeout, true)
    }

    /// [`DataClient::new`], with local reads on or off (off: every read crosses the data
    /// port, as it must from another host).
    pub fn with_local_reads(timeout: Duration, local_reads: bool) -> Self {
        DataClient {
            inner: Arc::new(Inner {
                timeout,
                local: local_reads.then(|| crate::local::LocalReads::new(timeout)),
                next_id: AtomicU64::new(1),
                pools: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Writes `w.data` at `w.offset` of chunk `w.chunk` on the chunkserver at `addr`.
    pub async fn write(&self, addr: &str, w: WriteReq) -> Result<(), DataError> {
        let length = match u32::try_from(w.data.len()) {
            Ok(len) if len <= MAX_PAYLOAD => len,
            _ => {
                return Err(DataError::Protocol {
                    reason: format!(
                        "write of {} bytes exceeds the {MAX_PAYLOAD}-byte frame limit",
                        w.data.len()
                    ),
                })
            }
        };
        let req = Request {
            id: 0,
            op: Opcode::Write,
            flags: if w.sync { FLAG_SYNC } else { 0 },
            chunk: w.chunk,
            version: w.version,
            term: w.term,
            offset: w.offset,
            length,
            payload: w.data,
        };
        self.call(addr, req).await.map(|_| ())
    }

    /// Writes several pieces of chunk `chunk` on the chunkserver at `addr` in one request
    /// (a WRITEV, see [`crate::vector`]); one piece goes as a plain WRITE. The pieces'
    /// encoding must fit one frame: at most [`crate::MAX_PIECES`] pieces and
    /// [`MAX_PAYLOAD`] bytes.
    pub async fn write_v(
        &self,
        addr: &str,
        chunk: u64,
        version: u64,
        term: u64,
        pieces: &[crate::Piece],
    ) -> Result<Option<u64>, DataError> {
        let frame = EncodedWrite::new(pieces)?;
        self.write_encoded(addr, chunk, version, term, &frame).await
    }

    /// Sends a write encoded once by [`EncodedWrite::new`] (the same frame goes to every
    /// replica: encoded and hashed once, not once per replica). Returns the bytes the write
    /// added to the chunk's stored space ([`crate::frame::added`]; `None` for a ZERO, or from a
    /// chunkserver that does not say).
    pub async fn write_encoded(
        &self,
        addr: &str,
        chunk: u64,
        version: u64,
        term: u64,
        frame: &EncodedWrite,
    ) -> Result<Option<u64>, DataError> {
        let req = Request {
            id: 0,
            op: frame.op,
            flags: 0,
            chunk,
            version,
            term,
            offset: frame.offset,
            length: frame.length,
            payload: frame.payload.clone(),
        };
        let zero = frame.zeroes().is_some();
        self.call_with_crc(addr, req, Some(frame.crc))
            .await
            .map(|payload| crate::frame::added(&payload).filter(|_| !zero))
    }

    /// Reads `len` bytes at `offset` of `chunk`. Unwritten ranges read as zeros; every byte was
    /// verified against its block checksum by the chunkserver.
    pub async fn read(
        &self,
        addr: &str,
        chunk: u64,
        version: u64,
        offset: u32,
        len: u32,
    ) -> Result<Bytes, DataError> {
        if len > MAX_PAYLOAD {
            return Err(DataError::Protocol {
                reason: format!("read of {len} bytes exceeds the {MAX_PAYLOAD}-byte frame limit"),
            });
        }
        if let Some(local) = &self.inner.local {
            if let Some(data) = local.read(self, addr, chunk, version, offset, len).await {
                return Ok(data);
            }
        }
        let req = Request::about(Opcode::Read, chunk, version, offset, len);
        let data = self.call(addr, req).await?;
        if data.len() != len as usize {
            return Err(DataError::Protocol {
                reason: format!("asked for {len} bytes, got {}", data.len()),
            });
        }
        Ok(data)
    }

    /// Which parts of `offset..offset + len` of `chunk` hold data on the chunkserver at
    /// `addr`, as ascending chunk byte ranges (whole checksummed blocks, clipped to the
    /// range). What is not listed was never written and reads as zeros there.
    pub async fn written(
        &self,
        addr: &str,
        chunk: u64,
        version: u64,
        offset: u32,
        len: u32,
    ) -> Result<Vec<std::ops::Range<u32>>, DataError> {
        let asked = offset..offset.checked_add(len).ok_or_else(|| DataError::Protocol {
            reason: format!("range {offset}+{len} overflows"),
        })?;
        let req = Request::about(Opcode::Written, chunk, version, offset, len);
        let payload = self.call(addr, req).await?;
        crate::written::decode(&payload, asked).map_err(|reason| DataError::Protocol { reason })
    }

    /// fsyncs the file of `chunk` on the chunkserver at `addr`.
    pub async fn sync(&self, addr: &str, chunk: u64, version: u64) -> Result<(), DataError> {
        let req = Request::about(Opcode::Sync, chunk, version, 0, 0);
        self.call(addr, req).await.map(|_| ())
    }

    /// Copies chunk `src` at `src_version` into the new chunk `dst` at `dst_version` on the
    /// chunkserver at `addr` (its local files; see the CLONE opcode), fenced by `term`.
    /// Idempotent: a `dst` that exists already is left as it is.
    pub async fn clone_chunk(
        &self,
        addr: &str,
        src: u64,
        src_version: u64,
        dst: u64,
        dst_version: u64,
        term: u64,
    ) -> Result<(), DataError> {
        let mut payload = Vec::with_capacity(16);
        payload.extend_from_slice(&src.to_be_bytes());
        payload.extend_from_slice(&src_version.to_be_bytes());
        let req = Request {
            id: 0,
            op: Opcode::Clone,
            flags: 0,
            chunk: dst,
            version: dst_version,
            term,
            offset: 0,
            length: 16,
            payload: Bytes::from(payload),
        };
        self.call(addr, req).await.map(|_| ())
    }

    /// Makes the chunkserver at `addr` refuse versions of `chunk` older than `version`, and
    /// fsync it (see the FENCE opcode), fenced by `term`.
    pub async fn fence(
        &self,
        addr: &str,
        chunk: u64,
        version: u64,
        term: u64,
    ) -> Result<(), DataError> {
        let req = Request {
            id: 0,
            op: Opcode::Fence,
            flags: 0,
            chunk,
            version,
            term,
            offset: 0,
            length: 0,
            payload: Bytes::new(),
        };
        self.call(addr, req).await.map(|_| ())
    }

    /// How many reads this client answered from chunk files on this host (local reads).
    pub fn local_reads(&self) -> u64 {
        self.inner.local.as_ref().map_or(0, |l| l.served())
    }

    /// The token and path of the local socket of the chunkserver at `addr` (see
    /// [`crate::local`]).
    pub async fn local_socket(&self, addr: &str) -> Result<(u64, String), DataError> {
        let req = Request::bare(Opcode::LocalSocket);
        let payload = self.call(addr, req).await?;
        let bad = || DataError::Protocol {
            reason: "malformed local socket answer".to_string(),
        };
        let (token, path) = payload.split_at_checked(8).ok_or_else(bad)?;
        let token = u64::from_be_bytes(token.try_into().map_err(|_| bad())?);
        let path = std::str::from_utf8(path).map_err(|_| bad())?;
        Ok((token, path.to_string()))
    }

    /// Checks that the chunkserver at `addr` answers on its data port.
    pub async fn ping(&self, addr: &str) -> Result<(), DataError> {
        let req = Request::bare(Opcode::Ping);
        self.call(addr, req).await.map(|_| ())
    }

    fn pool(&self, addr: &str) -> Arc<Pool> {
        let mut pools = self
            .inner
            .pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pools
            .entry(addr.to_string())
            .or_insert_with(|| {
                Arc::new(Pool {
                    idle: Mutex::new(Vec::new()),
                    permits: Semaphore::new(MAX_CONNS_PER_ADDR),
                })
            })
            .clone()
    }

    /// Sends `req` (with a fresh request id) and returns the payload of an OK response.
    async fn call(&self, addr: &str, req: Request) -> Result<Bytes, DataError> {
        self.call_with_crc(addr, req, None).await
    }

    /// [`DataClient::call`] with the payload's crc32c, if the caller has it already.
    async fn call_with_crc(
        &self,
        addr: &str,
        mut req: Request,
        crc: Option<u32>,
    ) -> Result<Bytes, DataError> {
        req.id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let resp = tokio::time::timeout(self.inner.timeout, self.exchange(addr, &req, crc))
            .await
            .map_err(|_| DataError::Timeout)??;
        status_to_result(resp)
    }

    async fn exchange(
        &self,
        addr: &str,
        req: &Request,
        crc: Option<u32>,
    ) -> Result<Response, DataError> {
        let pool = self.pool(addr);
        let _permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| DataError::Unreachable {
                addr: addr.to_string(),
                reason: "connection pool closed".to_string(),
            })?;
        let pooled = pool
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let (resp, conn) = match pooled {
            Some(conn) => match round_trip(conn, req, crc).await {
                Ok(done) => done,
                // An idle connection may have been closed by a restarted server; every request
                // is idempotent (positional writes), so retry once on a fresh connection.
                Err(FrameError::Io(e)) => {
                    tracing::debug!(addr, error = %e, "pooled connection failed; reconnecting");
                    let conn = connect(addr).await?;
                    round_trip(conn, req, crc)
                        .await
                        .map_err(|e| frame_error(addr, e))?
                }
                Err(e) => return Err(frame_error(addr, e)),
            },
            None => {
                let conn = connect(addr).await?;
                round_trip(conn, req, crc)
                    .await
                    .map_err(|e| frame_error(addr, e))?
            }
        };
        if resp.id != req.id {
            // The connection is out of step; `conn` is dropped here rather than pooled.
            return Err(DataError::Protocol {
                reason: format!("response id {} for request {}", resp.id, req.id),
            });
        }
        let mut idle = pool
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE_PER_ADDR {
            idle.push(conn);
        }
        Ok(resp)
    }
}

async fn connect(addr: &str) -> Result<Conn, DataError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| DataError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    // Requests are written whole and then flushed; Nagle would only add latency.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(addr, error = %e, "set_nodelay failed");
    }
    Ok(Conn {
        stream: BufStream::with_capacity(CONN_BUFFER, CONN_BUFFER, stream),
    })
}

async fn round_trip(
    mut conn: Conn,
    req: &Request,
    crc: Option<u32>,
) -> Result<(Response, Conn), FrameError> {
    let crc = crc.unwrap_or_else(|| crc32c::crc32c(&req.payload));
    frame::write_request_with_crc(&mut conn.stream, req, crc).await?;
    let resp = frame::read_response(&mut conn.stream).await?;
    Ok((resp, conn))
}

fn frame_error(addr: &str, e: FrameError) -> DataError {
    match e {
        FrameError::Io(e) => DataError::Unreachable {
            addr: addr.to_string(),
            reason: e.to_string(),
        },
        other => DataError::Protocol {
            reason: other.to_string(),
        },
    }
}

fn status_to_result(resp: Response) -> Result<Bytes, DataError> {
    let reason = || String::from_utf8_lossy(&resp.payload).into_owned();
    match resp.status {
        Status::Ok => Ok(resp.payload),
        Status::StaleVersion { current } => Err(DataError::StaleVersion { current }),
        Status::StaleTerm { current } => Err(DataError::StaleTerm { current }),
        Status::NotFound => Err(DataError::NotFound),
        Status::Corrupt { offset } => Err(DataError::Corrupt { offset }),
        Status::NoSpace => Err(DataError::NoSpace),
        Status::DiskError => Err(DataError::Disk { reason: reason() }),
        Status::BadRequest => Err(DataError::Protocol {
            reason: format!("request refused: {}", reason()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_write_is_encoded_once_as_a_write_or_a_writev() {
        use crate::Piece;
        let piece = |offset, data: &'static [u8]| Piece {
            offset,
            data: Bytes::from_static(data),
        };
        let one = EncodedWrite::new(&[piece(4096, b"block")]).unwrap();
        assert_eq!(
            (one.op, one.offset, &one.payload[..]),
            (Opcode::Write, 4096, &b"block"[..])
        );
        assert_eq!(one.crc, crc32c::crc32c(b"block"));
        let two = [piece(0, b"a"), piece(10, b"b")];
        let many = EncodedWrite::new(&two).unwrap();
        assert_eq!((many.op, many.offset), (Opcode::WriteV, 0));
        assert_eq!(many.payload, crate::vector::encode(&two));
        assert_eq!(many.crc, crc32c::crc32c(&many.payload));
        assert!(EncodedWrite::new(&[]).is_err());
        let big = Piece {
            offset: 0,
            data: Bytes::from(vec![0u8; MAX_PAYLOAD as usize + 1]),
        };
        assert!(EncodedWrite::new(&[big]).is_err());
    }

    #[test]
    fn stale_fences_are_not_replica_failures() {
        assert!(!DataError::StaleVersion { current: 1 }.is_replica_failure());
        assert!(!DataError::StaleTerm { current: 1 }.is_replica_failure());
        assert!(DataError::Timeout.is_replica_failure());
        assert!(DataError::Corrupt { offset: 0 }.is_replica_failure());
        assert!(DataError::NotFound.is_replica_failure());
    }

    #[tokio::test]
    async fn unreachable_address_is_reported() {
        // Bind and drop a listener to get a port that is (very likely) closed.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let c = DataClient::new(Duration::from_secs(5));
        assert!(matches!(
            c.ping(&addr).await,
            Err(DataError::Unreachable { .. })
        ));
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            // Keep the connection open without answering.
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let c = DataClient::new(Duration::from_millis(200));
        assert_eq!(c.ping(&addr).await, Err(DataError::Timeout));
        hold.abort();
    }

    #[tokio::test]
    async fn garbage_response_is_a_protocol_error() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut hdr = [0u8; frame::REQUEST_HEADER_LEN];
            s.read_exact(&mut hdr).await.unwrap();
            s.write_all(&[0xabu8; 64]).await.unwrap();
        });
        let c = DataClient::new(Duration::from_secs(5));
        assert!(matches!(
            c.ping(&addr).await,
            Err(DataError::Protocol { .. })
        ));
    }
}
