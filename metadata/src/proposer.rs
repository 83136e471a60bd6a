//! Group commit: mutations that arrive while earlier proposals are in flight travel together
//! as one [`Command::Batch`] log entry, so many callers share one log write.
//!
//! ```text
//!  request tasks --(command, reply slot)--> queue --> proposer: take one, then whatever
//!                                                     else is queued (up to MAX_BATCH)
//!                                                        | at most MAX_IN_FLIGHT at once
//!                                                        v
//!                                              Replica::propose(Batch) --> replies fan out
//! ```
//!
//! A lone command is proposed as itself. Commands batched together were concurrent, so
//! applying them in queue order keeps every operation linearizable.

use std::sync::Arc;

use rawfs_metadata_api::{MetaError, MetaResult};
use rawfs_replication::Replica;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;

use crate::commands::{decode_reply, Command, Reply};
use crate::server::propose_error;

/// Most commands in one log entry.
const MAX_BATCH: usize = 512;
/// Batches stop growing past about this many encoded bytes (log entries stay small enough
/// for one replication message).
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Proposals in flight at once; while all are busy, new commands queue into the next batch.
const MAX_IN_FLIGHT: usize = 4;
/// Commands waiting for a proposal slot before callers are held back.
const QUEUE: usize = 8192;

type Pending = (Command, oneshot::Sender<MetaResult<Reply>>);

/// The sending side: hands a command to the proposer and waits for its result.
#[derive(Clone)]
pub(crate) struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the proposer task; it ends (after finishing what is in flight) once every
    /// `Proposer` clone is gone.
    pub fn start(replica: Replica) -> (Proposer, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(replica, rx));
        (Proposer { tx }, task)
    }

    pub async fn propose(&self, cmd: Command) -> MetaResult<Reply> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let stopping = || MetaError::Unavailable {
            reason: "metadata service is stopping".into(),
        };
        self.tx
            .send((cmd, reply_tx))
            .await
            .map_err(|_| stopping())?;
        reply_rx.await.map_err(|_| stopping())?
    }
}

async fn run(replica: Replica, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut running = JoinSet::new();
    while let Some(first) = rx.recv().await {
        while running.try_join_next().is_some() {}
        // Wait for a slot before draining, so that commands pile up into the next batch.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let mut bytes = first.0.approx_size();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.0.approx_size();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let replica = replica.clone();
        running.spawn(async move {
            propose_batch(&replica, batch).await;
            drop(permit);
        });
    }
    while running.join_next().await.is_some() {}
}

async fn propose_one(replica: &Replica, cmd: &Command) -> MetaResult<Reply> {
    let bytes = cmd.encode().map_err(|e| MetaError::Invalid {
        reason: e.to_string(),
    })?;
    let out = replica.propose(bytes).await.map_err(propose_error)?;
    decode_reply(&out).map_err(|e| {
        tracing::error!(error = %e, "undecodable reply from the state machine");
        MetaError::Storage {
            reason: e.to_string(),
        }
    })?
}

async fn propose_batch(replica: &Replica, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        if let Some((cmd, reply)) = batch.pop() {
            let _ = reply.send(propose_one(replica, &cmd).await);
        }
        return;
    }
    let (cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().unzip();
    let n = cmds.len();
    match propose_one(replica, &Command::Batch(cmds)).await {
        Ok(Reply::Batch(results)) if results.len() == n => {
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
        Ok(other) => {
            tracing::error!(reply = ?other, "batch reply of the wrong shape");
            for reply in replies {
                let _ = reply.send(Err(MetaError::Storage {
                    reason: "batch reply of the wrong shape".into(),
                }));
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
