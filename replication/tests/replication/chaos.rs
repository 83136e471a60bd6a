//! A seeded randomized test of the replicated core: replicas in one process whose raft RPCs
//! go through a fault-injecting hook (loss of requests or responses, delays, partitions),
//! crashed and restarted from their directories while a driver proposes commands.
//!
//! ```text
//!  driver (StdRng from the seed) --propose / crash / restart / faults / partition--> cluster
//!  sampler (every 5 ms) --status of every running replica--> Checker: one leader per term
//!  after every step --applied (index, term, command) of every replica--> Checker:
//!      every replica's sequence agrees with every other one at every index (committed
//!      entries never change), no command twice, only proposed commands, acknowledged
//!      proposals at the index they were acknowledged with
//!  end: heal, restart all, commit a marker --> identical applied sequences everywhere
//! ```
//!
//! The seed is printed at the start (`RAWFS_SEED=...`) and in every failure message; set
//! `RAWFS_SEED` to replay the driver's schedule. The run is not bit-for-bit reproducible:
//! threads and real sockets decide the order in which faults are drawn.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use openraft::RPCTypes;
use rand::rngs::StdRng;
use rand::Rng;
use rand::SeedableRng;
use rawfs_replication::Fault;
use rawfs_replication::NetworkFaults;
use rawfs_replication::Replica;
use rawfs_replication::ReplicationStatus;
use rawfs_replication::Role;

use crate::harness::Cluster;
use crate::harness::Tune;
use crate::toy::index_of;
use crate::toy::ToySm;
use crate::toy::ToyState;

const SEED_ENV: &str = "RAWFS_SEED";

fn seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_ENV}={s} is not a number")),
        Err(_) => rand::random(),
    }
}

/// How the network misbehaves right now.
#[derive(Debug)]
struct NetState {
    rng: StdRng,
    drop_request: f64,
    drop_response: f64,
    delay: f64,
    max_delay: Duration,
    /// One side of a partition: RPCs between it and the rest are lost.
    side: Option<BTreeSet<u64>>,
}

#[derive(Debug)]
struct Net(Mutex<NetState>);

