//! rawfs-healer: the elected daemon that keeps every chunk at full redundancy.
//!
//! ```text
//!  metadata (chunk states) ──▶ planner (most endangered first) ──▶ workers: re-replicate,
//!                                                                  reconstruct shards, scrub,
//!                                                                  convert quiet files to RS 4+2
//! ```
//!
//! Built so far: the repair [`planner`] (which chunks to copy or rebuild where, most
//! endangered first: an RS 4+2 chunk with 4 live shards ranks with a replicated chunk with one
//! copy left), the [`daemon`] that runs it under the metadata service's healer lease, the
//! re-replication of replicated chunks ([`copy`]: checksummed reads from a live replica,
//! committed fenced by term and chunk version, verified after the fence), the rebuild of
//! lost RS 4+2 shards ([`reconstruct`]: any 4 healthy shards read with their checksums
//! verified, the missing ones decoded with the client's codec and stripe layout, written to
//! servers holding no shard of the chunk, read back and compared, then committed with
//! `replace_shard`, fenced by term and version), and [`tiering`] (after each repair pass, the
//! chunks of `cold` files and of `auto` files quiet for `cold_after` become RS 4+2 through
//! the client library's crash-safe conversion). Not yet (issue 6): scrub, throttling,
//! inventory comparison (orphaned and stale copies), persisted progress, drain, and the
//! status views.

pub mod copy;
pub mod daemon;
pub mod planner;
pub mod reconstruct;
pub mod tiering;

pub use daemon::{run, HealerConfig, HealerError, DEFAULT_REPAIR_RATE, DEFAULT_WORKERS};
