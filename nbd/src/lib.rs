//! rawfs-nbd: the NBD server that exports rawfs volumes as block devices, so that
//! `nbd-client`, QEMU (`nbd://host/volume`) and the libnbd tools attach them with no rawfs
//! code on the client.
//!
//! ```text
//!  nbdcopy / qemu / nbdfuse ──NBD (fixed newstyle)──▶ server: one task per connection
//!                                                      │  negotiate → transmit (concurrent requests)
//!                                                      ▼
//!                                   Catalog (by export name) ──▶ Export (shared per volume)
//!                                                                  │ VolumeExport
//!                                                                  ▼
//!                              rawfs-client FileIo ──▶ metadata service + chunkservers
//! ```
//!
//! The protocol is our own, on tokio: tokio-nbd 0.3 is GPL-2.0-or-later, lacks structured
//! replies and panics on options it does not know; nbd 0.3 is blocking and lacks FUA,
//! WRITE_ZEROES, structured replies and multi-conn. What is implemented (the NBD project's
//! `doc/proto.md`): fixed newstyle negotiation with `NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`,
//! `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT`
//! (`base:allocation`); block size constraints (1 / 64 KiB / 32 MiB); READ, WRITE, FLUSH, FUA,
//! TRIM, WRITE_ZEROES (with `NO_HOLE` and `FAST_ZERO`), CACHE, BLOCK_STATUS, DISC;
//! read-only exports; multi-conn. Not implemented: TLS, extended headers, resize.
//!
//! The protocol sits behind two small traits so it can be tested without a cluster:
//! [`Export`] (one block device) and [`Catalog`] (exports by name); [`mem`] has in-memory
//! ones. A rawfs volume ([`volumes`]) is a sparse file in the namespace directory
//! `/.rawfs-volumes/`; [`VolumeCatalog`] serves every volume as an export of the same name
//! through a [`VolumeExport`], and [`serve_volumes`] is the `rawfs nbd` daemon.

mod catalog;
mod export;
mod handshake;
pub mod lease;
pub mod mem;
mod payload;
pub mod proto;
mod server;
mod transmission;
mod view;
pub mod volume;
pub mod volumes;

pub use catalog::{serve_volumes, NbdConfig, NbdHandle, VolumeCatalog, FLUSH_EVERY};
pub use export::{Catalog, Export, ExportError, ExportInfo, Extent};
pub use server::{serve, ServeError, ServerConfig, ServerHandle, DEFAULT_LISTEN};
pub use transmission::{IN_FLIGHT_BYTES, MAX_IN_FLIGHT};
pub use volume::VolumeExport;
pub use volumes::{
    CreateOptions, Origin, VolumeError, VolumeInfo, Volumes, MULTI_CONN_XATTR, VOLUMES_DIR,
};
