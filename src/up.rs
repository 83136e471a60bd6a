//! `rawfs up`: a whole cluster on this machine, as separate processes, mounted.
//!
//! ```text
//!  lock DIR/up.pid ─> plan ports (reuse DIR/cluster.json; ports.rs) ─> spawn N metadata
//!     replicas (--metadata-replicas: 1, 3 or 5; --bootstrap on a fresh DIR), chunkservers
//!     (6: one RS 4+2 stripe), the NBD server, two healers (--cold-after) ─> poll `status` until a leader is elected and all chunkservers are up
//!     ─> spawn mount.rawfs -f (every metadata address), poll mountinfo ─> write cluster.json
//!     (ready) ─> watch children (never restart them)
//!     ─> SIGINT/SIGTERM: stop in phases (stop.rs): NBD server and mount (umount) first, so
//!        they flush; then healers, chunkservers, and the metadata replicas last
//! ```
//!
//! Readiness is polled, never slept for, and bounded by `--ready-timeout`; on failure the log
//! tail of whatever is not ready is printed and everything started is stopped again.
//!
//! The metadata replicas form their group on the first start only: `--bootstrap` is passed
//! when no replica of DIR has any state yet. A later run (or a replica restarted by hand from
//! the command line in cluster.json) finds its state and never re-initializes; a replica
//! whose data directory was wiped while the others kept theirs must be added back with
//! `rawfs metadata add-peer`, so it is started without `--bootstrap`.

use crate::cluster_file::{pid_alive, ClusterFile, ProcessEntry, Role};
use crate::procs::{self, Proc};
use crate::size::{ByteSize, Dur};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::watch;

mod ports;
mod replicas;
mod stop;

pub use ports::{plan, Planned};

/// Metadata replicas started by `up` on a fresh DIR unless `--metadata-replicas` says
/// otherwise: any one of them may fail without a pause longer than an election.
pub const DEFAULT_METADATA_REPLICAS: u64 = 3;
/// Replica counts `up` accepts: odd (an even group tolerates no more failures than the odd
/// one below it and needs a larger majority), and at most 5 (each replica is a process and
/// a copy of the log on this one machine).
const ALLOWED_METADATA_REPLICAS: [u64; 3] = [1, 3, 5];
/// How often readiness and children are polled.
const POLL: Duration = Duration::from_millis(200);

/// Flags of `rawfs up`.
#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Cluster directory: data of every daemon, logs, cluster.json.
    #[arg(long)]
    pub dir: PathBuf,
    /// Where to mount the filesystem (created if missing).
    #[arg(long)]
    pub mount: PathBuf,
    /// Metadata replicas: 1, 3 or 5 (default: as many as DIR already has, else 3). An even
    /// number is refused. A DIR keeps the count it was created with; change the group's size
    /// online with `rawfs metadata add-peer|remove-peer`.
    #[arg(long, value_parser = replicas::parse_metadata_replicas)]
    pub metadata_replicas: Option<u64>,
    /// Number of chunkservers (at least 3, one per replica; 6 are needed for an RS 4+2
    /// stripe, so with fewer, cold data stays replicated).
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(3..=64))]
    pub chunkservers: u64,
    /// First port of a fixed layout (metadata replica i: P+2(i-1), P+2(i-1)+1 for i = 1..3,
    /// P+138+2(i-4), P+139+2(i-4) for i = 4..5; chunkserver i: P+10+2(i-1), P+11+2(i-1));
    /// default: the previous run's ports, or free ones.
    #[arg(long)]
    pub base_port: Option<u16>,
    /// Capacity each chunkserver advertises (default: the disk's).
    #[arg(long)]
    pub capacity: Option<ByteSize>,
    /// Passed to every chunkserver: free space of the disk its chunk writes leave alone
    /// (default: 2% of the disk, at least 64M and at most 4G).
    #[arg(long)]
    pub reserve: Option<ByteSize>,
    /// Passed to every chunkserver: bytes per second its background scrub reads, e.g. 4M
    /// (default: the chunkservers' 4M; 0 turns the scrub off).
    #[arg(long, value_name = "BYTES_PER_SEC")]
    pub scrub_rate: Option<ByteSize>,
    /// How long to wait for the daemons and the mount to become ready.
    #[arg(long, default_value = "60s")]
    pub ready_timeout: Dur,
    /// Passed to every metadata replica as `--snapshot-every` (entries between snapshots).
    #[arg(long)]
    pub snapshot_every: Option<u64>,
    /// Address of the NBD server (default: the previous run's, P+6 with --base-port P, else
    /// 127.0.0.1:10809, or a free port when that is taken).
    #[arg(long)]
    pub nbd_listen: Option<String>,
    /// Passed to every metadata replica: heartbeat silence after which a chunkserver counts
    /// as down and its chunks are re-replicated (default: the replicas' 5s).
    #[arg(long)]
    pub chunkserver_timeout: Option<Dur>,
    /// Time between the healers' scans for chunks short of copies.
    #[arg(long, default_value = "5s")]
    pub healer_scan_interval: Dur,
    /// Passed to the healers: quiet time after which the chunks of an `auto` file are
    /// converted to RS 4+2 (e.g. `30s`, `5m`, `24h`, `0` for at once).
    #[arg(long, default_value = "24h")]
    pub cold_after: Dur,
}

