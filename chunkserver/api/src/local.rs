//! Local reads: a client on the same host as a chunkserver reads chunk files itself, through
//! read-only descriptors the chunkserver passes over a unix socket (as HDFS's short-circuit
//! reads do). A read then costs a few `pread`s (a memory map for large ones, see
//! `mapped.rs`) instead of two socket hops and the server's copy; it is checked
//! against the block checksums exactly as the server checks it.
//!
//! ```text
//!  DataClient ──TCP: LOCAL──▶ chunkserver        (once per server: socket path + token)
//!      │ ◀── token, DATA_DIR/local.sock ──┘
//!      ├──unix: greeting ◀── token (must match: same server, same host)
//!      ├──unix: OPEN(chunk, version) ──▶ ◀── OK + fd (SCM_RIGHTS) | STALE | NOT_FOUND
//!      └──unix (second connection): closed once the chunkserver is gone (peeked after
//!         every read) ──▶ its descriptors retire
//! ```
//!
//! Unix socket messages (big-endian):
//!
//! ```text
//!  greeting  server → client, on accept  16 bytes: b"RFSL", u16 version (1), u16 0, u64 token
//!  open      client → server             24 bytes: b"RFSO", u32 0, u64 chunk, u64 version
//!  reply     server → client             16 bytes: u8 status (0 OK, 1 STALE_VERSION,
//!                                        3 NOT_FOUND, 6 FAILED), 7 zero bytes, u64 detail
//!                                        (STALE_VERSION: the stored version); with OK, the
//!                                        chunk file's descriptor rides along (SCM_RIGHTS)
//! ```
//!
//! A local read never decides anything on its own: a descriptor whose file was deleted, a
//! header naming another chunk or a newer version, a checksum that does not match (which may
//! be a write racing the read), a dead chunkserver or any I/O error all send the read to the
//! data port, which gives the authoritative answer (and reports corruption).

use crate::layout::{
    self, BlockEntry, BlockReadError, Header, Wait, ENTRY_LEN, HEADER_LEN, TABLE_OFFSET,
};
use crate::DataClient;
use bytes::Bytes;
use lru::LruCache;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::Interest;
use tokio::net::UnixStream;

const GREETING_MAGIC: [u8; 4] = *b"RFSL";
const OPEN_MAGIC: [u8; 4] = *b"RFSO";
const LOCAL_VERSION: u16 = 1;
/// Bytes of the greeting a chunkserver sends on every local connection.
pub const GREETING_LEN: usize = 16;
/// Bytes of an open request.
pub const OPEN_LEN: usize = 24;
/// Bytes of the reply to an open request.
pub const REPLY_LEN: usize = 16;
/// The file name of the local socket in a chunkserver's data directory.
pub const SOCKET_NAME: &str = "local.sock";

/// How long a chunkserver whose local socket could not be used is left alone before the
/// next try (it may be on another host, or restarting).
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// A chunkserver's descriptors are used without asking it again for this long after it last
/// answered. A server that stopped (SIGSTOP, a hung disk) still looks alive to the kernel,
/// and the replica it holds may meanwhile be dropped by a writer that timed out on it (which
/// takes the data call deadline, seconds): asking again every second makes a read of a
/// stopped server wait for it, as a read through its data port would, instead of returning
/// what its files held.
const FRESH_FOR: Duration = Duration::from_secs(1);
/// Reads up to this long are first tried inline, from the page cache only (see
/// [`Wait::CacheOnly`]); longer ones, and those that would wait, run on a blocking thread.
const INLINE_READ: u32 = 128 << 10;
/// Reads this long or longer are made through a memory map (see [`crate::mapped`]): one copy
/// fewer, for more than the map costs.
const MAP_READ: u32 = 512 << 10;
/// Chunk files kept open per chunkserver.
const FILES_PER_SERVER: usize = 128;

/// The greeting carrying `token`.
pub fn encode_greeting(token: u64) -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0..4].copy_from_slice(&GREETING_MAGIC);
    g[4..6].copy_from_slice(&LOCAL_VERSION.to_be_bytes());
    g[8..16].copy_from_slice(&token.to_be_bytes());
    g
}

fn parse_greeting(g: &[u8; GREETING_LEN]) -> Option<u64> {
    (g[0..4] == GREETING_MAGIC && g[4..6] == LOCAL_VERSION.to_be_bytes()).then(|| be_u64(&g[8..16]))
}

