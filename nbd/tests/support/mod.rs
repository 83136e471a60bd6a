//! Shared by the protocol tests: a server with in-memory exports on 127.0.0.1:0 running on
//! its own runtime (so a test thread can block on a subprocess), and a minimal raw client
//! that speaks the handshake and requests byte by byte.

#![allow(dead_code)]

use rawfs_nbd::mem::{MemCatalog, MemExport};
use rawfs_nbd::proto::*;
use rawfs_nbd::{serve, ServerConfig, ServerHandle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// A running server with a writable `disk` (64 MiB), a read-only `ro` (1 MiB), and a small
/// writable `small` (1 MiB).
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    pub disk: Arc<MemExport>,
    pub ro: Arc<MemExport>,
    pub catalog: Arc<MemCatalog>,
    handle: Option<ServerHandle>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

pub const DISK_SIZE: u64 = 64 << 20;

impl TestServer {
    pub fn start() -> TestServer {
        Self::with_disk(DISK_SIZE)
    }

    pub fn with_disk(size: u64) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let disk = Arc::new(MemExport::new(size, false));
        let ro = Arc::new(MemExport::new(1 << 20, true));
        ro.fill(0, b"read-only contents");
        let small = Arc::new(MemExport::new(1 << 20, false));
        let catalog = Arc::new(MemCatalog::new(vec![
            ("disk".to_string(), disk.clone()),
            ("ro".to_string(), ro.clone()),
            ("small".to_string(), small),
        ]));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut cfg = ServerConfig::new("127.0.0.1:0".parse().expect("addr"));
        cfg.handshake_timeout = Duration::from_secs(5);
        cfg.io_timeout = Duration::from_secs(5);
        let cat: Arc<dyn rawfs_nbd::Catalog> = catalog.clone();
        let handle = rt
            .block_on(serve(cfg, cat, async move {
                let _ = rx.await;
            }))
            .expect("serve");
        TestServer {
            addr: handle.addr(),
            rt,
            disk,
            ro,
            catalog,
            handle: Some(handle),
            stop: Some(tx),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub fn connections(&self) -> usize {
        self.handle.as_ref().map_or(0, |h| h.connections())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(30), h.join()).await });
        }
    }
}

/// Runs a command and returns its stdout; panics with stderr on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install libnbd-bin, qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `cond` (every 20 ms) until true; panics after `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A blocking raw NBD client for protocol tests.
pub struct Raw {
    pub s: TcpStream,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A reply to a request: simple (error, data if a READ) or a list of structured chunks.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Connects and reads the greeting (checking it), without sending client flags.
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut r = Raw { s };
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        r
    }

    /// Connects and sends fixed-newstyle, no-zeroes client flags.
    pub fn start(addr: SocketAddr) -> Raw {
        let mut r = Self::connect(addr);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(&h[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).expect("option reply data");
        OptReply {
            option: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            kind: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
            data,
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    /// `NBD_OPT_GO` for `name`; returns (size, flags).
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let replies = self.opt_replies();
        let last = replies.last().expect("a reply");
        assert_eq!(last.kind, REP_ACK, "GO {name}: {replies:?}");
        let info = replies
            .iter()
            .find(|r| r.kind == REP_INFO && r.data[0..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        let mut size = [0u8; 8];
        size.copy_from_slice(&info.data[2..10]);
        (
            u64::from_be_bytes(size),
            u16::from_be_bytes([info.data[10], info.data[11]]),
        )
    }

    pub fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.opt_reply().kind, REP_ACK);
    }

    pub fn set_base_allocation(&mut self, name: &str) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        self.option(OPT_SET_META_CONTEXT, &d);
        let r = self.opt_replies();
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].kind, REP_META_CONTEXT);
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let req = Request {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        let mut m = req.encode().to_vec();
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// A simple reply: (error, handle); reads `data_len` bytes of data if no error.
    pub fn simple(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut handle = [0u8; 8];
        handle.copy_from_slice(&h[8..16]);
        let mut data = vec![0u8; if err == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut data).expect("read data");
        (err, u64::from_be_bytes(handle), data)
    }

    /// One structured chunk.
    pub fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("chunk");
        assert_eq!(&h[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let mut handle = [0u8; 8];
        handle.copy_from_slice(&h[8..16]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut payload = vec![0u8; len];
        self.s.read_exact(&mut payload).expect("chunk payload");
        Chunk {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            handle: u64::from_be_bytes(handle),
            payload,
        }
    }

    /// True once the server has closed the connection (EOF), within the read timeout.
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}
