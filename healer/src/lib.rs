//! rawfs-healer: the elected daemon that keeps every chunk at full redundancy.
//!
//! ```text
//!  metadata (chunk states) ──▶ planner (most endangered first) ──▶ workers: re-replicate,
//!                                                                  reconstruct shards, scrub,
//!                                                                  convert quiet files to RS 4+2
//! ```
//!
//! The pieces: the repair [`planner`] (which chunks to copy or rebuild where, most
//! endangered first: an RS 4+2 chunk with 4 live shards ranks with a replicated chunk with one
//! copy left), the [`daemon`] that runs it under the metadata service's healer lease, the
//! [`workers`] that run several repairs at once in that order (one at a time per chunk), the
//! re-replication of replicated chunks ([`copy`]: checksummed reads from a live replica,
//! committed fenced by term and chunk version, verified after the fence), the rebuild of
//! lost RS 4+2 shards ([`reconstruct`]: any 4 healthy shards read with their checksums
//! verified, the missing ones decoded with the client's codec and stripe layout, written to
//! servers holding no shard of the chunk, read back and compared, then committed with
//! `replace_shard`, fenced by term and version), the repair throttle and progress report
//! ([`pace`]: one token bucket for all workers, its rate from `rawfs healer set
//! --repair-rate` or `--repair-rate`; the report feeds `rawfs status` and `rawfs healer
//! status`), and [`tiering`] (after each repair pass, the chunks of `cold` files and of
//! `auto` files quiet for `cold_after` become RS 4+2 through the client library's crash-safe
//! conversion).
//!
//! Elsewhere, by design: the scrub runs on each chunkserver (it reads its own disk; the
//! healer repairs what it reports, through the metadata service's chunk map), stale and
//! orphaned copies are found by the metadata service from chunkserver inventories and
//! deleted through heartbeat replies, and a draining server's copies are listed as missing
//! by the metadata service, so the healer moves them like any other repair.
//!
//! Progress lives in the chunk map: every repair is committed as it completes, so a healer
//! that restarts (or a standby that takes over) lists only what is still endangered and
//! does not start over; chunks already converted to RS 4+2 are no longer listed as cold.

pub mod copy;
pub mod daemon;
pub mod pace;
pub mod planner;
pub mod reconstruct;
pub mod tiering;
pub mod workers;

pub use daemon::{run, HealerConfig, HealerError, DEFAULT_REPAIR_RATE, DEFAULT_WORKERS};
