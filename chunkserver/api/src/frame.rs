//! The framed binary data protocol: byte layout, encoding, decoding and async frame I/O.
//!
//! Every integer is big-endian (network order). A connection carries a sequence of request
//! frames from the client and, for each, one response frame with the same request id, in order.
//!
//! Request frame: a 64-byte header followed by `payload_len` bytes of payload.
//!
//! ```text
//!  off size field
//!    0    4 magic        b"RFSQ"
//!    4    2 version      PROTOCOL_VERSION (1)
//!    6    1 opcode       1 WRITE, 2 READ, 3 SYNC, 4 PING, 5 CLONE, 6 FENCE, 7 WRITEV,
//!                        8 LOCAL_SOCKET, 9 WRITTEN, 10 ZERO
//!    7    1 flags        bit 0: FLAG_SYNC (fsync the chunk file after a WRITE)
//!    8    8 request id   chosen by the client, echoed in the response
//!   16    8 chunk id
//!   24    8 chunk version
//!   32    8 term         the metadata leader's term (fencing token)
//!   40    4 offset       byte offset within the chunk
//!   44    4 length       READ, WRITTEN, ZERO: bytes of the range; WRITE, WRITEV, CLONE:
//!                        equals payload_len; else 0
//!   48    4 payload_len  at most MAX_PAYLOAD
//!   52    4 payload_crc  crc32c of the payload
//!   56    4 reserved     zero
//!   60    4 header_crc   crc32c of bytes 0..60
//! ```
//!
//! CLONE copies another chunk of the same server into a new chunk (the request's chunk and
//! version; fenced by term like a WRITE); its 16-byte payload is the source chunk id and
//! version (u64 each). FENCE raises the stored version of an existing chunk to the
//! request's version and fsyncs it (fenced by term). WRITTEN asks which blocks of
//! `offset..offset + length` hold data; the answer is [`crate::written`]'s list of runs.
//! ZERO makes `offset..offset + length` read as zeros (fenced by term like a WRITE, no
//! payload).
//!
//! Response frame: a 40-byte header followed by `payload_len` bytes (the data of a READ, or a
//! UTF-8 explanation for DISK_ERROR and BAD_REQUEST).
//!
//! ```text
//!  off size field
//!    0    4 magic        b"RFSR"
//!    4    2 version      PROTOCOL_VERSION (1)
//!    6    1 status       0 OK, 1 STALE_VERSION, 2 STALE_TERM, 3 NOT_FOUND, 4 CORRUPT,
//!                        5 NO_SPACE, 6 DISK_ERROR, 7 BAD_REQUEST
//!    7    1 reserved     zero
//!    8    8 request id
//!   16    8 detail       STALE_VERSION / STALE_TERM: the current value; CORRUPT: chunk offset
//!   24    4 payload_len  at most MAX_PAYLOAD
//!   28    4 payload_crc  crc32c of the payload
//!   32    4 reserved     zero
//!   36    4 header_crc   crc32c of bytes 0..36
//! ```
//!
//! The header crc lets a reader reject a garbage header before it trusts `payload_len`, and
//! `payload_len` is checked against [`MAX_PAYLOAD`] before any buffer is allocated. A header
//! that fails these checks leaves the stream position unknown, so the connection must be
//! closed; a payload whose crc does not match is reported as [`FrameError::PayloadCrc`] with
//! the request id, since framing is still intact.