impl Net {
    fn new(seed: u64) -> Net {
        Net(Mutex::new(NetState {
            // Another stream than the driver's, from the same seed.
            rng: StdRng::seed_from_u64(seed ^ 0x6e65_7477_6f72_6b21),
            drop_request: 0.0,
            drop_response: 0.0,
            delay: 0.0,
            max_delay: Duration::ZERO,
            side: None,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl NetworkFaults for Net {
    fn on_rpc(&self, from: u64, to: u64, rpc: RPCTypes) -> Fault {
        // A lost snapshot chunk holds its sender for openraft's snapshot timeout (30 s):
        // snapshots fail fast instead, as over a reset connection.
        let lost = match rpc {
            RPCTypes::InstallSnapshot => Fault::Fail,
            _ => Fault::DropRequest,
        };
        let mut st = self.lock();
        if let Some(side) = &st.side {
            if side.contains(&from) != side.contains(&to) {
                return lost;
            }
        }
        let roll: f64 = st.rng.gen();
        if roll < st.drop_request {
            return lost;
        }
        if roll < st.drop_request + st.drop_response {
            return match rpc {
                RPCTypes::InstallSnapshot => lost,
                _ => Fault::DropResponse,
            };
        }
        if roll < st.drop_request + st.drop_response + st.delay && !st.max_delay.is_zero() {
            let max = st.max_delay;
            let d = st.rng.gen_range(Duration::ZERO..max);
            return Fault::Delay(d);
        }
        Fault::Deliver
    }
}

/// The invariants, fed by the sampler and the driver.
struct Checker {
    seed: u64,
    /// The one leader of each term seen so far.
    leaders: BTreeMap<u64, u64>,
    /// Every entry any replica applied: index -> (term, command).
    log: BTreeMap<u64, (u64, Vec<u8>)>,
    proposed: HashSet<Vec<u8>>,
    /// Acknowledged proposals with the index they were acknowledged with.
    acked: BTreeMap<Vec<u8>, u64>,
    violation: Option<String>,
}

impl Checker {
    fn new(seed: u64) -> Checker {
        Checker {
            seed,
            leaders: BTreeMap::new(),
            log: BTreeMap::new(),
            proposed: HashSet::new(),
            acked: BTreeMap::new(),
            violation: None,
        }
    }

    fn violate(&mut self, msg: String) {
        if self.violation.is_none() {
            self.violation = Some(msg);
        }
    }

    /// Panics with the seed if any invariant was broken.
    fn check(&self) {
        if let Some(v) = &self.violation {
            panic!("invariant broken ({SEED_ENV}={}): {v}", self.seed);
        }
    }

    fn leader_of(&mut self, term: u64, id: u64, who: u64) {
        match self.leaders.insert(term, id) {
            Some(prev) if prev != id => self.violate(format!(
                "two leaders in term {term}: {prev} and {id} (reported by replica {who})"
            )),
            _ => {}
        }
    }

    fn status(&mut self, st: &ReplicationStatus) {
        if st.role == Role::Leader {
            self.leader_of(st.term, st.id, st.id);
        }
        // A replica names a leader only once its vote for it is committed (granted by a
        // quorum): the same uniqueness must hold.
        if let Some(l) = st.leader {
            self.leader_of(st.term, l, st.id);
        }
    }

    fn applied(&mut self, id: u64, st: &ToyState) {
        let mut seen = HashSet::new();
        let mut prev: Option<u64> = None;
        for (index, term, cmd) in &st.applied {
            if prev.is_some_and(|p| *index <= p) {
                self.violate(format!("replica {id} applied index {index} after {prev:?}"));
            }
            prev = Some(*index);
            if !seen.insert(cmd.clone()) {
                self.violate(format!(
                    "replica {id} applied {} twice",
                    String::from_utf8_lossy(cmd)
                ));
            }
            if !self.proposed.contains(cmd) {
                self.violate(format!(
                    "replica {id} applied {} that nobody proposed",
                    String::from_utf8_lossy(cmd)
                ));
            }
            match self.log.get(index) {
                Some((t, c)) if t != term || c != cmd => {
                    let msg = format!(
                        "entry {index} changed: replica {id} has ({term}, {}), another had ({t}, {})",
                        String::from_utf8_lossy(cmd),
                        String::from_utf8_lossy(c)
                    );
                    self.violate(msg);
                }
                Some(_) => {}
                None => {
                    self.log.insert(*index, (*term, cmd.clone()));
                }
            }
        }
        let wrong: Vec<String> = self
            .acked
            .iter()
            .filter_map(|(cmd, index)| {
                let (_, c) = self.log.get(index)?;
                (c != cmd).then(|| {
                    format!(
                        "acknowledged {} at index {index}, but index {index} holds {}",
                        String::from_utf8_lossy(cmd),
                        String::from_utf8_lossy(c)
                    )
                })
            })
            .collect();
        for msg in wrong {
            self.violate(msg);
        }
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records the status of every running replica every few milliseconds.
async fn sample(live: Shared<BTreeMap<u64, Replica>>, checker: Shared<Checker>) {
    loop {
        let statuses: Vec<ReplicationStatus> = lock(&live).values().map(|r| r.status()).collect();
        {
            let mut ch = lock(&checker);
            for st in &statuses {
                ch.status(st);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Chaos {
    c: Cluster,
    n: u64,
    net: Arc<Net>,
    rng: StdRng,
    checker: Shared<Checker>,
    live: Shared<BTreeMap<u64, Replica>>,
    next_cmd: u64,
    stats: BTreeMap<&'static str, u64>,
}

impl Chaos {
    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn sync_live(&self) {
        *lock(&self.live) = self.c.running.clone();
    }

    fn down(&self) -> Vec<u64> {
        (1..=self.n)
            .filter(|id| !self.c.running.contains_key(id))
            .collect()
    }

    /// The running replica that leads in the highest term, if any.
    fn leader(&self) -> Option<u64> {
        self.c
            .running
            .values()
            .map(|r| r.status())
            .filter(|s| s.role == Role::Leader)
            .max_by_key(|s| s.term)
            .map(|s| s.id)
    }

    /// Checks every replica's applied sequence (and whatever the sampler found).
    fn check(&self) {
        let mut ch = lock(&self.checker);
        for (id, sm) in &self.c.sms {
            ch.applied(*id, &sm.state());
        }
        ch.check();
    }

    async fn propose_batch(&mut self) {
        let deadline = Instant::now() + Duration::from_millis(800);
        let mut target = self.leader();
        while target.is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            target = self.leader();
        }
        let running: Vec<u64> = self.c.running.keys().copied().collect();
        let target = match target {
            Some(t) => t,
            // Nobody leads: a follower answers NotLeader, which is worth exercising too.
            None => running[self.rng.gen_range(0..running.len())],
        };
        let k = self.rng.gen_range(1..=4);
        let mut cmds = Vec::new();
        for _ in 0..k {
            let cmd = format!("c{}", self.next_cmd).into_bytes();
            self.next_cmd += 1;
            lock(&self.checker).proposed.insert(cmd.clone());
            cmds.push(cmd);
        }
        let r = self.c.replica(target).clone();
        let results = futures::future::join_all(cmds.iter().map(|cmd| {
            let r = r.clone();
            let cmd = cmd.clone();
            async move { r.propose(cmd).await }
        }))
        .await;
        for (cmd, res) in cmds.into_iter().zip(results) {
            match res {
                Ok(resp) => {
                    self.count("acknowledged");
                    lock(&self.checker).acked.insert(cmd, index_of(&resp));
                }
                Err(rawfs_replication::ProposeError::NotLeader { .. }) => self.count("not leader"),
                Err(e) => {
                    tracing::debug!(error = %e, "proposal failed (outcome unknown)");
                    self.count("unavailable");
                }
            }
        }
    }

    /// Whether a majority of the group can still talk together with `down` stopped and the
    /// network cut off `side`. The driver keeps it so: without a quorum every step would only
    /// wait for timeouts (losing the quorum is tested in cluster.rs).
    fn quorum(&self, down: &[u64], side: Option<&BTreeSet<u64>>) -> bool {
        let up = (1..=self.n)
            .filter(|id| !down.contains(id) && side.map_or(true, |s| !s.contains(id)))
            .count() as u64;
        up > self.n / 2
    }

    async fn crash(&mut self) {
        let running: Vec<u64> = self.c.running.keys().copied().collect();
        // Often the leader, to force elections.
        let id = match self.leader() {
            Some(l) if self.rng.gen_bool(0.5) => l,
            _ => running[self.rng.gen_range(0..running.len())],
        };
        let mut down = self.down();
        down.push(id);
        let side = self.net.lock().side.clone();
        if !self.quorum(&down, side.as_ref()) {
            return;
        }
        self.c.stop(id).await;
        self.sync_live();
        // The state machine loses what it had not made durable, as after a power loss.
        self.c.sms[&id].crash();
        self.count("crashes");
    }

    async fn restart(&mut self) {
        let down = self.down();
        if down.is_empty() {
            return;
        }
        let id = down[self.rng.gen_range(0..down.len())];
        self.c.restart(id).await;
        self.sync_live();
        self.count("restarts");
    }

    fn change_faults(&mut self) {
        let level = self.rng.gen_range(0..4);
        let mut st = self.net.lock();
        (st.drop_request, st.drop_response, st.delay, st.max_delay) = match level {
            0 => (0.0, 0.0, 0.0, Duration::ZERO),
            1 => (0.02, 0.02, 0.1, Duration::from_millis(20)),
            2 => (0.05, 0.05, 0.3, Duration::from_millis(60)),
            _ => (0.15, 0.05, 0.2, Duration::from_millis(150)),
        };
        drop(st);
        self.count("fault changes");
    }

    fn partition(&mut self) {
        let mut st = self.net.lock();
        if st.side.is_some() {
            st.side = None;
            drop(st);
            self.count("heals");
            return;
        }
        // A minority on one side: often the leader, to force an election.
        let size = self.rng.gen_range(1..=((self.n - 1) / 2).max(1));
        let mut ids: Vec<u64> = (1..=self.n).collect();
        let mut side = BTreeSet::new();
        let leader = self.leader();
        if let Some(l) = leader.filter(|_| self.rng.gen_bool(0.5)) {
            side.insert(l);
            ids.retain(|id| *id != l);
        }
        while side.len() < size as usize {
            let i = self.rng.gen_range(0..ids.len());
            side.insert(ids.swap_remove(i));
        }
        drop(st);
        if !self.quorum(&self.down(), Some(&side)) {
            return;
        }
        self.net.lock().side = Some(side);
        self.count("partitions");
    }

    async fn step(&mut self) {
        match self.rng.gen_range(0..100) {
            0..=59 => self.propose_batch().await,
            60..=67 => self.crash().await,
            68..=77 => self.restart().await,
            78..=89 => self.change_faults(),
            _ => self.partition(),
        }
        self.check();
    }

    /// Heals everything, commits a marker and waits until every replica applied the same.
    async fn settle(&mut self) -> Vec<(u64, u64, Vec<u8>)> {
        {
            let mut st = self.net.lock();
            st.side = None;
            (st.drop_request, st.drop_response, st.delay) = (0.0, 0.0, 0.0);
        }
        for id in self.down() {
            self.c.restart(id).await;
        }
        self.sync_live();
        // Each attempt proposes a new marker: re-proposing one whose outcome is unknown
        // could apply it twice. Unacknowledged markers may or may not show up.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut attempt = 0;
        let marker = loop {
            self.check();
            assert!(
                Instant::now() < deadline,
                "{SEED_ENV}={}: no marker committed within 30 s after healing",
                self.seed()
            );
            let Some(l) = self.leader() else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            let marker = format!("marker-{attempt}").into_bytes();
            attempt += 1;
            lock(&self.checker).proposed.insert(marker.clone());
            match self.c.replica(l).propose(marker.clone()).await {
                Ok(resp) => {
                    lock(&self.checker)
                        .acked
                        .insert(marker.clone(), index_of(&resp));
                    break marker;
                }
                Err(e) => tracing::info!(error = %e, "marker proposal failed; trying again"),
            }
        };
        let seed = self.seed();
        let all = crate::toy::wait_for(
            "identical applied sequences after healing",
            Duration::from_secs(30),
            || {
                let states: Vec<ToyState> = self.c.sms.values().map(|sm| sm.state()).collect();
                let done = states.iter().all(|s| {
                    s.applied.iter().any(|(_, _, c)| *c == marker) && s.applied == states[0].applied
                });
                done.then(|| states[0].applied.clone())
            },
        )
        .await;
        self.check();
        let ch = lock(&self.checker);
        for (cmd, index) in &ch.acked {
            assert!(
                all.iter().any(|(i, _, c)| i == index && c == cmd),
                "{SEED_ENV}={seed}: acknowledged {} (index {index}) missing after healing",
                String::from_utf8_lossy(cmd)
            );
        }
        all
    }

    fn seed(&self) -> u64 {
        lock(&self.checker).seed
    }
}

async fn run(n: u64, steps: usize) {
    let seed = seed();
    // Printed first: the test harness shows it with the output of a failed test.
    println!("chaos: {n} replicas, {steps} steps, {SEED_ENV}={seed}");
    let started = Instant::now();
    let net = Arc::new(Net::new(seed));
    let hook = net.clone();
    let tune: Tune = Arc::new(move |cfg| {
        cfg.faults = Some(hook.clone());
        cfg.heartbeat_interval = Duration::from_millis(50);
        cfg.election_timeout = (Duration::from_millis(300), Duration::from_millis(600));
        cfg.op_timeout = Duration::from_secs(1);
        // Frequent snapshots: restarted replicas often catch up by one.
        cfg.snapshot_every = 25;
        cfg.logs_to_keep = 5;
    });
    // Durable only every 3rd batch: a crash loses applies, which the log re-applies.
    let c = Cluster::start_with(n, tune, |_| ToySm::checkpoint_every(Some(3))).await;
    let checker = Arc::new(Mutex::new(Checker::new(seed)));
    let live = Arc::new(Mutex::new(c.running.clone()));
    let sampler = tokio::spawn(sample(live.clone(), checker.clone()));
    let mut chaos = Chaos {
        c,
        n,
        net,
        rng: StdRng::seed_from_u64(seed),
        checker,
        live,
        next_cmd: 0,
        stats: BTreeMap::new(),
    };
    for _ in 0..steps {
        chaos.step().await;
    }
    let applied = chaos.settle().await;
    sampler.abort();
    let terms = lock(&chaos.checker).leaders.len();
    println!(
        "chaos: {n} replicas, {steps} steps in {:?}: {} commands applied, {terms} terms with a leader, {:?}",
        started.elapsed(),
        applied.len(),
        chaos.stats
    );
    chaos.c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_crashes_and_restarts_three_replicas() {
    run(3, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_faults_crashes_and_restarts_five_replicas() {
    run(5, 100).await;
}

#[test]
fn the_checker_catches_two_leaders_in_a_term_and_a_changed_entry() {
    let status = |id: u64, role: Role, leader: Option<u64>| ReplicationStatus {
        id,
        role,
        term: 7,
        leader,
        leader_node: None,
        last_applied: 0,
        last_log_index: 0,
        snapshot_index: None,
        purged_index: None,
        members: BTreeMap::new(),
        voters: BTreeSet::new(),
        matched: BTreeMap::new(),
    };
    let mut ch = Checker::new(1);
    ch.status(&status(1, Role::Leader, Some(1)));
    ch.status(&status(2, Role::Follower, Some(1)));
    assert!(ch.violation.is_none());
    ch.status(&status(3, Role::Follower, Some(3)));
    assert!(ch.violation.is_some(), "a second leader in term 7");

    let mut ch = Checker::new(1);
    ch.proposed.extend([b"a".to_vec(), b"b".to_vec()]);
    let state = |applied: Vec<(u64, u64, Vec<u8>)>| ToyState {
        applied,
        ..ToyState::default()
    };
    ch.applied(
        1,
        &state(vec![(2, 1, b"a".to_vec()), (3, 1, b"b".to_vec())]),
    );
    ch.applied(2, &state(vec![(2, 1, b"a".to_vec())]));
    assert!(ch.violation.is_none(), "a prefix is consistent");
    ch.applied(
        3,
        &state(vec![(2, 1, b"a".to_vec()), (3, 2, b"b".to_vec())]),
    );
    assert!(ch.violation.is_some(), "entry 3 changed its term");

    let mut ch = Checker::new(1);
    ch.proposed.extend([b"a".to_vec(), b"b".to_vec()]);
    ch.acked.insert(b"a".to_vec(), 3);
    ch.applied(
        1,
        &state(vec![(2, 1, b"a".to_vec()), (3, 1, b"b".to_vec())]),
    );
    assert!(ch.violation.is_some(), "acknowledged at another index");
}
