//! A one-replica group: election, proposals, restart and recovery of a forgetful state machine.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use rawfs_replication::Replica;
use rawfs_replication::ReplicaConfig;
use rawfs_replication::Role;

use crate::toy::count;
use crate::toy::init_tracing;
use crate::toy::wait_for;
use crate::toy::ToySm;

fn config(dir: &Path) -> ReplicaConfig {
    ReplicaConfig::new(
        1,
        dir,
        "127.0.0.1:0".parse().expect("addr"),
        "client-1",
        BTreeMap::new(),
    )
}

async fn start_leader(cfg: ReplicaConfig, sm: Arc<ToySm>) -> Replica {
    let started = Instant::now();
    let r = Replica::start(cfg, sm).await.expect("start");
    wait_for("single node leadership", Duration::from_secs(1), || {
        (r.status().role == Role::Leader).then_some(())
    })
    .await;
    tracing::info!(elapsed = ?started.elapsed(), "single node is leader");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_leads_within_a_second_and_applies_proposals() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = ToySm::durable();
    let r = start_leader(config(dir.path()), sm.clone()).await;

    assert_eq!(
        count(&r.propose(b"a".to_vec()).await.expect("propose a")),
        1
    );
    assert_eq!(
        count(&r.propose(b"b".to_vec()).await.expect("propose b")),
        2
    );
    assert_eq!(sm.commands(), vec![b"a".to_vec(), b"b".to_vec()]);

    let term = r.ensure_leader().await.expect("ensure_leader");
    // Metrics trail the responses slightly.
    let st = wait_for(
        "metrics to show the applies",
        Duration::from_secs(1),
        || {
            let st = r.status();
            (st.last_applied == 3).then_some(st)
        },
    )
    .await;
    assert_eq!(st.term, term);
    assert!(term >= 1);
    assert_eq!(st.leader, Some(1));
    assert_eq!(
        st.leader_node.as_ref().map(|n| n.client_addr.as_str()),
        Some("client-1")
    );
    assert_eq!(
        st.leader_node.as_ref().map(|n| n.raft_addr.clone()),
        Some(r.raft_addr().to_string())
    );
    assert_eq!(st.members.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(st.last_log_index, 3, "membership, blank, a, b");
    // Every applied command carries the term it was proposed in.
    assert!(sm.state().applied.iter().all(|(_, t, _)| *t == term));
    r.shutdown().await.expect("shutdown");
    assert_eq!(r.status().role, Role::Shutdown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_reapplying_or_reinitializing() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let sm = ToySm::durable();
    let r = start_leader(config(dir.path()), sm.clone()).await;
    for i in 0..5u8 {
        r.propose(vec![i]).await.expect("propose");
    }
    let before = r.status();
    r.shutdown().await.expect("shutdown");

    let r = start_leader(config(dir.path()), sm.clone()).await;
    assert_eq!(sm.commands().len(), 5, "nothing applied twice");
    assert_eq!(
        count(&r.propose(vec![5]).await.expect("propose after restart")),
        6
    );
    let after = r.status();
    assert!(after.term >= before.term);
    assert!(after.last_log_index > before.last_log_index);
    assert_eq!(after.members, before.members);
    r.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_reapplies_entries_the_state_machine_lost() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    // Durable only every 4th batch, like a store with periodic durable commits.
    let sm = ToySm::checkpoint_every(Some(4));
    let r = start_leader(config(dir.path()), sm.clone()).await;
    let proposed: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i]).collect();
    for c in &proposed {
        r.propose(c.clone()).await.expect("propose");
    }
    r.shutdown().await.expect("shutdown");

    sm.crash();
    assert!(
        sm.commands().len() < proposed.len(),
        "the crash lost the last applies"
    );

    let r = start_leader(config(dir.path()), sm.clone()).await;
    wait_for("lost entries re-applied", Duration::from_secs(5), || {
        (sm.commands().len() >= proposed.len()).then_some(())
    })
    .await;
    assert_eq!(sm.commands(), proposed);
    assert_eq!(count(&r.propose(vec![10]).await.expect("propose")), 11);
    r.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_machine_behind_the_purged_log_is_restored_from_the_snapshot() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    // Never durable by itself: a crash loses everything not covered by a snapshot file.
    let sm = ToySm::checkpoint_every(None);
    let mut cfg = config(dir.path());
    cfg.snapshot_every = 5;
    cfg.logs_to_keep = 0;
    let r = start_leader(cfg.clone(), sm.clone()).await;
    let proposed: Vec<Vec<u8>> = (0..12u8).map(|i| vec![i]).collect();
    for c in &proposed {
        r.propose(c.clone()).await.expect("propose");
    }
    let st = wait_for("snapshot and purge", Duration::from_secs(5), || {
        let st = r.status();
        // Entries 0 (membership) and 1 (blank) + 12 commands: snapshots at 4 and 9.
        (st.purged_index.unwrap_or(0) >= 9).then_some(st)
    })
    .await;
    assert!(st.snapshot_index.unwrap_or(0) >= st.purged_index.unwrap_or(0));
    r.shutdown().await.expect("shutdown");

    sm.crash();
    assert_eq!(sm.durable_commands(), 0);
    assert!(dir
        .path()
        .join(rawfs_replication::state_machine::SNAPSHOT_FILE)
        .exists());

    let r = start_leader(cfg, sm.clone()).await;
    wait_for(
        "state restored and re-applied",
        Duration::from_secs(5),
        || (sm.commands().len() >= proposed.len()).then_some(()),
    )
    .await;
    assert_eq!(sm.commands(), proposed);
    assert_eq!(sm.restores(), 1, "restored from the snapshot file");
    assert_eq!(count(&r.propose(vec![12]).await.expect("propose")), 13);
    r.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_log_is_an_error_not_a_panic() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join(rawfs_replication::log_store::LOG_DIR);
    std::fs::create_dir_all(&log).expect("log dir");
    // Damage in a segment that is not the last one cannot be a torn write.
    std::fs::write(
        log.join("00000000000000000000.seg"),
        b"this is not a log segment at all",
    )
    .expect("write");
    std::fs::write(log.join("00000000000000000005.seg"), b"").expect("write");
    let res = Replica::start(config(dir.path()), ToySm::durable()).await;
    assert!(res.is_err(), "a corrupt log must fail the start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_log_returns_once_proposals_are_on_disk() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let r = start_leader(config(dir.path()), ToySm::durable()).await;
    r.sync_log().await.expect("sync with nothing new");
    for i in 0..20u8 {
        r.propose(vec![i]).await.expect("propose");
    }
    r.sync_log().await.expect("sync_log");
    r.shutdown().await.expect("shutdown");
}