fn encode_open(chunk: u64, version: u64) -> [u8; OPEN_LEN] {
    let mut m = [0u8; OPEN_LEN];
    m[0..4].copy_from_slice(&OPEN_MAGIC);
    m[8..16].copy_from_slice(&chunk.to_be_bytes());
    m[16..24].copy_from_slice(&version.to_be_bytes());
    m
}

/// The `(chunk, version)` of an open request, or `None` if it is malformed.
pub fn parse_open(m: &[u8; OPEN_LEN]) -> Option<(u64, u64)> {
    (m[0..4] == OPEN_MAGIC && m[4..8] == [0; 4]).then(|| (be_u64(&m[8..16]), be_u64(&m[16..24])))
}

/// What a chunkserver answers to an open request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenReply {
    /// The descriptor is attached.
    Ok,
    /// The server stores a newer version than the one asked for.
    StaleVersion {
        current: u64,
    },
    NotFound,
    /// Anything else (a malformed request, an I/O error): use the data port.
    Failed,
}

impl OpenReply {
    /// The reply's bytes.
    pub fn encode(self) -> [u8; REPLY_LEN] {
        let (status, detail) = match self {
            OpenReply::Ok => (0u8, 0u64),
            OpenReply::StaleVersion { current } => (1, current),
            OpenReply::NotFound => (3, 0),
            OpenReply::Failed => (6, 0),
        };
        let mut r = [0u8; REPLY_LEN];
        r[0] = status;
        r[8..16].copy_from_slice(&detail.to_be_bytes());
        r
    }

    fn parse(r: &[u8; REPLY_LEN]) -> Option<OpenReply> {
        if r[1..8] != [0; 7] {
            return None;
        }
        Some(match r[0] {
            0 => OpenReply::Ok,
            1 => OpenReply::StaleVersion {
                current: be_u64(&r[8..16]),
            },
            3 => OpenReply::NotFound,
            6 => OpenReply::Failed,
            _ => return None,
        })
    }
}

