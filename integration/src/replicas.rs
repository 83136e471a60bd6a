//! The metadata replicas of a test cluster, one by one: who leads, in which term, how far
//! each has applied the log, and a digest of each one's state.
//!
//! ```text
//!  test ──> Cluster::leader / wait_leader / wait_converged / sigstop / wipe_data / rawfs
//!              │ one MetadataClient per replica address (no redirects: each speaks for itself)
//!              v
//!           replica_status()  digest()   (rawfs metadata x3, answered by any replica)
//! ```
//!
//! Calls run on one small tokio runtime shared by the whole test binary; each has a short
//! deadline, so a killed or stopped replica costs a timeout, never a hang.

use crate::harness::{pid_alive, signal, wait_until, Cluster};
use anyhow::{bail, Context, Result};
use rawfs_chunkserver_api::{connect_control, deadline, ScrubStatus};
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use rawfs_metadata_api::{ReplicaStatus, StateDigest};
use std::collections::BTreeMap;
use std::future::Future;
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

/// Deadline of one call to one replica.
const REPLICA_CALL: Duration = Duration::from_secs(2);

/// The runtime the harness runs metadata calls on.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("harness-rt")
            .enable_all()
            .build()
            .expect("the test harness needs a tokio runtime")
    })
}

/// Runs `f` to completion on the harness runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// A client bound to one replica's address with short deadlines: it reports that replica's
/// own view (it follows a `NotLeader` redirect only for calls that need the leader).
pub fn replica_client(addr: &str) -> MetadataClient {
    let _rt = runtime().enter();
    MetadataClient::new(
        vec![addr.to_string()],
        ClientTimeouts {
            call: REPLICA_CALL,
            op: REPLICA_CALL,
        },
    )
}

/// `replica_status()` of the replica at `addr`.
pub fn replica_status_at(addr: &str) -> Result<ReplicaStatus> {
    let c = replica_client(addr);
    block_on(async {
        tokio::time::timeout(REPLICA_CALL * 2, c.replica_status())
            .await
            .context("replica_status timed out")?
            .with_context(|| format!("replica_status at {addr}"))
    })
}

/// `digest()` of the replica at `addr`.
pub fn digest_at(addr: &str) -> Result<StateDigest> {
    let c = replica_client(addr);
    block_on(async {
        tokio::time::timeout(REPLICA_CALL * 4, c.digest())
            .await
            .context("digest timed out")?
            .with_context(|| format!("digest at {addr}"))
    })
}

impl Cluster {
    /// Lines containing `what` in the logs of every `role` process (e.g. what the healers did).
    pub fn log_lines(&self, role: &str, what: &str) -> Result<usize> {
        let mut n = 0;
        for p in self.info()?.processes.iter().filter(|p| p.role == role) {
            if let Some(log) = &p.log {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                n += text.lines().filter(|l| l.contains(what)).count();
            }
        }
        Ok(n)
    }

    /// The scrub status of chunkserver `id` (its rate, bytes verified, bad copies found),
    /// over its control port.
    pub fn scrub_status(&self, id: u64) -> Result<ScrubStatus> {
        let addr = self
            .process("chunkserver", id)?
            .control_addr
            .context("no control address in cluster.json")?;
        block_on(async {
            let ctl = connect_control(&addr, Duration::from_secs(5)).await?;
            Ok(ctl.scrub_status(deadline(Duration::from_secs(5))).await?)
        })
    }

    /// Ids of the metadata replicas in cluster.json.
    pub fn metadata_ids(&self) -> Result<Vec<u64>> {
        Ok(self
            .info()?
            .processes
            .iter()
            .filter(|p| p.role == "metadata")
            .map(|p| p.id)
            .collect())
    }

    /// Client address of metadata replica `id`.
    pub fn metadata_addr(&self, id: u64) -> Result<String> {
        Ok(self.process("metadata", id)?.addr)
    }

    /// A client of the whole metadata group (every address; finds the leader itself).
    pub fn meta_client(&self) -> Result<MetadataClient> {
        let addrs: Vec<String> = self
            .metadata_ids()?
            .into_iter()
            .map(|id| self.metadata_addr(id))
            .collect::<Result<_>>()?;
        let _rt = runtime().enter();
        Ok(MetadataClient::new(
            addrs,
            ClientTimeouts {
                call: Duration::from_secs(2),
                op: Duration::from_secs(20),
            },
        ))
    }

    /// What replica `id` says about itself.
    pub fn replica_status(&self, id: u64) -> Result<ReplicaStatus> {
        replica_status_at(&self.metadata_addr(id)?)
    }

    /// The digest of replica `id`'s state.
    pub fn digest(&self, id: u64) -> Result<StateDigest> {
        digest_at(&self.metadata_addr(id)?)
    }

    /// Every replica that answers, by id, asked in parallel. Replicas that are dead or that
    /// this test stopped with SIGSTOP are skipped (they would only cost a deadline).
    pub fn replica_statuses(&self) -> Result<BTreeMap<u64, ReplicaStatus>> {
        let mut asks = tokio::task::JoinSet::new();
        for id in self.metadata_ids()? {
            let pid = self.pid("metadata", id)?;
            if !pid_alive(pid) || self.stopped.contains(&pid) {
                continue;
            }
            let c = replica_client(&self.metadata_addr(id)?);
            let _rt = runtime().enter();
            asks.spawn(async move {
                let s = tokio::time::timeout(REPLICA_CALL * 2, c.replica_status()).await;
                (id, s)
            });
        }
        let mut out = BTreeMap::new();
        block_on(async {
            while let Some(done) = asks.join_next().await {
                if let Ok((id, Ok(Ok(s)))) = done {
                    out.insert(id, s);
                }
            }
        });
        Ok(out)
    }

