//! The local socket: hands clients on this host read-only descriptors of chunk files, so
//! that they read chunks without crossing the data port (see
//! [`rawfs_chunkserver_api::local`] for the protocol and what the client checks).
//!
//! The socket is `DATA_DIR/local.sock`, mode 0600: whoever may connect may read every chunk,
//! which is what the owner of the data directory may do anyway. Each connection starts with
//! a greeting carrying this process's random token, which the data port's LOCAL_SOCKET answer
//! also carries: a client compares them, so it never trusts a socket of another server (or
//! of a restarted one) by its path. A client watches one connection for its end to learn
//! that this process is gone.

use crate::storage::{Storage, StoreError};
use rawfs_chunkserver_api::local::{
    encode_greeting, parse_open, recv_with_fd, send_with_fd, OpenReply, OPEN_LEN, SOCKET_NAME,
};
use std::hash::{BuildHasher, Hasher};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Where this server's local socket is, as the data port tells clients.
#[derive(Debug)]
pub(crate) struct LocalSocket {
    pub token: u64,
    pub path: PathBuf,
}

impl LocalSocket {
    /// The LOCAL_SOCKET answer: token, then path.
    pub fn answer(&self) -> bytes::Bytes {
        let mut b = self.token.to_be_bytes().to_vec();
        b.extend_from_slice(self.path.to_string_lossy().as_bytes());
        b.into()
    }
}

/// Binds `data_dir/local.sock` (replacing one left by an earlier process). A failure only
/// costs local reads, so it is logged and `None` returned.
pub(crate) fn bind(data_dir: &Path) -> Option<(UnixListener, LocalSocket)> {
    let path = std::fs::canonicalize(data_dir).ok()?.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let bound = UnixListener::bind(&path).and_then(|l| {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(l)
    });
    match bound {
        Ok(listener) => {
            // Not a secret (the socket's mode guards it): only a name no other process has.
            let token = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            Some((listener, LocalSocket { token, path }))
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no local socket; clients on this host read through the data port");
            None
        }
    }
}

/// Serves the local socket until `stop` is cancelled.
pub(crate) async fn run(
    listener: UnixListener,
    token: u64,
    storage: Arc<Storage>,
    stop: CancellationToken,
) {
    let mut conns = crate::accept::until_stopped(
        "local socket",
        &stop,
        || async { listener.accept().await.map(|(stream, _)| stream) },
        |stream| serve_conn(stream, token, storage.clone(), stop.clone()),
    )
    .await;
    // Every connection closed before this returns: clients see the end of a server that
    // stopped, as they see a killed one's.
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn serve_conn(
    stream: UnixStream,
    token: u64,
    storage: Arc<Storage>,
    stop: CancellationToken,
) {
    if let Err(e) = send_with_fd(&stream, &encode_greeting(token), None).await {
        tracing::debug!(error = %e, "local client left before the greeting");
        return;
    }
    loop {
        let mut request = [0u8; OPEN_LEN];
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            r = recv_with_fd(&stream, &mut request) => r,
        };
        match received {
            Ok(None) => {}
            Ok(Some(_)) => {
                tracing::warn!("local client sent a descriptor; closing its connection");
                return;
            }
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    tracing::debug!(error = %e, "local connection failed");
                }
                return;
            }
        }
        let Some((chunk, version)) = parse_open(&request) else {
            tracing::warn!("malformed local request; closing its connection");
            let _ = send_with_fd(&stream, &OpenReply::Failed.encode(), None).await;
            return;
        };
        let storage = storage.clone();
        let opened = tokio::task::spawn_blocking(move || storage.open_read_only(chunk, version))
            .await
            .unwrap_or_else(|e| {
                Err(StoreError::Disk {
                    reason: e.to_string(),
                })
            });
        let sent = match &opened {
            Ok(file) => send_with_fd(&stream, &OpenReply::Ok.encode(), Some(file.as_fd())).await,
            Err(e) => {
                let reply = match e {
                    StoreError::StaleVersion { current } => {
                        OpenReply::StaleVersion { current: *current }
                    }
                    StoreError::NotFound => OpenReply::NotFound,
                    _ => OpenReply::Failed,
                };
                send_with_fd(&stream, &reply.encode(), None).await
            }
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "local client left before its answer");
            return;
        }
    }
}