/// Healers `rawfs up` starts: one active (the lease holder), one standby.
const HEALERS: u64 = 2;
/// Chunkservers one RS 4+2 stripe needs (4 data and 2 parity shards on distinct servers).
const EC_STRIPE_SERVERS: u64 = 6;

/// Why `rawfs up` could not start the cluster.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} is in use by another `rawfs up` (pid {pid})")]
    Locked { dir: PathBuf, pid: String },
    #[error("{0} is already a mountpoint; unmount it first")]
    AlreadyMounted(PathBuf),
    #[error("{role} {id} from a previous run is still alive (pid {pid}); stop it first")]
    Leftover { role: Role, id: u64, pid: u32 },
    #[error(transparent)]
    ClusterFile(#[from] crate::cluster_file::ClusterFileError),
    #[error("no free ports for the layout starting at --base-port {0}")]
    Ports(u16),
    #[error("{0}")]
    NotReady(String),
    #[error("interrupted while starting")]
    Interrupted,
    #[error(
        "{dir} holds a group of {existing} metadata replicas, not {requested}: run with \
         --metadata-replicas {existing} (change the group's size online with `rawfs metadata \
         add-peer|remove-peer`), or use a new DIR"
    )]
    ReplicaCount {
        dir: PathBuf,
        existing: u64,
        requested: u64,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> UpError {
    let path = path.to_path_buf();
    move |source| UpError::Io { what, path, source }
}

/// Holds `DIR/up.pid` locked for as long as `up` runs.
struct DirLock {
    _file: std::fs::File,
}

fn lock_dir(dir: &Path) -> Result<DirLock, UpError> {
    let path = dir.join("up.pid");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("cannot open", &path))?;
    // SAFETY: flock on a descriptor we own; the lock lives as long as the file stays open.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let pid = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .trim()
            .to_string();
        return Err(UpError::Locked {
            dir: dir.to_path_buf(),
            pid,
        });
    }
    f.set_len(0).map_err(io_err("cannot write", &path))?;
    writeln!(f, "{}", std::process::id()).map_err(io_err("cannot write", &path))?;
    Ok(DirLock { _file: f })
}

/// True if `pid` is alive and still looks like a rawfs process (pids get reused).
fn rawfs_pid_alive(pid: u32) -> bool {
    pid_alive(pid)
        && std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("rawfs"))
            .unwrap_or(false)
}

/// The running cluster: children in start order, and where things are.
struct Cluster {
    dir: PathBuf,
    mount: PathBuf,
    exe: PathBuf,
    procs: Vec<(ProcessEntry, Proc)>,
}

impl Cluster {
    fn cluster_file(&self, ready: bool) -> ClusterFile {
        ClusterFile {
            mount: self.mount.clone(),
            processes: self
                .procs
                .iter()
                .map(|(e, p)| ProcessEntry {
                    pid: p.pid(),
                    ..e.clone()
                })
                .collect(),
            up_pid: Some(std::process::id()),
            ready,
        }
    }

