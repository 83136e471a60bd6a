//! rawfs-healer: the elected daemon that keeps every chunk at full redundancy.
//!
//! ```text
//!  metadata (chunk states) ──▶ planner (most endangered first) ──▶ workers: re-replicate,
//!                                                                  reconstruct shards, scrub,
//!                                                                  convert quiet files to RS 4+2
//! ```
//!
//! Built so far: the repair [`planner`] (which chunks to copy where, most endangered first),
//! a core without I/O. Not yet: the daemon that runs it (the lease, the copies, the commits),
//! which arrives with issue 6. Until then chunks left under-replicated by a failed
//! chunkserver stay so (and `rawfs status` says so), and `rawfs healer` exits with an error
//! instead of pretending to heal.

pub mod planner;
