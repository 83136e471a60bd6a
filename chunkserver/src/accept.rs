//! The accept loop shared by the chunkserver's listeners (the data port and the local
//! socket): each connection becomes a task; an accept error (typically EMFILE) backs off
//! briefly instead of spinning; finished tasks are reaped as they end.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts with `accept` until `stop` is cancelled, running `serve(conn)` as a task for each
/// connection. Returns the tasks still running, for the caller's own shutdown policy.
pub(crate) async fn until_stopped<C, A, S>(
    what: &str,
    stop: &CancellationToken,
    mut accept: impl FnMut() -> A,
    mut serve: impl FnMut(C) -> S,
) -> JoinSet<()>
where
    A: Future<Output = io::Result<C>>,
    S: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = accept() => match accepted {
                Ok(conn) => {
                    conns.spawn(serve(conn));
                }
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(listener = what, error = %e, "connection task failed");
                }
            }
        }
    }
    conns
}
