//! Repair pacing and progress: the token bucket every worker draws from, and the counters
//! the healer reports to the metadata service (`rawfs status`, `rawfs healer status`).
//!
//! ```text
//!  worker ─ piece of N bytes ─▶ Throttle::take(N): waits its turn at `rate` B/s (shared)
//!         ─ piece written ─────▶ Progress: worker's done bytes, moved bytes (throughput)
//!  lease task, every renewal ──▶ Progress::report ──healer_report──▶ leader
//!                            ◀── settings: repair rate ──▶ Throttle::set_rate
//! ```
//!
//! The throttle counts bytes copied (a replica copy) or decoded (a shard rebuild's stripes),
//! once per piece: the verification read after a copy is not paced, so the disk traffic of
//! a repair is up to twice the limit. Tiering conversions are not repairs and are not paced.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{HealerReport, WorkerReport};

/// The largest head start a piece gets after the throttle was idle: one second at the rate,
/// so that a pause does not become a burst later.
const BURST: Duration = Duration::from_secs(1);
/// Throughput is averaged over this window.
const WINDOW: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A token bucket shared by all workers: bytes per second, 0 = unlimited.
#[derive(Debug)]
pub struct Throttle(Mutex<Bucket>);

#[derive(Debug)]
struct Bucket {
    rate: u64,
    /// When the bytes booked so far are paid for.
    paid_until: Instant,
}

impl Throttle {
    pub fn new(rate: u64) -> Self {
        Throttle(Mutex::new(Bucket {
            rate,
            paid_until: Instant::now(),
        }))
    }

    pub fn rate(&self) -> u64 {
        lock(&self.0).rate
    }

    /// Changes the rate; pieces already waiting keep their turn, the next ones pay the new
    /// rate (a slower rate does not make them wait for what was booked at the old one).
    pub fn set_rate(&self, rate: u64) {
        let mut b = lock(&self.0);
        if b.rate != rate {
            tracing::info!(old = b.rate, rate, "repair rate changed");
            b.rate = rate;
            b.paid_until = b.paid_until.min(Instant::now());
        }
    }

    /// How long a piece of `bytes` booked at `now` waits before it may go.
    fn book(&self, bytes: u64, now: Instant) -> Duration {
        let mut b = lock(&self.0);
        if b.rate == 0 {
            return Duration::ZERO;
        }
        let start = b.paid_until.max(now.checked_sub(BURST).unwrap_or(now));
        b.paid_until = start + Duration::from_secs_f64(bytes as f64 / b.rate as f64);
        start.saturating_duration_since(now)
    }

