//! [`VolumeCatalog`]: every rawfs volume as an NBD export of the same name, and
//! [`serve_volumes`], the `rawfs nbd` daemon.
//!
//! ```text
//!  GO "vm1" ─▶ lookup /.rawfs-volumes/vm1 ─▶ open entry for its inode? ─yes─▶ share it
//!                                                  │ no
//!                                                  ▼
//!                         metadata open(ino, session) + FileIo + flusher task
//!  connection ends ─▶ flush its buffered writes ─▶ last one: release(ino, session)
//!  shutdown ─▶ flush every volume, end_session
//! ```
//!
//! One [`VolumeExport`] per volume inode while any connection uses it, so every connection
//! of this server sees the same buffered data and a flush on one covers all (multi-conn).
//!
//! Writers: a volume whose multi-conn setting is on ([`crate::volumes::MULTI_CONN_XATTR`],
//! `rawfs volume create --multi-conn`) takes any number of writing connections and is
//! advertised with `NBD_FLAG_CAN_MULTI_CONN`. Otherwise one connection writes at a time: a
//! connection that opens the volume while another writes it gets a read-only view (flagged
//! `NBD_FLAG_READ_ONLY`, writes refused with `EPERM`), so two VMs never both write one
//! disk by mistake. The same holds across NBD servers: the server that opens a single-writer
//! volume for writing holds its writer lease from the metadata leader ([`WriterLease`]) while
//! any connection uses it, and another server then opens it read-only. Snapshots are
//! read-only for everyone.
//! The metadata open keeps a volume deleted while in use alive until its last client
//! leaves. A flusher sends buffered writes to the chunkservers every [`FLUSH_EVERY`], so
//! data a client never flushed reaches the replicas within seconds, as with a kernel's
//! writeback.

use crate::export::{Catalog, Export, ExportError, ExportInfo};
use crate::lease::WriterLease;
use crate::server::{serve, ServeError, ServerConfig, ServerHandle};
use crate::view::ReadOnlyView;
use crate::volume::VolumeExport;
use crate::volumes::{VolumeError, VolumeInfo, Volumes};
use futures::future::BoxFuture;
use futures::FutureExt;
use rawfs_client::{Client, ClientConfig};
use rawfs_metadata_api::{Ino, MetaError};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// How often buffered writes of an open volume are sent to the chunkservers.
pub const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// One volume in use.
struct Entry {
    export: Arc<VolumeExport>,
    conns: usize,
    /// Connections that got `export` itself and may write (0 or 1 unless multi-conn).
    writers: usize,
    /// Read-only views handed to other connections while a single writer holds it, by
    /// address (see [`ptr_of`]).
    views: Vec<usize>,
    flusher: tokio::task::JoinHandle<()>,
}

/// An export's address, to recognise it when its connection closes (a raw pointer would
/// make the futures holding it not `Send`).
fn ptr_of<T: ?Sized>(export: &Arc<T>) -> usize {
    Arc::as_ptr(export) as *const () as usize
}

/// How a volume may be opened, from its file.
#[derive(Clone, Copy, Debug)]
struct Access {
    /// A read-only snapshot.
    snapshot: bool,
    /// Several writers allowed.
    multi_conn: bool,
}

/// Serves the volumes of one cluster.
pub struct VolumeCatalog {
    client: Client,
    volumes: Volumes,
    /// This server's metadata session: its opens keep deleted volumes alive while in use.
    session: u64,
    open: Mutex<HashMap<Ino, Entry>>,
}

impl std::fmt::Debug for VolumeCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeCatalog")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

fn volume_error(e: VolumeError) -> ExportError {
    ExportError::Io(Box::new(e))
}