use crate::aligned::AlignedPayload;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Magic at the start of every request frame.
pub const REQUEST_MAGIC: [u8; 4] = *b"RFSQ";
/// Magic at the start of every response frame.
pub const RESPONSE_MAGIC: [u8; 4] = *b"RFSR";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Size of a request header in bytes.
pub const REQUEST_HEADER_LEN: usize = 64;
/// Size of a response header in bytes.
pub const RESPONSE_HEADER_LEN: usize = 40;
/// Largest payload a frame may carry (8 MiB); bigger frames are refused unread.
pub const MAX_PAYLOAD: u32 = 8 << 20;
/// Request flag: fsync the chunk file after the WRITE, before answering.
pub const FLAG_SYNC: u8 = 1;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opcode {
    /// Store the payload at `offset` of the chunk (creating the chunk if needed). The answer
    /// says how many bytes of blocks held no data before ([`added_payload`]).
    Write = 1,
    /// Return `length` bytes at `offset` of the chunk, verified against block checksums.
    Read = 2,
    /// fsync the chunk file.
    Sync = 3,
    /// Liveness check; touches no chunk.
    Ping = 4,
    /// Copy the source chunk named in the payload into this (new) chunk.
    Clone = 5,
    /// Refuse versions older than this one from now on, and fsync the chunk.
    Fence = 6,
    /// Store several pieces of the chunk, laid out as in [`crate::vector`]; answered like a
    /// WRITE.
    WriteV = 7,
    /// Where this server's local socket is (see [`crate::local`]); touches no chunk. The
    /// response payload is the socket's token (u64) and its path (UTF-8); NOT_FOUND if the
    /// server has none.
    LocalSocket = 8,
    /// Which blocks of `offset..offset + length` hold data (for `SEEK_DATA` and NBD block
    /// status); the response payload is a list of runs (see [`crate::written`]). Fenced by
    /// version like a READ.
    Written = 9,
    /// Make `offset..offset + length` of the chunk read as zeros (creating the chunk if
    /// needed): whole blocks become unwritten and their space is punched out of the chunk
    /// file; zeros are written into partly covered blocks that hold data. Fenced like a WRITE.
    Zero = 10,
}

impl Opcode {
    fn from_u8(v: u8) -> Option<Opcode> {
        match v {
            1 => Some(Opcode::Write),
            2 => Some(Opcode::Read),
            3 => Some(Opcode::Sync),
            4 => Some(Opcode::Ping),
            5 => Some(Opcode::Clone),
            6 => Some(Opcode::Fence),
            7 => Some(Opcode::WriteV),
            8 => Some(Opcode::LocalSocket),
            9 => Some(Opcode::Written),
            10 => Some(Opcode::Zero),
            _ => None,
        }
    }
}

/// One request frame, header fields and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the client; echoed in the response.
    pub id: u64,
    pub op: Opcode,
    /// [`FLAG_SYNC`] or 0.
    pub flags: u8,
    pub chunk: u64,
    /// The caller's chunk version (fence).
    pub version: u64,
    /// The metadata leader's term (fence for writes).
    pub term: u64,
    /// Byte offset within the chunk.
    pub offset: u32,
    /// READ: bytes wanted; WRITE: the payload's length; otherwise 0.
    pub length: u32,
    /// WRITE: the data; otherwise empty.
    pub payload: Bytes,
}

impl Request {
    /// A request of `op` about `offset..offset + length` of chunk `chunk` at `version` that
    /// carries nothing and needs no term (READ, WRITTEN, SYNC).
    pub fn about(op: Opcode, chunk: u64, version: u64, offset: u32, length: u32) -> Request {
        Request {
            id: 0,
            op,
            flags: 0,
            chunk,
            version,
            term: 0,
            offset,
            length,
            payload: Bytes::new(),
        }
    }

    /// A request of `op` that names no chunk and carries nothing (PING, LOCAL_SOCKET).
    pub fn bare(op: Opcode) -> Request {
        Request {
            id: 0,
            op,
            flags: 0,
            chunk: 0,
            version: 0,
            term: 0,
            offset: 0,
            length: 0,
            payload: Bytes::new(),
        }
    }
}

