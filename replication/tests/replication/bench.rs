//! Latency of sequential proposals on a one-node group with the toy state machine. Ignored by
//! default (it measures, it does not check much); run it with
//! `cargo test -p rawfs-replication --test replication bench -- --ignored --nocapture`.

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
#[ignore = "benchmark; run with --ignored --nocapture"]
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
    let mut lat = Vec::with_capacity(PROPOSALS);
    let started = Instant::now();
    for i in 0..PROPOSALS {
        let t = Instant::now();
        r.propose(vec![7u8; 100 + i % 100]).await.expect("propose");
        lat.push(t.elapsed());
    }
    let total = started.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "sequential propose x{PROPOSALS}: {:.0}/s, mean {:?}, p50 {:?}, p99 {:?}, max {:?}",
        PROPOSALS as f64 / total.as_secs_f64(),
        total / PROPOSALS as u32,
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    r.shutdown().await.expect("shutdown");
}
