//! rawfs-nbd: the NBD server that exports rawfs volumes as block devices.
//!
//! ```text
//!  nbd-client / qemu / nbdcopy ──NBD (newstyle fixed)──▶ rawfs nbd ──▶ rawfs-client ──▶ chunkservers
//! ```
//!
//! Not built yet: volumes and the NBD server arrive with issue 4 ("Block volumes over NBD").
//! The server will be our own, on tokio: tokio-nbd 0.3 is GPL-2.0-or-later, lacks structured
//! replies and panics on options it does not know; nbd 0.3 is blocking and lacks FUA,
//! WRITE_ZEROES, structured replies and multi-conn. Until then `rawfs nbd` exits with an error
//! instead of pretending to serve.
