//! `rawfs chunkserver`: runs a chunkserver, or (`drain ID`) moves every chunk off one.
//!
//! ```text
//!  rawfs chunkserver drain ID [--wait] ──drain_chunkserver(ID, true)──▶ metadata leader
//!     --wait: poll status ──▶ progress bar over the chunks still listed on ID ──▶ 0: done
//!  rawfs chunkserver drain ID --cancel ──drain_chunkserver(ID, false)
//! ```
//!
//! Draining keeps full redundancy all along: a copy leaves the server only once the chunk
//! has all its copies (or shards) elsewhere. The healer does the moving, so a drain goes at
//! the healer's pace and needs one running (`rawfs up` starts two).

use crate::admin::ClusterArgs;
use indicatif::{ProgressBar, ProgressStyle};
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use rawfs_metadata_api::{ChunkserverStatus, MetaError};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `rawfs chunkserver`: the daemon's flags, or an operator subcommand.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ChunkserverCmd {
    #[command(subcommand)]
    pub admin: Option<ChunkserverAdmin>,
    #[command(flatten)]
    pub run: crate::config::ChunkserverArgs,
}

/// Operator subcommands of `rawfs chunkserver`.
#[derive(clap::Subcommand, Debug)]
pub enum ChunkserverAdmin {
    /// Move every chunk off a chunkserver (before removing it); it takes no new chunks.
    Drain(DrainArgs),
}

/// Flags of `rawfs chunkserver drain`.
#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    /// Id of the chunkserver to drain.
    #[arg(value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,
    /// Wait until no chunk is left on it, showing progress.
    #[arg(long, conflicts_with = "cancel")]
    pub wait: bool,
    /// Stop draining: the server takes new chunks again (what was moved stays moved).
    #[arg(long)]
    pub cancel: bool,
    /// With --wait: give up (exit 1) if the server is not empty after this long.
    #[arg(long, default_value = "24h")]
    pub timeout: crate::size::Dur,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// How often `--wait` looks at the cluster's status.
const POLL: Duration = Duration::from_secs(1);

/// Runs `rawfs chunkserver drain`. Exit 0 once set (or, with --wait, once the server is
/// empty), 1 on failure or timeout, 2 for wrong arguments.
pub fn run(admin: ChunkserverAdmin) -> ExitCode {
    let ChunkserverAdmin::Drain(a) = admin;
    let (addrs, rt) = match crate::admin::prepare("chunkserver drain", &a.cluster) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let client = MetadataClient::new(addrs, ClientTimeouts::default());
    match rt.block_on(drain(&client, &a)) {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rawfs chunkserver drain: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why a drain failed.
#[derive(Debug, thiserror::Error)]
enum DrainError {
    #[error("no chunkserver {0} is registered")]
    Unknown(u64),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("chunkserver {id} still holds {left} chunks after {waited:?}")]
    Timeout {
        id: u64,
        left: u64,
        waited: Duration,
    },
}

async fn drain(client: &MetadataClient, a: &DrainArgs) -> Result<String, DrainError> {
    match client.drain_chunkserver(a.id, !a.cancel).await {
        Err(MetaError::NotFound) => return Err(DrainError::Unknown(a.id)),
        r => r?,
    }
    if a.cancel {
        return Ok(format!("chunkserver {} is no longer draining", a.id));
    }
    if !a.wait {
        return Ok(format!(
            "chunkserver {} is draining; `rawfs status` shows its chunks leave",
            a.id
        ));
    }
    let started = Instant::now();
    let first = server(client, a.id).await?;
    let bar = ProgressBar::new(first.chunks.max(1));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} chunks moved, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let now = server(client, a.id).await?;
        let total = first.chunks.max(now.chunks);
        bar.set_length(total.max(1));
        bar.set_position(total - now.chunks);
        bar.set_message(format!("{} left", now.chunks));
        if now.chunks == 0 {
            bar.finish();
            return Ok(format!(
                "chunkserver {} is empty after {:.0?}; it can be stopped",
                a.id,
                started.elapsed()
            ));
        }
        if started.elapsed() >= a.timeout.0 {
            bar.abandon();
            return Err(DrainError::Timeout {
                id: a.id,
                left: now.chunks,
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Server `id` as the leader's status shows it.
async fn server(client: &MetadataClient, id: u64) -> Result<ChunkserverStatus, DrainError> {
    client
        .status()
        .await?
        .chunkservers
        .into_iter()
        .find(|s| s.id == id)
        .ok_or(DrainError::Unknown(id))
}