impl VolumeCatalog {
    /// A catalog over `client`'s cluster.
    pub fn new(client: Client) -> VolumeCatalog {
        let session = loop {
            let s: u64 = rand::random();
            if s != 0 {
                break s;
            }
        };
        VolumeCatalog {
            volumes: Volumes::new(client.meta().clone()),
            client,
            session,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Volumes with connected clients: (name, connections).
    pub async fn in_use(&self) -> Vec<(String, usize)> {
        let open = self.open.lock().await;
        let mut v: Vec<(String, usize)> = open
            .values()
            .map(|e| (e.export.name().to_string(), e.conns))
            .collect();
        v.sort();
        v
    }

    /// What a connection opening `v` now would get: read-only for a snapshot, and for a
    /// single-writer volume that another connection of this server, or another server,
    /// writes.
    async fn describe(&self, v: &VolumeInfo, access: Access) -> ExportInfo {
        let local = self
            .open
            .lock()
            .await
            .get(&v.ino)
            .map(|e| e.writers > 0 || e.export.read_only());
        let taken = !access.multi_conn
            && !access.snapshot
            && match local {
                Some(taken) => taken,
                None => self.written_elsewhere(v.ino).await,
            };
        let read_only = access.snapshot || taken;
        let what = if access.snapshot {
            "snapshot"
        } else if taken {
            "volume (read-only: another client writes it)"
        } else {
            "volume"
        };
        ExportInfo {
            name: v.name.clone(),
            size: v.size,
            read_only,
            multi_conn: access.snapshot || (access.multi_conn && !taken),
            description: format!("rawfs {what} {}", v.name),
        }
    }

    /// Whether another NBD server holds the writer lease of `ino` (asked without taking it;
    /// a metadata leader new in office, or one out of reach, counts as no).
    async fn written_elsewhere(&self, ino: Ino) -> bool {
        matches!(
            self.client.meta().volume_lease(ino, self.session, 0, false).await,
            Err(MetaError::LeaseHeld { holder, .. }) if holder != 0
        )
    }

    /// How volume inode `ino` may be opened.
    async fn access(&self, ino: Ino) -> Result<Access, ExportError> {
        let origin = self.volumes.origin(ino).await.map_err(volume_error)?;
        let snapshot = origin.is_some_and(|o| o.read_only);
        let multi_conn = !snapshot && self.volumes.multi_conn(ino).await.map_err(volume_error)?;
        Ok(Access {
            snapshot,
            multi_conn,
        })
    }

    /// Looks a volume up by export name; names that cannot be volumes are simply unknown.
    async fn find(&self, name: &str) -> Result<Option<(VolumeInfo, Access)>, ExportError> {
        if crate::volumes::check_name(name).is_err() {
            return Ok(None);
        }
        let Some(v) = self.volumes.find(name).await.map_err(volume_error)? else {
            return Ok(None);
        };
        let access = self.access(v.ino).await?;
        Ok(Some((v, access)))
    }

    async fn acquire(&self, v: VolumeInfo, access: Access) -> Result<Arc<dyn Export>, ExportError> {
        let mut open = self.open.lock().await;
        if let Some(e) = open.get_mut(&v.ino) {
            e.conns += 1;
            e.export.grow_to(v.size);
            if access.snapshot || e.export.multi_conn() || e.writers == 0 {
                e.writers += usize::from(!e.export.read_only());
                return Ok(e.export.clone());
            }
            let view: Arc<dyn Export> = Arc::new(ReadOnlyView::new(e.export.clone()));
            e.views.push(ptr_of(&view));
            tracing::info!(volume = %v.name, "volume has a writer; this connection reads only");
            return Ok(view);
        }
        let meta = self.client.meta();
        let attr = meta
            .open(v.ino, self.session)
            .await
            .map_err(|e| ExportError::Io(Box::new(e)))?;
        let io = self.client.file(v.ino, attr.size);
        let mut export = VolumeExport::new(v.name.clone(), v.ino, io, meta.clone());
        if access.snapshot {
            export = export.into_read_only();
        } else if !access.multi_conn {
            export = export.single_writer();
            // One writer across NBD servers too: the cluster-wide writer lease.
            match WriterLease::acquire(meta.clone(), v.ino, self.session).await {
                Ok(lease) => export = export.with_lease(lease),
                Err(MetaError::LeaseHeld { holder, .. }) => {
                    tracing::info!(volume = %v.name, holder, "volume is written through another NBD server; this connection reads only");
                    export = export.into_read_only();
                }
                Err(e) => {
                    if let Err(err) = meta.release(v.ino, self.session).await {
                        tracing::warn!(volume = %v.name, error = %err, "metadata release failed; the open stays until the session ends");
                    }
                    return Err(ExportError::Io(Box::new(e)));
                }
            }
        }
        let writers = usize::from(!export.read_only());
        let export = Arc::new(export);
        let weak = Arc::downgrade(&export);
        let flusher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(export) = weak.upgrade() else { return };
                if let Err(e) = export.flush_buffers().await {
                    tracing::warn!(volume = export.name(), error = %e, "background flush failed; will retry");
                }
            }
        });
        open.insert(
            v.ino,
            Entry {
                export: export.clone(),
                conns: 1,
                writers,
                views: Vec::new(),
                flusher,
            },
        );
        tracing::info!(volume = %v.name, ino = v.ino, size = attr.size, "volume opened");
        Ok(export)
    }

    async fn release(&self, export: Arc<dyn Export>) {
        let ptr = ptr_of(&export);
        let found = {
            let mut open = self.open.lock().await;
            open.values_mut().find_map(|e| {
                if ptr_of(&e.export) == ptr {
                    e.writers = e.writers.saturating_sub(usize::from(!e.export.read_only()));
                    Some(e.export.clone())
                } else if let Some(i) = e.views.iter().position(|&p| p == ptr) {
                    e.views.swap_remove(i);
                    Some(e.export.clone())
                } else {
                    None
                }
            })
        };
        let Some(vol) = found else {
            tracing::error!("closing a connection to a volume that is not open");
            return;
        };
        // The connection's acknowledged writes leave the buffer before it counts as gone.
        let flushed = vol.flush_buffers().await;
        if let Err(e) = &flushed {
            tracing::warn!(volume = vol.name(), error = %e, "flush after a disconnect failed; the flusher retries");
        }
        let mut open = self.open.lock().await;
        let Some(e) = open.get_mut(&vol.ino()) else {
            return;
        };
        e.conns = e.conns.saturating_sub(1);
        // A volume whose buffer could not be flushed stays open (unused) so the data is
        // not dropped; the flusher keeps trying and a new connection picks it up.
        if e.conns > 0 || flushed.is_err() {
            return;
        }
        if let Some(e) = open.remove(&vol.ino()) {
            e.flusher.abort();
            if let Some(lease) = e.export.lease() {
                lease.end().await;
            }
            if let Err(err) = self.client.meta().release(vol.ino(), self.session).await {
                tracing::warn!(volume = vol.name(), error = %err, "metadata release failed; the open stays until the session ends");
            }
            tracing::info!(volume = vol.name(), "volume closed");
        }
    }

    /// Flushes every open volume and ends this server's metadata session (after the server
    /// has stopped).
    pub async fn shutdown(&self) {
        let entries: Vec<Entry> = self.open.lock().await.drain().map(|(_, e)| e).collect();
        for e in entries {
            e.flusher.abort();
            if let Err(err) = e.export.flush_buffers().await {
                tracing::error!(volume = e.export.name(), error = %err, "buffered writes lost at shutdown");
            }
            if let Some(lease) = e.export.lease() {
                lease.end().await;
            }
        }
        if let Err(e) = self.client.meta().end_session(self.session).await {
            tracing::warn!(error = %e, "end_session failed; this server's opens stay recorded");
        }
    }
}

