//! The data port: accepts connections and answers framed requests from [`Storage`].
//!
//! Each connection is one task that reads a request, runs it on the blocking pool, writes the
//! response, and repeats; parallelism comes from clients opening several connections. A frame
//! that cannot be parsed closes only its own connection.

use crate::local_server::LocalSocket;
use crate::payload_crc;
use crate::storage::{Storage, StoreError};
use rawfs_chunkserver_api::frame::{self, Opcode, Request, Response, Status, FLAG_SYNC};
use rawfs_chunkserver_api::{vector, written, MAX_CHUNK_SIZE, MAX_PAYLOAD};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const CONN_BUFFER: usize = 64 << 10;
/// How long in-flight requests may take to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long the payload of a started frame may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves the data protocol on `listener` until `stop` is cancelled.
/// `local` is the local socket to tell clients about (LOCAL_SOCKET), if there is one.
pub(crate) async fn run(
    listener: TcpListener,
    storage: Arc<Storage>,
    local: Option<Arc<LocalSocket>>,
    stop: CancellationToken,
) {
    let mut conns = crate::accept::until_stopped(
        "data port",
        &stop,
        || listener.accept(),
        |(stream, peer)| serve_conn(stream, peer, storage.clone(), local.clone(), stop.clone()),
    )
    .await;
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!("data connections still busy at shutdown; aborting them");
        conns.abort_all();
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    storage: Arc<Storage>,
    local: Option<Arc<LocalSocket>>,
    stop: CancellationToken,
) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "set_nodelay failed");
    }
    let (r, w) = stream.into_split();
    let mut r = BufReader::with_capacity(CONN_BUFFER, r);
    let mut w = BufWriter::with_capacity(CONN_BUFFER, w);
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            header = frame::read_request_header(&mut r) => match header {
                Ok(Some(h)) => {
                    // Once a frame has begun, its payload must follow promptly: a peer that
                    // stalls mid-frame would otherwise pin a payload buffer forever.
                    let body = frame::read_request_body_leaving_write_crc(&mut r, h);
                    match tokio::time::timeout(BODY_TIMEOUT, body).await {
                        Ok(body) => body.map(Some),
                        Err(_) => {
                            tracing::warn!(%peer, request_id = h.id, "request payload stalled; closing connection");
                            break;
                        }
                    }
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            },
        };
        let (resp, crc) = match next {
            Ok(None) => break,
            Ok(Some((req, write_crc))) => answer(&storage, local.as_deref(), req, write_crc).await,
            Err(frame::FrameError::PayloadCrc { request_id }) => {
                tracing::warn!(%peer, request_id, "request payload failed its checksum");
                let resp =
                    Response::error(request_id, Status::BadRequest, "payload checksum mismatch");
                (resp, None)
            }
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing data connection after a bad frame");
                break;
            }
        };
        let crc = crc.unwrap_or_else(|| crc32c::crc32c(&resp.payload));
        if let Err(e) = frame::write_response_with_crc(&mut w, &resp, crc).await {
            tracing::debug!(%peer, error = %e, "data connection lost while answering");
            break;
        }
    }
}

/// Runs one request and builds its response.
#[cfg(test)]
pub(crate) async fn handle(storage: &Arc<Storage>, req: Request) -> Response {
    answer(storage, None, req, None).await.0
}