/// The outcome of a request, as carried in a response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The chunkserver stores a newer version of the chunk.
    StaleVersion {
        current: u64,
    },
    /// The chunkserver has seen a newer metadata term.
    StaleTerm {
        current: u64,
    },
    /// The chunk does not exist here.
    NotFound,
    /// A block failed its checksum; `offset` is the block's offset within the chunk.
    Corrupt {
        offset: u64,
    },
    /// The disk is full.
    NoSpace,
    /// The disk failed the operation (payload: explanation).
    DiskError,
    /// The request was malformed (payload: explanation).
    BadRequest,
}

impl Status {
    fn encode(self) -> (u8, u64) {
        match self {
            Status::Ok => (0, 0),
            Status::StaleVersion { current } => (1, current),
            Status::StaleTerm { current } => (2, current),
            Status::NotFound => (3, 0),
            Status::Corrupt { offset } => (4, offset),
            Status::NoSpace => (5, 0),
            Status::DiskError => (6, 0),
            Status::BadRequest => (7, 0),
        }
    }

    fn decode(code: u8, detail: u64) -> Option<Status> {
        Some(match code {
            0 => Status::Ok,
            1 => Status::StaleVersion { current: detail },
            2 => Status::StaleTerm { current: detail },
            3 => Status::NotFound,
            4 => Status::Corrupt { offset: detail },
            5 => Status::NoSpace,
            6 => Status::DiskError,
            7 => Status::BadRequest,
            _ => return None,
        })
    }
}

/// One response frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    pub status: Status,
    /// READ: the data; WRITE / WRITEV: [`added_payload`] (empty from chunkservers before
    /// it); DISK_ERROR / BAD_REQUEST: a UTF-8 explanation; otherwise empty.
    pub payload: Bytes,
}

/// The payload of a successful WRITE or WRITEV: the bytes of the chunk's checksum blocks that
/// held no data before the request (8 bytes, big-endian), which is what the write added to
/// the space the chunk takes. Clients sum it into the file's stored bytes (`st_blocks`).
pub fn added_payload(bytes: u64) -> Bytes {
    Bytes::copy_from_slice(&bytes.to_be_bytes())
}

/// The bytes a successful WRITE or WRITEV added, from its payload ([`added_payload`]);
/// `None` from a chunkserver that does not say.
pub fn added(payload: &[u8]) -> Option<u64> {
    let b: [u8; 8] = payload.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

impl Response {
    /// A response with a status and no payload.
    pub fn status(id: u64, status: Status) -> Response {
        Response {
            id,
            status,
            payload: Bytes::new(),
        }
    }

    /// An error response whose payload explains the failure.
    pub fn error(id: u64, status: Status, reason: impl Into<String>) -> Response {
        Response {
            id,
            status,
            payload: Bytes::from(reason.into()),
        }
    }
}

/// Why a frame could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended inside a frame.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad magic {found:02x?}")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found}")]
    BadVersion { found: u16 },
    #[error("header checksum mismatch")]
    HeaderCrc,
    #[error("unknown opcode {found}")]
    BadOpcode { found: u8 },
    #[error("unknown status code {found}")]
    BadStatus { found: u8 },
    #[error("payload of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge { len: u32 },
    /// The frame was complete but its payload does not match its crc: the stream is still in
    /// sync, so a server may answer `request_id` with BAD_REQUEST and go on.
    #[error("payload checksum mismatch (request {request_id})")]
    PayloadCrc { request_id: u64 },
}

