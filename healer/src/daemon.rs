//! The healer daemon: hold the lease, scan, plan, repair, most endangered first.
//!
//! ```text
//!  lease task: healer_lease(id, ttl) every ttl/3 ─▶ Lease { term, valid until }
//!  scan loop (every scan interval, while the lease is held):
//!     endangered_chunks pages ─▶ planner::plan_with ─▶ work, by failures to spare:
//!        0: RS chunks with 4 live shards and replicated chunks with 1 copy left, then 1, ...
//!        each: copy::re_replicate or reconstruct::rebuild (missing shards decoded from 4);
//!        a failure backs the chunk off (1 s, 2 s, ... 60 s), a failed target is avoided
//!     then, if the repair pass completed: tiering::Tiering::pass (quiet chunks to RS 4+2,
//!        one at a time, for at most TIER_BUDGET)
//! ```
//!
//! Any number of healers may run; the one holding the lease works, the others wait for it
//! to lapse (a dead holder stops renewing). A healer that loses the lease mid-scan stops
//! before its next repair; one in flight may still commit, fenced by its term: a new leader
//! refuses it (`StaleTerm`) and the chunk's version refuses a copy made twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rawfs_chunkserver_api::DataClient;
use rawfs_metadata_api::{ChunkId, ClientTimeouts, MetaError, MetadataClient};
use tokio_util::sync::CancellationToken;

use futures::stream::{FuturesUnordered, StreamExt};

use crate::copy::Ctx;
use crate::pace::{Pace, Progress, Throttle};
use crate::planner::{self, ChunkState, EcState, ServerId, ServerState};
use crate::reconstruct::RebuildError;
use crate::tiering::{self, Tiering};
use crate::workers::{self, Job, Outcome, Queue};
use rawfs_client::erasure::{Codec, Layout};
use rawfs_client::{Client, ClientConfig};

/// How the healer runs.
#[derive(Clone, Debug)]
pub struct HealerConfig {
    /// Metadata service client addresses.
    pub metadata: Vec<String>,
    /// This healer's lease holder id (distinct per instance).
    pub id: u64,
    /// Time between scans of the chunk map.
    pub scan_interval: Duration,
    /// Lease length asked for (the service caps it at 10 s).
    pub lease_ttl: Duration,
    /// Quiet time after which the chunks of an `auto` file are converted to RS 4+2
    /// (`cold` files are converted whatever this says; see [`crate::tiering`]).
    pub cold_after: Duration,
    /// Bytes per second repairs move at most, while the cluster setting (`rawfs healer set
    /// --repair-rate`) is unset; 0 = unlimited. See [`DEFAULT_REPAIR_RATE`].
    pub repair_rate: u64,
    /// Repairs run at once (at least 1).
    pub workers: usize,
}

/// Default repair limit: 64 MiB/s, about a quarter of a disk's sequential bandwidth, so that
/// foreground I/O keeps most of the disk while a lost server's data is restored.
pub const DEFAULT_REPAIR_RATE: u64 = 64 << 20;
/// Default number of repairs in flight: enough to hide per-chunk latency (a copy is read,
/// written, synced, committed, fenced and verified one after the other).
pub const DEFAULT_WORKERS: usize = 4;

/// Why the healer stopped other than on request.
#[derive(Debug, thiserror::Error)]
pub enum HealerError {
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Most chunks asked for per `endangered_chunks` page.
const PAGE: u32 = 1024;
/// Deadline of one chunkserver call (a 4 MiB piece).
const DATA_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest back-off of a failing chunk.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest a scan spends tiering (plus one conversion in flight) before it checks for
/// repairs again: chunks at risk never wait long behind conversions.
const TIER_BUDGET: Duration = Duration::from_secs(60);

/// What the scan loop and the lease task share: the repair throttle (its rate set from the
/// metadata service's answer to each report) and the progress reported.
struct Shared {
    throttle: Throttle,
    progress: Progress,
}

/// The lease as this healer last got it.
#[derive(Clone, Copy, Debug)]
struct Held {
    term: u64,
    until: Instant,
}

/// A chunk whose repair failed: not tried again before `next`.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    next: Instant,
    delay: Duration,
}

/// What the healer remembers of failed repairs between scans.
#[derive(Default)]
struct Retries {
    backoff: HashMap<ChunkId, Backoff>,
    /// Targets a shard rebuild of the chunk failed on (a tombstone of an earlier copy, a
    /// failing disk): planned elsewhere while the chunk stays listed.
    avoid: std::collections::BTreeMap<ChunkId, Vec<ServerId>>,
}

