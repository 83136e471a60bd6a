//! The listener: one task per connection, each negotiating and then serving its export.
//!
//! ```text
//!  accept ─▶ task: negotiate (deadline) ─▶ catalog.open ─▶ transmit ─▶ catalog.close
//!  shutdown ─▶ stop accepting; connections finish their requests in flight and close
//! ```
//!
//! A connection that misbehaves (garbage, a truncated handshake, a stalled reader) is
//! dropped on its own; the others are not affected. Connections beyond
//! [`ServerConfig::max_connections`] are closed at once.

use crate::export::Catalog;
use crate::handshake::{negotiate, HandshakeError};
use crate::transmission::transmit;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Default address of `rawfs nbd` (the IANA port of NBD, on loopback).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// How the server listens and how long it waits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen; port 0 picks one (see [`ServerHandle::addr`]).
    pub listen: SocketAddr,
    /// Deadline of the whole negotiation of one connection.
    pub handshake_timeout: Duration,
    /// Deadline of reading one WRITE payload and of sending one reply.
    pub io_timeout: Duration,
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
}

impl ServerConfig {
    /// Defaults (30 s handshake, 60 s I/O, 1024 connections) for `listen`.
    pub fn new(listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            handshake_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    active: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open right now (negotiating or transmitting).
    pub fn connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Waits until the server has stopped (after the shutdown future resolved and the
    /// connections have finished).
    pub async fn join(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "NBD server task failed");
        }
    }
}

/// Binds `cfg.listen` and serves the exports of `catalog` until `shutdown` resolves.
pub async fn serve(
    cfg: ServerConfig,
    catalog: Arc<dyn Catalog>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ServerHandle, ServeError> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let active = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        stop_tx.send_replace(true);
    });
    let task = tokio::spawn(accept_loop(listener, cfg, catalog, stop, active.clone()));
    tracing::info!(%addr, "NBD server listening");
    Ok(ServerHandle { addr, active, task })
}

async fn accept_loop(
    listener: TcpListener,
    cfg: ServerConfig,
    catalog: Arc<dyn Catalog>,
    mut stop: watch::Receiver<bool>,
    active: Arc<AtomicUsize>,
) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or the like: keep serving the connections we have and
                // try again shortly rather than spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.load(Ordering::Acquire) >= cfg.max_connections {
            tracing::warn!(%peer, max = cfg.max_connections, "too many NBD connections; refusing one");
            drop(stream);
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let (catalog, stop, active, cfg) =
            (catalog.clone(), stop.clone(), active.clone(), cfg.clone());
        conns.spawn(async move {
            connection(stream, peer, &cfg, &*catalog, stop).await;
            active.fetch_sub(1, Ordering::AcqRel);
        });
    }
    drop(listener);
    tracing::info!(connections = conns.len(), "NBD server stopping");
    // Connections see the same stop signal; they finish what is in flight within their own
    // deadlines. This bound only guards against a bug.
    let grace = cfg.handshake_timeout + cfg.io_timeout * 2;
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("NBD connections did not finish in time; dropping them");
        conns.shutdown().await;
    }
}

/// Serves one connection from greeting to close.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: &ServerConfig,
    catalog: &dyn Catalog,
    stop: watch::Receiver<bool>,
) {
    // Replies are small and latency-bound; do not let Nagle hold them back.
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let stopping = || *stop.borrow();
    let negotiated = tokio::time::timeout(
        cfg.handshake_timeout,
        negotiate(&mut rd, &mut wr, catalog, stopping),
    )
    .await;
    let session = match negotiated {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => {
            tracing::debug!(%peer, "client left during negotiation");
            return;
        }
        Ok(Err(HandshakeError::Io(e))) => {
            tracing::debug!(%peer, error = %e, "negotiation ended");
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "negotiation failed; dropping the connection");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "negotiation timed out; dropping the connection");
            return;
        }
    };
    tracing::info!(
        %peer,
        export = %session.name,
        size = session.size,
        structured = session.structured,
        base_allocation = session.base_allocation,
        "NBD client attached"
    );
    match transmit(&mut rd, wr, &session, stop, cfg.io_timeout).await {
        Ok(end) => tracing::info!(%peer, export = %session.name, ?end, "NBD client detached"),
        Err(e) => {
            tracing::warn!(%peer, export = %session.name, error = %e, "NBD connection dropped")
        }
    }
    catalog.close(&session.name, session.export.clone()).await;
}