impl FrameError {
    /// True when the stream is still positioned at a frame boundary after this error.
    pub fn stream_in_sync(&self) -> bool {
        matches!(self, FrameError::PayloadCrc { .. })
    }
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Fields of a request header, before the payload is read (see [`Request`] for meanings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub id: u64,
    pub op: Opcode,
    pub flags: u8,
    pub chunk: u64,
    pub version: u64,
    pub term: u64,
    pub offset: u32,
    pub length: u32,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl RequestHeader {
    /// Encodes the header (computing its crc).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC);
        put_u16(&mut b, 4, PROTOCOL_VERSION);
        b[6] = self.op as u8;
        b[7] = self.flags;
        put_u64(&mut b, 8, self.id);
        put_u64(&mut b, 16, self.chunk);
        put_u64(&mut b, 24, self.version);
        put_u64(&mut b, 32, self.term);
        put_u32(&mut b, 40, self.offset);
        put_u32(&mut b, 44, self.length);
        put_u32(&mut b, 48, self.payload_len);
        put_u32(&mut b, 52, self.payload_crc);
        let crc = crc32c::crc32c(&b[..60]);
        put_u32(&mut b, 60, crc);
        b
    }

    /// Decodes and validates a header; the payload length is checked against [`MAX_PAYLOAD`].
    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = get_u16(b, 4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion { found: version });
        }
        if crc32c::crc32c(&b[..60]) != get_u32(b, 60) {
            return Err(FrameError::HeaderCrc);
        }
        let op = Opcode::from_u8(b[6]).ok_or(FrameError::BadOpcode { found: b[6] })?;
        let payload_len = get_u32(b, 48);
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { len: payload_len });
        }
        Ok(RequestHeader {
            id: get_u64(b, 8),
            op,
            flags: b[7],
            chunk: get_u64(b, 16),
            version: get_u64(b, 24),
            term: get_u64(b, 32),
            offset: get_u32(b, 40),
            length: get_u32(b, 44),
            payload_len,
            payload_crc: get_u32(b, 52),
        })
    }
}

/// Fields of a response header, before the payload is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHeader {
    pub id: u64,
    pub status: Status,
    pub payload_len: u32,
    pub payload_crc: u32,
}

impl ResponseHeader {
    /// Encodes the header (computing its crc).
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut b = [0u8; RESPONSE_HEADER_LEN];
        b[0..4].copy_from_slice(&RESPONSE_MAGIC);
        put_u16(&mut b, 4, PROTOCOL_VERSION);
        let (code, detail) = self.status.encode();
        b[6] = code;
        put_u64(&mut b, 8, self.id);
        put_u64(&mut b, 16, detail);
        put_u32(&mut b, 24, self.payload_len);
        put_u32(&mut b, 28, self.payload_crc);
        let crc = crc32c::crc32c(&b[..36]);
        put_u32(&mut b, 36, crc);
        b
    }

    /// Decodes and validates a header; the payload length is checked against [`MAX_PAYLOAD`].
    pub fn decode(b: &[u8; RESPONSE_HEADER_LEN]) -> Result<ResponseHeader, FrameError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != RESPONSE_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let version = get_u16(b, 4);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::BadVersion { found: version });
        }
        if crc32c::crc32c(&b[..36]) != get_u32(b, 36) {
            return Err(FrameError::HeaderCrc);
        }
        let status =
            Status::decode(b[6], get_u64(b, 16)).ok_or(FrameError::BadStatus { found: b[6] })?;
        let payload_len = get_u32(b, 24);
        if payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLarge { len: payload_len });
        }
        Ok(ResponseHeader {
            id: get_u64(b, 8),
            status,
            payload_len,
            payload_crc: get_u32(b, 28),
        })
    }
}

/// Reads exactly `buf.len()` bytes, or returns `Ok(false)` on a clean end of stream before the
/// first byte (a peer closing between frames).
async fn read_first<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = r.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(true)
}

/// Payload bytes read before the full payload buffer is allocated: a peer that announces a
/// big frame and then stalls holds at most this much memory.
const FIRST_READ: usize = 64 << 10;

