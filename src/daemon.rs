//! Running one daemon in the foreground: config → runtime → `serve` → wait for a signal.
//!
//! Exit status: 0 after a clean shutdown on SIGINT/SIGTERM, 1 when the daemon fails,
//! 2 when its configuration is wrong (nothing was started).

use crate::config::{self, ChunkserverArgs, MetadataArgs};
use std::future::Future;
use std::process::ExitCode;

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut int, mut term) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            // Without signal handlers the daemon could not stop cleanly; wait on Ctrl-C instead.
            tracing::warn!(error = %e, "cannot install signal handlers; only Ctrl-C stops this daemon");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, std::io::Error> {
    if std::env::var_os("RAWFS_EXP_CT").is_some() {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Runs `fut` on a fresh runtime and maps its outcome to an exit status.
fn run_daemon<E: std::fmt::Display>(
    role: &str,
    fut: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rawfs {role}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => {
            tracing::info!("{role} stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "{role} failed");
            eprintln!("rawfs {role}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `rawfs metadata`.
pub fn run_metadata(args: MetadataArgs) -> ExitCode {
    let cfg = match config::metadata_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rawfs metadata: {e}");
            return ExitCode::from(2);
        }
    };
    run_daemon("metadata", async move {
        let id = cfg.id;
        let handle = rawfs_metadata::serve(cfg, shutdown_signal()).await?;
        tracing::info!(id, addr = %handle.addr(), raft_addr = %handle.raft_addr(), "metadata replica serving");
        handle.join().await
    })
}

/// `rawfs chunkserver`.
pub fn run_chunkserver(args: ChunkserverArgs) -> ExitCode {
    let cfg = match config::chunkserver_config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rawfs chunkserver: {e}");
            return ExitCode::from(2);
        }
    };
    run_daemon("chunkserver", async move {
        let id = cfg.id;
        let handle = rawfs_chunkserver::serve(cfg, shutdown_signal()).await?;
        tracing::info!(
            id,
            data_addr = %handle.data_addr(),
            control_addr = %handle.control_addr(),
            "chunkserver serving"
        );
        handle.join().await
    })
}
