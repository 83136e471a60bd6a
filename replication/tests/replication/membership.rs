//! Membership changes online (add, remove, remove the leader) and the bootstrap rule: a
//! replica with an empty directory never forms a second group next to an existing one, and a
//! replica whose disk was wiped rejoins, either by catching up while still a member or by
//! being removed and added again.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use rawfs_replication::Node;
use rawfs_replication::ProposeError;
use rawfs_replication::Replica;
use rawfs_replication::ReplicaConfig;
use rawfs_replication::Role;

use crate::cluster::snapshot_often;
use crate::harness::no_tuning;
use crate::harness::Cluster;
use crate::harness::WAIT;
use crate::toy::init_tracing;
use crate::toy::wait_for;
use crate::toy::ToySm;

fn voters(ids: &[u64]) -> BTreeSet<u64> {
    ids.iter().copied().collect()
}

/// Proposes `n` numbered commands on `leader`, appending them to `proposed`.
async fn propose_n(c: &Cluster, leader: u64, proposed: &mut Vec<Vec<u8>>, n: usize) {
    for _ in 0..n {
        let cmd = format!("cmd-{}", proposed.len()).into_bytes();
        c.replica(leader)
            .propose(cmd.clone())
            .await
            .expect("propose on the leader");
        proposed.push(cmd);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_peers_online_including_the_leader() {
    let mut c = Cluster::start(3, no_tuning()).await;
    let (leader, term) = c.leader(0).await;
    let mut proposed = Vec::new();
    propose_n(&c, leader, &mut proposed, 3).await;

    // A new replica waits, unconfigured, until the leader adds it.
    let node4 = c.add_node(4).await;
    let st = c.replica(4).status();
    assert!(st.members.is_empty() && st.voters.is_empty(), "{st:?}");
    let follower = *c
        .running
        .keys()
        .find(|id| **id != leader && **id != 4)
        .expect("a follower");
    assert!(matches!(
        c.replica(follower).add_peer(4, node4.clone()).await,
        Err(ProposeError::NotLeader { leader: Some(l), .. }) if l == leader
    ));
    c.replica(leader)
        .add_peer(4, node4.clone())
        .await
        .expect("add_peer");
    let st = c.replica(leader).status();
    assert_eq!(st.voters, voters(&[1, 2, 3, 4]));
    assert_eq!(st.members.get(&4), Some(&node4));
    assert_eq!(c.converged(3).await, proposed, "the new voter caught up");
    // Idempotent; the same id under another address is refused.
    c.replica(leader)
        .add_peer(4, node4.clone())
        .await
        .expect("add_peer again");
    let elsewhere = Node {
        raft_addr: "127.0.0.1:1".to_string(),
        client_addr: "elsewhere".to_string(),
    };
    assert!(matches!(
        c.replica(leader).add_peer(4, elsewhere).await,
        Err(ProposeError::Rejected { .. })
    ));
    wait_for("replica 4 to know it is a voter", WAIT, || {
        (c.replica(4).status().role == Role::Follower).then_some(())
    })
    .await;
    propose_n(&c, leader, &mut proposed, 2).await;
    assert_eq!(c.converged(5).await, proposed);

    // Remove a follower; removing it again is a no-op.
    c.replica(leader)
        .remove_peer(follower)
        .await
        .expect("remove_peer");
    c.replica(leader)
        .remove_peer(follower)
        .await
        .expect("remove_peer again");
    c.stop(follower).await;
    let mut remaining: Vec<u64> = vec![1, 2, 3, 4];
    remaining.retain(|id| *id != follower);
    assert_eq!(c.replica(leader).status().voters, voters(&remaining));
    propose_n(&c, leader, &mut proposed, 2).await;
    assert_eq!(c.converged(7).await, proposed);

    // Remove the leader itself: it steps down once the change commits, the others elect.
    c.replica(leader)
        .remove_peer(leader)
        .await
        .expect("remove the leader");
    remaining.retain(|id| *id != leader);
    wait_for("the old leader to step down", WAIT, || {
        (c.replica(leader).status().role != Role::Leader).then_some(())
    })
    .await;
    c.stop(leader).await;
    let (new_leader, new_term) = c.leader(term).await;
    assert!(remaining.contains(&new_leader));
    assert!(new_term > term);
    assert_eq!(c.replica(new_leader).status().voters, voters(&remaining));
    propose_n(&c, new_leader, &mut proposed, 2).await;
    assert_eq!(c.converged(9).await, proposed);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_voter_cannot_be_removed() {
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
    wait_for("leadership", WAIT, || {
        (r.status().role == Role::Leader).then_some(())
    })
    .await;
    let res = r.remove_peer(1).await;
    assert!(
        matches!(res, Err(ProposeError::Rejected { .. })),
        "got {res:?}"
    );
    assert!(!res.expect_err("rejected").is_retryable());
    assert_eq!(r.status().voters, voters(&[1]));
    r.propose(b"still works".to_vec()).await.expect("propose");
    r.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_replica_never_forms_a_group_next_to_an_existing_one() {
    // Replica 2 forms a one-member group. Replica 1 starts empty, with the lowest id and
    // bootstrap allowed, and lists 2 as its peer: its probe finds 2 in a group, so it must
    // stay pristine instead of initializing a group of its own.
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let local = "127.0.0.1:0".parse().expect("addr");
    let cfg2 = ReplicaConfig::new(2, dir.path().join("r2"), local, "client-2", BTreeMap::new());
    let r2 = Replica::start(cfg2, ToySm::durable())
        .await
        .expect("start 2");
    wait_for("replica 2 to lead", WAIT, || {
        (r2.status().role == Role::Leader).then_some(())
    })
    .await;
    let node2 = Node {
        raft_addr: r2.raft_addr().to_string(),
        client_addr: "client-2".to_string(),
    };
    let mut cfg1 = ReplicaConfig::new(
        1,
        dir.path().join("r1"),
        local,
        "client-1",
        BTreeMap::from([(2, node2)]),
    );
    cfg1.election_timeout = (Duration::from_millis(200), Duration::from_millis(400));
    let r1 = Replica::start(cfg1, ToySm::durable())
        .await
        .expect("start 1");
    // A non-event: had replica 1 initialized, it would have a membership at once and be a
    // candidate within one election timeout. Watch for several of them.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let st = r1.status();
        assert!(
            st.members.is_empty() && st.term == 0,
            "replica 1 formed a group: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once added by the real group's leader it follows it.
    let node1 = Node {
        raft_addr: r1.raft_addr().to_string(),
        client_addr: "client-1".to_string(),
    };
    r2.add_peer(1, node1).await.expect("add replica 1");
    r2.propose(b"x".to_vec()).await.expect("propose");
    wait_for("replica 1 to follow", WAIT, || {
        let st = r1.status();
        (st.role == Role::Follower && st.leader == Some(2) && st.voters == voters(&[1, 2]))
            .then_some(())
    })
    .await;
    r1.shutdown().await.expect("shutdown 1");
    r2.shutdown().await.expect("shutdown 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_member_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, Arc::new(snapshot_often)).await;
    let (leader, _) = c.leader(0).await;
    let mut proposed = Vec::new();
    propose_n(&c, leader, &mut proposed, 3).await;
    c.converged(3).await;
    // Replica 1 has the lowest id: with an empty directory and bootstrap allowed it is the
    // one that would form a group, which it must not do next to the existing one.
    let wiped = 1;
    c.stop(wiped).await;
    c.wipe(wiped);
    let (leader, _) = c.leader(0).await;
    propose_n(&c, leader, &mut proposed, 30).await;
    wait_for("the leader to purge its log", WAIT, || {
        (c.replica(leader).status().purged_index.unwrap_or(0) > 10).then_some(())
    })
    .await;

    c.restart_with(wiped, true).await;
    assert_eq!(c.converged(proposed.len()).await, proposed);
    assert!(c.sms[&wiped].restores() >= 1, "caught up by a snapshot");
    let st = c.replica(wiped).status();
    assert_eq!(st.voters, voters(&[1, 2, 3]));
    propose_n(&c, leader, &mut proposed, 2).await;
    assert_eq!(c.converged(proposed.len()).await, proposed);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_replica_rejoins_after_remove_and_add() {
    let mut c = Cluster::start(3, Arc::new(snapshot_often)).await;
    let (leader, _) = c.leader(0).await;
    let mut proposed = Vec::new();
    propose_n(&c, leader, &mut proposed, 3).await;
    let wiped = *c
        .running
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    c.stop(wiped).await;
    c.wipe(wiped);
    c.replica(leader)
        .remove_peer(wiped)
        .await
        .expect("remove the wiped replica");
    assert_eq!(c.replica(leader).status().voters.len(), 2);
    propose_n(&c, leader, &mut proposed, 20).await;

    // It comes back empty, not allowed to form a group, and waits to be added.
    c.restart_with(wiped, false).await;
    assert!(c.replica(wiped).status().members.is_empty());
    c.replica(leader)
        .add_peer(wiped, c.node(wiped))
        .await
        .expect("add it again");
    assert_eq!(c.replica(leader).status().voters, voters(&[1, 2, 3]));
    assert_eq!(c.converged(proposed.len()).await, proposed);
    propose_n(&c, leader, &mut proposed, 2).await;
    assert_eq!(c.converged(proposed.len()).await, proposed);
    c.shutdown().await;
}