/// Runs one request and builds its response, with the payload's crc32c when the storage
/// already knows it (a read of whole blocks), which saves the frame a second pass.
/// `write_crc` is the unchecked payload crc of a WRITE, checked by the storage.
async fn answer(
    storage: &Arc<Storage>,
    local: Option<&LocalSocket>,
    req: Request,
    write_crc: Option<u32>,
) -> (Response, Option<u32>) {
    let id = req.id;
    if let Err(reason) = validate(&req) {
        tracing::warn!(request_id = id, reason, "refusing malformed request");
        return (Response::error(id, Status::BadRequest, reason), None);
    }
    match (req.op, local) {
        (Opcode::Ping, _) => return (Response::status(id, Status::Ok), None),
        (Opcode::LocalSocket, None) => return (Response::status(id, Status::NotFound), None),
        (Opcode::LocalSocket, Some(local)) => {
            let resp = Response {
                id,
                status: Status::Ok,
                payload: local.answer(),
            };
            return (resp, None);
        }
        _ => {}
    }
    let storage = storage.clone();
    let result = tokio::task::spawn_blocking(move || {
        let (chunk, version, offset) = (req.chunk, req.version, u64::from(req.offset));
        let none = |r: Result<bytes::Bytes, StoreError>| r.map(|b| (b, None));
        match req.op {
            Opcode::Write => {
                let (term, data, sync) = (req.term, &req.payload, req.flags & FLAG_SYNC != 0);
                // The payload is checked before anything is touched: a damaged one changes
                // nothing, not even by creating the chunk.
                let crcs = match write_crc {
                    Some(crc) => Some(payload_crc::whole_block_crcs(offset, data, crc)?),
                    None => None,
                };
                storage
                    .write_with_crcs(chunk, version, term, offset, data, sync, crcs.as_deref())
                    .map(|added| (frame::added_payload(added), None))
            }
            Opcode::WriteV => none(write_pieces(&storage, &req)),
            Opcode::Zero => storage
                .zero(chunk, version, req.term, offset, u64::from(req.length))
                .map(|()| (bytes::Bytes::new(), None)),
            Opcode::Read => storage.read_checked(chunk, version, offset, u64::from(req.length)),
            Opcode::Written => storage
                .written(chunk, version, offset, u64::from(req.length))
                .map(|runs| (written::encode(&runs), None)),
            Opcode::Sync => storage
                .sync(chunk, version)
                .map(|()| (bytes::Bytes::new(), None)),
            Opcode::Fence => storage
                .fence(chunk, version, req.term)
                .map(|()| (bytes::Bytes::new(), None)),
            Opcode::Clone => {
                let (src, src_version) = clone_source(&req.payload);
                storage
                    .clone_chunk(src, src_version, chunk, version, req.term)
                    .map(|()| (bytes::Bytes::new(), None))
            }
            Opcode::Ping | Opcode::LocalSocket => Ok((bytes::Bytes::new(), None)),
        }
    })
    .await;
    match result {
        Ok(Ok((payload, crc))) => (
            Response {
                id,
                status: Status::Ok,
                payload,
            },
            crc,
        ),
        Ok(Err(e)) => {
            if let StoreError::BadRequest { reason } = &e {
                tracing::warn!(request_id = id, reason, "refusing request");
            }
            (error_response(id, e), None)
        }
        Err(e) => {
            tracing::error!(request_id = id, error = %e, "storage task failed");
            let resp = Response::error(id, Status::DiskError, "internal error in storage task");
            (resp, None)
        }
    }
}

fn validate(req: &Request) -> Result<(), &'static str> {
    match req.op {
        Opcode::Write if req.length as usize != req.payload.len() => {
            Err("write length differs from payload length")
        }
        Opcode::WriteV if req.length as usize != req.payload.len() => {
            Err("writev length differs from payload length")
        }
        Opcode::WriteV => vector::decode(&req.payload)
            .map(|_| ())
            .map_err(vector::VectorError::reason),
        Opcode::Read if req.length > MAX_PAYLOAD => Err("read length exceeds the payload limit"),
        Opcode::Read
        | Opcode::Sync
        | Opcode::Ping
        | Opcode::Fence
        | Opcode::LocalSocket
        | Opcode::Written
        | Opcode::Zero
            if !req.payload.is_empty() =>
        {
            Err("unexpected payload")
        }
        Opcode::Clone if req.payload.len() != 16 || req.length != 16 => {
            Err("a clone names its source in 16 bytes")
        }
        // Checked before anything is touched: a ZERO past the chunk must not create it.
        Opcode::Read | Opcode::Written | Opcode::Zero | Opcode::Write
            if u64::from(req.offset) + u64::from(req.length) > MAX_CHUNK_SIZE =>
        {
            Err("range past the end of a chunk")
        }
        _ => Ok(()),
    }
}

/// Applies a validated WRITEV: each piece as a WRITE of its own, in order, stopping at the
/// first refusal (the client writes the whole request again; every piece is positional).
fn write_pieces(storage: &Storage, req: &Request) -> Result<bytes::Bytes, StoreError> {
    let pieces = vector::decode(&req.payload).map_err(|e| StoreError::BadRequest {
        reason: e.to_string(),
    })?;
    let mut added = 0;
    for p in &pieces {
        added += storage.write(
            req.chunk,
            req.version,
            req.term,
            u64::from(p.offset),
            &p.data,
            false,
        )?;
    }
    Ok(frame::added_payload(added))
}

/// The source (chunk, version) of a CLONE, from its validated 16-byte payload.
fn clone_source(p: &[u8]) -> (u64, u64) {
    let mut chunk = [0u8; 8];
    let mut version = [0u8; 8];
    chunk.copy_from_slice(&p[0..8]);
    version.copy_from_slice(&p[8..16]);
    (u64::from_be_bytes(chunk), u64::from_be_bytes(version))
}