impl Retries {
    /// Backs `chunk` off after a failure; returns the delay.
    fn fail(&mut self, chunk: ChunkId) -> Duration {
        let delay = self
            .backoff
            .get(&chunk)
            .map_or(Duration::from_secs(1), |b| (b.delay * 2).min(MAX_BACKOFF));
        self.backoff.insert(
            chunk,
            Backoff {
                next: Instant::now() + delay,
                delay,
            },
        );
        delay
    }

    /// Notes how a repair job ended: a success clears the chunk's back-off, a failure
    /// extends it (and a rebuild's failed targets are avoided next time).
    fn record(&mut self, job: &Job<'_>, outcome: Outcome) {
        let chunk = job.chunk();
        match (job, outcome) {
            (_, Outcome::Copy(Ok(_))) => {
                self.backoff.remove(&chunk);
            }
            (_, Outcome::Copy(Err(_))) => {
                self.fail(chunk);
            }
            (_, Outcome::Rebuild(None)) => {}
            (_, Outcome::Rebuild(Some(Ok(done)))) => {
                let avoid = self.avoid.entry(chunk).or_default();
                avoid.extend(done.failed.iter().map(|(t, _)| *t));
                avoid.extend(&done.reported);
                if done.failed.is_empty() {
                    self.backoff.remove(&chunk);
                }
            }
            (job, Outcome::Rebuild(Some(Err(e)))) => {
                let delay = self.fail(chunk);
                if let (Job::Rebuild(rb), RebuildError::Targets(_)) = (job, &e) {
                    let avoid = self.avoid.entry(chunk).or_default();
                    avoid.extend(rb.targets.iter().map(|(_, t)| *t));
                }
                tracing::warn!(
                    chunk,
                    error = %e,
                    retry_in_ms = delay.as_millis() as u64,
                    "shard rebuild failed"
                );
            }
        }
    }
}

/// Runs the healer until `stop` is cancelled.
pub async fn run(cfg: HealerConfig, stop: CancellationToken) -> Result<(), HealerError> {
    if cfg.metadata.is_empty() {
        return Err(HealerError::Config("no metadata address".into()));
    }
    if cfg.scan_interval.is_zero() || cfg.lease_ttl < Duration::from_millis(300) {
        return Err(HealerError::Config(
            "scan interval must be > 0 and the lease ttl at least 300ms".into(),
        ));
    }
    let meta = MetadataClient::new(cfg.metadata.clone(), ClientTimeouts::default());
    let held: Arc<Mutex<Option<Held>>> = Arc::default();
    let shared = Arc::new(Shared {
        throttle: Throttle::new(cfg.repair_rate),
        progress: Progress::default(),
    });
    let lease_task = tokio::spawn(keep_lease(
        meta.clone(),
        cfg.clone(),
        held.clone(),
        shared.clone(),
        stop.clone(),
    ));
    let data = DataClient::new(DATA_TIMEOUT);
    let client = Client::new(ClientConfig::new(cfg.metadata.clone()));
    // The RS 4+2 kernel has no run-time CPU dispatch: refuse tiering here rather than die of
    // SIGILL mid-conversion; repairs of replicated chunks still run.
    let (mut tiering, codec) = match Codec::new(Layout::DEFAULT) {
        Ok(c) => (Some(Tiering::new(cfg.cold_after, TIER_BUDGET)), Some(c)),
        Err(e) => {
            tracing::error!(error = %e, "tiering to RS 4+2 and shard rebuilds disabled on this CPU");
            (None, None)
        }
    };
    let mut retries = Retries::default();
    let mut report_failed = false;
    tracing::info!(
        id = cfg.id,
        cold_after_ms = tiering::quiet_ms(cfg.cold_after),
        "healer started"
    );
    loop {
        if let Some(term) = lease_term(&held) {
            let io = Io {
                meta: &meta,
                data: &data,
                codec: codec.as_ref(),
                shared: &shared,
                workers: cfg.workers.max(1),
            };
            shared.progress.set_phase("repairing");
            // The limits as they are now: one set since the last report (a lease renewal
            // away) applies to this pass from its start.
            report_and_apply(&meta, &cfg, &shared, true, &mut report_failed).await;
            let repaired = scan(&io, term, &held, &stop, &mut retries).await;
            shared.progress.end_pass();
            // Tiering only after a complete repair pass: repairs always go first.
            if let Some(t) = tiering.as_mut().filter(|_| repaired) {
                if !stop.is_cancelled() && lease_term(&held) == Some(term) {
                    let active = || lease_term(&held) == Some(term);
                    shared.progress.set_phase("tiering");
                    let done = t.pass(&client, &active, &stop).await;
                    shared.progress.tiered(done.converted);
                }
            }
            shared.progress.set_phase("idle");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(cfg.scan_interval) => {}
        }
    }
    let _ = lease_task.await;
    Ok(())
}

