//! The wire contract of the rawfs metadata service: types, errors, the tarpc service, and a
//! client that finds the leader, follows `NotLeader` redirects and retries mutations
//! idempotently (each carries a [`ReqId`]).
//!
//! ```text
//!  mount / nbd / healer / chunkserver
//!        |  MetadataClient (deadlines, redirects, retries with the same ReqId)
//!        v
//!  MetadataRpc over tarpc (MessagePack frames on TCP)
//!        v
//!  rawfs metadata (leader) -- replicated log --> followers
//!        (writes, linearizable reads)            (Consistency::Local reads)
//! ```
//!
//! Clients link only this crate, never the server.

pub mod client;
mod error;
mod events;
mod healer;
mod locks;
mod service;
mod types;

pub use client::{ClientTimeouts, MetadataClient};
pub use error::MetaError;
pub use events::*;
pub use healer::*;
pub use locks::*;
pub use service::*;
pub use types::*;
