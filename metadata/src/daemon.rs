//! `serve`: opens the state, starts the replica, accepts tarpc connections, runs the
//! durability tick, and shuts everything down in order.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Future, StreamExt};
use rawfs_metadata_api::client::MAX_FRAME;
use rawfs_metadata_api::MetadataRpc;
use rawfs_replication::{Node, Replica, ReplicaConfig, StateMachine};
use tarpc::server::{BaseChannel, Channel};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_serde::formats::MessagePack;
use tokio_util::sync::CancellationToken;

use crate::machine::MetaStateMachine;
use crate::proposer::Proposer;
use crate::registry::Registry;
use crate::server::{Server, Shared};
use crate::{MetadataConfig, MetadataError, MetadataHandle};

/// Page cache of the redb file: bounds memory whatever the namespace size.
const CACHE_BYTES: usize = 64 << 20;
/// Requests one connection may have in flight.
const MAX_REQUESTS_PER_CONN: usize = 256;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;
/// How often the durability tick looks for pending non-durable commits.
const TICK: Duration = Duration::from_millis(200);
/// Most entries kept in the log behind a snapshot, for followers that lag a little.
const LOGS_TO_KEEP: u64 = 10_000;

pub(crate) async fn serve(
    cfg: MetadataConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<MetadataHandle, MetadataError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| MetadataError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let path = cfg.data_dir.join("meta.redb");
    let sm =
        tokio::task::spawn_blocking(move || MetaStateMachine::open(&path, CACHE_BYTES)).await??;
    let sm = Arc::new(sm);

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| MetadataError::Listen {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| MetadataError::Listen {
            addr: cfg.listen,
            source,
        })?;

    let peers: BTreeMap<u64, Node> = cfg
        .peers
        .iter()
        .map(|p| {
            (
                p.id,
                Node {
                    raft_addr: p.raft_addr.clone(),
                    client_addr: p.addr.clone(),
                },
            )
        })
        .collect();
    let mut rcfg = ReplicaConfig::new(
        cfg.id,
        cfg.data_dir.clone(),
        cfg.raft_listen,
        addr.to_string(),
        peers,
    );
    rcfg.bootstrap = cfg.bootstrap;
    rcfg.snapshot_every = cfg.snapshot_every.max(1);
    rcfg.logs_to_keep = LOGS_TO_KEEP.min(cfg.snapshot_every / 10);
    let replica = Replica::start(rcfg, sm.clone() as Arc<dyn StateMachine>).await?;
    let raft_addr = replica.raft_addr();

    let (proposer, proposer_task) = Proposer::start(replica.clone());
    let shared = Arc::new(Shared {
        sm: sm.clone(),
        replica: replica.clone(),
        proposer,
        registry: Mutex::new(Registry::new(cfg.chunkserver_timeout, Instant::now())),
        root_ready: AtomicBool::new(false),
        addr: addr.to_string(),
        members: Arc::default(),
        events: crate::events::EventLog::new(),
        delegations_changed: tokio::sync::Notify::new(),
        recalling: Mutex::default(),
        opens: Default::default(),
        locks: Default::default(),
    });
    let stop = CancellationToken::new();
    let expiry = tokio::spawn(Server(shared.clone()).expire_locks());
    let accept = tokio::spawn(accept_loop(listener, Server(shared), stop.clone()));
    let tick = tokio::spawn(durability_tick(sm.clone()));
    tracing::info!(id = cfg.id, %addr, %raft_addr, "metadata service listening");

    let failed = {
        let replica = replica.clone();
        async move { replica.failed().await }
    };
    let task = tokio::spawn(async move {
        let failure = tokio::select! {
            () = shutdown => None,
            cause = failed => Some(cause),
        };
        match &failure {
            None => tracing::info!("metadata service shutting down"),
            Some(cause) => tracing::error!(
                cause,
                "replica stopped on its own (storage error); stopping the service"
            ),
        }
        // Connections first (they wait for their requests), so that nothing uses the
        // replica or the store once they stop.
        stop.cancel();
        if let Err(e) = accept.await {
            tracing::error!(error = %e, "accept task failed");
        }
        // The lock expiry holds the shared state (and so a sender) too.
        expiry.abort();
        let _ = expiry.await;
        // Every sender is gone with the connections: the proposer drains and ends.
        if let Err(e) = proposer_task.await {
            tracing::error!(error = %e, "proposer task failed");
        }
        tick.abort();
        let _ = tick.await;
        let stopped = replica.shutdown().await;
        drop(replica);
        let store = sm.store().clone();
        let flushed = tokio::task::spawn_blocking(move || store.flush_durable()).await;
        if let Some(reason) = failure {
            // The storage already failed: what else failed on the way down adds nothing.
            tracing::debug!(?stopped, ?flushed, "stopped after a replica failure");
            return Err(MetadataError::ReplicaFailed { reason });
        }
        stopped?;
        flushed??;
        tracing::info!("metadata service stopped");
        Ok(())
    });
    Ok(MetadataHandle {
        addr,
        raft_addr,
        task,
    })
}

/// Makes non-durable commits durable about once a second.
async fn durability_tick(sm: Arc<MetaStateMachine>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !sm.store().durable_due() {
            continue;
        }
        let store = sm.store().clone();
        match tokio::task::spawn_blocking(move || store.flush_durable()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "durable commit failed"),
            Err(e) => tracing::error!(error = %e, "durable commit task failed"),
        }
    }
}

async fn accept_loop(listener: TcpListener, server: Server, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            serve_connection(stream, peer, server, stop).await;
            drop(permit);
        });
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    server: Server,
    stop: CancellationToken,
) {
    let framed = tokio_util::codec::LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_framed(stream);
    let transport = tarpc::serde_transport::new(framed, MessagePack::default());
    let channel =
        BaseChannel::with_defaults(transport).max_concurrent_requests(MAX_REQUESTS_PER_CONN);
    let mut requests = channel.requests();
    let mut running = JoinSet::new();
    tracing::debug!(%peer, "metadata connection opened");
    loop {
        while running.try_join_next().is_some() {}
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            r = requests.next() => r,
        };
        match next {
            Some(Ok(req)) => {
                running.spawn(req.execute(server.clone().serve()));
            }
            Some(Err(e)) => {
                // A malformed or oversized frame: nothing after it can be trusted.
                tracing::warn!(%peer, error = %e, "closing metadata connection after a bad frame");
                break;
            }
            None => break,
        }
    }
    // Requests still running finish (their replies go nowhere once the channel is gone);
    // on shutdown they fail fast because the replica is stopping.
    running.shutdown().await;
    tracing::debug!(%peer, "metadata connection closed");
}
