//! [`WriterLease`]: this server's right to write one single-writer volume, from the metadata
//! leader (`volume_lease`), so that two NBD servers never both write it.
//!
//! ```text
//!  acquire ── volume_lease(ino, holder, TTL) ──▶ granted: valid until request start + TTL
//!                                            ├──▶ LeaseHeld by 0 (leader new in office): wait
//!                                            └──▶ LeaseHeld: the caller serves it read-only
//!  renewer, every TTL / 3 ── volume_lease(.., renew = still valid by our clock)
//!  writes ── check(): refused (EIO) once our clock says the lease ran out
//!  last connection gone ── end(): end_volume_lease
//! ```
//!
//! Validity is counted from when the request was sent, not answered, and our clock never
//! lets a write through past it, so the lease has ended here before the leader can give it
//! to anyone else. A lease lost while connected (the metadata service unreachable for a
//! whole TTL, or another server took it after that) is tried again at each renewal; writes
//! fail meanwhile rather than race another writer.

use crate::export::ExportError;
use rawfs_metadata_api::client::MetadataClient;
use rawfs_metadata_api::{Ino, MetaError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long each grant is asked for.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// A volume's writer lease held by this server (see the module docs).
pub struct WriterLease {
    ino: Ino,
    holder: u64,
    meta: MetadataClient,
    /// Until when writes are allowed (by this host's monotonic clock).
    valid_until: Mutex<Instant>,
    renewer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for WriterLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterLease")
            .field("ino", &self.ino)
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

/// Why a lease is not held.
#[derive(Debug, thiserror::Error)]
#[error("the writer lease of volume inode {ino} is not held: {source}")]
pub struct LeaseLost {
    ino: Ino,
    #[source]
    source: MetaError,
}

impl WriterLease {
    /// Asks for the writer lease of volume `ino` as `holder` and keeps renewing it. `Err`
    /// with `LeaseHeld` while another server writes the volume.
    pub async fn acquire(
        meta: MetadataClient,
        ino: Ino,
        holder: u64,
    ) -> Result<Arc<WriterLease>, MetaError> {
        // A leader fresh in office grants nothing new until a lease an earlier leader gave
        // has lapsed (holder 0): wait for that rather than open the volume read-only.
        let give_up = Instant::now() + LEASE_TTL + LEASE_TTL / 2;
        let (sent, granted) = loop {
            let sent = Instant::now();
            match meta
                .volume_lease(ino, holder, millis(LEASE_TTL), false)
                .await
            {
                Ok(ms) => break (sent, ms),
                Err(MetaError::LeaseHeld {
                    holder: 0,
                    remaining_ms,
                }) if sent < give_up => {
                    let wait = Duration::from_millis(remaining_ms.clamp(50, 1000));
                    tracing::debug!(
                        ino,
                        ?wait,
                        "new metadata leader: waiting to grant the writer lease"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        };
        let lease = Arc::new(WriterLease {
            ino,
            holder,
            meta,
            valid_until: Mutex::new(sent + Duration::from_millis(granted)),
            renewer: Mutex::new(None),
        });
        let weak = Arc::downgrade(&lease);
        let renewer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(LEASE_TTL / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(lease) = weak.upgrade() else { return };
                lease.renew().await;
            }
        });
        *lock(&lease.renewer) = Some(renewer);
        Ok(lease)
    }

    /// Whether a write may go through now.
    pub fn check(&self) -> Result<(), ExportError> {
        if Instant::now() < *lock(&self.valid_until) {
            return Ok(());
        }
        Err(ExportError::Io(Box::new(LeaseLost {
            ino: self.ino,
            source: MetaError::Unavailable {
                reason: "the lease ran out before it could be renewed".into(),
            },
        })))
    }

    async fn renew(&self) {
        let sent = Instant::now();
        let still_valid = sent < *lock(&self.valid_until);
        match self
            .meta
            .volume_lease(self.ino, self.holder, millis(LEASE_TTL), still_valid)
            .await
        {
            Ok(ms) => {
                if !still_valid {
                    tracing::warn!(ino = self.ino, "volume writer lease regained");
                }
                *lock(&self.valid_until) = sent + Duration::from_millis(ms);
            }
            Err(e) => {
                if still_valid {
                    tracing::warn!(ino = self.ino, error = %e, "volume writer lease not renewed; writes stop when it runs out");
                }
            }
        }
    }

    /// Stops renewing and gives the lease back (best effort: it lapses anyway).
    pub async fn end(&self) {
        if let Some(r) = lock(&self.renewer).take() {
            r.abort();
        }
        *lock(&self.valid_until) = Instant::now();
        if let Err(e) = self.meta.end_volume_lease(self.ino, self.holder).await {
            tracing::warn!(ino = self.ino, error = %e, "end_volume_lease failed; the lease lapses on its own");
        }
    }
}

impl Drop for WriterLease {
    fn drop(&mut self) {
        if let Some(r) = lock(&self.renewer).take() {
            r.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
