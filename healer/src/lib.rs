//! rawfs-healer: the elected daemon that keeps every chunk at full redundancy.
//!
//! ```text
//!  metadata (chunk states) ──▶ planner (most endangered first) ──▶ workers: re-replicate,
//!                                                                  reconstruct shards, scrub,
//!                                                                  convert quiet files to RS 4+2
//! ```
//!
//! Not built yet: it arrives with issue 6. Until then chunks left under-replicated by a failed
//! chunkserver stay so (and `rawfs status` says so), and `rawfs healer` exits with an error
//! instead of pretending to heal.
