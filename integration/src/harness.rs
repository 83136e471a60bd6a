//! A real cluster for tests: `rawfs up` in a temporary directory, with its own mountpoint.
//!
//! [`Cluster::start`] runs `rawfs up --dir TMP/cluster --mount TMP/mnt` and polls until
//! `cluster.json` says ready, `rawfs status --json` shows a leader and every chunkserver up, and
//! the mount is live — never a fixed sleep. Faults are injected with [`Cluster::kill9`],
//! [`Cluster::sigstop`] / [`Cluster::sigcont`] and [`Cluster::restart_process`] (which re-runs
//! a daemon with the command line recorded in `cluster.json`, optionally edited: see
//! [`Cluster::start_process`]). The metadata replicas (3) are reached one by one through
//! `crate::replicas` (role, term, applied index, digest, the leader). Dropping the cluster
//! resumes stopped processes, stops `up` (which unmounts), then unmounts lazily and kills
//! every pid still alive, so a failing test leaks neither mounts nor processes.
//!
//! Binaries are found in the cargo target directory of this test executable
//! (`target/<profile>/rawfs` next to `target/<profile>/deps/integration-*`), or in
//! `$RAWFS_BIN_DIR`. Build them first: `cargo build --workspace` (the README's test command does).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster may take to become ready (debug builds on 2 busy cores).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long `rawfs up` gets to stop after SIGTERM before the harness takes over.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);

/// One process as `cluster.json` lists it.
#[derive(Clone, Debug, Deserialize)]
pub struct ProcessInfo {
    /// `metadata`, `chunkserver`, `healer`, `nbd` or `mount`.
    pub role: String,
    /// Id within the role.
    pub id: u64,
    /// Pid as `rawfs up` started it.
    pub pid: u32,
    /// Client-facing address.
    pub addr: String,
    /// Data directory (the mountpoint for the mount).
    pub data_dir: PathBuf,
    /// Replication address of a metadata replica.
    #[serde(default)]
    pub raft_addr: Option<String>,
    /// Control address of a chunkserver.
    #[serde(default)]
    pub control_addr: Option<String>,
    /// Executable that was started.
    #[serde(default)]
    pub exe: Option<PathBuf>,
    /// Its arguments, to restart it exactly.
    #[serde(default)]
    pub args: Vec<String>,
    /// Its log file.
    #[serde(default)]
    pub log: Option<PathBuf>,
}

/// `cluster.json`.
#[derive(Clone, Debug, Deserialize)]
pub struct ClusterInfo {
    /// The mountpoint.
    pub mount: PathBuf,
    /// Every process of the cluster.
    pub processes: Vec<ProcessInfo>,
    /// True once the daemons answered and the mount is live.
    #[serde(default)]
    pub ready: bool,
}

/// Directory holding `rawfs` and `mount.rawfs`.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("RAWFS_BIN_DIR") {
        return PathBuf::from(d);
    }
    // target/<profile>/deps/integration-HASH -> target/<profile>
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// Path of the `rawfs` binary; panics with the build command if it is missing.
pub fn rawfs_bin() -> PathBuf {
    let p = bin_dir().join("rawfs");
    assert!(
        p.exists() && bin_dir().join("mount.rawfs").exists(),
        "{} not found: build the binaries first (cargo build --workspace) or set RAWFS_BIN_DIR",
        p.display()
    );
    p
}

/// The chunkserver listing the most copies in a `rawfs status --json` (a test's victim:
/// losing it puts the most at risk).
pub fn busiest_chunkserver(status: &Value) -> Result<u64> {
    status["chunkservers"]
        .as_array()
        .into_iter()
        .flatten()
        .max_by_key(|cs| cs["chunks"].as_u64().unwrap_or(0))
        .and_then(|cs| cs["id"].as_u64())
        .context("no chunkserver in status")
}

/// Polls `cond` every 50–200 ms until it returns true, failing after `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let end = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    let mut last_err = None;
    loop {
        match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > end {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}: last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// True if `pid` is a live process (zombies count as dead).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .and_then(|(_, r)| r.chars().next())
            .is_some_and(|s| s != 'Z' && s != 'X'),
        Err(_) => false,
    }
}