/// Reads from `r` until `buf` holds `upto` bytes, straight into its spare capacity (a
/// payload buffer is not zeroed first: megabytes per frame add up), never past `upto`.
async fn read_up_to<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    upto: usize,
) -> std::io::Result<()> {
    while buf.len() < upto {
        let want = (upto - buf.len()) as u64;
        if (&mut *r).take(want).read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    len: u32,
    crc: u32,
    request_id: u64,
) -> Result<Bytes, FrameError> {
    // `len` was bounded by MAX_PAYLOAD when the header was decoded.
    read_payload_after(r, &[], len as usize, Some(crc), request_id).await
}

/// [`read_payload`] of a payload whose first bytes, `prefix`, were read already; `crc`, if
/// given, is checked.
async fn read_payload_after<R: AsyncRead + Unpin>(
    r: &mut R,
    prefix: &[u8],
    len: usize,
    crc: Option<u32>,
    request_id: u64,
) -> Result<Bytes, FrameError> {
    let first = len.min(FIRST_READ);
    let mut buf = BytesMut::with_capacity(first);
    buf.extend_from_slice(prefix);
    read_up_to(r, &mut buf, first).await?;
    if first < len {
        buf.reserve(len - first);
        read_up_to(r, &mut buf, len).await?;
    }
    if crc.is_some_and(|crc| crc32c::crc32c(&buf) != crc) {
        return Err(FrameError::PayloadCrc { request_id });
    }
    Ok(buf.freeze())
}

/// Reads the payload of a WRITE or WRITEV into a page-aligned pooled buffer with its first
/// piece's data on a page boundary (see [`crate::aligned`]), or as any other payload when it
/// does not fit one. Its crc is checked if `verify`.
async fn read_write_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    h: &RequestHeader,
    verify: bool,
) -> Result<Bytes, FrameError> {
    let len = h.payload_len as usize;
    let mut count = [0u8; 4];
    // A WRITEV's data starts after its piece table, whose size its first 4 bytes give (a
    // bogus count only misplaces the alignment: the table is checked when it is decoded).
    let (prefix, head) = if h.op == Opcode::WriteV && len >= count.len() {
        r.read_exact(&mut count).await?;
        let pieces = u32::from_be_bytes(count) as usize;
        (&count[..], (4 + 8 * pieces).min(len))
    } else {
        (&count[..0], 0)
    };
    let crc = verify.then_some(h.payload_crc);
    let Some(mut buf) = AlignedPayload::new(len, head) else {
        return read_payload_after(r, prefix, len, crc, h.id).await;
    };
    buf.put_slice(prefix);
    while buf.missing() > 0 {
        let want = buf.missing() as u64;
        if (&mut *r).take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    if crc.is_some_and(|crc| crc32c::crc32c(buf.as_ref()) != crc) {
        return Err(FrameError::PayloadCrc { request_id: h.id });
    }
    Ok(Bytes::from_owner(buf))
}

/// Reads one request header. `Ok(None)` means the peer closed the stream between frames.
/// Follow with [`read_request_body`]; a server may put a deadline on the body alone, since
/// waiting for the next header is an idle connection's normal state.
pub async fn read_request_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<RequestHeader>, FrameError> {
    let mut hb = [0u8; REQUEST_HEADER_LEN];
    if !read_first(r, &mut hb).await? {
        return Ok(None);
    }
    RequestHeader::decode(&hb).map(Some)
}

/// Reads the payload announced by `h` and returns the whole request.
pub async fn read_request_body<R: AsyncRead + Unpin>(
    r: &mut R,
    h: RequestHeader,
) -> Result<Request, FrameError> {
    let payload = match h.op {
        Opcode::Write | Opcode::WriteV => read_write_payload(r, &h, true).await?,
        _ => read_payload(r, h.payload_len, h.payload_crc, h.id).await?,
    };
    Ok(request(h, payload))
}

/// [`read_request_body`] that leaves the payload crc of a WRITE to the caller: returns it
/// (unchecked) with the request, or `None` for any other request (checked here). A
/// chunkserver checks it from the block checksums it computes anyway, one pass instead of
/// two; a WRITE whose check is skipped must not be stored.
pub async fn read_request_body_leaving_write_crc<R: AsyncRead + Unpin>(
    r: &mut R,
    h: RequestHeader,
) -> Result<(Request, Option<u32>), FrameError> {
    if h.op != Opcode::Write {
        return read_request_body(r, h).await.map(|req| (req, None));
    }
    let payload = read_write_payload(r, &h, false).await?;
    Ok((request(h, payload), Some(h.payload_crc)))
}

fn request(h: RequestHeader, payload: Bytes) -> Request {
    Request {
        id: h.id,
        op: h.op,
        flags: h.flags,
        chunk: h.chunk,
        version: h.version,
        term: h.term,
        offset: h.offset,
        length: h.length,
        payload,
    }
}

/// Reads one request frame. `Ok(None)` means the peer closed the stream between frames.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Request>, FrameError> {
    match read_request_header(r).await? {
        None => Ok(None),
        Some(h) => read_request_body(r, h).await.map(Some),
    }
}

