//! [`MetadataClient`]: calls the metadata service with deadlines, finds the leader, follows
//! `NotLeader` redirects and retries retryable failures across replicas.
//!
//! ```text
//!  caller --> call(): pick address (writes and linearizable reads: leader hint, else round
//!                |     robin; local reads: this client's sticky replica)
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
//! Every mutation carries a [`ReqId`]: this client's random id and a sequence number drawn
//! once per operation and reused by each of its retries. A mutation whose reply was lost
//! (deadline, dropped connection, leader failover) is retried, and the service answers the
//! retry with the first attempt's reply instead of applying it again, so a retried `rename`
//! succeeds rather than failing with `NotFound`.
//!
//! Reads follow the client's [`Consistency`] (see [`MetadataClient::with_consistency`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_bytes::ByteBuf;
use tarpc::client::RpcError;
use tarpc::context::Context;
use tokio_serde::formats::MessagePack;

use crate::error::MetaError;
use crate::events::WatchReply;
use crate::healer::{HealerReport, HealerSettings, RateChange};
use crate::locks::*;
use crate::service::{MetaResult, MetadataRpcClient};
use crate::types::*;

/// Largest frame accepted on a metadata connection (a big readdir or status fits easily).
pub const MAX_FRAME: usize = 64 << 20;

/// How long a replica whose call timed out is passed over when picking one at random: about
/// the time an election takes to replace a leader that hangs.
const SUSPECT_FOR: Duration = Duration::from_secs(5);

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
        // A call the leader does not answer in 3 s is retried (with the same request id, so
        // it is applied once): a leader that hangs without closing its connections (stopped,
        // cut off) then costs 3 s, not 10, before the client finds the new leader. Every
        // metadata call is small; a healthy leader answers in milliseconds.
        ClientTimeouts {
            call: Duration::from_secs(3),
            op: Duration::from_secs(30),
        }
    }
}

/// A client of the metadata service. Cheap to clone; clones share connections, the leader
/// hint and the request-id sequence.
#[derive(Clone)]
pub struct MetadataClient {
    inner: Arc<Inner>,
    consistency: Consistency,
}

struct Inner {
    addrs: Vec<String>,
    timeouts: ClientTimeouts,
    /// Address that answered last (or that a redirect named): tried first.
    leader: Mutex<Option<String>>,
    conns: Mutex<HashMap<String, MetadataRpcClient>>,
    /// Round-robin position for when no leader is known (random start, to spread clients).
    next: AtomicUsize,
    /// The replica serving `Consistency::Local` reads. Sticky, so that successive reads do
    /// not go back in time by hopping between replicas at different log positions.
    local: Mutex<Option<String>>,
    /// Replicas whose last call timed out, until when they are passed over by round robin:
    /// a replica that hangs without closing its connections (stopped, cut off, swapping)
    /// would otherwise cost a whole call deadline each time it comes round.
    suspects: Mutex<HashMap<String, Instant>>,
    /// This client's random id, in every [`ReqId`] it sends.
    client_id: u64,
    /// Last sequence number drawn for a [`ReqId`].
    seq: AtomicU64,
}

/// Where an RPC may be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The leader (mutations, linearizable reads, cluster calls).
    Leader,
    /// Any replica (local reads).
    Any,
}

/// An attempt left unanswered because another replica leads now (its address).
struct Hedged(String);