/// True while any thread of `pid` still runs, or it still has open file descriptors. A
/// killed multi-threaded process shows its main thread as a zombie while the others are
/// still exiting and holding its descriptors (and locks), and /proc/PID/fd may then already
/// read as empty; so every thread in /proc/PID/task is checked too.
fn holds_files(pid: u32) -> bool {
    let threads_alive = std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| {
        d.filter_map(|e| e.ok())
            .any(|t| match std::fs::read_to_string(t.path().join("stat")) {
                Ok(stat) => stat
                    .rsplit_once(") ")
                    .and_then(|(_, r)| r.chars().next())
                    .is_some_and(|s| s != 'Z' && s != 'X'),
                Err(_) => false,
            })
    });
    threads_alive
        || std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|mut d| d.next().is_some())
}

/// True if `path` is exactly a mountpoint (per /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            info.lines()
                .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
        })
        .unwrap_or(false)
}

/// Sends `sig` to `pid` (nothing for pid 0 or one that does not fit a pid_t).
pub(crate) fn signal(pid: u32, sig: i32) {
    if let Ok(p) = i32::try_from(pid) {
        if p > 0 {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(p, sig) };
        }
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(32 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Options for [`Cluster::start_with`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of chunkservers (`rawfs up --chunkservers`).
    pub chunkservers: u32,
    /// Extra arguments for `rawfs up`.
    pub up_args: Vec<String>,
    /// Where `rawfs up --dir` keeps the cluster, for a test that needs it on a filesystem
    /// of its own; by default a directory in the test's temporary root.
    pub dir: Option<PathBuf>,
}

impl Options {
    /// A cluster for healing tests: `chunkservers` chunkservers, one metadata replica, a
    /// chunkserver counted down after 2 s of silence, a healer scan every second.
    pub fn healing(chunkservers: u32) -> Options {
        Options::new(
            chunkservers,
            &[
                "--metadata-replicas",
                "1",
                "--chunkserver-timeout",
                "2s",
                "--healer-scan-interval",
                "1s",
            ],
        )
    }

    /// `chunkservers` chunkservers and `up_args` for `rawfs up`.
    pub fn new(chunkservers: u32, up_args: &[&str]) -> Options {
        Options {
            chunkservers,
            up_args: up_args.iter().map(|s| s.to_string()).collect(),
            dir: None,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chunkservers: 6,
            up_args: Vec::new(),
            dir: None,
        }
    }
}

/// A running cluster owned by one test.
pub struct Cluster {
    /// Temporary root; removed on drop (after everything is unmounted and stopped).
    root: tempfile::TempDir,
    /// `rawfs up --dir`.
    pub dir: PathBuf,
    /// The mountpoint.
    pub mnt: PathBuf,
    opts: Options,
    up: Option<Child>,
    /// Daemons the harness restarted itself: (role, id, child).
    restarted: Vec<(String, u64, Child)>,
    /// Every pid ever seen in cluster.json, killed on drop if still alive.
    seen_pids: Vec<u32>,
    /// First of this cluster's ports (see [`next_base_port`]).
    pub(crate) base_port: u16,
    /// Pids stopped with SIGSTOP and not resumed yet (resumed before teardown).
    pub(crate) stopped: Vec<u32>,
}

/// Ports each cluster may use from its base port on.
const PORTS_PER_CLUSTER: u16 = 32;

/// A port range for a new cluster, disjoint from every other cluster of this test run, below
/// the kernel's ephemeral range (20000..32000), starting at a random slot. Without it, one
/// cluster could pick a free port that another cluster's killed daemon is about to take again.
/// A slot with a port some other program listens on (a cluster the user runs, say) is
/// passed over.
fn next_base_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const SLOTS: u16 = 12000 / PORTS_PER_CLUSTER;
    static NEXT: AtomicU16 = AtomicU16::new(u16::MAX);
    let _ = NEXT.compare_exchange(
        u16::MAX,
        rand::random::<u16>() % SLOTS,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let free = |base: u16| {
        (base..base + PORTS_PER_CLUSTER)
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
    };
    let mut base = 0;
    for _ in 0..SLOTS {
        let slot = NEXT.fetch_add(1, Ordering::SeqCst) % SLOTS;
        base = 20000 + slot * PORTS_PER_CLUSTER;
        if free(base) {
            break;
        }
    }
    base
}

impl Cluster {
    /// A port in this cluster's range that `rawfs up`'s layout leaves unused (it takes
    /// `P..=P+6` and `P+10` on), for a test's own extra daemon. Not one from the kernel's
    /// ephemeral range, which an outgoing connection could take before the daemon binds it.
    pub fn spare_port(&self) -> u16 {
        self.base_port + 7
    }

    /// Starts a cluster with 6 chunkservers and waits until it is ready.
    pub fn start() -> Result<Cluster> {
        Self::start_with(Options::default())
    }

    /// Starts a cluster with `opts` in a fresh directory under `$RAWFS_TEST_DIR` (default
    /// `/var/tmp`) and waits until it is ready.
    pub fn start_with(opts: Options) -> Result<Cluster> {
        let base = std::env::var_os("RAWFS_TEST_DIR")
            .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        let root = tempfile::Builder::new()
            .prefix("rawfs-it-")
            .tempdir_in(&base)
            .with_context(|| {
                format!("cannot create a temporary directory in {}", base.display())
            })?;
        let dir = opts
            .dir
            .clone()
            .unwrap_or_else(|| root.path().join("cluster"));
        let mnt = root.path().join("mnt");
        std::fs::create_dir_all(&mnt)?;
        let mut c = Cluster {
            base_port: next_base_port(),
            root,
            dir,
            mnt,
            opts,
            up: None,
            restarted: Vec::new(),
            seen_pids: Vec::new(),
            stopped: Vec::new(),
        };
        c.spawn_up()?;
        Ok(c)
    }

    /// Root of the test's temporary directory (outside the mount; for reference copies).
    pub fn scratch(&self) -> &Path {
        self.root.path()
    }

    /// `path` relative to the mountpoint.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn up_log(&self) -> PathBuf {
        self.root.path().join("up.log")
    }

    fn spawn_up(&mut self) -> Result<()> {
        // Clusters of one test binary start one at a time, so that two never choose the same
        // free ports before either has bound them.
        static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one_at_a_time = STARTING.lock().unwrap_or_else(|p| p.into_inner());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.up_log())?;
        let mut cmd = Command::new(rawfs_bin());
        cmd.arg("up")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--mount")
            .arg(&self.mnt)
            .arg("--chunkservers")
            .arg(self.opts.chunkservers.to_string())
            .args(&self.opts.up_args)
            .args(["--base-port", &self.base_port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.up = Some(cmd.spawn().context("cannot run rawfs up")?);
        self.wait_ready()
            .inspect_err(|_| eprintln!("{}", self.diagnostics()))
    }

    /// Waits for cluster.json (ready), a leader with every chunkserver up, and a live mount.
    pub fn wait_ready(&mut self) -> Result<()> {
        let n = self.opts.chunkservers as usize;
        let mut up = self.up.take();
        let mut pids = Vec::new();
        let this = &*self;
        let r = wait_until("the cluster to be ready", READY_TIMEOUT, || {
            if let Some(child) = up.as_mut() {
                if let Some(st) = child.try_wait()? {
                    bail!("rawfs up exited with {st}");
                }
            }
            let Some(info) = this.info_opt()? else {
                return Ok(false);
            };
            pids.extend(info.processes.iter().map(|p| p.pid));
            if !info.ready || !is_mountpoint(&this.mnt) {
                return Ok(false);
            }
            let s = this.status()?;
            let ups = s["chunkservers"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|c| c["up"] == true).count());
            // Every replica a member and answering, so a test may take down any one of them.
            let replicas_up = s["metadata"]["replicas"]
                .as_array()
                .is_some_and(|a| !a.is_empty() && a.iter().all(|r| r["up"] == true));
            Ok(!s["metadata"]["leader"].is_null() && ups >= n && replicas_up)
        });
        self.up = up;
        for p in pids {
            if !self.seen_pids.contains(&p) {
                self.seen_pids.push(p);
            }
        }
        r
    }

    fn remember_pids(&mut self, info: &ClusterInfo) {
        for p in &info.processes {
            if !self.seen_pids.contains(&p.pid) {
                self.seen_pids.push(p.pid);
            }
        }
    }

    fn info_opt(&self) -> Result<Option<ClusterInfo>> {
        match std::fs::read(self.dir.join("cluster.json")) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).context("cluster.json")?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// `cluster.json`.
    pub fn info(&self) -> Result<ClusterInfo> {
        self.info_opt()?.context("no cluster.json")
    }

    /// `rawfs status --json --dir DIR`, parsed.
    pub fn status(&self) -> Result<Value> {
        let out = Command::new(rawfs_bin())
            .args(["status", "--json", "--dir"])
            .arg(&self.dir)
            .env("RUST_LOG", "warn")
            .output()?;
        if !out.status.success() {
            bail!(
                "rawfs status failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("status JSON")
    }

    /// The entry of `role`/`id` in cluster.json.
    pub fn process(&self, role: &str, id: u64) -> Result<ProcessInfo> {
        self.info()?
            .processes
            .into_iter()
            .find(|p| p.role == role && p.id == id)
            .with_context(|| format!("no {role} {id} in cluster.json"))
    }

    /// Current pid of `role`/`id` (a harness-restarted daemon's new pid if there is one).
    pub fn pid(&self, role: &str, id: u64) -> Result<u32> {
        if let Some((_, _, c)) = self
            .restarted
            .iter()
            .rev()
            .find(|(r, i, _)| r == role && *i == id)
        {
            return Ok(c.id());
        }
        Ok(self.process(role, id)?.pid)
    }

    /// `kill -9` one daemon and wait until it is gone.
    pub fn kill9(&mut self, role: &str, id: u64) -> Result<()> {
        let pid = self.pid(role, id)?;
        signal(pid, libc::SIGKILL);
        for (_, _, c) in self
            .restarted
            .iter_mut()
            .filter(|(r, i, _)| r == role && *i == id)
        {
            let _ = c.wait();
        }
        // Dead means its files and ports are released too: a killed multi-threaded process
        // shows as a zombie while its other threads still hold its descriptors.
        wait_until(
            &format!("{role} {id} (pid {pid}) to die"),
            Duration::from_secs(10),
            || Ok(!pid_alive(pid) && !holds_files(pid)),
        )
    }

    /// Runs `role`/`id` again with the command line recorded in cluster.json (same addresses,
    /// same data directory) and waits until the cluster is ready again: a leader, every
    /// chunkserver up after a chunkserver restart, the replica answering after a metadata
    /// restart.
    pub fn restart_process(&mut self, role: &str, id: u64) -> Result<()> {
        self.start_process(role, id, |_| {})?;
        self.wait_back(role, id)
    }

    /// Starts `role`/`id` with its recorded command line after `edit` has changed it (for
    /// example to drop `--bootstrap` for a replica whose data was wiped), without waiting for
    /// anything but the spawn. Its stdout and stderr are appended to its log.
    pub fn start_process(
        &mut self,
        role: &str,
        id: u64,
        edit: impl FnOnce(&mut Vec<String>),
    ) -> Result<()> {
        let p = self.process(role, id)?;
        let exe = p.exe.clone().context("cluster.json has no exe")?;
        let log = p
            .log
            .clone()
            .unwrap_or_else(|| self.dir.join(format!("logs/{role}-{id}.log")));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut args = p.args.clone();
        edit(&mut args);
        let child = Command::new(exe)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot restart the daemon")?;
        self.seen_pids.push(child.id());
        self.set_pid(role, id, child.id())?;
        self.restarted.push((role.to_string(), id, child));
        Ok(())
    }

    /// Waits until a restarted `role`/`id` is back (see [`Cluster::restart_process`]); fails
    /// at once, with its log, if it exits.
    pub fn wait_back(&mut self, role: &str, id: u64) -> Result<()> {
        let n = self.opts.chunkservers as usize;
        let log_path = self
            .process(role, id)?
            .log
            .unwrap_or_else(|| self.dir.join(format!("logs/{role}-{id}.log")));
        let addr = self.process(role, id)?.addr;
        let child = self
            .restarted
            .iter()
            .rposition(|(r, i, _)| r == role && *i == id);
        wait_until(&format!("{role} {id} to be back"), READY_TIMEOUT, || {
            if let Some((_, _, child)) = child.and_then(|k| self.restarted.get_mut(k)) {
                if let Some(st) = child.try_wait()? {
                    bail!(
                        "the restarted {role} {id} exited with {st}; its log ends:\n{}",
                        tail(&log_path, 20)
                    );
                }
            }
            if role == "metadata" && crate::replicas::replica_status_at(&addr).is_err() {
                return Ok(false);
            }
            let s = self.status()?;
            let ups = s["chunkservers"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|c| c["up"] == true).count());
            Ok(!s["metadata"]["leader"].is_null() && (role != "chunkserver" || ups >= n))
        })
    }

    /// Records a restarted daemon's new pid in cluster.json (atomically, keeping every other
    /// key), so `rawfs status --dir` sees it alive.
    fn set_pid(&self, role: &str, id: u64, pid: u32) -> Result<()> {
        let path = self.dir.join("cluster.json");
        let mut v: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        if let Some(ps) = v["processes"].as_array_mut() {
            for p in ps.iter_mut().filter(|p| p["role"] == role && p["id"] == id) {
                p["pid"] = pid.into();
            }
        }
        let tmp = self.dir.join(".cluster.json.harness");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Stops the whole cluster the way an operator does (SIGTERM to `rawfs up`) and checks that
    /// it unmounted and every process ended.
    pub fn stop(&mut self) -> Result<()> {
        // A stopped process would only act on SIGTERM once resumed.
        for pid in std::mem::take(&mut self.stopped) {
            signal(pid, libc::SIGCONT);
        }
        let info = self.info_opt()?;
        if let Some(mut up) = self.up.take() {
            signal(up.id(), libc::SIGTERM);
            let end = Instant::now() + STOP_TIMEOUT;
            loop {
                if let Some(st) = up.try_wait()? {
                    if !st.success() {
                        bail!(
                            "rawfs up exited with {st} on SIGTERM:\n{}",
                            tail(&self.up_log(), 30)
                        );
                    }
                    break;
                }
                if Instant::now() > end {
                    signal(up.id(), libc::SIGKILL);
                    let _ = up.wait();
                    bail!("rawfs up did not stop within {STOP_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for (_, _, c) in &mut self.restarted {
            signal(c.id(), libc::SIGTERM);
        }
        for (_, _, c) in &mut self.restarted {
            let _ = c.wait();
        }
        self.restarted.clear();
        if is_mountpoint(&self.mnt) {
            bail!(
                "{} is still mounted after rawfs up stopped",
                self.mnt.display()
            );
        }
        if let Some(info) = info {
            for p in info.processes {
                wait_until(
                    &format!("{} {} to exit", p.role, p.id),
                    Duration::from_secs(20),
                    || Ok(!pid_alive(p.pid)),
                )?;
            }
        }
        Ok(())
    }

    /// Stops everything and starts `rawfs up` again on the same directory.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn_up()
    }

    /// Log tails of `up` and every daemon, for a failing test's output.
    pub fn diagnostics(&self) -> String {
        let mut out = format!(
            "---- rawfs up ({}):\n{}\n",
            self.up_log().display(),
            tail(&self.up_log(), 30)
        );
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs")) {
            let mut logs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            logs.sort();
            for l in logs {
                out.push_str(&format!("---- {}:\n{}\n", l.display(), tail(&l, 15)));
            }
        }
        out
    }
}

impl Cluster {
    /// Passes `r` through, printing the daemons' log tails first if it is an error (a test
    /// that returns `Err` does not panic, so `Drop` would not print them).
    ///
    /// A test that passed still fails if a daemon panicked on the way (a panic in a task
    /// does not stop the process, so nothing else would notice it).
    pub fn diagnose<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            // The error first: a CI log that keeps only the head of a long output still
            // shows why the test failed.
            eprintln!("test failed: {e:#}\n{}", self.diagnostics());
            return r;
        }
        let panics = self.panics();
        if !panics.is_empty() {
            bail!("a daemon panicked:\n{}", panics.join("\n"));
        }
        r
    }

    /// Every panic message in the daemons' logs, with the log's name and a few lines.
    pub fn panics(&self) -> Vec<String> {
        let mut logs = vec![self.up_log()];
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs")) {
            logs.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
        }
        let mut found = Vec::new();
        for l in logs {
            let Ok(text) = std::fs::read_to_string(&l) else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if line.contains("panicked at") {
                    let end = (i + 4).min(lines.len());
                    found.push(format!("{}: {}", l.display(), lines[i..end].join("\n")));
                }
            }
        }
        found
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        if let Err(e) = self.stop() {
            eprintln!("cluster teardown: {e:#}");
        }
        // Whatever is left: a lazy unmount and SIGKILL to every pid the cluster ever had.
        if is_mountpoint(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Ok(Some(info)) = self.info_opt() {
            self.remember_pids(&info);
        }
        for (_, _, c) in &mut self.restarted {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in &self.seen_pids {
            let is_ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("rawfs"))
                .unwrap_or(false);
            if pid_alive(*pid) && is_ours {
                signal(*pid, libc::SIGKILL);
            }
        }
        // RAWFS_KEEP=1 keeps the cluster directory (data and logs) for a post-mortem.
        if std::env::var_os("RAWFS_KEEP").is_some() {
            self.root.disable_cleanup(true);
            eprintln!("RAWFS_KEEP: cluster kept in {}", self.root.path().display());
        }
    }
}
