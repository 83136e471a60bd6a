//! A group of replicas in one process on real TCP (127.0.0.1), each with a toy state machine
//! and its own directory, that tests stop, wipe, restart and extend.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rawfs_replication::Node;
use rawfs_replication::Replica;
use rawfs_replication::ReplicaConfig;
use rawfs_replication::Role;
use tokio::net::TcpListener;

use crate::toy::init_tracing;
use crate::toy::wait_for;
use crate::toy::ToySm;

pub const WAIT: Duration = Duration::from_secs(15);

/// Adjusts each replica's configuration (timings, snapshots, fault hooks).
pub type Tune = Arc<dyn Fn(&mut ReplicaConfig) + Send + Sync>;

pub struct Cluster {
    pub base: tempfile::TempDir,
    /// Every replica ever part of the test, with its fixed raft address.
    pub addrs: BTreeMap<u64, SocketAddr>,
    pub sms: BTreeMap<u64, Arc<ToySm>>,
    pub running: BTreeMap<u64, Replica>,
    tune: Tune,
}

pub fn client_addr(id: u64) -> String {
    format!("client-{id}")
}

pub fn no_tuning() -> Tune {
    Arc::new(|_| {})
}

impl Cluster {
    /// Starts replicas `1..=n`, which form the group.
    pub async fn start(n: u64, tune: Tune) -> Cluster {
        Cluster::start_with(n, tune, |_| ToySm::durable()).await
    }

    /// Like [`Cluster::start`] with the state machines `sm(id)` makes.
    pub async fn start_with(n: u64, tune: Tune, sm: impl Fn(u64) -> Arc<ToySm>) -> Cluster {
        init_tracing();
        let mut listeners = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.insert(id, l.local_addr().expect("local addr"));
            listeners.insert(id, l);
        }
        let mut c = Cluster {
            base: tempfile::tempdir().expect("tempdir"),
            addrs,
            sms: (1..=n).map(|id| (id, sm(id))).collect(),
            running: BTreeMap::new(),
            tune,
        };
        for (id, l) in listeners {
            c.start_node(id, l, true).await;
        }
        c
    }

    pub fn node(&self, id: u64) -> Node {
        Node {
            raft_addr: self.addrs[&id].to_string(),
            client_addr: client_addr(id),
        }
    }

    pub fn dir(&self, id: u64) -> std::path::PathBuf {
        self.base.path().join(format!("r{id}"))
    }

    /// Replica `id`'s configuration: every other known replica is a peer.
    pub fn config(&self, id: u64, bootstrap: bool) -> ReplicaConfig {
        let peers = self
            .addrs
            .keys()
            .filter(|p| **p != id)
            .map(|p| (*p, self.node(*p)))
            .collect();
        let mut cfg = ReplicaConfig::new(id, self.dir(id), self.addrs[&id], client_addr(id), peers);
        cfg.bootstrap = bootstrap;
        cfg.heartbeat_interval = Duration::from_millis(100);
        cfg.election_timeout = (Duration::from_millis(500), Duration::from_millis(1000));
        cfg.op_timeout = Duration::from_secs(3);
        (self.tune)(&mut cfg);
        cfg
    }

    async fn start_node(&mut self, id: u64, listener: TcpListener, bootstrap: bool) {
        let r = Replica::start_with_listener(
            self.config(id, bootstrap),
            listener,
            self.sms[&id].clone(),
        )
        .await
        .expect("start replica");
        self.running.insert(id, r);
    }

    /// Restarts a stopped replica from its directory.
    pub async fn restart(&mut self, id: u64) {
        self.restart_with(id, true).await;
    }

    /// Restarts a stopped replica from its directory with the given `bootstrap` flag.
    pub async fn restart_with(&mut self, id: u64, bootstrap: bool) {
        let l = TcpListener::bind(self.addrs[&id]).await.expect("rebind");
        self.start_node(id, l, bootstrap).await;
    }

    /// Starts a brand-new replica `id` (not a member: `bootstrap` false) and returns its node.
    pub async fn add_node(&mut self, id: u64) -> Node {
        assert!(!self.addrs.contains_key(&id), "replica {id} exists");
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        self.addrs.insert(id, l.local_addr().expect("local addr"));
        self.sms.insert(id, ToySm::durable());
        self.start_node(id, l, false).await;
        self.node(id)
    }

    /// Loses a stopped replica's disk: its directory and its state machine.
    pub fn wipe(&mut self, id: u64) {
        assert!(!self.running.contains_key(&id), "replica {id} is running");
        std::fs::remove_dir_all(self.dir(id)).expect("remove replica dir");
        self.sms.insert(id, ToySm::durable());
    }

    pub async fn stop(&mut self, id: u64) {
        let r = self.running.remove(&id).expect("running");
        r.shutdown().await.expect("shutdown");
    }

    pub fn replica(&self, id: u64) -> &Replica {
        &self.running[&id]
    }

    /// Waits until one running replica leads in a term newer than `after_term` and every
    /// running replica knows it.
    pub async fn leader(&self, after_term: u64) -> (u64, u64) {
        wait_for("an agreed leader", WAIT, || {
            let st: Vec<_> = self.running.values().map(|r| r.status()).collect();
            let leader = st
                .iter()
                .find(|s| s.role == Role::Leader && s.term > after_term)?;
            st.iter()
                .all(|s| s.leader == Some(leader.id) && s.term == leader.term)
                .then_some((leader.id, leader.term))
        })
        .await
    }

    /// Waits until every running replica applied exactly `n` commands, and returns them.
    pub async fn converged(&self, n: usize) -> Vec<Vec<u8>> {
        wait_for("applied states to converge", WAIT, || {
            let all: Vec<_> = self
                .running
                .keys()
                .map(|id| self.sms[id].commands())
                .collect();
            (all.iter().all(|c| c.len() == n) && all.windows(2).all(|w| w[0] == w[1]))
                .then(|| all[0].clone())
        })
        .await
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.running.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}
