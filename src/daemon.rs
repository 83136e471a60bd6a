//! Running one daemon in the foreground: config → runtime → `serve` → wait for a signal.
//!
//! Exit status: 0 after a clean shutdown on SIGINT/SIGTERM, 1 when the daemon fails,
//! 2 when its configuration is wrong (nothing was started).

use crate::config::{self, ChunkserverArgs, MetadataArgs};
use rawfs_metadata::MetadataError;
use std::future::Future;
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

/// Which tokio runtime a daemon runs on.
#[derive(Clone, Copy)]
enum Threads {
    /// One thread for everything. The metadata service's work is a chain of short steps
    /// (request, log append, apply, reply) that cannot run in parallel anyway; on one thread
    /// each hand-off is a task switch, where across threads it is a wake-up of another CPU,
    /// which costs tens of microseconds on a virtual machine (measured ~40 µs here).
    One,
    /// A worker per core: the chunkserver checksums and moves bulk data in parallel.
    PerCore,
}

fn runtime(threads: Threads) -> Result<tokio::runtime::Runtime, std::io::Error> {
    match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
}

/// Runs `fut` on a fresh runtime and maps its outcome to an exit status.
fn run_daemon<E: std::fmt::Display>(
    role: &str,
    threads: Threads,
    fut: impl Future<Output = Result<(), E>>,
) -> ExitCode {
    let rt = match runtime(threads) {
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
            report_failure(role, &e);
            ExitCode::FAILURE
        }
    }
}

/// Logs that the daemon `role` failed with `e` and says so on stderr, which for a daemon
/// under `rawfs up` is its log file: written with `writeln!`, not `eprintln!`, so that a log
/// on a full disk does not turn a clean failure into a panic.
pub(crate) fn report_failure(role: &str, e: &dyn std::fmt::Display) {
    tracing::error!(error = %e, "{role} failed");
    let _ = writeln!(std::io::stderr(), "rawfs {role}: {e}");
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
    run_daemon("metadata", Threads::One, serve_metadata(cfg))
}

/// Pause before a metadata replica that stopped on a storage error is started again.
const METADATA_RESTART_AFTER: Duration = Duration::from_secs(5);

/// Serves a metadata replica until SIGINT/SIGTERM. A replica whose storage failed (a full
/// or failing disk stops a replicated log for good) is started again from its files, as a
/// restart of the process would, every [`METADATA_RESTART_AFTER`] until it runs: the
/// cluster comes back by itself once the disk has room again, and the process never lingers
/// as a replica that answers nothing.
async fn serve_metadata(mut cfg: rawfs_metadata::MetadataConfig) -> Result<(), MetadataError> {
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            shutdown_signal().await;
            stop.cancel();
        }
    });
    let id = cfg.id;
    let mut restarting = false;
    loop {
        match rawfs_metadata::serve(cfg.clone(), stop.clone().cancelled_owned()).await {
            Ok(handle) => {
                tracing::info!(id, addr = %handle.addr(), raft_addr = %handle.raft_addr(), "metadata replica serving");
                // A restart binds the same ports, which peers and clients know.
                cfg.listen = handle.addr();
                cfg.raft_listen = handle.raft_addr();
                match handle.join().await {
                    Err(e @ MetadataError::ReplicaFailed { .. }) if !stop.is_cancelled() => {
                        tracing::error!(error = %e, "metadata replica failed; starting it again in {METADATA_RESTART_AFTER:?}");
                    }
                    done => return done,
                }
            }
            Err(e) if restarting => {
                tracing::error!(error = %e, "metadata replica cannot start yet; trying again in {METADATA_RESTART_AFTER:?}");
            }
            Err(e) => return Err(e),
        }
        restarting = true;
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(METADATA_RESTART_AFTER) => {}
        }
    }
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
    run_daemon("chunkserver", Threads::PerCore, async move {
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

/// Flags of the `rawfs healer` daemon (flattened into `healer_cmd::HealerCmd`, which also
/// has the `set` and `status` subcommands).
#[derive(clap::Args, Debug)]
pub struct HealerArgs {
    /// Metadata client addresses, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub metadata: Vec<String>,
    /// This healer's id, distinct per instance (the lease holder).
    #[arg(long, default_value_t = 1)]
    pub id: u64,
    /// Time between scans for chunks short of copies.
    #[arg(long, default_value = "10s")]
    pub scan_interval: crate::size::Dur,
    /// Length of the healer lease (at most 10s); a standby takes over this long after the
    /// active healer dies.
    #[arg(long, default_value = "6s")]
    pub lease_ttl: crate::size::Dur,
    /// Quiet time (no change to a file's data) after which the chunks of an `auto` file are
    /// converted to RS 4+2, e.g. `30s`, `5m`, `24h`, `0` (at once). `cold` files are
    /// converted whatever this says, `hot` ones never.
    #[arg(long, default_value = "24h")]
    pub cold_after: crate::size::Dur,
    /// Bytes per second repairs move at most (e.g. `64M`; 0 = unlimited), while the cluster
    /// setting (`rawfs healer set --repair-rate`) is unset.
    #[arg(long, default_value = "64M")]
    pub repair_rate: crate::size::ByteSize,
    /// Repairs run at once.
    #[arg(long, default_value_t = rawfs_healer::DEFAULT_WORKERS as u64, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub workers: u64,
}

/// `rawfs healer`.
pub fn run_healer(args: HealerArgs) -> ExitCode {
    let cfg = rawfs_healer::HealerConfig {
        metadata: args.metadata,
        id: args.id,
        scan_interval: args.scan_interval.0,
        lease_ttl: args.lease_ttl.0,
        cold_after: args.cold_after.0,
        repair_rate: args.repair_rate.0,
        workers: args.workers as usize,
    };
    run_daemon("healer", Threads::PerCore, async move {
        let stop = tokio_util::sync::CancellationToken::new();
        let trigger = stop.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            trigger.cancel();
        });
        rawfs_healer::run(cfg, stop).await
    })
}