/// Sends all of `bytes` on `stream`, with `fd` attached to the first of them.
pub async fn send_with_fd(
    stream: &UnixStream,
    bytes: &[u8],
    mut fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let attempt = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(&bytes[sent..])];
            let raw: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
            let rights = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match attempt {
            Ok(n) => {
                sent += n;
                fd = None;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives exactly `buf.len()` bytes from `stream`, and the descriptor attached to them if
/// any (further descriptors are closed).
pub async fn recv_with_fd(stream: &UnixStream, buf: &mut [u8]) -> io::Result<Option<OwnedFd>> {
    let mut got = 0;
    let mut fd: Option<OwnedFd> = None;
    while got < buf.len() {
        stream.readable().await?;
        let attempt = stream.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut buf[got..])];
            let mut space = nix::cmsg_space!([RawFd; 2]);
            let msg = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut fds = Vec::new();
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(received) = c {
                    fds.extend(received);
                }
            }
            Ok((msg.bytes, fds))
        });
        match attempt {
            Ok((n, fds)) => {
                for raw in fds {
                    // SAFETY: the kernel just installed this descriptor for us and nothing
                    // else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(fd)
}

/// The local-read side of a [`DataClient`]: per chunkserver, whether its chunk files can be
/// read here, and the descriptors it handed out.
pub(crate) struct LocalReads {
    timeout: Duration,
    servers: Mutex<HashMap<String, Server>>,
    /// Held while a chunkserver's local socket is being set up, so that concurrent reads
    /// do not all try at once.
    probing: tokio::sync::Mutex<()>,
    /// Reads answered from chunk files here.
    served: AtomicU64,
}

#[derive(Clone)]
enum Server {
    Unavailable { until: Instant },
    Ready(Arc<Link>),
}

/// The connection to one chunkserver's local socket.
struct Link {
    conn: tokio::sync::Mutex<UnixStream>,
    /// A second connection the server never writes to after its greeting: it reads as
    /// closed once the chunkserver process is gone.
    watch: UnixStream,
    /// False once the chunkserver was seen gone or the request connection broke: its
    /// descriptors are no longer used.
    alive: AtomicBool,
    files: Mutex<LruCache<u64, Arc<File>>>,
    /// When the server last answered a request here (see [`FRESH_FOR`]).
    answered: Mutex<Instant>,
}

impl Link {
    fn alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Whether the chunkserver still runs, asked of the kernel now (a peek at the watch
    /// connection: a dead process's end of it is closed before the process is reaped).
    fn server_runs(&self) -> bool {
        if !self.alive() {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: recv writes at most 1 byte into `byte`; the descriptor is the watch
        // connection's, open for the link's lifetime.
        let n = unsafe {
            libc::recv(
                self.watch.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let runs = n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        if !runs {
            self.alive.store(false, Ordering::Release);
        }
        runs
    }

    /// The descriptor of `chunk` handed out before, unless the server has not answered for
    /// [`FRESH_FOR`].
    fn cached(&self, chunk: u64) -> Option<Arc<File>> {
        if lock(&self.answered).elapsed() >= FRESH_FOR {
            return None;
        }
        lock(&self.files).get(&chunk).cloned()
    }

    /// The chunkserver's descriptor of `chunk` at `version` or newer, or `None` if it
    /// refuses (the data port then gives the real answer) or the link broke.
    async fn open(&self, chunk: u64, version: u64, timeout: Duration) -> Option<Arc<File>> {
        if let Some(f) = self.cached(chunk) {
            return Some(f);
        }
        // One request at a time on the connection (the lock is held across the exchange):
        // opens are rare, since descriptors are kept.
        let conn = self.conn.lock().await;
        // Another read may have asked while this one waited.
        if let Some(f) = self.cached(chunk) {
            return Some(f);
        }
        let exchange = async {
            send_with_fd(&conn, &encode_open(chunk, version), None).await?;
            let mut reply = [0u8; REPLY_LEN];
            let fd = recv_with_fd(&conn, &mut reply).await?;
            Ok::<_, io::Error>((OpenReply::parse(&reply), fd))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok((Some(OpenReply::Ok), Some(fd)))) => {
                *lock(&self.answered) = Instant::now();
                let file = Arc::new(File::from(fd));
                lock(&self.files).put(chunk, file.clone());
                Some(file)
            }
            Ok(Ok((Some(reply), None))) if reply != OpenReply::Ok => None,
            outcome => {
                tracing::debug!(chunk, ?outcome, "local socket out of step; dropping it");
                self.alive.store(false, Ordering::Release);
                None
            }
        }
    }
}

/// Why a local read gave up.
enum Miss {
    /// The descriptor's file is no longer the chunk's (deleted, or another chunk): forget it.
    Gone,
    /// The data is not in the page cache (only for [`Wait::CacheOnly`]).
    Blocked,
    /// Anything else: ask the data port.
    Ask,
}

impl LocalReads {
    pub(crate) fn new(timeout: Duration) -> LocalReads {
        LocalReads {
            timeout,
            servers: Mutex::new(HashMap::new()),
            probing: tokio::sync::Mutex::new(()),
            served: AtomicU64::new(0),
        }
    }

    /// How many reads were answered from chunk files here.
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// `len` verified bytes at `offset` of `chunk` read from the chunkserver at `addr`'s
    /// files directly, or `None` when that is not possible or not certain (then the caller
    /// asks the data port).
    pub(crate) async fn read(
        &self,
        client: &DataClient,
        addr: &str,
        chunk: u64,
        version: u64,
        offset: u32,
        len: u32,
    ) -> Option<Bytes> {
        if len == 0 || u64::from(offset) + u64::from(len) > crate::MAX_CHUNK_SIZE {
            return None;
        }
        let link = self.link(client, addr).await?;
        let file = link.open(chunk, version, self.timeout).await?;
        // Small reads of cached data are done here; the rest on a blocking thread.
        let inline = if len <= INLINE_READ {
            read_verified(&file, chunk, version, offset, len, Wait::CacheOnly)
        } else {
            Err(Miss::Blocked)
        };
        let read = match inline {
            Err(Miss::Blocked) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    read_verified(&file, chunk, version, offset, len, Wait::Disk)
                })
                .await
                .unwrap_or(Err(Miss::Ask))
            }
            done => done,
        };
        match read {
            // A server that is gone may have lost its place in the chunk's replica set:
            // its files are only read while it runs.
            Ok(data) if link.server_runs() => {
                self.served.fetch_add(1, Ordering::Relaxed);
                Some(data)
            }
            Err(Miss::Gone) => {
                lock(&link.files).pop(&chunk);
                None
            }
            _ => None,
        }
    }

    /// The live link to `addr`'s local socket, set up if needed; `None` if there is none.
    async fn link(&self, client: &DataClient, addr: &str) -> Option<Arc<Link>> {
        if let Some(known) = self.known(addr) {
            return known;
        }
        let _probing = self.probing.lock().await;
        if let Some(known) = self.known(addr) {
            return known;
        }
        let connected = tokio::time::timeout(self.timeout, connect(client, addr))
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()));
        let state = match connected {
            Ok(link) => {
                tracing::debug!(addr, "reading this chunkserver's chunks locally");
                Server::Ready(Arc::new(link))
            }
            Err(reason) => {
                tracing::debug!(addr, reason, "no local reads from this chunkserver");
                Server::Unavailable {
                    until: Instant::now() + RETRY_AFTER,
                }
            }
        };
        lock(&self.servers).insert(addr.to_string(), state.clone());
        match state {
            Server::Ready(link) => Some(link),
            Server::Unavailable { .. } => None,
        }
    }

    /// What is known about `addr`: `Some(link)`, `Some(None)` (not now), or `None` (find out).
    fn known(&self, addr: &str) -> Option<Option<Arc<Link>>> {
        match lock(&self.servers).get(addr) {
            Some(Server::Ready(link)) if link.alive() => Some(Some(link.clone())),
            Some(Server::Unavailable { until }) if Instant::now() < *until => Some(None),
            _ => None,
        }
    }
}