    /// The current leader and its term, if a replica that answers says it leads and no
    /// answering replica knows a newer term (a stale leader that has not noticed yet does
    /// not count).
    pub fn leader(&self) -> Result<Option<(u64, u64)>> {
        let all = self.replica_statuses()?;
        let newest = all.values().map(|s| s.term).max().unwrap_or(0);
        Ok(all
            .iter()
            .find(|(_, s)| s.role == "leader" && s.term == newest)
            .map(|(id, s)| (*id, s.term)))
    }

    /// Waits for a leader whose term is at least `min_term` and that is not `not`; returns
    /// its id and term.
    pub fn wait_leader(
        &self,
        timeout: Duration,
        min_term: u64,
        not: Option<u64>,
    ) -> Result<(u64, u64)> {
        let mut found = None;
        wait_until("a metadata leader", timeout, || {
            found = self
                .leader()?
                .filter(|(id, term)| *term >= min_term && Some(*id) != not);
            Ok(found.is_some())
        })?;
        found.context("leader")
    }

    /// Waits until replicas `ids` have applied the same log index, then checks that their
    /// state digests are equal; returns the common digest. Fails at once if two replicas at
    /// the same applied index hold different states.
    pub fn wait_converged(&self, ids: &[u64], timeout: Duration) -> Result<StateDigest> {
        let mut last: Vec<(u64, Result<StateDigest>)> = Vec::new();
        let mut same = None;
        let r = wait_until("the replicas to converge", timeout, || {
            last = ids.iter().map(|id| (*id, self.digest(*id))).collect();
            let ok: Vec<(u64, StateDigest)> = last
                .iter()
                .filter_map(|(id, d)| d.as_ref().ok().map(|d| (*id, *d)))
                .collect();
            if ok.len() != ids.len() {
                return Ok(false);
            }
            let first = ok[0].1;
            if ok.iter().any(|(_, d)| d.applied != first.applied) {
                return Ok(false);
            }
            if let Some((id, d)) = ok.iter().find(|(_, d)| d.digest != first.digest) {
                bail!(
                    "replicas {} and {id} both applied index {} but their states differ: \
                     digest {:#x} vs {:#x}",
                    ok[0].0,
                    first.applied,
                    first.digest,
                    d.digest
                );
            }
            same = Some(first);
            Ok(true)
        });
        if let Err(e) = r {
            let seen: Vec<String> = last
                .iter()
                .map(|(id, d)| match d {
                    Ok(d) => format!("{id}: applied {} digest {:#x}", d.applied, d.digest),
                    Err(e) => format!("{id}: {e:#}"),
                })
                .collect();
            bail!("{e:#}; last seen: {}", seen.join(", "));
        }
        same.context("digest")
    }

    /// Waits until replica `id` has applied at least what the leader had applied when this
    /// was called.
    pub fn wait_caught_up(&self, id: u64, timeout: Duration) -> Result<()> {
        let (leader, _) = self.wait_leader(timeout, 0, None)?;
        let target = self.replica_status(leader)?.applied;
        wait_until(
            &format!("replica {id} to apply index {target}"),
            timeout,
            || Ok(self.replica_status(id)?.applied >= target),
        )
    }

    /// SIGSTOP `role`/`id` (it is resumed at teardown if the test does not).
    pub fn sigstop(&mut self, role: &str, id: u64) -> Result<u32> {
        let pid = self.pid(role, id)?;
        if !pid_alive(pid) {
            bail!("{role} {id} (pid {pid}) is not running");
        }
        signal(pid, libc::SIGSTOP);
        self.stopped.push(pid);
        wait_until(
            &format!("{role} {id} to stop"),
            Duration::from_secs(5),
            || Ok(process_state(pid) == Some('T')),
        )?;
        Ok(pid)
    }

    /// SIGCONT `role`/`id`.
    pub fn sigcont(&mut self, role: &str, id: u64) -> Result<()> {
        let pid = self.pid(role, id)?;
        signal(pid, libc::SIGCONT);
        self.stopped.retain(|p| *p != pid);
        Ok(())
    }

    /// Removes everything in the data directory of `role`/`id` (which must not run).
    pub fn wipe_data(&self, role: &str, id: u64) -> Result<()> {
        let pid = self.pid(role, id)?;
        if pid_alive(pid) {
            bail!("{role} {id} still runs (pid {pid}); kill it before wiping its data");
        }
        let dir = self.process(role, id)?.data_dir;
        for e in std::fs::read_dir(&dir).with_context(|| dir.display().to_string())? {
            let p = e?.path();
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        Ok(())
    }

    /// Runs `rawfs ARGS...` (quiet logging) and returns its output.
    pub fn rawfs(&self, args: &[&str]) -> Result<Output> {
        Ok(Command::new(crate::harness::rawfs_bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .env_remove("RAWFS_METADATA")
            .output()?)
    }

    /// Runs `rawfs ARGS... --dir DIR` and fails with its stderr unless it exits 0.
    pub fn rawfs_ok(&self, args: &[&str]) -> Result<String> {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--dir", &dir]);
        let out = self.rawfs(&all)?;
        if !out.status.success() {
            bail!(
                "rawfs {} failed ({}): {}",
                all.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The state letter of `pid` from /proc (`R`, `S`, `T` for stopped, `Z`...).
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}
