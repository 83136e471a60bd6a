//! [`MetadataClient`]: calls the metadata service with deadlines, finds the leader, follows
//! `NotLeader` redirects and retries retryable failures across replicas.
//!
//! ```text
//!  caller --> call(): pick address (leader hint, else round robin)
//!                |  connect lazily (cached tarpc client per address)
//!                v
//!             RPC with deadline = min(call timeout, what is left of op timeout)
//!                |  Ok / non-retryable error -> return
//!                |  NotLeader{leader_addr}    -> remember the leader, retry there
//!                |  Unavailable / transport   -> drop connection, back off, next replica
//!                v
//!             op timeout passed -> MetaError::Unavailable
//! ```
//!
//! A mutation whose reply was lost (deadline, dropped connection) is retried, so it may be
//! applied twice; the second attempt then reports what it finds (`Exists` after a `mknod`
//! that did succeed, for example). Callers that care check the state after such an error.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_bytes::ByteBuf;
use tarpc::client::RpcError;
use tarpc::context::Context;
use tokio_serde::formats::MessagePack;

use crate::error::MetaError;
use crate::service::{MetaResult, MetadataRpcClient};
use crate::types::*;

/// Largest frame accepted on a metadata connection (a big readdir or status fits easily).
pub const MAX_FRAME: usize = 64 << 20;

/// Deadlines of a [`MetadataClient`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// Deadline of one RPC attempt (and of connecting).
    pub call: Duration,
    /// Time an operation may spend across retries, redirects and reconnects.
    pub op: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            call: Duration::from_secs(10),
            op: Duration::from_secs(30),
        }
    }
}

/// A client of the metadata service. Cheap to clone; clones share connections and the
/// leader hint.
#[derive(Clone)]
pub struct MetadataClient {
    inner: Arc<Inner>,
}

struct Inner {
    addrs: Vec<String>,
    timeouts: ClientTimeouts,
    /// Address that answered last (or that a redirect named): tried first.
    leader: Mutex<Option<String>>,
    conns: Mutex<HashMap<String, MetadataRpcClient>>,
    /// Round-robin position for when no leader is known.
    next: AtomicUsize,
}