fn error_response(id: u64, e: StoreError) -> Response {
    match e {
        StoreError::StaleVersion { current } => {
            Response::status(id, Status::StaleVersion { current })
        }
        StoreError::StaleTerm { current } => Response::status(id, Status::StaleTerm { current }),
        StoreError::NotFound => Response::status(id, Status::NotFound),
        StoreError::Corrupt { offset } => Response::status(id, Status::Corrupt { offset }),
        StoreError::NoSpace => Response::status(id, Status::NoSpace),
        StoreError::Disk { reason } => Response::error(id, Status::DiskError, reason),
        StoreError::BadRequest { reason } => Response::error(id, Status::BadRequest, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rawfs_chunkserver_api::Piece;

    fn req(op: Opcode, chunk: u64, offset: u32, length: u32, payload: bytes::Bytes) -> Request {
        Request {
            id: 9,
            op,
            flags: 0,
            chunk,
            version: 1,
            term: 1,
            offset,
            length,
            payload,
        }
    }

    fn writev(chunk: u64, pieces: &[Piece]) -> Request {
        let payload = vector::encode(pieces);
        req(Opcode::WriteV, chunk, 0, payload.len() as u32, payload)
    }

    #[tokio::test]
    async fn a_writev_stores_every_piece_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
        let pieces: Vec<Piece> = [(0u32, 1u8), (70_000, 2), (5 << 20, 3), (4096, 4)]
            .iter()
            .map(|&(offset, fill)| Piece {
                offset,
                data: bytes::Bytes::from(vec![fill; 4096]),
            })
            .collect();
        let resp = handle(&storage, writev(7, &pieces)).await;
        assert_eq!(resp.status, Status::Ok, "{resp:?}");
        // 5 blocks filled for the first time (the piece at 70,000 straddles two).
        assert_eq!(frame::added(&resp.payload), Some(5 * 4096));
        let again = handle(&storage, writev(7, &pieces[..1])).await;
        assert_eq!(frame::added(&again.payload), Some(0));
        for p in &pieces {
            let read = req(Opcode::Read, 7, p.offset, 4096, bytes::Bytes::new());
            let resp = handle(&storage, read).await;
            assert_eq!(resp.status, Status::Ok);
            assert_eq!(resp.payload, p.data, "piece at {}", p.offset);
        }
        // Between the pieces the chunk reads as zeros.
        let gap = handle(
            &storage,
            req(Opcode::Read, 7, 8192, 4096, bytes::Bytes::new()),
        )
        .await;
        assert_eq!(gap.payload, bytes::Bytes::from(vec![0u8; 4096]));

        // A piece table that does not match the payload, and a length that differs from it.
        let good = vector::encode(&pieces);
        let cut = good.slice(..good.len() - 1);
        let bad = handle(&storage, req(Opcode::WriteV, 8, 0, cut.len() as u32, cut)).await;
        assert!(matches!(bad.status, Status::BadRequest), "{bad:?}");
        let bad = handle(&storage, req(Opcode::WriteV, 8, 0, 3, good)).await;
        assert!(matches!(bad.status, Status::BadRequest), "{bad:?}");
        // Nothing of the refused requests was stored.
        let none = handle(&storage, req(Opcode::Read, 8, 0, 10, bytes::Bytes::new())).await;
        assert_eq!(none.status, Status::NotFound);
    }

    #[tokio::test]
    async fn written_and_zero_answer_per_block_and_refuse_bad_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
        let data = bytes::Bytes::from(vec![5u8; 5 * 4096]);
        let write = req(Opcode::Write, 3, 8192, data.len() as u32, data);
        let resp = handle(&storage, write).await;
        assert_eq!(resp.status, Status::Ok);
        assert_eq!(frame::added(&resp.payload), Some(5 * 4096));
        let written = |offset, length| req(Opcode::Written, 3, offset, length, bytes::Bytes::new());
        let runs = handle(&storage, written(0, 1 << 20)).await;
        assert_eq!(runs.status, Status::Ok);
        assert_eq!(
            written::decode(&runs.payload, 0..1 << 20).unwrap(),
            vec![8192..8192 + 5 * 4096]
        );
        // Zero the middle three blocks and a piece of the first: they go, the rest stays.
        let zero = req(
            Opcode::Zero,
            3,
            8192 + 100,
            4 * 4096 - 100,
            bytes::Bytes::new(),
        );
        assert_eq!(handle(&storage, zero).await.status, Status::Ok);
        let runs = handle(&storage, written(0, 1 << 20)).await;
        assert_eq!(
            written::decode(&runs.payload, 0..1 << 20).unwrap(),
            vec![8192..8192 + 4096, 8192 + 4 * 4096..8192 + 5 * 4096]
        );
        let read = handle(
            &storage,
            req(Opcode::Read, 3, 8192, 5 * 4096, bytes::Bytes::new()),
        )
        .await;
        let mut want = vec![0u8; 5 * 4096];
        want[..100].fill(5);
        want[4 * 4096..].fill(5);
        assert_eq!(read.payload, bytes::Bytes::from(want));

        // Past the chunk's end, or with a payload: refused, and no chunk made for them.
        let past = req(Opcode::Zero, 4, (64 << 20) - 10, 11, bytes::Bytes::new());
        assert_eq!(handle(&storage, past).await.status, Status::BadRequest);
        let past = req(Opcode::Written, 3, 1 << 20, u32::MAX, bytes::Bytes::new());
        assert_eq!(handle(&storage, past).await.status, Status::BadRequest);
        let loaded = req(Opcode::Written, 3, 0, 10, bytes::Bytes::from_static(b"x"));
        assert_eq!(handle(&storage, loaded).await.status, Status::BadRequest);
        let none = handle(&storage, written(0, 10)).await;
        assert_eq!(none.status, Status::Ok);
        let none = handle(&storage, req(Opcode::Read, 4, 0, 10, bytes::Bytes::new())).await;
        assert_eq!(none.status, Status::NotFound);
    }
}