impl Catalog for VolumeCatalog {
    fn list(&self) -> BoxFuture<'_, Result<Vec<ExportInfo>, ExportError>> {
        async move {
            let all = self.volumes.names().await.map_err(volume_error)?;
            let mut out = Vec::with_capacity(all.len());
            for v in &all {
                let access = self.access(v.ino).await?;
                out.push(self.describe(v, access).await);
            }
            Ok(out)
        }
        .boxed()
    }

    fn info<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<ExportInfo>, ExportError>> {
        async move {
            Ok(match self.find(name).await? {
                Some((v, access)) => Some(self.describe(&v, access).await),
                None => None,
            })
        }
        .boxed()
    }

    fn open<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Export>>, ExportError>> {
        async move {
            let Some((v, access)) = self.find(name).await? else {
                return Ok(None);
            };
            Ok(Some(self.acquire(v, access).await?))
        }
        .boxed()
    }

    fn close<'a>(&'a self, _name: &'a str, export: Arc<dyn Export>) -> BoxFuture<'a, ()> {
        self.release(export).boxed()
    }
}

/// Configuration of `rawfs nbd`.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// Metadata client addresses of the cluster.
    pub metadata: Vec<String>,
    /// How the server listens ([`crate::DEFAULT_LISTEN`] by default).
    pub server: ServerConfig,
}

/// A running `rawfs nbd`.
#[derive(Debug)]
pub struct NbdHandle {
    server: ServerHandle,
    catalog: Arc<VolumeCatalog>,
}

impl NbdHandle {
    /// Where the server listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.server.addr()
    }

    /// The catalog (volumes in use).
    pub fn catalog(&self) -> &Arc<VolumeCatalog> {
        &self.catalog
    }

    /// Waits for the server to stop, then flushes the volumes and ends the session.
    pub async fn join(self) {
        self.server.join().await;
        self.catalog.shutdown().await;
    }
}

/// Serves every volume of the cluster at `cfg.metadata` until `shutdown` resolves.
pub async fn serve_volumes(
    cfg: NbdConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<NbdHandle, ServeError> {
    let client = Client::new(ClientConfig::new(cfg.metadata.clone()));
    let catalog = Arc::new(VolumeCatalog::new(client));
    let server = serve(cfg.server, catalog.clone(), shutdown).await?;
    Ok(NbdHandle { server, catalog })
}
