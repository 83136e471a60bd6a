//! The wire contract of the rawfs metadata service: types, errors, the tarpc service, and a
//! client that finds the leader and follows `NotLeader` redirects.
//!
//! ```text
//!  mount / nbd / healer / chunkserver
//!        |  MetadataClient (deadlines, redirects, retries)
//!        v
//!  MetadataRpc over tarpc (MessagePack frames on TCP)
//!        v
//!  rawfs metadata (leader) -- replicated log --> followers
//! ```
//!
//! Clients link only this crate, never the server.

pub mod client;
mod error;
mod service;
mod types;

pub use client::{ClientTimeouts, MetadataClient};
pub use error::MetaError;
pub use service::*;
pub use types::*;
