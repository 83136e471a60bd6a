//! Latency of proposals on a one-node and a three-node group with the toy state machine.
//! Compiled only with `--cfg rawfs_bench` (it measures, it does not check much); run it with a
//! separate target directory so the flag does not invalidate the shared one:
//! `RUSTFLAGS="--cfg rawfs_bench" CARGO_TARGET_DIR=/tmp/rawfs-bench cargo test -p
//! rawfs-replication --test replication bench -- --nocapture --test-threads=1`.

use std::collections::BTreeMap;
use std::time::Duration;
use std::time::Instant;

use rawfs_replication::Replica;
use rawfs_replication::ReplicaConfig;
use rawfs_replication::Role;

use crate::toy::init_tracing;
use crate::toy::wait_for;
use crate::toy::ToySm;

const PROPOSALS: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_sequential_propose_latency() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = ReplicaConfig::new(
        1,
        dir.path(),
        "127.0.0.1:0".parse().expect("addr"),
        "client-1",
        BTreeMap::new(),
    );
    let r = Replica::start(cfg, ToySm::durable()).await.expect("start");
    wait_for("leadership", Duration::from_secs(5), || {
        (r.status().role == Role::Leader).then_some(())
    })
    .await;
    // Warm up (first segment/table creation, connection of nothing: single node).
    for i in 0..50u32 {
        r.propose(i.to_be_bytes().to_vec()).await.expect("propose");
    }
    measure("sequential propose", PROPOSALS, || async {
        r.propose(vec![7u8; 150]).await.expect("propose");
    })
    .await;
    // What a caller needing a power-loss barrier after each operation pays.
    measure("sequential propose + sync_log", PROPOSALS / 4, || async {
        r.propose(vec![7u8; 150]).await.expect("propose");
        r.sync_log().await.expect("sync_log");
    })
    .await;
    // Several concurrent proposers (FUSE requests from several processes).
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let r = r.clone();
            tokio::spawn(async move {
                for _ in 0..PROPOSALS / 8 {
                    r.propose(vec![7u8; 150]).await.expect("propose");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("proposer");
    }
    println!(
        "8 concurrent proposers x{}: {:.0}/s",
        PROPOSALS / 8,
        PROPOSALS as f64 / started.elapsed().as_secs_f64()
    );
    r.shutdown().await.expect("shutdown");
}

/// The same on a three-replica group in one process (real TCP on 127.0.0.1): every proposal
/// is one AppendEntries round trip to a follower on top of the local work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_three_replica_propose_latency() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut listeners = Vec::new();
    let mut nodes = BTreeMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let node = rawfs_replication::Node {
            raft_addr: l.local_addr().expect("addr").to_string(),
            client_addr: format!("client-{id}"),
        };
        nodes.insert(id, node);
        listeners.push((id, l));
    }
    let mut replicas = Vec::new();
    for (id, l) in listeners {
        let mut peers = nodes.clone();
        peers.remove(&id);
        let cfg = ReplicaConfig::new(
            id,
            dir.path().join(format!("r{id}")),
            l.local_addr().expect("addr"),
            format!("client-{id}"),
            peers,
        );
        let r = Replica::start_with_listener(cfg, l, ToySm::durable())
            .await
            .expect("start");
        replicas.push(r);
    }
    let leader = wait_for("a leader", Duration::from_secs(15), || {
        replicas
            .iter()
            .find(|r| r.status().role == Role::Leader)
            .cloned()
    })
    .await;
    for i in 0..50u32 {
        leader
            .propose(i.to_be_bytes().to_vec())
            .await
            .expect("propose");
    }
    measure("3 replicas: sequential propose", PROPOSALS, || async {
        leader.propose(vec![7u8; 150]).await.expect("propose");
    })
    .await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let r = leader.clone();
            tokio::spawn(async move {
                for _ in 0..PROPOSALS / 8 {
                    r.propose(vec![7u8; 150]).await.expect("propose");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("proposer");
    }
    println!(
        "3 replicas: 8 concurrent proposers x{}: {:.0}/s",
        PROPOSALS / 8,
        PROPOSALS as f64 / started.elapsed().as_secs_f64()
    );
    for r in replicas {
        r.shutdown().await.expect("shutdown");
    }
}

/// Runs `op` `n` times in sequence and prints the rate and latency percentiles.
async fn measure<F, Fut>(what: &str, n: usize, mut op: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut lat = Vec::with_capacity(n);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        op().await;
        lat.push(t.elapsed());
    }
    let total = started.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{what} x{n}: {:.0}/s, mean {:?}, p50 {:?}, p99 {:?}, max {:?}",
        n as f64 / total.as_secs_f64(),
        total / n as u32,
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
}