    fn start(
        &mut self,
        role: Role,
        id: u64,
        exe: &Path,
        args: Vec<String>,
        entry: ProcessEntry,
    ) -> Result<(), UpError> {
        let logs = self.dir.join("logs");
        let log = logs.join(format!("{role}-{id}.log"));
        let name = format!("{role} {id}");
        let proc = procs::spawn(&name, exe, &args, &log).map_err(io_err("cannot start", exe))?;
        tracing::info!(%name, pid = proc.pid(), "started");
        self.procs.push((
            ProcessEntry {
                pid: proc.pid(),
                exe: Some(exe.to_path_buf()),
                args,
                log: Some(log),
                ..entry
            },
            proc,
        ));
        Ok(())
    }

    /// The first child that has died since the last call, as a message with its log tail.
    fn check_children(&mut self) -> Option<String> {
        for (_, p) in &mut self.procs {
            if let Some(st) = p.poll_exit() {
                return Some(format!(
                    "{} (pid {}) exited with {st}; last lines of {}:\n{}",
                    p.name,
                    p.pid(),
                    p.log.display(),
                    procs::log_tail(&p.log, 20)
                ));
            }
        }
        None
    }
}

/// A flag that flips to true on SIGINT or SIGTERM. The handlers are installed before this
/// returns, so a signal during start-up is never lost (nor kills `up` before it cleans up).
fn signal_watch() -> Result<watch::Receiver<bool>, UpError> {
    use tokio::signal::unix::{signal, SignalKind};
    let ioe = |source| UpError::Io {
        what: "cannot install signal handlers for",
        path: "rawfs up".into(),
        source,
    };
    let mut int = signal(SignalKind::interrupt()).map_err(ioe)?;
    let mut term = signal(SignalKind::terminate()).map_err(ioe)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// `rawfs up`.
pub fn run(args: UpArgs) -> ExitCode {
    // One thread: children are spawned from the main thread, so PR_SET_PDEATHSIG (which follows
    // the spawning thread) fires only when `up` itself exits.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rawfs up: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(up(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rawfs up: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn up(args: UpArgs) -> Result<(), UpError> {
    let stop = signal_watch()?;
    std::fs::create_dir_all(args.dir.join("logs")).map_err(io_err("cannot create", &args.dir))?;
    let dir = args
        .dir
        .canonicalize()
        .map_err(io_err("cannot resolve", &args.dir))?;
    // Not canonicalize: a dead FUSE mount there would fail with ENOTCONN before we can say so.
    let mount = std::path::absolute(&args.mount).map_err(io_err("cannot resolve", &args.mount))?;
    if procs::mounted_fstype(&mount).is_some() {
        return Err(UpError::AlreadyMounted(mount));
    }
    let _lock = lock_dir(&dir)?;
    std::fs::create_dir_all(&mount).map_err(io_err("cannot create", &mount))?;
    let mount = mount
        .canonicalize()
        .map_err(io_err("cannot resolve", &mount))?;
    if procs::mounted_fstype(&mount).is_some() {
        return Err(UpError::AlreadyMounted(mount));
    }

    let prev = ClusterFile::load(&dir)?;
    if let Some(p) = &prev {
        if let Some(e) = p
            .processes
            .iter()
            .find(|e| e.pid != std::process::id() && rawfs_pid_alive(e.pid))
        {
            return Err(UpError::Leftover {
                role: e.role,
                id: e.id,
                pid: e.pid,
            });
        }
    }
    let (replicas, fresh) = replicas::replica_count(args.metadata_replicas, prev.as_ref(), &dir)?;
    let mut free = ports::FreePorts(Vec::new());
    let planned = plan(
        prev.as_ref(),
        args.base_port,
        replicas,
        args.chunkservers,
        || free.next(),
    )?;
    drop(free);
    let nbd_addr = crate::nbd::plan_addr(prev.as_ref(), args.base_port, args.nbd_listen.as_deref())
        .map_err(|e| UpError::NotReady(e.to_string()))?;

    let exe = std::env::current_exe().map_err(io_err("cannot find", Path::new("rawfs")))?;
    let mut cluster = Cluster {
        dir: dir.clone(),
        mount: mount.clone(),
        exe: exe.clone(),
        procs: Vec::new(),
    };
    let started = match start_all(
        &mut cluster,
        &planned,
        fresh,
        &nbd_addr,
        &args,
        stop.clone(),
    )
    .await
    {
        Ok(()) => cluster
            .cluster_file(true)
            .store(&dir)
            .map_err(UpError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = started {
        cluster.stop().await;
        return Err(e);
    }
    print_summary(&cluster, args.chunkservers);
    watch_until_stopped(&mut cluster, stop).await;
    eprintln!("rawfs up: stopping");
    cluster.stop().await;
    let mut cf = cluster.cluster_file(false);
    cf.up_pid = None;
    if let Err(e) = cf.store(&dir) {
        tracing::warn!(error = %e, "cannot update cluster.json");
    }
    eprintln!("rawfs up: stopped");
    Ok(())
}

async fn start_all(
    c: &mut Cluster,
    planned: &[Planned],
    fresh: bool,
    nbd_addr: &str,
    args: &UpArgs,
    stop: watch::Receiver<bool>,
) -> Result<(), UpError> {
    let meta_addrs: Vec<String> = planned
        .iter()
        .filter(|p| p.role == Role::Metadata)
        .map(|p| p.addr.clone())
        .collect();
    let exe = c.exe.clone();
    for p in planned {
        let data_dir = c.dir.join(format!("{}-{}", p.role, p.id));
        std::fs::create_dir_all(&data_dir).map_err(io_err("cannot create", &data_dir))?;
        let d = data_dir.to_string_lossy().into_owned();
        let mut a: Vec<String> = vec![
            p.role.to_string(),
            "--id".into(),
            p.id.to_string(),
            "--data-dir".into(),
            d,
        ];
        let mut entry = ProcessEntry {
            role: p.role,
            id: p.id,
            pid: 0,
            addr: p.addr.clone(),
            data_dir,
            raft_addr: None,
            control_addr: None,
            exe: None,
            args: vec![],
            log: None,
        };
        match p.role {
            Role::Metadata => {
                a.extend([
                    "--listen".into(),
                    p.addr.clone(),
                    "--raft-listen".into(),
                    p.second.clone(),
                ]);
                for o in planned
                    .iter()
                    .filter(|o| o.role == Role::Metadata && o.id != p.id)
                {
                    a.extend(["--peer".into(), format!("{}={}/{}", o.id, o.addr, o.second)]);
                }
                if fresh {
                    a.push("--bootstrap".into());
                }
                if let Some(n) = args.snapshot_every {
                    a.extend(["--snapshot-every".into(), n.to_string()]);
                }
                if let Some(t) = &args.chunkserver_timeout {
                    a.extend([
                        "--chunkserver-timeout".into(),
                        format!("{}ms", t.0.as_millis()),
                    ]);
                }
                entry.raft_addr = Some(p.second.clone());
            }
            _ => {
                a.extend([
                    "--listen".into(),
                    p.addr.clone(),
                    "--control-listen".into(),
                    p.second.clone(),
                ]);
                a.extend(["--metadata".into(), meta_addrs.join(",")]);
                if let Some(cap) = args.capacity {
                    a.extend(["--capacity".into(), cap.0.to_string()]);
                }
                if let Some(reserve) = args.reserve {
                    a.extend(["--reserve".into(), reserve.0.to_string()]);
                }
                if let Some(rate) = args.scrub_rate {
                    a.extend(["--scrub-rate".into(), rate.0.to_string()]);
                }
                entry.control_addr = Some(p.second.clone());
            }
        }
        c.start(p.role, p.id, &exe, a, entry)?;
    }
    // The NBD server (block volumes); it reaches the metadata service lazily.
    let nbd_dir = c.dir.join("nbd-1");
    std::fs::create_dir_all(&nbd_dir).map_err(io_err("cannot create", &nbd_dir))?;
    let entry = ProcessEntry {
        role: Role::Nbd,
        id: 1,
        pid: 0,
        addr: nbd_addr.to_string(),
        data_dir: nbd_dir,
        raft_addr: None,
        control_addr: None,
        exe: None,
        args: vec![],
        log: None,
    };
    let mut nbd_args = crate::nbd::up_args(nbd_addr, &meta_addrs);
    // Connected clients per volume, for `rawfs status` (see crate::nbd_status).
    nbd_args.extend([
        "--status-file".into(),
        crate::nbd_status::path(&c.dir.join("nbd-1"))
            .to_string_lossy()
            .into_owned(),
    ]);
    c.start(Role::Nbd, 1, &exe, nbd_args, entry)?;
    for id in 1..=HEALERS {
        let data_dir = c.dir.join(format!("healer-{id}"));
        std::fs::create_dir_all(&data_dir).map_err(io_err("cannot create", &data_dir))?;
        let entry = ProcessEntry {
            role: Role::Healer,
            id,
            pid: 0,
            addr: String::new(),
            data_dir,
            raft_addr: None,
            control_addr: None,
            exe: None,
            args: vec![],
            log: None,
        };
        let a = vec![
            "healer".into(),
            "--id".into(),
            id.to_string(),
            "--metadata".into(),
            meta_addrs.join(","),
            "--scan-interval".into(),
            format!("{}ms", args.healer_scan_interval.0.as_millis()),
            "--cold-after".into(),
            format!("{}ms", args.cold_after.0.as_millis()),
        ];
        c.start(Role::Healer, id, &exe, a, entry)?;
    }
    // Early, so a harness can clean up even if the rest fails.
    c.cluster_file(false).store(&c.dir)?;

    let deadline = Instant::now() + args.ready_timeout.0;
    wait_daemons_ready(c, planned, &meta_addrs, deadline, stop.clone()).await?;

    let helper = exe.with_file_name("mount.rawfs");
    let spec = format!("{}:/", meta_addrs.join(","));
    let mnt = c.mount.to_string_lossy().into_owned();
    let log = c.dir.join("logs").join("mount-1.log");
    let (mexe, margs) = if helper.exists() {
        (helper, vec![spec, mnt, "-f".into()])
    } else {
        (exe.clone(), vec!["mount".into(), spec, mnt, "-f".into()])
    };
    let entry = ProcessEntry {
        role: Role::Mount,
        id: 1,
        pid: 0,
        addr: meta_addrs.first().cloned().unwrap_or_default(),
        data_dir: c.mount.clone(),
        raft_addr: None,
        control_addr: None,
        exe: None,
        args: vec![],
        log: Some(log),
    };
    c.start(Role::Mount, 1, &mexe, margs, entry)?;
    c.cluster_file(false).store(&c.dir)?;
    loop {
        if *stop.borrow() {
            return Err(UpError::Interrupted);
        }
        if let Some(msg) = c.check_children() {
            return Err(UpError::NotReady(msg));
        }
        if procs::mounted_fstype(&c.mount).is_some_and(|t| t.starts_with("fuse"))
            && crate::nbd::accepts(nbd_addr).await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            let log = c.dir.join("logs").join("mount-1.log");
            return Err(UpError::NotReady(format!(
                "the mount at {} is not live after {:?}; last lines of {}:\n{}",
                c.mount.display(),
                args.ready_timeout.0,
                log.display(),
                procs::log_tail(&log, 20)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// True if `dir` does not exist or holds nothing: a replica that never ran there.
fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

/// Polls `status` until there is a leader and every planned chunkserver is up.
async fn wait_daemons_ready(
    c: &mut Cluster,
    planned: &[Planned],
    meta_addrs: &[String],
    deadline: Instant,
    stop: watch::Receiver<bool>,
) -> Result<(), UpError> {
    let want: Vec<u64> = planned
        .iter()
        .filter(|p| p.role == Role::Chunkserver)
        .map(|p| p.id)
        .collect();
    let mut missing: Vec<(Role, u64)> = planned
        .iter()
        .filter(|p| p.role == Role::Metadata)
        .map(|p| (Role::Metadata, p.id))
        .collect();
    loop {
        if *stop.borrow() {
            return Err(UpError::Interrupted);
        }
        if let Some(msg) = c.check_children() {
            return Err(UpError::NotReady(msg));
        }
        match crate::status::fetch(meta_addrs, Duration::from_secs(2)).await {
            Ok(s) if s.leader.is_some() => {
                missing = want
                    .iter()
                    .filter(|id| !s.chunkservers.iter().any(|cs| cs.id == **id && cs.up))
                    .map(|id| (Role::Chunkserver, *id))
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
            }
            Ok(_) => tracing::debug!("metadata has no leader yet"),
            Err(e) => tracing::debug!(error = %e, "metadata not answering yet"),
        }
        if Instant::now() > deadline {
            let mut msg = String::from(
                "not ready before the deadline (if a port is taken by another program, remove \
                 DIR/cluster.json to pick new ones):",
            );
            for (role, id) in &missing {
                if let Some((_, p)) = c.procs.iter().find(|(e, _)| e.role == *role && e.id == *id) {
                    msg.push_str(&format!(
                        "\n{} (pid {}), last lines of {}:\n{}",
                        p.name,
                        p.pid(),
                        p.log.display(),
                        procs::log_tail(&p.log, 20)
                    ));
                }
            }
            return Err(UpError::NotReady(msg));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn print_summary(c: &Cluster, chunkservers: u64) {
    println!(
        "rawfs up: cluster in {}, mounted at {}",
        c.dir.display(),
        c.mount.display()
    );
    for (e, p) in &c.procs {
        let extra = match e.role {
            Role::Metadata => format!("raft {}", e.raft_addr.as_deref().unwrap_or("-")),
            Role::Chunkserver => format!("control {}", e.control_addr.as_deref().unwrap_or("-")),
            _ => format!("at {}", e.data_dir.display()),
        };
        println!(
            "  {:<14} {:<21} {:<26} pid {:<8} log {}",
            p.name,
            e.addr,
            extra,
            p.pid(),
            p.log.display()
        );
    }
    println!("cluster file: {}", ClusterFile::path(&c.dir).display());
    if let Some(note) = ec_note(chunkservers) {
        println!("{note}");
    }
    println!(
        "status: {} status --dir {}",
        c.exe.display(),
        c.dir.display()
    );
    println!("Ctrl-C (or SIGTERM) unmounts and stops everything.");
}

/// What the summary says about erasure coding with `chunkservers` servers: nothing when there
/// are enough for an RS 4+2 stripe.
fn ec_note(chunkservers: u64) -> Option<String> {
    (chunkservers < EC_STRIPE_SERVERS).then(|| {
        format!(
            "note: {chunkservers} chunkservers: cold data cannot be erasure coded (RS 4+2 needs \
             {EC_STRIPE_SERVERS}); it stays replicated"
        )
    })
}

/// Stays in the foreground until a signal; a child that dies is reported, never restarted
/// (it shows as down in `rawfs status`).
async fn watch_until_stopped(c: &mut Cluster, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                while let Some(msg) = c.check_children() {
                    tracing::warn!("{msg}\n(not restarted: it shows as down in `rawfs status`)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_directory_without_state_is_fresh() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(dir_is_empty(&d.path().join("missing")));
        assert!(dir_is_empty(d.path()));
        std::fs::write(d.path().join("meta.redb"), b"x").expect("write");
        assert!(!dir_is_empty(d.path()));
    }

    #[test]
    fn fewer_than_six_chunkservers_cannot_erasure_code() {
        let note = ec_note(3).expect("3 servers get a note");
        assert!(note.contains("cannot be erasure coded"), "{note}");
        assert!(ec_note(5).is_some());
        assert_eq!(ec_note(6), None);
        assert_eq!(ec_note(64), None);
    }

    #[test]
    fn a_directory_is_locked_by_one_up() {
        let d = tempfile::tempdir().expect("tempdir");
        let lock = lock_dir(d.path()).expect("first lock");
        match lock_dir(d.path()) {
            Err(UpError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Locked, got {other:?}", other = other.map(|_| ())),
        }
        drop(lock);
        lock_dir(d.path()).expect("lock again after release");
    }
}
