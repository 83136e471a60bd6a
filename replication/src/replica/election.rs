//! The election timer, in place of openraft's.
//!
//! ```text
//!  raft RPC server: AppendEntries / InstallSnapshot accepted, vote granted --> Contact::touch
//!  timer task: quiet = now - max(contact, own last election, last time leading)
//!              quiet >= lease (if following a leader) + random(election_timeout)
//!                  --> Raft::trigger().elect(), draw a new random timeout
//! ```
//!
//! Why not openraft 0.9's own timer: it draws one random timeout per process and checks it
//! on a tick every 1.5 heartbeat intervals. Two replicas whose timeouts round to the same
//! number of ticks and whose tick tasks started within a few milliseconds of each other
//! (replicas started together, as `rawfs up` and tests do) time out at the same instant in
//! every round, each votes for itself, and the group never elects a leader (observed: a
//! livelock of more than 15 s after the leader of a 3-replica group stopped). This timer
//! draws a fresh timeout for every round and sleeps precisely, which breaks such ties the
//! way the Raft paper intends. openraft's rules are otherwise kept: a follower of a live
//! leader waits for the leader lease to pass on top of the timeout (its vote requests would
//! be refused before that), and a single voter elects itself at once.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use openraft::ServerState;
use rand::Rng;

use crate::types::Raft;

/// When this replica last heard from a leader it accepted, or granted a vote: the point its
/// election timer counts from.
#[derive(Debug)]
pub(crate) struct Contact(Mutex<Instant>);

impl Contact {
    pub(crate) fn new() -> Contact {
        Contact(Mutex::new(Instant::now()))
    }

    /// Records contact now.
    pub(crate) fn touch(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Timings of the election timer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    /// A new election timeout is drawn uniformly from this range for every round.
    pub timeout: (Duration, Duration),
    /// openraft's leader lease: voters refuse to vote while it runs after leader contact.
    pub lease: Duration,
    /// How often a leader or a non-voter looks again (roles change without contact).
    pub recheck: Duration,
}

fn draw(t: &Timing) -> Duration {
    let (lo, hi) = t.timeout;
    if hi <= lo {
        return lo;
    }
    rand::thread_rng().gen_range(lo..hi)
}

/// Runs the election timer of replica `id` until raft stops.
pub(super) async fn run(raft: Raft, id: u64, contact: Arc<Contact>, timing: Timing) {
    let mut timeout = draw(&timing);
    let mut last_elect: Option<Instant> = None;
    let mut last_leading: Option<Instant> = None;
    loop {
        let m = raft.metrics().borrow().clone();
        if m.running_state.is_err() || m.state == ServerState::Shutdown {
            return;
        }
        let now = Instant::now();
        let membership = m.membership_config.membership();
        let voters = membership.voter_ids().count();
        let is_voter = membership.voter_ids().any(|v| v == id);
        let wait = if m.state == ServerState::Leader {
            // Stepping down (deposed or removed) must not be followed by an instant campaign.
            last_leading = Some(now);
            timing.recheck
        } else if !is_voter {
            timing.recheck
        } else if voters == 1 {
            // The only voter needs nobody's vote: campaign at once, as openraft does.
            if m.state != ServerState::Candidate {
                elect(&raft, id).await;
            }
            timing.recheck
        } else {
            let since = [Some(contact.last()), last_elect, last_leading]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(now);
            let needed = if m.vote.is_committed() {
                timing.lease + timeout
            } else {
                timeout
            };
            let quiet = now.saturating_duration_since(since);
            if quiet >= needed {
                tracing::info!(
                    id,
                    term = m.current_term,
                    ?quiet,
                    "no leader heard: campaigning"
                );
                elect(&raft, id).await;
                last_elect = Some(Instant::now());
                timeout = draw(&timing);
                timeout
            } else {
                needed - quiet
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn elect(raft: &Raft, id: u64) {
    if let Err(e) = raft.trigger().elect().await {
        tracing::debug!(id, error = %e, "cannot start an election");
    }
}