/// Asks the chunkserver at `addr` for its local socket and connects to it twice: one
/// connection for requests, one whose end tells that the chunkserver is gone. Both must
/// greet with the token the data port gave, which proves the socket is that server's.
async fn connect(client: &DataClient, addr: &str) -> Result<Link, String> {
    let (token, path) = client.local_socket(addr).await.map_err(|e| e.to_string())?;
    let open = |path: String| async move {
        let stream = UnixStream::connect(&path)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let mut greeting = [0u8; GREETING_LEN];
        recv_with_fd(&stream, &mut greeting)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        match parse_greeting(&greeting) {
            Some(t) if t == token => Ok(stream),
            _ => Err(format!("{path} belongs to another chunkserver")),
        }
    };
    let conn = open(path.clone()).await?;
    let watch = open(path).await?;
    Ok(Link {
        conn: tokio::sync::Mutex::new(conn),
        watch,
        alive: AtomicBool::new(true),
        files: Mutex::new(LruCache::new(
            NonZeroUsize::new(FILES_PER_SERVER).expect("nonzero"),
        )),
        answered: Mutex::new(Instant::now()),
    })
}

/// Reads `len` bytes at `offset` of the chunk file `file`, which must still be chunk `chunk`
/// at `version` or older (as the data port requires), every block verified.
fn read_verified(
    file: &File,
    chunk: u64,
    version: u64,
    offset: u32,
    len: u32,
    wait: Wait,
) -> Result<Bytes, Miss> {
    let (offset, len) = (u64::from(offset), u64::from(len));
    if file.metadata().map_err(|_| Miss::Ask)?.nlink() == 0 {
        return Err(Miss::Gone);
    }
    let miss = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock => Miss::Blocked,
        _ => Miss::Ask,
    };
    let mut header = [0u8; HEADER_LEN];
    layout::read_full_at_waiting(file, &mut header, 0, wait).map_err(miss)?;
    let geo = match Header::parse(&header) {
        Ok(h) if h.id == chunk && h.version <= version => h.geometry,
        Ok(h) if h.id == chunk => return Err(Miss::Ask),
        _ => return Err(Miss::Gone),
    };
    let first = (offset / geo.block) as usize;
    let last = ((offset + len - 1) / geo.block) as usize;
    let mut table = vec![0u8; (last - first + 1) * ENTRY_LEN];
    let at = TABLE_OFFSET + (first * ENTRY_LEN) as u64;
    layout::read_full_at_waiting(file, &mut table, at, wait).map_err(miss)?;
    // Decoded once: the block reader looks at each entry more than once.
    let entries: Vec<BlockEntry> = table
        .chunks_exact(ENTRY_LEN)
        .map(BlockEntry::decode)
        .collect();
    let entry = |b: usize| entries[b - first];
    if wait == Wait::Disk && len >= u64::from(MAP_READ) {
        match crate::mapped::read_blocks_mapped(file, geo, offset, len, entry) {
            Ok(Some(data)) => return Ok(data),
            Ok(None) => {}
            Err(_) => return Err(Miss::Ask),
        }
    }
    layout::read_blocks(file, geo, offset, len, wait, entry, |_| {}).map_err(|e| match e {
        BlockReadError::Io(e) => miss(e),
        BlockReadError::Corrupt { .. } => Miss::Ask,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
