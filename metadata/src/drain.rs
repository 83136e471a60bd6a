//! Draining a chunkserver: moving every chunk off it before it is removed.
//!
//! ```text
//!  rawfs chunkserver drain ID ──drain_chunkserver(ID, true)──▶ log: ServerRec.draining = true
//!  placement (new chunks, RS shards, healer targets) skips a draining server
//!  endangered_chunks counts its copies and shards as missing ──▶ healer copies / rebuilds
//!  the chunk is back at full redundancy without it ──▶ leader drops its copy (version bump)
//!      ──▶ the deletion reaches the server with a heartbeat ──▶ it ends empty
//! ```
//!
//! The flag is replicated (it survives leader changes and restarts); the leader mirrors it in
//! its registry from every heartbeat, so placement reads no table. The surplus copies are
//! dropped by the leader, not the healer: it only has to see, while a draining server
//! heartbeats, which of its copies are no longer needed; at most every [`SURPLUS_SCAN`] per
//! draining server, because it is a scan of the whole chunk map.

use std::time::{Duration, Instant};

use redb::ReadableTable;

use rawfs_metadata_api::{ChunkId, MetaError, MetaResult, ServerId, WANTED_COPIES};

use crate::commands::Command;
use crate::server::Server;
use crate::store::{decode, get_server, ChunkRec, Op, ReadTables, Tables};

/// Least time between two surplus scans for one draining server.
pub(crate) const SURPLUS_SCAN: Duration = Duration::from_secs(2);

/// Applies `SetDraining`.
pub(crate) fn set_draining(t: &mut Tables, server: ServerId, draining: bool) -> Op<()> {
    let Some(mut rec) = get_server(&t.servers, server)? else {
        return Err(MetaError::NotFound.into());
    };
    rec.draining = draining;
    t.servers
        .insert(server, crate::store::encode("server", &rec)?.as_slice())?;
    Ok(())
}

/// Replicated chunks listed on `server` that have [`WANTED_COPIES`] copies on other live
/// servers that are not draining: its copy is no longer needed. As (chunk, version).
pub(crate) fn surplus(
    rt: &ReadTables,
    server: ServerId,
    keeps: &dyn Fn(ServerId) -> bool,
) -> Op<Vec<(ChunkId, u64)>> {
    let mut out = Vec::new();
    for item in rt.chunks.iter()? {
        let (_, v) = item?;
        let rec: ChunkRec = decode("chunk", v.value())?;
        if rec.ec.is_some() || rec.pending.is_some() || !rec.servers.contains(&server) {
            continue;
        }
        let others = rec
            .servers
            .iter()
            .filter(|&&s| s != server && keeps(s))
            .count();
        if others >= WANTED_COPIES as usize {
            out.push((rec.chunk, rec.version));
        }
    }
    Ok(out)
}

impl Server {
    /// `drain_chunkserver`: sets or clears the flag, and mirrors it in the registry.
    pub(crate) async fn do_drain(
        &self,
        server: ServerId,
        draining: bool,
        cmd: Command,
    ) -> MetaResult<()> {
        self.propose(cmd).await?.into_unit()?;
        self.registry().set_draining(server, draining);
        Ok(())
    }

    /// Called on a heartbeat of a draining server: drops its copies of chunks that are at
    /// full redundancy elsewhere (so that the deletion reaches it), at most every
    /// [`SURPLUS_SCAN`].
    pub(crate) async fn drop_drained_copies(&self, server: ServerId) -> MetaResult<()> {
        let now = Instant::now();
        let (keeps, due) = {
            let mut reg = self.registry();
            let due = reg.surplus_scan_due(server, now, SURPLUS_SCAN);
            let up = reg.up_servers(now);
            let keeps: std::collections::HashSet<ServerId> =
                up.into_iter().filter(|&s| !reg.is_draining(s)).collect();
            (keeps, due)
        };
        if !due {
            return Ok(());
        }
        let me = self.clone();
        let found = tokio::task::spawn_blocking(move || {
            me.0.sm
                .read(|rt| surplus(rt, server, &|s| keeps.contains(&s)))
        })
        .await
        .map_err(|e| MetaError::Unavailable {
            reason: format!("drain scan failed: {e}"),
        })??;
        for (chunk, version) in found {
            tracing::info!(chunk, server, "dropping a drained copy");
            let dropped = self
                .propose(Command::DropReplica {
                    chunk,
                    expected_version: version,
                    server,
                })
                .await
                .and_then(|r| r.into_chunk());
            // A writer or the healer moved the chunk meanwhile: the next scan looks again.
            if let Err(e) = dropped {
                tracing::debug!(chunk, server, error = %e, "drained copy not dropped");
            }
        }
        Ok(())
    }
}
