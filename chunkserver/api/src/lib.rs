//! The wire contract of a rawfs chunkserver.
//!
//! Bulk data moves over a framed binary protocol on plain TCP connections ([`frame`], byte
//! layout documented there), spoken by [`DataClient`]; control calls (status, inventory, scrub
//! rate and progress) use tarpc ([`ChunkserverControl`]).
//!
//! ```text
//!  DataClient ──WRITE(chunk, version, term, offset, bytes, crc)──▶ chunkserver ──▶ chunk file
//!  (pool per   ◀──── OK / STALE_VERSION / STALE_TERM / CORRUPT / NO_SPACE ───┘
//!   address)  ──READ / SYNC / PING──▶  ◀── data (block-verified) + crc
//! ```
//!
//! A client on the same host as a chunkserver reads its chunk files directly ([`local`]),
//! through descriptors the chunkserver passes over a unix socket; the file format it then
//! reads is [`layout`].
//!
//! Every request carries `(chunk, version)`, and a WRITE also the metadata leader's term: a
//! chunkserver refuses a version older than the one it stores and a write whose term is older
//! than the highest it has seen, so a client with a stale chunk map or a deposed metadata
//! leader cannot change data. Reads and syncs change nothing, so only their version is checked.

pub mod aligned;
pub mod client;
pub mod control;
pub mod frame;
pub mod layout;
pub mod local;
mod mapped;
pub mod vector;
pub mod written;

pub use client::{DataClient, DataError, EncodedWrite, WriteReq, MAX_CONNS_PER_ADDR};
pub use control::{
    connect_control, deadline, ChunkserverControl, ChunkserverControlClient, ControlError,
    ControlStatus, ScrubStatus, CONTROL_MAX_FRAME,
};
pub use frame::{FrameError, MAX_PAYLOAD};
pub use vector::{Piece, MAX_PIECES};

/// Largest chunk a chunkserver stores: 64 MiB (as `rawfs_metadata_api::CHUNK_SIZE`).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
/// Size of a checksummed block: 64 KiB.
pub const BLOCK_SIZE: u32 = 64 << 10;
