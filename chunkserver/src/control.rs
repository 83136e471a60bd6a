//! The control port: the tarpc [`ChunkserverControl`] service over MessagePack.

use crate::scrub::Scrubber;
use crate::storage::Storage;
use futures::StreamExt;
use rawfs_chunkserver_api::{ChunkserverControl, ControlStatus, ScrubStatus};
use std::sync::Arc;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::MessagePack;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Answers control calls from the storage's in-memory state (no disk I/O on this path).
#[derive(Clone)]
pub(crate) struct ControlServer {
    pub id: u64,
    pub storage: Arc<Storage>,
    pub scrubber: Arc<Scrubber>,
}

impl ChunkserverControl for ControlServer {
    async fn status(self, _: tarpc::context::Context) -> ControlStatus {
        ControlStatus {
            id: self.id,
            used_bytes: self.storage.used(),
            total_bytes: self.storage.total(),
            chunks: self.storage.chunk_count(),
            term: self.storage.term(),
            healthy: self.storage.healthy(),
        }
    }

    async fn list_chunks(self, _: tarpc::context::Context) -> Vec<(u64, u64)> {
        self.storage.inventory()
    }

    async fn set_scrub_rate(self, _: tarpc::context::Context, bytes_per_sec: u64) -> ScrubStatus {
        self.scrubber.set_rate(bytes_per_sec);
        self.scrubber.status()
    }

    async fn scrub_status(self, _: tarpc::context::Context) -> ScrubStatus {
        self.scrubber.status()
    }
}

/// Serves the control service on `listener` until `stop` is cancelled.
pub(crate) async fn run(listener: TcpListener, server: ControlServer, stop: CancellationToken) {
    let local = listener.local_addr().ok();
    let mut incoming =
        match tarpc::serde_transport::tcp::listen_on(listener, MessagePack::default).await {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(?local, error = %e, "control listener failed");
                return;
            }
        };
    incoming
        .config_mut()
        .max_frame_length(rawfs_chunkserver_api::CONTROL_MAX_FRAME);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            next = incoming.next() => match next {
                Some(Ok(transport)) => {
                    let server = server.clone();
                    let stop = stop.clone();
                    conns.spawn(async move {
                        // A garbage frame ends this channel's stream (tarpc logs it); the
                        // listener and other connections are unaffected.
                        let requests = BaseChannel::with_defaults(transport)
                            .execute(server.serve())
                            // Calls run inline: they are tiny, and nothing outlives the
                            // connection task, so shutdown really releases the storage.
                            .for_each(|call| call);
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = requests => {}
                        }
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "control port accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