/// Writes one request frame and flushes the writer.
pub async fn write_request<W: AsyncWrite + Unpin>(
    w: &mut W,
    req: &Request,
) -> Result<(), FrameError> {
    write_request_with_crc(w, req, crc32c::crc32c(&req.payload)).await
}

/// [`write_request`] for a payload whose crc32c the caller already has (the same frame sent
/// to every replica is hashed once).
pub async fn write_request_with_crc<W: AsyncWrite + Unpin>(
    w: &mut W,
    req: &Request,
    payload_crc: u32,
) -> Result<(), FrameError> {
    let len = frame_len(&req.payload)?;
    let h = RequestHeader {
        id: req.id,
        op: req.op,
        flags: req.flags,
        chunk: req.chunk,
        version: req.version,
        term: req.term,
        offset: req.offset,
        length: req.length,
        payload_len: len,
        payload_crc,
    };
    w.write_all(&h.encode()).await?;
    w.write_all(&req.payload).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one response frame. A clean end of stream is an error here: a response was expected.
pub async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> Result<Response, FrameError> {
    let mut hb = [0u8; RESPONSE_HEADER_LEN];
    if !read_first(r, &mut hb).await? {
        return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let h = ResponseHeader::decode(&hb)?;
    let payload = read_payload(r, h.payload_len, h.payload_crc, h.id).await?;
    Ok(Response {
        id: h.id,
        status: h.status,
        payload,
    })
}

/// Writes one response frame and flushes the writer.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
) -> Result<(), FrameError> {
    write_response_with_crc(w, resp, crc32c::crc32c(&resp.payload)).await
}

/// [`write_response`] for a payload whose crc32c the caller already has (a chunkserver
/// derives a whole-block read's from the block checksums it verified).
pub async fn write_response_with_crc<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
    payload_crc: u32,
) -> Result<(), FrameError> {
    let len = frame_len(&resp.payload)?;
    let h = ResponseHeader {
        id: resp.id,
        status: resp.status,
        payload_len: len,
        payload_crc,
    };
    w.write_all(&h.encode()).await?;
    w.write_all(&resp.payload).await?;
    w.flush().await?;
    Ok(())
}

