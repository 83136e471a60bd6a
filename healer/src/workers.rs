//! Running a scan's plan: several repairs at once, most endangered first.
//!
//! ```text
//!  plan ──▶ jobs: one per copy or shard rebuild, ordered by danger; the k-th extra copy of
//!           a chunk counts the k copies before it (the 2nd copy of a chunk that had one
//!           left ranks with the chunks that have two)
//!  up to `workers` jobs in flight; a freed worker takes the first job whose chunk has
//!     nothing in flight (copies of one chunk go one after the other: each bumps the chunk's
//!     version, the next starts from it; after a failure the chunk's other copies wait for
//!     its back-off and the next plan)
//!  every piece ──▶ Pace: the shared throttle, the worker's progress
//!  each outcome ──▶ the scan (back-off, targets to avoid)
//! ```
//!
//! So every chunk one loss from lost gets its first new copy before any chunk that is two
//! losses away gets one, while the workers keep the disks busy.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use rawfs_client::erasure::Codec;
use rawfs_metadata_api::ChunkId;

use crate::copy::{self, Ctx, RepairError};
use crate::pace::JobInfo;
use crate::planner::{Rebuild, Repair, Work};
use crate::reconstruct::{self, RebuildError, Rebuilt};

/// One repair.
#[derive(Debug)]
pub enum Job<'a> {
    /// A copy; `copies_left` counts the copies made earlier in this scan.
    Copy(Repair),
    Rebuild(&'a Rebuild),
}

impl Job<'_> {
    pub fn chunk(&self) -> ChunkId {
        match self {
            Job::Copy(r) => r.chunk,
            Job::Rebuild(r) => r.chunk,
        }
    }

    /// Failures the chunk survives when the job starts: 0 is the most urgent.
    fn margin(&self) -> usize {
        match self {
            Job::Copy(r) => r.margin(),
            Job::Rebuild(r) => r.margin(),
        }
    }

    /// What the progress report shows; `chunk_bytes` is the chunk's data length.
    pub fn info(&self, chunk_bytes: u64) -> JobInfo {
        match self {
            Job::Copy(r) => JobInfo {
                chunk: r.chunk,
                kind: "copy",
                target: r.target,
                copies_left: r.copies_left as u32,
                bytes: chunk_bytes,
            },
            Job::Rebuild(r) => JobInfo {
                chunk: r.chunk,
                kind: "rebuild",
                target: r.targets.first().map_or(0, |t| t.1),
                copies_left: r.margin() as u32 + 1,
                bytes: r.length,
            },
        }
    }
}

/// The plan's work as jobs, most urgent first (see the module docs); the copies of one
/// chunk keep their order.
pub fn jobs<'a>(work: Vec<Work<'a>>) -> Vec<Job<'a>> {
    let mut before: HashMap<ChunkId, usize> = HashMap::new();
    let mut out: Vec<Job<'a>> = work
        .into_iter()
        .map(|w| match w {
            Work::Copy(r) => {
                let n = before.entry(r.chunk).or_default();
                let mut r = r.clone();
                r.copies_left += *n;
                *n += 1;
                Job::Copy(r)
            }
            Work::Rebuild(r) => Job::Rebuild(r),
        })
        .collect();
    // Stable: equal margins keep the plan's order (by chunk id).
    out.sort_by_key(Job::margin);
    out
}

/// The jobs of a scan waiting for a worker.
pub struct Queue<'a> {
    jobs: Vec<Job<'a>>,
    /// Chunks with a job in flight.
    busy: HashSet<ChunkId>,
    /// A chunk's version after the copies made so far, `None` after a failed one.
    moved: HashMap<ChunkId, Option<u64>>,
}