/// Why an attempt failed in a way worth retrying elsewhere.
enum Attempt {
    /// The replica named another one as leader.
    Redirect(String),
    /// Retry later (possibly elsewhere), for this reason.
    Retry(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MetadataClient {
    /// A client of the replicas at `addrs` (`host:port` of their client ports). Connects on
    /// first use.
    pub fn new(addrs: Vec<String>, timeouts: ClientTimeouts) -> Self {
        MetadataClient {
            inner: Arc::new(Inner {
                addrs,
                timeouts,
                leader: Mutex::new(None),
                conns: Mutex::new(HashMap::new()),
                next: AtomicUsize::new(0),
            }),
        }
    }

    /// The replica addresses this client was made with.
    pub fn addrs(&self) -> &[String] {
        &self.inner.addrs
    }

    /// The timeouts this client applies.
    pub fn timeouts(&self) -> ClientTimeouts {
        self.inner.timeouts
    }

    fn pick(&self) -> Option<String> {
        if let Some(l) = lock(&self.inner.leader).clone() {
            return Some(l);
        }
        let addrs = &self.inner.addrs;
        if addrs.is_empty() {
            return None;
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        Some(addrs[i % addrs.len()].clone())
    }

    /// Forgets `addr` as leader and its connection.
    fn forget(&self, addr: &str) {
        let mut l = lock(&self.inner.leader);
        if l.as_deref() == Some(addr) {
            *l = None;
        }
        drop(l);
        lock(&self.inner.conns).remove(addr);
    }

    async fn conn(&self, addr: &str, timeout: Duration) -> Result<MetadataRpcClient, String> {
        if let Some(c) = lock(&self.inner.conns).get(addr) {
            return Ok(c.clone());
        }
        let mut connect = tarpc::serde_transport::tcp::connect(addr, MessagePack::default);
        connect.config_mut().max_frame_length(MAX_FRAME);
        let transport = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(format!("connect {addr}: {e}")),
            Err(_) => return Err(format!("connect {addr}: timed out")),
        };
        let client = MetadataRpcClient::new(tarpc::client::Config::default(), transport).spawn();
        Ok(lock(&self.inner.conns)
            .entry(addr.to_string())
            .or_insert(client)
            .clone())
    }

    /// Runs one RPC with redirects and retries until the op timeout.
    async fn call<T, F, Fut>(&self, name: &'static str, f: F) -> MetaResult<T>
    where
        F: Fn(MetadataRpcClient, Context) -> Fut,
        Fut: Future<Output = Result<MetaResult<T>, RpcError>>,
    {
        let t = self.inner.timeouts;
        let start = Instant::now();
        let deadline = start + t.op;
        let mut backoff = Duration::from_millis(10);
        let mut redirects = 0u32;
        let mut last = String::from("no metadata address configured");
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let Some(addr) = self.pick() else { break };
            let call_timeout = t.call.min(deadline - now);
            let outcome = match self.conn(&addr, call_timeout).await {
                Err(e) => Err(Attempt::Retry(e)),
                Ok(client) => {
                    let mut ctx = tarpc::context::current();
                    ctx.deadline = Instant::now() + call_timeout;
                    // The tarpc deadline is enforced by the dispatcher; the outer timeout
                    // also covers a dispatcher that is stuck.
                    match tokio::time::timeout(call_timeout, f(client, ctx)).await {
                        Err(_) => Err(Attempt::Retry(format!("{name} at {addr}: timed out"))),
                        Ok(Err(e)) => Err(Attempt::Retry(format!("{name} at {addr}: {e}"))),
                        Ok(Ok(Ok(v))) => {
                            *lock(&self.inner.leader) = Some(addr);
                            return Ok(v);
                        }
                        Ok(Ok(Err(MetaError::NotLeader {
                            leader_addr: Some(l),
                            ..
                        }))) if l != addr => Err(Attempt::Redirect(l)),
                        Ok(Ok(Err(e))) if e.is_retryable() => {
                            Err(Attempt::Retry(format!("{name} at {addr}: {e}")))
                        }
                        Ok(Ok(Err(e))) => return Err(e),
                    }
                }
            };
            match outcome {
                Ok(()) => {}
                Err(Attempt::Redirect(l)) => {
                    tracing::debug!(rpc = name, from = %addr, to = %l, "following leader redirect");
                    *lock(&self.inner.leader) = Some(l);
                    redirects += 1;
                    // Redirects are free until they ping-pong (an election in progress).
                    if redirects <= 3 {
                        continue;
                    }
                    last = format!("{name}: redirected {redirects} times");
                }
                Err(Attempt::Retry(reason)) => {
                    tracing::debug!(rpc = name, %reason, "metadata call failed; retrying");
                    self.forget(&addr);
                    last = reason;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
            tokio::time::sleep((backoff + Duration::from_millis(jitter)).min(left)).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
        Err(MetaError::Unavailable {
            reason: format!("gave up after {:?}: {last}", start.elapsed()),
        })
    }
}

/// Generates one method per RPC: same arguments as the service (minus the context).
macro_rules! rpc_methods {
    ($( $(#[$doc:meta])* fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty; )*) => {
        impl MetadataClient {
            $(
                $(#[$doc])*
                #[allow(clippy::clone_on_copy, clippy::too_many_arguments)]
                pub async fn $name(&self, $($arg: $ty),*) -> MetaResult<$ret> {
                    self.call(stringify!($name), move |c, ctx| {
                        $(let $arg = $arg.clone();)*
                        async move { c.$name(ctx, $($arg),*).await }
                    })
                    .await
                }
            )*
        }
    };
}

rpc_methods! {
    /// Finds `name` in directory `parent`.
    fn lookup(parent: Ino, name: Name) -> Attr;
    /// The attributes of `ino`.
    fn getattr(ino: Ino) -> Attr;
    /// Changes attributes (a size change truncates or extends).
    fn setattr(ino: Ino, set: SetAttr) -> Attr;
    /// Creates a file, directory, fifo, socket or device node.
    fn mknod(parent: Ino, name: Name, node: NewNode, caller: Caller) -> Attr;
    /// Creates a node and records an open of it by `session`, atomically.
    fn create(parent: Ino, name: Name, node: NewNode, caller: Caller, session: u64) -> Attr;
    /// Creates a symbolic link.
    fn symlink(parent: Ino, name: Name, target: ByteBuf, caller: Caller) -> Attr;
    /// The target of a symbolic link.
    fn readlink(ino: Ino) -> ByteBuf;
    /// Adds a hard link.
    fn link(ino: Ino, newparent: Ino, newname: Name) -> Attr;
    /// Removes a non-directory entry.
    fn unlink(parent: Ino, name: Name) -> ();
    /// Removes an empty directory.
    fn rmdir(parent: Ino, name: Name) -> ();
    /// Renames an entry (renameat2 flags).
    fn rename(parent: Ino, name: Name, newparent: Ino, newname: Name, flags: RenameFlags) -> ();
    /// Lists up to `limit` entries after `cookie`.
    fn readdir(ino: Ino, cookie: u64, limit: u32) -> Vec<DirEntry>;
    /// Records an open of `ino` by `session`.
    fn open(ino: Ino, session: u64) -> Attr;
    /// Drops one open of `ino` by `session`.
    fn release(ino: Ino, session: u64) -> ();
    /// Drops every open held by `session`.
    fn end_session(session: u64) -> ();
    /// Filesystem totals.
    fn statfs() -> StatFs;
    /// Waits until every acknowledged change is on the leader's disk.
    fn sync() -> ();
    /// Sets an extended attribute.
    fn setxattr(ino: Ino, name: Name, value: ByteBuf, mode: XattrMode) -> ();
    /// Reads an extended attribute.
    fn getxattr(ino: Ino, name: Name) -> ByteBuf;
    /// Lists extended attribute names.
    fn listxattr(ino: Ino) -> Vec<Name>;
    /// Removes an extended attribute.
    fn removexattr(ino: Ino, name: Name) -> ();
    /// Existing chunks with index in `first..first + count`.
    fn chunks(ino: Ino, first: u64, count: u64) -> Vec<ChunkLoc>;
    /// The chunk at `index`, allocated if missing.
    fn allocate_chunk(ino: Ino, index: u64) -> ChunkLoc;
    /// Records a completed write (size, mtime, stored bytes).
    fn commit_write(ino: Ino, end: u64, stored_delta: i64) -> Attr;
    /// Releases whole chunks (punch hole).
    fn release_chunks(ino: Ino, first: u64, count: u64) -> ();
    /// Drops a failed replica from a chunk.
    fn drop_replica(chunk: ChunkId, expected_version: u64, server: ServerId) -> ChunkLoc;
    /// A chunkserver's heartbeat.
    fn heartbeat(hb: Heartbeat) -> HeartbeatReply;
    /// The cluster's state.
    fn status() -> ClusterStatus;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_server_gives_unavailable_within_op_timeout() {
        // A port nothing listens on: bind, note the address, close.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let c = MetadataClient::new(
            vec![addr],
            ClientTimeouts {
                call: Duration::from_millis(200),
                op: Duration::from_millis(600),
            },
        );
        let start = Instant::now();
        let r = c.getattr(ROOT_INO).await;
        assert!(matches!(r, Err(MetaError::Unavailable { .. })), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(3));
        let none = MetadataClient::new(vec![], ClientTimeouts::default());
        assert!(matches!(
            none.statfs().await,
            Err(MetaError::Unavailable { .. })
        ));
    }
}