/// How long a call to the leader waits for its answer before the client checks whether
/// another replica leads (see `MetadataClient::wait_attempt`).
const HEDGE_AFTER: Duration = Duration::from_millis(500);

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
    /// A client of the replicas at `addrs` (`host:port` of their client ports), with
    /// linearizable reads. Connects on first use.
    pub fn new(addrs: Vec<String>, timeouts: ClientTimeouts) -> Self {
        let mut rng = rand::thread_rng();
        MetadataClient {
            inner: Arc::new(Inner {
                addrs,
                timeouts,
                leader: Mutex::new(None),
                conns: Mutex::new(HashMap::new()),
                next: AtomicUsize::new(rng.gen_range(0..1 << 16)),
                local: Mutex::new(None),
                suspects: Mutex::new(HashMap::new()),
                client_id: rng.gen(),
                seq: AtomicU64::new(0),
            }),
            consistency: Consistency::Linearizable,
        }
    }

    /// This client (sharing connections, leader hint and request ids with `self`) with
    /// reads (`lookup`, `getattr`, `readdir`, `readlink`, `getxattr`, `listxattr`, `chunks`,
    /// `statfs`) at `consistency`. With [`Consistency::Local`] they go to one replica of
    /// the list (picked at random, kept until it fails) and may be stale: see
    /// [`Consistency`]. Writes always go to the leader.
    pub fn with_consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// The consistency of this client's reads.
    pub fn consistency(&self) -> Consistency {
        self.consistency
    }

    /// The replica addresses this client was made with.
    pub fn addrs(&self) -> &[String] {
        &self.inner.addrs
    }

    /// The timeouts this client applies.
    pub fn timeouts(&self) -> ClientTimeouts {
        self.inner.timeouts
    }

    /// The random id this client puts in its [`ReqId`]s.
    pub fn client_id(&self) -> u64 {
        self.inner.client_id
    }

    /// A request id for one new operation.
    fn next_req(&self) -> ReqId {
        ReqId {
            client: self.inner.client_id,
            seq: self.inner.seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// The next address in turn, passing over suspects unless every address is one.
    fn round_robin(&self) -> Option<String> {
        let addrs = &self.inner.addrs;
        if addrs.is_empty() {
            return None;
        }
        let now = Instant::now();
        let mut suspects = lock(&self.inner.suspects);
        suspects.retain(|_, until| *until > now);
        for _ in 0..addrs.len() {
            let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
            let addr = &addrs[i % addrs.len()];
            if !suspects.contains_key(addr) {
                return Some(addr.clone());
            }
        }
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed);
        Some(addrs[i % addrs.len()].clone())
    }

    /// Passes `addr` over for a while (its call timed out).
    fn suspect(&self, addr: &str) {
        let until = Instant::now() + SUSPECT_FOR;
        lock(&self.inner.suspects).insert(addr.to_string(), until);
    }

    fn pick(&self, route: Route) -> Option<String> {
        match route {
            Route::Leader => {
                if let Some(l) = lock(&self.inner.leader).clone() {
                    return Some(l);
                }
                self.round_robin()
            }
            Route::Any => {
                let mut local = lock(&self.inner.local);
                if local.is_none() {
                    *local = self.round_robin();
                }
                local.clone()
            }
        }
    }

    /// Forgets `addr` as leader, as local replica, and its connection.
    fn forget(&self, addr: &str) {
        for hint in [&self.inner.leader, &self.inner.local] {
            let mut h = lock(hint);
            if h.as_deref() == Some(addr) {
                *h = None;
            }
        }
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
        // Without it, a request sent while a long-polling `watch` is unanswered waits for
        // the server's delayed ACK (Nagle's algorithm): 40 ms per call.
        if let Err(e) = transport.get_ref().set_nodelay(true) {
            tracing::debug!(addr, error = %e, "set_nodelay failed");
        }
        let client = MetadataRpcClient::new(tarpc::client::Config::default(), transport).spawn();
        Ok(lock(&self.inner.conns)
            .entry(addr.to_string())
            .or_insert(client)
            .clone())
    }

    /// Runs one RPC with redirects and retries until the op timeout. `f` is called once per
    /// attempt with the same arguments (the same [`ReqId`] for a mutation).
    async fn call<T, F, Fut>(&self, name: &'static str, route: Route, f: F) -> MetaResult<T>
    where
        F: Fn(MetadataRpcClient, Context) -> Fut,
        Fut: Future<Output = Result<MetaResult<T>, RpcError>>,
    {
        let t = self.inner.timeouts;
        let start = Instant::now();
        let deadline = start + t.op;
        let mut backoff = Duration::from_millis(10);
        let mut redirects = 0u32;
        // A local read that a replica redirected (it needs the leader's soft state) goes to
        // the leader once, without moving this client's local replica.
        let mut redirected: Option<String> = None;
        let mut last = String::from("no metadata address configured");
        loop {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let Some(addr) = redirected.take().or_else(|| self.pick(route)) else {
                break;
            };
            let call_timeout = t.call.min(deadline - now);
            let failed = match self.conn(&addr, call_timeout).await {
                Err(e) => Attempt::Retry(e),
                Ok(client) => {
                    let mut ctx = tarpc::context::current();
                    ctx.deadline = Instant::now() + call_timeout;
                    // The tarpc deadline is enforced by the dispatcher; the outer timeout
                    // also covers a dispatcher that is stuck.
                    let answer = tokio::time::timeout(call_timeout, f(client, ctx));
                    match self.wait_attempt(&addr, route, answer).await {
                        Err(Hedged(l)) => {
                            // Whatever the silent replica does with the request, it cannot
                            // commit it in its old term; the same request id goes to `l`.
                            tracing::debug!(rpc = name, from = %addr, to = %l, "another replica leads; leaving a silent one");
                            self.suspect(&addr);
                            *lock(&self.inner.leader) = Some(l.clone());
                            redirected = (route == Route::Any).then_some(l);
                            continue;
                        }
                        Ok(Err(_)) => {
                            self.suspect(&addr);
                            Attempt::Retry(format!("{name} at {addr}: timed out"))
                        }
                        Ok(Ok(Err(e))) => {
                            if matches!(e, RpcError::DeadlineExceeded) {
                                self.suspect(&addr);
                            }
                            Attempt::Retry(format!("{name} at {addr}: {e}"))
                        }
                        Ok(Ok(Ok(Ok(v)))) => {
                            if route == Route::Leader {
                                *lock(&self.inner.leader) = Some(addr);
                            }
                            return Ok(v);
                        }
                        Ok(Ok(Ok(Err(MetaError::NotLeader {
                            leader_addr: Some(l),
                            ..
                        }))))
                            if l != addr =>
                        {
                            Attempt::Redirect(l)
                        }
                        Ok(Ok(Ok(Err(e)))) if e.is_retryable() => {
                            Attempt::Retry(format!("{name} at {addr}: {e}"))
                        }
                        Ok(Ok(Ok(Err(e)))) => return Err(e),
                    }
                }
            };
            match failed {
                Attempt::Redirect(l) => {
                    tracing::debug!(rpc = name, from = %addr, to = %l, "following leader redirect");
                    match route {
                        Route::Leader => *lock(&self.inner.leader) = Some(l),
                        Route::Any => redirected = Some(l),
                    }
                    redirects += 1;
                    // Redirects are free until they ping-pong (an election in progress).
                    if redirects <= 3 {
                        continue;
                    }
                    last = format!("{name}: redirected {redirects} times");
                }
                Attempt::Retry(reason) => {
                    tracing::debug!(rpc = name, %reason, "metadata call failed; retrying");
                    self.forget(&addr);
                    last = reason;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2);
            tokio::time::sleep((backoff + Duration::from_millis(jitter)).min(left)).await;
            // Capped low: an election takes about a second, and every retry is one cheap
            // round trip; waiting longer would only add to the failover users see.
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
        Err(MetaError::Unavailable {
            reason: format!("gave up after {:?}: {last}", start.elapsed()),
        })
    }

    /// Waits for an attempt's answer at `addr`. A call that needs the leader and is not
    /// answered within [`HEDGE_AFTER`] makes the client ask the other replicas, every
    /// [`HEDGE_AFTER`], whether one of them leads now: a leader that hangs without closing
    /// its connections (stopped, cut off) is then left after about an election's time,
    /// not after the whole call deadline. Mutations carry their request id, so sending one
    /// again to the new leader applies it once.
    async fn wait_attempt<R>(
        &self,
        addr: &str,
        route: Route,
        answer: impl Future<Output = R>,
    ) -> Result<R, Hedged> {
        if route != Route::Leader || self.inner.addrs.len() < 2 {
            return Ok(answer.await);
        }
        tokio::pin!(answer);
        tokio::select! {
            r = &mut answer => Ok(r),
            l = self.other_leader(addr) => Err(Hedged(l)),
        }
    }

    /// Resolves once a replica other than `addr` says it leads, asking every [`HEDGE_AFTER`].
    async fn other_leader(&self, addr: &str) -> String {
        loop {
            tokio::time::sleep(HEDGE_AFTER).await;
            let asks = self
                .inner
                .addrs
                .iter()
                .filter(|a| *a != addr)
                .map(|other| async move {
                    let client = self.conn(other, HEDGE_AFTER).await.ok()?;
                    let mut ctx = tarpc::context::current();
                    ctx.deadline = Instant::now() + HEDGE_AFTER;
                    let status = tokio::time::timeout(HEDGE_AFTER, client.replica_status(ctx));
                    let s = status.await.ok()?.ok()?.ok()?;
                    (s.role == "leader").then(|| other.clone())
                });
            let leaders = futures::future::join_all(asks).await;
            if let Some(l) = leaders.into_iter().flatten().next() {
                return l;
            }
        }
    }

    fn read_route(&self) -> Route {
        match self.consistency {
            Consistency::Linearizable => Route::Leader,
            Consistency::Local => Route::Any,
        }
    }
}

/// Generates one method per RPC, with the service's arguments minus the context and minus
/// what the client adds itself: reads get the client's [`Consistency`], writes a fresh
/// [`ReqId`] (the same for every retry of the call), other calls nothing.
macro_rules! rpc_methods {
    (
        reads { $( $(#[$rdoc:meta])* fn $rname:ident($($rarg:ident : $rty:ty),*) -> $rret:ty; )* }
        writes { $( $(#[$wdoc:meta])* fn $wname:ident($($warg:ident : $wty:ty),*) -> $wret:ty; )* }
        other { $( $(#[$odoc:meta])* fn $oname:ident($($oarg:ident : $oty:ty),*) -> $oret:ty; )* }
    ) => {
        impl MetadataClient {
            $(
                $(#[$rdoc])*
                #[allow(clippy::clone_on_copy, clippy::too_many_arguments)]
                pub async fn $rname(&self, $($rarg: $rty),*) -> MetaResult<$rret> {
                    let read = self.consistency;
                    self.call(stringify!($rname), self.read_route(), move |c, ctx| {
                        $(let $rarg = $rarg.clone();)*
                        async move { c.$rname(ctx, $($rarg,)* read).await }
                    })
                    .await
                }
            )*
            $(
                $(#[$wdoc])*
                #[allow(clippy::clone_on_copy, clippy::too_many_arguments)]
                pub async fn $wname(&self, $($warg: $wty),*) -> MetaResult<$wret> {
                    let req = self.next_req();
                    self.call(stringify!($wname), Route::Leader, move |c, ctx| {
                        $(let $warg = $warg.clone();)*
                        async move { c.$wname(ctx, $($warg,)* req).await }
                    })
                    .await
                }
            )*
            $(
                $(#[$odoc])*
                #[allow(clippy::clone_on_copy, clippy::too_many_arguments)]
                pub async fn $oname(&self, $($oarg: $oty),*) -> MetaResult<$oret> {
                    self.call(stringify!($oname), Route::Leader, move |c, ctx| {
                        $(let $oarg = $oarg.clone();)*
                        async move { c.$oname(ctx, $($oarg),*).await }
                    })
                    .await
                }
            )*
        }
    };
}

rpc_methods! {
    reads {
        /// Finds `name` in directory `parent`.
        fn lookup(parent: Ino, name: Name) -> Attr;
        /// The attributes of `ino`.
        fn getattr(ino: Ino) -> Attr;
        /// The target of a symbolic link.
        fn readlink(ino: Ino) -> ByteBuf;
        /// Lists up to `limit` entries after `cookie`.
        fn readdir(ino: Ino, cookie: u64, limit: u32) -> Vec<DirEntry>;
        /// Filesystem totals.
        fn statfs() -> StatFs;
        /// Reads an extended attribute.
        fn getxattr(ino: Ino, name: Name) -> ByteBuf;
        /// Lists extended attribute names.
        fn listxattr(ino: Ino) -> Vec<Name>;
        /// Existing chunks with index in `first..first + count`.
        fn chunks(ino: Ino, first: u64, count: u64) -> Vec<ChunkLoc>;
        /// The storage class of a file or directory.
        fn get_class(ino: Ino) -> StorageClass;
        /// Replicated chunks due for RS 4+2, from `after` on.
        fn cold_chunks(after: (Ino, u64), quiet_ms: u64, limit: u32) -> ColdPage;
    }
    writes {
        /// Changes attributes (a size change truncates or extends).
        fn setattr(ino: Ino, set: SetAttr) -> Attr;
        /// Creates a file, directory, fifo, socket or device node.
        fn mknod(parent: Ino, name: Name, node: NewNode, caller: Caller) -> Attr;
        /// Creates a node and records an open of it by `session`, atomically.
        fn create(parent: Ino, name: Name, node: NewNode, caller: Caller, session: u64) -> Attr;
        /// Creates a directory whose creates are delegated to mount session `holder`.
        fn mkdir_held(parent: Ino, name: Name, node: NewNode, caller: Caller, holder: u64) -> Attr;
        /// Reserves `count` inode numbers; returns the first.
        fn reserve_inodes(count: u32) -> Ino;
        /// Commits a delegation holder's changes (and with `give_back` ends the delegation).
        fn commit_held(dir: Ino, holder: u64, ops: Vec<HeldOp>, give_back: bool) -> ();
        /// Commits a holder's changes and allocates the first chunk of some of its new files.
        fn commit_held_allocating(dir: Ino, holder: u64, ops: Vec<HeldOp>, files: Vec<Ino>) -> Vec<Option<ChunkLoc>>;
        /// Creates a symbolic link.
        fn symlink(parent: Ino, name: Name, target: ByteBuf, caller: Caller) -> Attr;
        /// Adds a hard link.
        fn link(ino: Ino, newparent: Ino, newname: Name) -> Attr;
        /// Removes a non-directory entry.
        fn unlink(parent: Ino, name: Name) -> ();
        /// Removes an empty directory.
        fn rmdir(parent: Ino, name: Name) -> ();
        /// Removes an empty directory from `parent`, held by `holder`, for `holder`.
        fn rmdir_held(parent: Ino, name: Name, holder: u64) -> ();
        /// Renames an entry (renameat2 flags).
        fn rename(parent: Ino, name: Name, newparent: Ino, newname: Name, flags: RenameFlags) -> ();
        /// Sets an extended attribute.
        fn setxattr(ino: Ino, name: Name, value: ByteBuf, mode: XattrMode) -> ();
        /// Removes an extended attribute.
        fn removexattr(ino: Ino, name: Name) -> ();
        /// The chunk at `index`, allocated if missing.
        fn allocate_chunk(ino: Ino, index: u64) -> ChunkLoc;
        /// Records a completed write (size, mtime, stored bytes).
        fn commit_write(ino: Ino, end: u64, stored_delta: i64) -> Attr;
        /// Releases whole chunks (punch hole).
        fn release_chunks(ino: Ino, first: u64, count: u64) -> ();
        /// Drops a failed replica from a chunk.
        fn drop_replica(chunk: ChunkId, expected_version: u64, server: ServerId) -> ChunkLoc;
        /// Makes a snapshot (read-only) or clone sharing every chunk of `origin`.
        fn snapshot(origin: Ino, parent: Ino, name: Name, read_only: bool, label: ByteBuf) -> Attr;
        /// The private copy of a shared chunk, for writing.
        fn cow_chunk(ino: Ino, index: u64, chunk: ChunkId) -> CowLoc;
        /// Ends a copy-on-write (failed replicas dropped).
        fn cow_done(ino: Ino, index: u64, chunk: ChunkId, failed: Vec<ServerId>) -> ChunkLoc;
        /// Commits a healer's new copy of a chunk (version bumped).
        fn add_replica(chunk: ChunkId, version: u64, server: ServerId, term: u64) -> ChunkLoc;
        /// Commits a healer's rebuilt shard of an erasure-coded chunk on a new server.
        fn replace_shard(chunk: ChunkId, version: u64, shard: ChunkId, server: ServerId, term: u64) -> ChunkLoc;
        /// Sets the storage class of a file or directory.
        fn set_class(ino: Ino, class: StorageClass) -> Attr;
        /// Starts converting a replicated chunk to RS 4+2.
        fn ec_prepare(ino: Ino, index: u64, chunk: ChunkId, version: u64) -> EcPlan;
        /// Commits a conversion to RS 4+2.
        fn ec_commit(ino: Ino, index: u64, chunk: ChunkId, version: u64, length: u64, term: u64) -> ChunkLoc;
        /// Starts or stops draining a chunkserver.
        fn drain_chunkserver(server: ServerId, draining: bool) -> ();
        /// Changes the run-time repair and scrub limits.
        fn set_healer_settings(repair_rate: RateChange, scrub_rate: RateChange) -> HealerSettings;
        /// Gives a lock delegation back, with the session's locks on the inode.
        fn return_locks(ino: Ino, session: u64, locks: Option<Vec<HeldLock>>) -> ();
        /// Commits an append to an erasure-coded chunk.
        fn ec_extend(ino: Ino, index: u64, chunk: ChunkId, version: u64, shards: Vec<(ChunkId, ServerId)>, from: u64, to: u64) -> ChunkLoc;
    }
    other {
        /// Records an open of `ino` by `session`.
        fn open(ino: Ino, session: u64) -> Attr;
        /// Records an open of `ino` by `session` in the leader's memory (see the service).
        fn open_leased(ino: Ino, session: u64) -> LeasedOpen;
        /// Sends `session`'s leased opens to a new leader.
        fn reopen(opens: Vec<(Ino, u64)>, session: u64) -> u64;
        /// Drops leased opens of `inos` by `session`.
        fn release_leased(inos: Vec<Ino>, session: u64) -> ();
        /// Drops one open of `ino` by `session`.
        fn release(ino: Ino, session: u64) -> ();
        /// Drops one open of each of `inos` by `session`.
        fn release_many(inos: Vec<Ino>, session: u64) -> ();
        /// Drops every open held by `session`.
        fn end_session(session: u64) -> ();
        /// Waits until every acknowledged change is on the leader's disk.
        fn sync() -> ();
        /// Takes, changes or drops a byte-range lock (waiting up to `wait_ms` at the leader).
        fn set_lock(ino: Ino, session: u64, lock: LockRequest, wait_ms: u32) -> Option<LockConflict>;
        /// The lock of another owner that would conflict with `lock`.
        fn test_lock(ino: Ino, session: u64, lock: LockRequest) -> Option<LockConflict>;
        /// Keeps `session`'s locks alive; the inodes whose locks it holds itself.
        fn renew_locks(session: u64) -> Vec<Ino>;
        /// Asks for the locks of `ino` to be delegated to `session`.
        fn delegate_locks(ino: Ino, session: u64) -> Option<LockDelegation>;
        /// Lists `dir`, held by `holder`, for `holder` (not recalled).
        fn readdir_held(dir: Ino, holder: u64, cookie: u64, limit: u32) -> Vec<DirEntry>;
        /// Cache invalidation events (long poll; give it a call timeout above `wait_ms`).
        fn watch(watcher: u64, epoch: u64, from: u64, wait_ms: u32) -> WatchReply;
        /// A chunkserver's heartbeat.
        fn heartbeat(hb: Heartbeat) -> HeartbeatReply;
        /// Grants or renews a volume's writer lease.
        fn volume_lease(ino: Ino, holder: u64, ttl_ms: u64, renew: bool) -> u64;
        /// Gives a volume's writer lease back.
        fn end_volume_lease(ino: Ino, holder: u64) -> ();
        /// The cluster's state.
        fn status() -> ClusterStatus;
        /// A page of chunks below their wanted copies or shards, with server liveness.
        fn endangered_chunks(after: ChunkId, limit: u32) -> EndangeredPage;
        /// Grants or renews the healer lease.
        fn healer_lease(holder: u64, ttl_ms: u64) -> HealerLease;
        /// A healer's progress report; returns the limits to apply.
        fn healer_report(holder: u64, report: HealerReport) -> HealerSettings;
        /// Adds a metadata replica to the group (give the client a long call timeout: the
        /// new replica catches up first).
        fn add_peer(id: u64, addr: String, raft_addr: String) -> ();
        /// Removes a metadata replica from the group.
        fn remove_peer(id: u64) -> ();
    }
}

impl MetadataClient {
    /// The view of the replica this call reaches, about itself: the replica this client
    /// uses for local reads (one of its addresses). To ask one particular replica, use a
    /// client made with only its address.
    pub async fn replica_status(&self) -> MetaResult<ReplicaStatus> {
        self.call("replica_status", Route::Any, |c, ctx| async move {
            c.replica_status(ctx).await
        })
        .await
    }

    /// The state digest of the replica this call reaches (see
    /// [`MetadataClient::replica_status`] for which one).
    pub async fn digest(&self) -> MetaResult<StateDigest> {
        self.call(
            "digest",
            Route::Any,
            |c, ctx| async move { c.digest(ctx).await },
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::MetadataRpc;
    use futures::StreamExt;
    use tarpc::server::{BaseChannel, Channel};

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

    /// Records what `unlink` and `getattr` receive; fails every other `unlink` attempt
    /// (as a failover would) so the client retries.
    #[derive(Clone, Default)]
    struct Fake {
        seen: Arc<Mutex<Vec<(ReqId, bool)>>>,
        reads: Arc<Mutex<Vec<Consistency>>>,
    }

    macro_rules! refuse {
        ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {
            $(async fn $name(self, _: Context, $($arg: $ty),*) -> MetaResult<$ret> {
                $(let _ = $arg;)*
                Err(MetaError::NotPermitted)
            })*
        };
    }

    impl MetadataRpc for Fake {
        async fn unlink(self, _: Context, _: Ino, _: Name, req: ReqId) -> MetaResult<()> {
            let mut seen = lock(&self.seen);
            let first = !seen.iter().any(|(r, _)| *r == req);
            seen.push((req, first));
            if first {
                return Err(MetaError::Unavailable {
                    reason: "electing".into(),
                });
            }
            Ok(())
        }

        async fn getattr(self, _: Context, ino: Ino, read: Consistency) -> MetaResult<Attr> {
            let _ = ino;
            lock(&self.reads).push(read);
            Err(MetaError::NotFound)
        }

        refuse! {
            lookup(parent: Ino, name: Name, read: Consistency) -> Attr;
            setattr(ino: Ino, set: SetAttr, req: ReqId) -> Attr;
            mknod(parent: Ino, name: Name, node: NewNode, caller: Caller, req: ReqId) -> Attr;
            create(parent: Ino, name: Name, node: NewNode, caller: Caller, session: u64, req: ReqId) -> Attr;
            symlink(parent: Ino, name: Name, target: ByteBuf, caller: Caller, req: ReqId) -> Attr;
            mkdir_held(parent: Ino, name: Name, node: NewNode, caller: Caller, holder: u64, req: ReqId) -> Attr;
            reserve_inodes(count: u32, req: ReqId) -> Ino;
            commit_held(dir: Ino, holder: u64, ops: Vec<HeldOp>, give_back: bool, req: ReqId) -> ();
            commit_held_allocating(dir: Ino, holder: u64, ops: Vec<HeldOp>, files: Vec<Ino>, req: ReqId) -> Vec<Option<ChunkLoc>>;
            readlink(ino: Ino, read: Consistency) -> ByteBuf;
            link(ino: Ino, newparent: Ino, newname: Name, req: ReqId) -> Attr;
            rmdir(parent: Ino, name: Name, req: ReqId) -> ();
            rmdir_held(parent: Ino, name: Name, holder: u64, req: ReqId) -> ();
            rename(parent: Ino, name: Name, newparent: Ino, newname: Name, flags: RenameFlags, req: ReqId) -> ();
            readdir(ino: Ino, cookie: u64, limit: u32, read: Consistency) -> Vec<DirEntry>;
            readdir_held(dir: Ino, holder: u64, cookie: u64, limit: u32) -> Vec<DirEntry>;
            open(ino: Ino, session: u64) -> Attr;
            open_leased(ino: Ino, session: u64) -> LeasedOpen;
            reopen(opens: Vec<(Ino, u64)>, session: u64) -> u64;
            release_leased(inos: Vec<Ino>, session: u64) -> ();
            release(ino: Ino, session: u64) -> ();
            release_many(inos: Vec<Ino>, session: u64) -> ();
            end_session(session: u64) -> ();
            set_lock(ino: Ino, session: u64, lock: LockRequest, wait_ms: u32) -> Option<LockConflict>;
            test_lock(ino: Ino, session: u64, lock: LockRequest) -> Option<LockConflict>;
            renew_locks(session: u64) -> Vec<Ino>;
            delegate_locks(ino: Ino, session: u64) -> Option<LockDelegation>;
            return_locks(ino: Ino, session: u64, locks: Option<Vec<HeldLock>>, req: ReqId) -> ();
            statfs(read: Consistency) -> StatFs;
            sync() -> ();
            watch(watcher: u64, epoch: u64, from: u64, wait_ms: u32) -> WatchReply;
            setxattr(ino: Ino, name: Name, value: ByteBuf, mode: XattrMode, req: ReqId) -> ();
            getxattr(ino: Ino, name: Name, read: Consistency) -> ByteBuf;
            listxattr(ino: Ino, read: Consistency) -> Vec<Name>;
            removexattr(ino: Ino, name: Name, req: ReqId) -> ();
            chunks(ino: Ino, first: u64, count: u64, read: Consistency) -> Vec<ChunkLoc>;
            allocate_chunk(ino: Ino, index: u64, req: ReqId) -> ChunkLoc;
            commit_write(ino: Ino, end: u64, stored_delta: i64, req: ReqId) -> Attr;
            release_chunks(ino: Ino, first: u64, count: u64, req: ReqId) -> ();
            drop_replica(chunk: ChunkId, expected_version: u64, server: ServerId, req: ReqId) -> ChunkLoc;
            snapshot(origin: Ino, parent: Ino, name: Name, read_only: bool, label: ByteBuf, req: ReqId) -> Attr;
            cow_chunk(ino: Ino, index: u64, chunk: ChunkId, req: ReqId) -> CowLoc;
            cow_done(ino: Ino, index: u64, chunk: ChunkId, failed: Vec<ServerId>, req: ReqId) -> ChunkLoc;
            endangered_chunks(after: ChunkId, limit: u32) -> EndangeredPage;
            add_replica(chunk: ChunkId, version: u64, server: ServerId, term: u64, req: ReqId) -> ChunkLoc;
            replace_shard(chunk: ChunkId, version: u64, shard: ChunkId, server: ServerId, term: u64, req: ReqId) -> ChunkLoc;
            healer_lease(holder: u64, ttl_ms: u64) -> HealerLease;
            set_class(ino: Ino, class: StorageClass, req: ReqId) -> Attr;
            get_class(ino: Ino, read: Consistency) -> StorageClass;
            cold_chunks(after: (Ino, u64), quiet_ms: u64, limit: u32, read: Consistency) -> ColdPage;
            ec_prepare(ino: Ino, index: u64, chunk: ChunkId, version: u64, req: ReqId) -> EcPlan;
            ec_commit(ino: Ino, index: u64, chunk: ChunkId, version: u64, length: u64, term: u64, req: ReqId) -> ChunkLoc;
            heartbeat(hb: Heartbeat) -> HeartbeatReply;
            status() -> ClusterStatus;
            replica_status() -> ReplicaStatus;
            digest() -> StateDigest;
            add_peer(id: u64, addr: String, raft_addr: String) -> ();
            remove_peer(id: u64) -> ();
            drain_chunkserver(server: ServerId, draining: bool, req: ReqId) -> ();
            set_healer_settings(repair_rate: RateChange, scrub_rate: RateChange, req: ReqId) -> HealerSettings;
            healer_report(holder: u64, report: HealerReport) -> HealerSettings;
            ec_extend(ino: Ino, index: u64, chunk: ChunkId, version: u64, shards: Vec<(ChunkId, ServerId)>, from: u64, to: u64, req: ReqId) -> ChunkLoc;
            volume_lease(ino: Ino, holder: u64, ttl_ms: u64, renew: bool) -> u64;
            end_volume_lease(ino: Ino, holder: u64) -> ();
        }
    }

    async fn start_fake() -> (Fake, String) {
        let fake = Fake::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut incoming = tarpc::serde_transport::tcp::listen_on(listener, MessagePack::default)
            .await
            .unwrap();
        let server = fake.clone();
        tokio::spawn(async move {
            while let Some(Ok(t)) = incoming.next().await {
                let server = server.clone();
                tokio::spawn(
                    BaseChannel::with_defaults(t)
                        .execute(server.serve())
                        .for_each(|call| call),
                );
            }
        });
        (fake, addr)
    }

    #[tokio::test]
    async fn retries_reuse_the_request_id_and_reads_carry_the_consistency() {
        let (fake, addr) = start_fake().await;
        let c = MetadataClient::new(vec![addr], ClientTimeouts::default());
        let other = MetadataClient::new(c.addrs().to_vec(), ClientTimeouts::default());
        assert_ne!(c.client_id(), other.client_id(), "random client ids");
        c.unlink(ROOT_INO, Name::from(b"a".to_vec())).await.unwrap();
        c.clone()
            .unlink(ROOT_INO, Name::from(b"b".to_vec()))
            .await
            .unwrap();
        let seen = lock(&fake.seen).clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        let (a, b) = (seen[0].0, seen[2].0);
        assert_eq!(seen[1], (a, false), "the retry reuses the first id");
        assert_eq!(seen[3], (b, false));
        assert_eq!(a.client, c.client_id());
        assert_eq!(
            (b.client, b.seq),
            (a.client, a.seq + 1),
            "clones share the sequence"
        );

        assert_eq!(c.getattr(ROOT_INO).await, Err(MetaError::NotFound));
        let local = c.clone().with_consistency(Consistency::Local);
        assert_eq!(local.consistency(), Consistency::Local);
        assert_eq!(local.getattr(ROOT_INO).await, Err(MetaError::NotFound));
        assert_eq!(
            *lock(&fake.reads),
            vec![Consistency::Linearizable, Consistency::Local]
        );
    }
}