    /// Waits until `bytes` more may be moved.
    pub async fn take(&self, bytes: u64) {
        let wait = self.book(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// A repair in flight, as the progress report shows it.
#[derive(Debug, Clone)]
struct Job {
    report: WorkerReport,
    started: Instant,
}

#[derive(Debug, Default)]
struct State {
    phase: &'static str,
    queued: u64,
    queued_bytes: u64,
    repaired: u64,
    repaired_bytes: u64,
    failed: u64,
    tiered: u64,
    /// Bytes moved by all repairs since start (pieces, not whole repairs).
    moved: u64,
    /// (when, moved) samples for the throughput, newest last.
    samples: VecDeque<(Instant, u64)>,
    jobs: BTreeMap<u32, Job>,
}

/// What the healer has done and is doing.
#[derive(Debug, Default)]
pub struct Progress(Mutex<State>);

/// What one repair is, for [`Progress::start`].
#[derive(Debug, Clone, Copy)]
pub struct JobInfo {
    pub chunk: u64,
    pub kind: &'static str,
    pub target: u64,
    pub copies_left: u32,
    pub bytes: u64,
}

impl Progress {
    pub fn set_phase(&self, phase: &'static str) {
        lock(&self.0).phase = phase;
    }

    /// A pass planned `count` repairs moving `bytes`.
    pub fn queue(&self, count: u64, bytes: u64) {
        let mut s = lock(&self.0);
        s.queued = count;
        s.queued_bytes = bytes;
    }

    /// Worker `worker` starts a repair.
    pub fn start(&self, worker: u32, job: JobInfo) {
        let mut s = lock(&self.0);
        s.queued = s.queued.saturating_sub(1);
        s.queued_bytes = s.queued_bytes.saturating_sub(job.bytes);
        s.jobs.insert(
            worker,
            Job {
                report: WorkerReport {
                    worker,
                    chunk: job.chunk,
                    kind: job.kind.to_string(),
                    target: job.target,
                    copies_left: job.copies_left,
                    done_bytes: 0,
                    bytes: job.bytes,
                    elapsed_ms: 0,
                },
                started: Instant::now(),
            },
        );
    }

    /// Worker `worker` moved `bytes` more.
    pub fn moved(&self, worker: u32, bytes: u64) {
        let mut s = lock(&self.0);
        s.moved += bytes;
        if let Some(j) = s.jobs.get_mut(&worker) {
            j.report.done_bytes += bytes;
        }
    }

    /// Worker `worker` is done with its repair: `ok` or failed.
    pub fn finish(&self, worker: u32, ok: bool) {
        let mut s = lock(&self.0);
        if let Some(j) = s.jobs.remove(&worker) {
            if ok {
                s.repaired += 1;
                s.repaired_bytes += j.report.bytes;
            } else {
                s.failed += 1;
            }
        }
    }

    /// A pass ended (completed or cut short): nothing queued until the next plan.
    pub fn end_pass(&self) {
        let mut s = lock(&self.0);
        s.queued = 0;
        s.queued_bytes = 0;
        s.jobs.clear();
    }

    pub fn tiered(&self, chunks: u64) {
        lock(&self.0).tiered += chunks;
    }

    /// The report for the metadata service, with the throughput since the samples in the
    /// window (one sample is taken per report).
    pub fn report(&self, active: bool, repair_rate: u64) -> HealerReport {
        self.report_at(active, repair_rate, Instant::now())
    }

    fn report_at(&self, active: bool, repair_rate: u64, now: Instant) -> HealerReport {
        let mut s = lock(&self.0);
        let moved = s.moved;
        s.samples.push_back((now, moved));
        while s
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > WINDOW)
        {
            s.samples.pop_front();
        }
        let throughput = match s.samples.front() {
            Some(&(t, m)) if now.saturating_duration_since(t) >= Duration::from_millis(500) => {
                ((moved - m) as f64 / now.saturating_duration_since(t).as_secs_f64()) as u64
            }
            _ => 0,
        };
        let phase = if !active {
            "standby"
        } else if s.phase.is_empty() {
            "idle"
        } else {
            s.phase
        };
        HealerReport {
            active,
            phase: phase.to_string(),
            repair_rate,
            throughput,
            queued: s.queued,
            queued_bytes: s.queued_bytes,
            repaired: s.repaired,
            repaired_bytes: s.repaired_bytes,
            failed: s.failed,
            tiered: s.tiered,
            workers: s
                .jobs
                .values()
                .map(|j| WorkerReport {
                    elapsed_ms: now.saturating_duration_since(j.started).as_millis() as u64,
                    ..j.report.clone()
                })
                .collect(),
        }
    }
}

/// One worker's handle on the shared throttle and progress.
#[derive(Clone, Copy)]
pub struct Pace<'a> {
    pub throttle: &'a Throttle,
    pub progress: &'a Progress,
    pub worker: u32,
}

impl Pace<'_> {
    /// Waits for the throttle, then counts `bytes` as moved (call before moving them).
    pub async fn piece(&self, bytes: u64) {
        self.throttle.take(bytes).await;
        self.progress.moved(self.worker, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_spaces_pieces_at_the_rate_after_a_burst() {
        let t = Throttle::new(1 << 20);
        let now = Instant::now() + BURST;
        // An idle bucket lets one second's worth go at once (plus the piece at hand); after
        // that each piece waits for the ones booked before it.
        assert_eq!(t.book(1 << 20, now), Duration::ZERO);
        assert_eq!(t.book(1 << 20, now), Duration::ZERO);
        let w = t.book(2 << 20, now);
        assert!((w.as_secs_f64() - 1.0).abs() < 0.01, "{w:?}");
        let w = t.book(1, now);
        assert!((w.as_secs_f64() - 3.0).abs() < 0.01, "{w:?}");
        // Unlimited: no wait, whatever was booked.
        t.set_rate(0);
        assert_eq!(t.book(1 << 30, now), Duration::ZERO);
    }

    #[test]
    fn a_faster_rate_takes_effect_at_once() {
        let t = Throttle::new(1024);
        let now = Instant::now() + BURST;
        t.book(1 << 20, now);
        assert!(t.book(1, now) > Duration::from_secs(100));
        t.set_rate(1 << 30);
        assert!(t.book(1 << 20, Instant::now() + BURST) < Duration::from_millis(10));
    }

    #[test]
    fn progress_counts_jobs_and_throughput() {
        let p = Progress::default();
        p.set_phase("repairing");
        p.queue(2, 300);
        let job = JobInfo {
            chunk: 9,
            kind: "copy",
            target: 4,
            copies_left: 1,
            bytes: 100,
        };
        let t0 = Instant::now();
        p.report_at(true, 0, t0);
        p.start(1, job);
        p.moved(1, 60);
        let r = p.report_at(true, 5, t0 + Duration::from_secs(2));
        assert_eq!((r.queued, r.queued_bytes), (1, 200));
        assert_eq!(r.workers.len(), 1);
        assert_eq!((r.workers[0].chunk, r.workers[0].done_bytes), (9, 60));
        assert_eq!(r.throughput, 30, "60 bytes in 2 s");
        assert_eq!((r.phase.as_str(), r.repair_rate), ("repairing", 5));
        p.finish(1, true);
        p.start(2, JobInfo { chunk: 10, ..job });
        p.finish(2, false);
        let r = p.report_at(false, 5, t0 + Duration::from_secs(3));
        assert_eq!((r.repaired, r.repaired_bytes, r.failed), (1, 100, 1));
        assert!(r.workers.is_empty());
        assert_eq!(r.phase, "standby");
    }
}