/// The term of a lease still valid for a while (not about to lapse mid-repair).
fn lease_term(held: &Mutex<Option<Held>>) -> Option<u64> {
    let h = *held.lock().unwrap_or_else(|p| p.into_inner());
    h.filter(|h| h.until > Instant::now() + Duration::from_millis(200))
        .map(|h| h.term)
}

/// Reports progress (`active`: this healer holds the lease) and applies the repair rate the
/// metadata service answers with; the first failure in a row is logged.
async fn report_and_apply(
    meta: &MetadataClient,
    cfg: &HealerConfig,
    sh: &Shared,
    active: bool,
    failed: &mut bool,
) {
    let report = sh.progress.report(active, sh.throttle.rate());
    match meta.healer_report(cfg.id, report).await {
        Ok(settings) => {
            *failed = false;
            sh.throttle
                .set_rate(settings.repair_rate.unwrap_or(cfg.repair_rate));
        }
        Err(e) if !*failed => {
            *failed = true;
            tracing::warn!(id = cfg.id, error = %e, "cannot report progress; keeping the repair rate");
        }
        Err(_) => {}
    }
}

/// Asks for the lease every ttl/3 and records what was granted; then reports progress and
/// applies the repair rate the metadata service answers with.
async fn keep_lease(
    meta: MetadataClient,
    cfg: HealerConfig,
    held: Arc<Mutex<Option<Held>>>,
    sh: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut had = false;
    let mut report_failed = false;
    loop {
        let asked = Instant::now();
        let got = meta
            .healer_lease(cfg.id, cfg.lease_ttl.as_millis() as u64)
            .await;
        let now_held = match got {
            Ok(l) => {
                if !had {
                    tracing::info!(id = cfg.id, term = l.term, "healer lease acquired: active");
                }
                // Counted from before the request: the leader's lease started later.
                Some(Held {
                    term: l.term,
                    until: asked + Duration::from_millis(l.ttl_ms),
                })
            }
            Err(MetaError::LeaseHeld { holder, .. }) => {
                if had {
                    tracing::warn!(id = cfg.id, holder, "healer lease lost: standby");
                }
                None
            }
            Err(e) => {
                tracing::warn!(id = cfg.id, error = %e, "cannot renew the healer lease");
                // Keep what is still valid; it lapses by itself.
                *held.lock().unwrap_or_else(|p| p.into_inner())
            }
        };
        had = now_held.is_some();
        *held.lock().unwrap_or_else(|p| p.into_inner()) = now_held;
        report_and_apply(&meta, &cfg, &sh, had, &mut report_failed).await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.lease_ttl / 3) => {}
        }
    }
}

/// The clients a scan works through.
struct Io<'a> {
    meta: &'a MetadataClient,
    data: &'a DataClient,
    /// `None` on a CPU the RS kernel cannot run on: no shard rebuilds.
    codec: Option<&'a Codec>,
    shared: &'a Shared,
    /// Repairs in flight at most.
    workers: usize,
}

