//! `rawfs nbd`: the NBD server for block volumes, in the foreground until SIGINT/SIGTERM.
//!
//! ```text
//!  --metadata ADDRS | --dir DIR | $RAWFS_METADATA ─▶ rawfs_nbd::serve_volumes
//!      listens on --listen (127.0.0.1:10809): every volume is an export of its name
//! ```
//!
//! Exit status: 0 after a clean shutdown, 1 when the server fails (the port is taken),
//! 2 for wrong arguments.

use crate::admin::ClusterArgs;
use crate::cluster_file::{ClusterFile, Role};
use crate::size::Dur;
use rawfs_nbd::{NbdConfig, ServerConfig, DEFAULT_LISTEN};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

/// Flags of `rawfs nbd`.
#[derive(clap::Args, Debug)]
pub struct NbdArgs {
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Address to listen on for NBD clients.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Most NBD connections served at once.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Deadline of a client's negotiation, of reading one write's data and of sending one
    /// reply.
    #[arg(long, default_value = "60s")]
    pub io_timeout: Dur,
    /// Keep connected clients per volume in this JSON file (set by `rawfs up`, read by
    /// `rawfs status`; see crate::nbd_status).
    #[arg(long, hide = true)]
    pub status_file: Option<std::path::PathBuf>,
}

/// `rawfs nbd`.
pub fn run(args: NbdArgs) -> ExitCode {
    let metadata = match args.cluster.resolve() {
        Ok((addrs, _)) => addrs,
        Err(e) => {
            eprintln!("rawfs nbd: {e}");
            return ExitCode::from(2);
        }
    };
    if args.max_connections == 0 {
        eprintln!("rawfs nbd: --max-connections must be at least 1");
        return ExitCode::from(2);
    }
    let mut server = ServerConfig::new(args.listen);
    server.max_connections = args.max_connections;
    server.io_timeout = args.io_timeout.0;
    server.handshake_timeout = args.io_timeout.0;
    let cfg = NbdConfig { metadata, server };
    // Worker threads: requests of many connections move data in parallel.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rawfs nbd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match rawfs_nbd::serve_volumes(cfg, crate::daemon::shutdown_signal()).await {
            Ok(h) => {
                tracing::info!(addr = %h.addr(), "NBD server serving volumes");
                let status = args.status_file.clone().map(|p| {
                    let publisher =
                        tokio::spawn(crate::nbd_status::publish(h.catalog().clone(), p.clone()));
                    (publisher, p)
                });
                h.join().await;
                if let Some((publisher, p)) = status {
                    // Wait for the abort, so no write of the task lands after the clear.
                    publisher.abort();
                    let _ = publisher.await;
                    crate::nbd_status::clear(&p);
                }
                tracing::info!("nbd stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                crate::daemon::report_failure("nbd", &e);
                ExitCode::FAILURE
            }
        }
    })
}

/// Where `rawfs up` puts the NBD server in its fixed port layout: after the 3 metadata
/// replicas (`P`..`P+5`), before the chunkservers (`P+10`...).
pub const UP_PORT_OFFSET: u16 = 6;

/// Why `rawfs up` could not choose the NBD server's address.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("--base-port {0} leaves no room for the NBD port")]
    Ports(u16),
    #[error("no free port for the NBD server: {0}")]
    NoPort(#[source] std::io::Error),
}

fn bindable(addr: &str) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

/// The NBD server's address under `rawfs up`: `--nbd-listen` if given; else the previous
/// run's (if still free); else the fixed layout's `P+6` with `--base-port P`; else
/// 127.0.0.1:10809 if free; else a free port. Unlike chunkservers, nothing remembers the
/// NBD address, so moving it when the usual one is taken (another cluster on this machine)
/// costs nothing.
pub fn plan_addr(
    prev: Option<&ClusterFile>,
    base: Option<u16>,
    explicit: Option<&str>,
) -> Result<String, PlanError> {
    if let Some(a) = explicit {
        return Ok(a.to_string());
    }
    if let Some(e) = prev.and_then(|p| p.find(Role::Nbd, 1)) {
        if bindable(&e.addr) {
            return Ok(e.addr.clone());
        }
    }
    if let Some(b) = base {
        let p = b.checked_add(UP_PORT_OFFSET).ok_or(PlanError::Ports(b))?;
        return Ok(format!("127.0.0.1:{p}"));
    }
    if bindable(DEFAULT_LISTEN) {
        return Ok(DEFAULT_LISTEN.to_string());
    }
    for _ in 0..200 {
        // Below the usual ephemeral range, where outgoing connections do not take ports.
        let port = 20000 + rand::random::<u16>() % 12000;
        let addr = format!("127.0.0.1:{port}");
        if bindable(&addr) {
            tracing::warn!(%addr, "{DEFAULT_LISTEN} is taken; the NBD server listens elsewhere");
            return Ok(addr);
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(PlanError::NoPort)?;
    let addr = l.local_addr().map_err(PlanError::NoPort)?;
    Ok(addr.to_string())
}

/// Arguments of the `rawfs nbd` process that `rawfs up` starts.
pub fn up_args(listen: &str, metadata: &[String]) -> Vec<String> {
    vec![
        "nbd".into(),
        "--listen".into(),
        listen.into(),
        "--metadata".into(),
        metadata.join(","),
    ]
}

/// One attempt (with a short deadline) to connect to `addr`: is the NBD server up?
pub async fn accepts(addr: &str) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn up_places_the_nbd_server_predictably() {
        assert_eq!(
            plan_addr(None, Some(7000), Some("0.0.0.0:1")).expect("plan"),
            "0.0.0.0:1"
        );
        assert_eq!(
            plan_addr(None, Some(7000), None).expect("plan"),
            "127.0.0.1:7006"
        );
        assert!(plan_addr(None, Some(u16::MAX), None).is_err());
        // A previous address is kept while free, else the layout decides.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let taken = free.local_addr().expect("addr").to_string();
        let prev = ClusterFile {
            mount: "/m".into(),
            processes: vec![crate::cluster_file::ProcessEntry {
                role: Role::Nbd,
                id: 1,
                pid: 1,
                addr: taken.clone(),
                data_dir: "/d".into(),
                raft_addr: None,
                control_addr: None,
                exe: None,
                args: vec![],
                log: None,
            }],
            up_pid: None,
            ready: true,
        };
        assert_eq!(
            plan_addr(Some(&prev), Some(7000), None).expect("plan"),
            "127.0.0.1:7006"
        );
        drop(free);
        assert_eq!(
            plan_addr(Some(&prev), Some(7000), None).expect("plan"),
            taken
        );
        let any = plan_addr(None, None, None).expect("plan");
        assert!(any.starts_with("127.0.0.1:"), "{any}");
        assert_eq!(up_args("a:1", &["m:1".into(), "m:2".into()])[4], "m:1,m:2");
    }
}