fn frame_len(payload: &[u8]) -> Result<u32, FrameError> {
    match u32::try_from(payload.len()) {
        Ok(len) if len <= MAX_PAYLOAD => Ok(len),
        _ => Err(FrameError::TooLarge {
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_request(payload: &'static [u8]) -> Request {
        Request {
            id: 42,
            op: Opcode::Write,
            flags: FLAG_SYNC,
            chunk: 0xdead_beef,
            version: 7,
            term: 3,
            offset: 65_536,
            length: payload.len() as u32,
            payload: Bytes::from_static(payload),
        }
    }

    #[tokio::test]
    async fn request_round_trips() {
        let req = sample_request(b"hello world");
        let mut buf = Vec::new();
        write_request(&mut buf, &req).await.unwrap();
        assert_eq!(buf.len(), REQUEST_HEADER_LEN + 11);
        let mut r = &buf[..];
        assert_eq!(read_request(&mut r).await.unwrap(), Some(req));
        // The stream is now at a clean end.
        assert_eq!(read_request(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn largest_payload_round_trips() {
        let payload: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
        let req = Request {
            length: MAX_PAYLOAD,
            payload: Bytes::from(payload),
            ..sample_request(b"")
        };
        let mut buf = Vec::new();
        write_request(&mut buf, &req).await.unwrap();
        let mut r = &buf[..];
        assert_eq!(read_request(&mut r).await.unwrap(), Some(req));
    }

    #[tokio::test]
    async fn write_payloads_arrive_with_their_first_piece_page_aligned() {
        use crate::aligned::PAGE;
        use crate::vector::{self, Piece};
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 249) as u8).collect();
        let pieces = [
            Piece {
                offset: 0,
                data: Bytes::from(data.clone()),
            },
            Piece {
                offset: 2 << 20,
                data: Bytes::from_static(b"tail"),
            },
        ];
        let payload = vector::encode(&pieces);
        let writev = Request {
            op: Opcode::WriteV,
            length: payload.len() as u32,
            payload,
            ..sample_request(b"")
        };
        let write = Request {
            length: data.len() as u32,
            payload: Bytes::from(data),
            ..sample_request(b"")
        };
        // One byte at a time for the first, as a slow peer would send it.
        let (mut w, mut r) = tokio::io::duplex(1);
        let sent = (writev.clone(), write.clone());
        let writer = tokio::spawn(async move {
            write_request(&mut w, &sent.0).await.unwrap();
            write_request(&mut w, &sent.1).await.unwrap();
        });
        let got = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(got, writev);
        let decoded = vector::decode(&got.payload).unwrap();
        assert_eq!(decoded[0].data.as_ptr() as usize % PAGE, 0);
        let got = read_request(&mut r).await.unwrap().unwrap();
        assert_eq!(got, write);
        assert_eq!(got.payload.as_ptr() as usize % PAGE, 0);
        writer.await.unwrap();
        // A damaged payload is still refused.
        let mut bad = Vec::new();
        write_request(&mut bad, &write).await.unwrap();
        bad[REQUEST_HEADER_LEN + 5] ^= 1;
        assert!(matches!(
            read_request(&mut &bad[..]).await,
            Err(FrameError::PayloadCrc { request_id: 42 })
        ));
    }

    #[tokio::test]
    async fn frames_arriving_a_few_bytes_at_a_time_are_read_whole_and_apart() {
        // A payload bigger than the first read, then a second frame right behind it: the
        // reader must stop exactly at each frame's end however the bytes arrive.
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let first = Response {
            id: 1,
            status: Status::Ok,
            payload: Bytes::from(big),
        };
        let second = Response {
            id: 2,
            status: Status::Ok,
            payload: Bytes::from_static(b"tail"),
        };
        let (mut w, mut r) = tokio::io::duplex(7);
        let sent = (first.clone(), second.clone());
        let writer = tokio::spawn(async move {
            write_response(&mut w, &sent.0).await.unwrap();
            write_response(&mut w, &sent.1).await.unwrap();
        });
        assert_eq!(read_response(&mut r).await.unwrap(), first);
        assert_eq!(read_response(&mut r).await.unwrap(), second);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn response_round_trips_every_status() {
        let statuses = [
            Status::Ok,
            Status::StaleVersion { current: 9 },
            Status::StaleTerm { current: 11 },
            Status::NotFound,
            Status::Corrupt { offset: 131_072 },
            Status::NoSpace,
            Status::DiskError,
            Status::BadRequest,
        ];
        for (i, status) in statuses.into_iter().enumerate() {
            let resp = Response {
                id: i as u64,
                status,
                payload: Bytes::from(vec![i as u8; i * 100]),
            };
            let mut buf = Vec::new();
            write_response(&mut buf, &resp).await.unwrap();
            let mut r = &buf[..];
            assert_eq!(read_response(&mut r).await.unwrap(), resp);
        }
    }

    #[tokio::test]
    async fn garbage_header_is_rejected() {
        let garbage = [0x5au8; REQUEST_HEADER_LEN];
        let mut r = &garbage[..];
        assert!(matches!(
            read_request(&mut r).await,
            Err(FrameError::BadMagic { .. })
        ));
        // Right magic and version but random fields: the header crc catches it.
        let mut h = sample_request(b"x");
        h.payload = Bytes::new();
        let mut buf = Vec::new();
        write_request(&mut buf, &h).await.unwrap();
        buf[20] ^= 0xff;
        let mut r = &buf[..];
        assert!(matches!(
            read_request(&mut r).await,
            Err(FrameError::HeaderCrc)
        ));
    }

    #[tokio::test]
    async fn truncated_frames_are_errors() {
        let mut buf = Vec::new();
        write_request(&mut buf, &sample_request(b"some payload bytes"))
            .await
            .unwrap();
        for cut in [1, REQUEST_HEADER_LEN - 1, REQUEST_HEADER_LEN, buf.len() - 1] {
            let mut r = &buf[..cut];
            match read_request(&mut r).await {
                Err(FrameError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
                other => panic!("cut at {cut}: expected EOF error, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_payload() {
        let h = RequestHeader {
            id: 1,
            op: Opcode::Write,
            flags: 0,
            chunk: 1,
            version: 1,
            term: 1,
            offset: 0,
            length: MAX_PAYLOAD + 1,
            payload_len: MAX_PAYLOAD + 1,
            payload_crc: 0,
        };
        // Only the header is present: a reader that tried to read the payload would hit EOF.
        let bytes = h.encode();
        let mut r = &bytes[..];
        assert!(matches!(
            read_request(&mut r).await,
            Err(FrameError::TooLarge { len }) if len == MAX_PAYLOAD + 1
        ));
        let big = Request {
            payload: Bytes::from(vec![0u8; MAX_PAYLOAD as usize + 1]),
            ..sample_request(b"")
        };
        let mut sink = Vec::new();
        assert!(matches!(
            write_request(&mut sink, &big).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert!(sink.is_empty());
    }

    #[tokio::test]
    async fn payload_crc_mismatch_is_an_error_with_the_request_id() {
        let mut buf = Vec::new();
        write_request(&mut buf, &sample_request(b"payload"))
            .await
            .unwrap();
        let last = buf.len() - 1;
        buf[last] ^= 1;
        let mut r = &buf[..];
        let err = read_request(&mut r).await.unwrap_err();
        assert!(matches!(err, FrameError::PayloadCrc { request_id: 42 }));
        assert!(err.stream_in_sync());
    }

    #[tokio::test]
    async fn unknown_opcode_and_status_are_rejected() {
        let mut b = sample_request(b"").clone();
        b.payload = Bytes::new();
        let mut buf = Vec::new();
        write_request(&mut buf, &b).await.unwrap();
        buf[6] = 99;
        let crc = crc32c::crc32c(&buf[..60]);
        buf[60..64].copy_from_slice(&crc.to_be_bytes());
        let mut r = &buf[..];
        assert!(matches!(
            read_request(&mut r).await,
            Err(FrameError::BadOpcode { found: 99 })
        ));

        let mut buf = Vec::new();
        write_response(&mut buf, &Response::status(1, Status::Ok))
            .await
            .unwrap();
        buf[6] = 200;
        let crc = crc32c::crc32c(&buf[..36]);
        buf[36..40].copy_from_slice(&crc.to_be_bytes());
        let mut r = &buf[..];
        assert!(matches!(
            read_response(&mut r).await,
            Err(FrameError::BadStatus { found: 200 })
        ));
    }
}