/// One scan: every endangered chunk, planned and repaired in order of danger. True when the
/// pass went through (failed repairs are backed off), false when it was cut short (listing
/// failed, leader changed, lease lapsing, stopping).
async fn scan(
    io: &Io<'_>,
    term: u64,
    held: &Mutex<Option<Held>>,
    stop: &CancellationToken,
    retries: &mut Retries,
) -> bool {
    let (meta, data, sh, workers) = (io.meta, io.data, io.shared, io.workers);
    let mut chunks = Vec::new();
    let mut after = 0;
    let servers = loop {
        let page = match meta.endangered_chunks(after, PAGE).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list endangered chunks");
                return false;
            }
        };
        if page.term != term {
            tracing::info!(
                lease_term = term,
                leader_term = page.term,
                "leader changed: waiting for a new lease"
            );
            return false;
        }
        chunks.extend(page.chunks);
        match page.next {
            Some(n) => after = n,
            None => break page.servers,
        }
    };
    let now = Instant::now();
    retries
        .backoff
        .retain(|c, _| chunks.iter().any(|e| e.chunk == *c));
    retries
        .avoid
        .retain(|c, _| chunks.iter().any(|e| e.chunk == *c));
    let due = |c: &&rawfs_metadata_api::EndangeredChunk| {
        retries
            .backoff
            .get(&c.chunk)
            .map_or(true, |b| b.next <= now)
    };
    let ec_states: Vec<EcState> = chunks
        .iter()
        .filter(due)
        .filter_map(|c| {
            let ec = c.ec.as_ref()?;
            Some(EcState {
                chunk: c.chunk,
                version: c.version,
                length: ec.length,
                shards: ec
                    .shards
                    .iter()
                    .map(|s| (s.chunk, s.replica.as_ref().map(|r| r.server)))
                    .collect(),
            })
        })
        .filter(|_| io.codec.is_some())
        .collect();
    let states: Vec<ChunkState> = chunks
        .iter()
        .filter(due)
        .filter(|c| c.ec.is_none())
        .map(|c| ChunkState {
            chunk: c.chunk,
            version: c.version,
            replicas: c.replicas.clone(),
            wanted: c.wanted as usize,
            bytes: c.bytes,
        })
        .collect();
    let bytes: HashMap<ChunkId, u64> = chunks.iter().map(|c| (c.chunk, c.bytes)).collect();
    let srv: Vec<ServerState> = servers
        .iter()
        .map(|s| ServerState {
            id: s.id,
            up: s.up,
            free_bytes: s.free_bytes,
        })
        .collect();
    let addrs: HashMap<u64, String> = servers
        .iter()
        .filter(|s| s.up)
        .map(|s| (s.id, s.data_addr.clone()))
        .collect();
    let plan = planner::plan_with(&states, &ec_states, &srv, &retries.avoid);
    if !plan.lost.is_empty() {
        tracing::error!(chunks = ?plan.lost, "chunks with no live copy: waiting for a holder to return");
    }
    if !plan.ec_lost.is_empty() {
        tracing::error!(chunks = ?plan.ec_lost, "erasure-coded chunks lost: fewer than 4 live shards, waiting for a holder to return");
    }
    if !plan.stuck.is_empty() {
        tracing::warn!(chunks = ?plan.stuck, "chunks missing copies with no server to copy to");
    }
    // Targets avoided after a failure may be the only ones left: a stuck chunk tries them
    // again (after its back-off) rather than waiting forever.
    for c in &plan.stuck {
        retries.avoid.remove(c);
    }
    if plan.repairs.is_empty() && plan.rebuilds.is_empty() {
        return true;
    }
    tracing::info!(
        repairs = plan.repairs.len(),
        rebuilds = plan.rebuilds.len(),
        by_danger = ?plan.by_danger(),
        "repair plan"
    );
    let jobs = workers::jobs(plan.work());
    let job_bytes = |j: &Job<'_>| bytes.get(&j.chunk()).copied().unwrap_or(0);
    let queued: u64 = jobs.iter().map(|j| j.info(job_bytes(j)).bytes).sum();
    sh.progress.queue(jobs.len() as u64, queued);
    let mut queue = Queue::new(jobs);
    // Stops between pieces once the lease lapses, not only on shutdown: a repair that goes
    // on would be refused at its commit anyway (fenced by the term).
    let stopping = || stop.is_cancelled() || lease_term(held) != Some(term);
    let mut free: Vec<u32> = (1..=workers as u32).rev().collect();
    let mut in_flight = FuturesUnordered::new();
    let mut completed = true;
    loop {
        while let Some(&worker) = free.last() {
            if stopping() {
                break;
            }
            let Some(job) = queue.take() else { break };
            free.pop();
            let b = job_bytes(&job);
            sh.progress.start(worker, job.info(b));
            let ctx = Ctx {
                meta,
                data,
                addrs: &addrs,
                term,
                stopping: &stopping,
                pace: Pace {
                    throttle: &sh.throttle,
                    progress: &sh.progress,
                    worker,
                },
            };
            in_flight.push(async move {
                let outcome = workers::run(&ctx, io.codec, &job).await;
                (worker, job, outcome)
            });
        }
        let Some((worker, job, outcome)) = in_flight.next().await else {
            break;
        };
        free.push(worker);
        sh.progress.finish(worker, outcome.ok());
        let copied = match &outcome {
            Outcome::Copy(r) => Some(r.as_ref().ok().map(|c| c.version)),
            Outcome::Rebuild(_) => None,
        };
        queue.done(job.chunk(), copied);
        if outcome.stopped() {
            completed = false;
            continue;
        }
        retries.record(&job, outcome);
    }
    if !queue.is_empty() || !completed {
        tracing::info!("lease lapsing or stopping: scan abandoned");
        return false;
    }
    true
}
