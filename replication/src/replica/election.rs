//! The election timer, in place of openraft's, with a pre-vote round.
//!
//! ```text
//!  raft RPC server: AppendEntries / InstallSnapshot accepted, vote granted --> Contact::touch
//!  timer task: quiet = now - max(contact, own last election, last time leading)
//!              quiet >= lease (if following a leader) + random(jitter)
//!                  --> pre-vote: ask every voter "would you vote for my log now?"
//!                      a majority yes --> Raft::trigger().elect(), draw a new jitter
//!                      otherwise      --> wait another round, term unchanged
//! ```
//!
//! Why not openraft 0.9's own timer: it draws one random timeout per process and checks it
//! on a tick every 1.5 heartbeat intervals. Two replicas whose timeouts round to the same
//! number of ticks and whose tick tasks started within a few milliseconds of each other
//! (replicas started together, as `rawfs up` and tests do) time out at the same instant in
//! every round, each votes for itself, and the group never elects a leader (observed: a
//! livelock of more than 15 s after the leader of a 3-replica group stopped). This timer
//! draws a fresh timeout for every round and sleeps precisely, which breaks such ties the
//! way the Raft paper intends.
//!
//! Why the pre-vote (Raft thesis §9.6): openraft's voters do not adopt the term of a vote
//! request they refuse. When the leader dies in the middle of a write burst, the survivors'
//! logs differ; the one that is behind can never win, yet each of its elections raised its
//! term, and the one that is ahead then had to lose a round of its own to learn that term
//! before it could win. Observed under load: 21 failed elections and 24 s without a leader.
//! A replica now raises its term only after a majority said it would vote for its log, so
//! the replica that is behind never campaigns and the one ahead wins in its first round.
//! The pre-vote answer uses the same state as openraft's vote handler (leader lease, last
//! log id), so it predicts the real vote except for a race with another candidate.
//!
//! openraft's rules are otherwise kept: a follower of a live leader waits for the leader
//! lease to pass (its vote requests would be refused before that), and a single voter elects
//! itself at once.

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use openraft::RaftMetrics;
use openraft::ServerState;
use rand::Rng;

use crate::log_store::LogStore;
use crate::network::NetworkFaults;
use crate::network::PeerClient;
use crate::network::PreVote;
use crate::types::Raft;
use crate::Node;

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
    /// A new election timeout is drawn uniformly from this range for every round. After a
    /// leader's contact the timer waits the lease plus the timeout's excess over the minimum.
    pub timeout: (Duration, Duration),
    /// openraft's leader lease: voters refuse to vote while it runs after leader contact.
    pub lease: Duration,
    /// How often a leader or a non-voter looks again (roles change without contact).
    pub recheck: Duration,
}

/// What the timer needs besides raft itself.
pub(super) struct Timer {
    pub raft: Raft,
    pub id: u64,
    pub contact: Arc<Contact>,
    pub timing: Timing,
    /// This replica's log, whose end the pre-vote offers.
    pub log: LogStore,
    /// The fault injection hook of tests, applied to pre-votes as to votes.
    pub faults: Option<Arc<dyn NetworkFaults>>,
}

fn draw(t: &Timing) -> Duration {
    let (lo, hi) = t.timeout;
    if hi <= lo {
        return lo;
    }
    rand::thread_rng().gen_range(lo..hi)
}

/// Runs the election timer until raft stops.
pub(super) async fn run(t: Timer) {
    let timing = t.timing;
    let id = t.id;
    let mut peers: HashMap<u64, PeerClient> = HashMap::new();
    let mut timeout = draw(&timing);
    let mut last_elect: Option<Instant> = None;
    let mut last_leading: Option<Instant> = None;
    loop {
        let m = t.raft.metrics().borrow().clone();
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
                elect(&t.raft, id).await;
            }
            timing.recheck
        } else {
            let since = [Some(t.contact.last()), last_elect, last_leading]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(now);
            let needed = if m.vote.is_committed() {
                timing.lease + (timeout - timing.timeout.0.min(timeout))
            } else {
                timeout
            };
            let quiet = now.saturating_duration_since(since);
            if quiet >= needed {
                if pre_vote(&t, &m, &mut peers).await {
                    tracing::info!(
                        id,
                        term = m.current_term,
                        ?quiet,
                        "no leader heard and a majority would vote for this log: campaigning"
                    );
                    elect(&t.raft, id).await;
                }
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

/// Asks every other voter whether it would vote for this replica's log now; true once that
/// makes a majority of every voter set of the membership (a joint one has two).
async fn pre_vote(
    t: &Timer,
    m: &RaftMetrics<u64, Node>,
    peers: &mut HashMap<u64, PeerClient>,
) -> bool {
    let membership = m.membership_config.membership();
    let configs: Vec<BTreeSet<u64>> = membership.get_joint_config().clone();
    let req = PreVote {
        candidate: t.id,
        last_log_id: t.log.last_log_id(),
    };
    let mut granted = BTreeSet::from([t.id]);
    let majority = |granted: &BTreeSet<u64>| {
        configs
            .iter()
            .all(|c| c.intersection(granted).count() * 2 > c.len())
    };
    if majority(&granted) {
        return true;
    }
    // Short: a peer that does not answer within a few heartbeats is as good as a "no", and
    // the round is repeated after the next timeout anyway.
    let ttl = t.timing.recheck * 3;
    peers.retain(|target, _| membership.voter_ids().any(|v| v == *target));
    let mut asks = FuturesUnordered::new();
    for target in membership.voter_ids().filter(|v| *v != t.id) {
        let Some(node) = membership.get_node(&target) else {
            continue;
        };
        let mut client = match peers.remove(&target) {
            Some(c) if c.node() == node => c,
            _ => PeerClient::with_faults(t.id, target, node.clone(), t.faults.clone()),
        };
        asks.push(async move {
            let reply = client.pre_vote(req, ttl).await;
            (target, client, reply)
        });
    }
    let mut won = false;
    while let Some((target, client, reply)) = asks.next().await {
        peers.insert(target, client);
        match reply {
            Ok(r) if r.granted => {
                granted.insert(target);
                if majority(&granted) {
                    won = true;
                    break;
                }
            }
            Ok(r) => {
                tracing::debug!(id = t.id, target, refused_by = ?r.refused_by, "pre-vote refused")
            }
            Err(e) => tracing::debug!(id = t.id, target, error = %e, "pre-vote unanswered"),
        }
    }
    // Clients still asking are dropped with their futures (a reconnect costs little).
    won
}

async fn elect(raft: &Raft, id: u64) {
    if let Err(e) = raft.trigger().elect().await {
        tracing::debug!(id, error = %e, "cannot start an election");
    }
}
