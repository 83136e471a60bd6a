//! rawfs-healer: the elected daemon that keeps every chunk at full redundancy.
//!
//! ```text
//!  metadata (chunk states) ──▶ planner (most endangered first) ──▶ workers: re-replicate,
//!                                                                  reconstruct shards, scrub,
//!                                                                  convert quiet files to RS 4+2
//! ```
//!
//! Built so far: the repair [`planner`] (which chunks to copy where, most endangered first),
//! the [`daemon`] that runs it under the metadata service's healer lease, the
//! re-replication of replicated chunks ([`copy`]: checksummed reads from a live replica,
//! committed fenced by term and chunk version, verified after the fence), and [`tiering`]
//! (after each repair pass, the chunks of `cold` files and of `auto` files quiet for
//! `cold_after` become RS 4+2 through the client library's crash-safe conversion). Not yet
//! (issue 6): EC reconstruction, scrub, throttling, inventory comparison (orphaned and stale
//! copies), persisted progress, drain, and the status views.

pub mod copy;
pub mod daemon;
pub mod planner;
pub mod tiering;

pub use daemon::{run, HealerConfig, HealerError};