impl<'a> Queue<'a> {
    pub fn new(jobs: Vec<Job<'a>>) -> Self {
        Queue {
            jobs,
            busy: HashSet::new(),
            moved: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The first job whose chunk has nothing in flight (a copy at the version the chunk's
    /// copies before it left), marked in flight; `None` if every waiting job must wait.
    pub fn take(&mut self) -> Option<Job<'a>> {
        loop {
            let i = self
                .jobs
                .iter()
                .position(|j| !self.busy.contains(&j.chunk()))?;
            let mut job = self.jobs.remove(i);
            if let Job::Copy(r) = &mut job {
                match self.moved.get(&r.chunk) {
                    Some(None) => continue,
                    Some(Some(v)) => r.version = *v,
                    None => {}
                }
            }
            self.busy.insert(job.chunk());
            return Some(job);
        }
    }

    /// The job on `chunk` ended: its version after a copy, `None` if the copy failed
    /// (the chunk's other copies are dropped from this scan).
    pub fn done(&mut self, chunk: ChunkId, copied: Option<Option<u64>>) {
        self.busy.remove(&chunk);
        if let Some(v) = copied {
            self.moved.insert(chunk, v);
        }
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    /// The chunk's new version and the bytes moved.
    Copy(Result<copy::Copied, RepairError>),
    /// `None` on a CPU that cannot run the RS kernel (nothing tried).
    Rebuild(Option<Result<Rebuilt, RebuildError>>),
}

impl Outcome {
    pub fn stopped(&self) -> bool {
        matches!(
            self,
            Outcome::Copy(Err(RepairError::Stopped))
                | Outcome::Rebuild(Some(Err(RebuildError::Stopped)))
        )
    }

    pub fn ok(&self) -> bool {
        match self {
            Outcome::Copy(r) => r.is_ok(),
            Outcome::Rebuild(r) => matches!(r, Some(Ok(done)) if done.failed.is_empty()),
        }
    }
}

/// Runs one job.
pub async fn run(ctx: &Ctx<'_>, codec: Option<&Codec>, job: &Job<'_>) -> Outcome {
    match job {
        Job::Rebuild(rb) => match codec {
            Some(codec) => Outcome::Rebuild(Some(reconstruct::rebuild(ctx, codec, rb).await)),
            None => Outcome::Rebuild(None),
        },
        Job::Copy(r) => {
            let started = Instant::now();
            let done = copy::re_replicate(ctx, r).await;
            match &done {
                Ok(copied) => tracing::info!(
                    chunk = r.chunk,
                    copies_left = r.copies_left,
                    target = r.target,
                    bytes = copied.bytes,
                    worker = ctx.pace.worker,
                    ms = started.elapsed().as_millis() as u64,
                    "repaired chunk"
                ),
                Err(RepairError::Stopped) => {}
                Err(e) => tracing::warn!(
                    chunk = r.chunk,
                    copies_left = r.copies_left,
                    target = r.target,
                    error = %e,
                    "repair failed"
                ),
            }
            Outcome::Copy(done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repair(chunk: u64, target: u64) -> Repair {
        Repair {
            chunk,
            version: 1,
            sources: vec![1],
            target,
            copies_left: 1,
        }
    }

    #[test]
    fn later_copies_rank_by_the_copies_made_before_them() {
        let (a, b, c) = (repair(5, 2), repair(3, 2), repair(5, 4));
        let two_left = Repair {
            copies_left: 2,
            ..repair(1, 3)
        };
        let work = vec![
            Work::Copy(&a),
            Work::Copy(&c),
            Work::Copy(&b),
            Work::Copy(&two_left),
        ];
        let js = jobs(work);
        let order: Vec<(u64, usize)> = js
            .iter()
            .map(|j| match j {
                Job::Copy(r) => (r.chunk, r.copies_left),
                Job::Rebuild(r) => (r.chunk, 0),
            })
            .collect();
        assert_eq!(order, [(5, 1), (3, 1), (5, 2), (1, 2)]);
        assert_eq!(js[0].info(10).bytes, 10);
    }

    #[test]
    fn a_chunk_runs_one_job_at_a_time_from_the_version_the_last_left() {
        let (a, b, c) = (repair(5, 2), repair(3, 2), repair(5, 4));
        let mut q = Queue::new(jobs(vec![Work::Copy(&a), Work::Copy(&b), Work::Copy(&c)]));
        let first = q.take().unwrap();
        let second = q.take().unwrap();
        assert_eq!((first.chunk(), second.chunk()), (5, 3));
        assert!(
            q.take().is_none(),
            "chunk 5's second copy waits for its first"
        );
        q.done(5, Some(Some(9)));
        match q.take() {
            Some(Job::Copy(r)) => assert_eq!((r.chunk, r.version, r.target), (5, 9, 4)),
            other => panic!("{other:?}"),
        }
        assert!(q.is_empty());
        // After a failure the chunk's remaining copies are dropped.
        let mut q = Queue::new(jobs(vec![Work::Copy(&a), Work::Copy(&c)]));
        q.take().unwrap();
        q.done(5, Some(None));
        assert!(q.take().is_none() && q.is_empty());
    }
}
