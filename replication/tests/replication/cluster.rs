//! Three replicas in one process on real TCP: election, replication, redirects, fail-over,
//! catch-up by snapshot, and proposals without a quorum.

use std::sync::Arc;
use std::time::Duration;

use rawfs_replication::ProposeError;
use rawfs_replication::ReplicaConfig;
use rawfs_replication::Role;

use crate::harness::client_addr;
use crate::harness::no_tuning;
use crate::harness::Cluster;
use crate::harness::WAIT;
use crate::toy::wait_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_redirect_and_fail_over() {
    let mut c = Cluster::start(3, no_tuning()).await;
    let (leader, term) = c.leader(0).await;
    let follower = *c
        .running
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");

    let mut proposed = Vec::new();
    for i in 0..3u8 {
        c.replica(leader)
            .propose(vec![i])
            .await
            .expect("propose on the leader");
        proposed.push(vec![i]);
    }
    assert_eq!(c.converged(3).await, proposed);

    // A follower redirects writes and reads to the leader, with its client address.
    match c.replica(follower).propose(vec![99]).await {
        Err(ProposeError::NotLeader {
            leader: l,
            leader_node,
            term: t,
        }) => {
            assert_eq!(l, Some(leader));
            assert_eq!(
                leader_node.map(|n| n.client_addr),
                Some(client_addr(leader))
            );
            assert_eq!(t, term);
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    assert!(matches!(
        c.replica(follower).ensure_leader().await,
        Err(ProposeError::NotLeader { leader: Some(l), .. }) if l == leader
    ));
    assert_eq!(
        c.replica(leader)
            .ensure_leader()
            .await
            .expect("leader read barrier"),
        term
    );
    let matched = wait_for("the leader to see every follower's log", WAIT, || {
        let m = c.replica(leader).status().matched;
        (m.len() == 3 && m.values().all(|i| *i == m[&leader])).then_some(m)
    })
    .await;
    assert!(matched[&leader] >= 4, "membership, blank and 3 commands");
    let st = c.replica(follower).status();
    assert_eq!(st.role, Role::Follower);
    assert_eq!(st.members.len(), 3);

    // The leader dies: another one takes over in a higher term and commits.
    c.stop(leader).await;
    let (new_leader, new_term) = c.leader(term).await;
    assert_ne!(new_leader, leader);
    assert!(new_term > term);
    c.replica(new_leader)
        .propose(vec![3])
        .await
        .expect("propose on the new leader");
    proposed.push(vec![3]);
    assert_eq!(c.converged(4).await, proposed);
    let sm = &c.sms[&new_leader];
    assert!(sm
        .state()
        .applied
        .iter()
        .any(|(_, t, cmd)| *t == new_term && cmd == &vec![3u8]));

    // The old leader comes back as a follower and catches up.
    c.restart(leader).await;
    c.replica(new_leader)
        .propose(vec![4])
        .await
        .expect("propose");
    proposed.push(vec![4]);
    assert_eq!(c.converged(5).await, proposed);
    let (l, _) = c.leader(term).await;
    assert_eq!(l, new_leader);
    c.shutdown().await;
}

pub fn snapshot_often(cfg: &mut ReplicaConfig) {
    cfg.snapshot_every = 10;
    cfg.logs_to_keep = 2;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let mut c = Cluster::start(3, Arc::new(snapshot_often)).await;
    let (leader, _) = c.leader(0).await;
    let lagging = *c
        .running
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    c.replica(leader)
        .propose(b"first".to_vec())
        .await
        .expect("propose");
    c.converged(1).await;
    let lagging_last = c.replica(lagging).status().last_log_index;
    c.stop(lagging).await;

    let mut proposed = vec![b"first".to_vec()];
    for i in 0..40u8 {
        c.replica(leader)
            .propose(vec![i])
            .await
            .expect("propose with 2 of 3");
        proposed.push(vec![i]);
    }
    wait_for(
        "the leader to purge past the lagging follower",
        WAIT,
        || (c.replica(leader).status().purged_index.unwrap_or(0) > lagging_last + 2).then_some(()),
    )
    .await;

    c.restart(lagging).await;
    assert_eq!(c.converged(proposed.len()).await, proposed);
    let st = wait_for("the follower to have a snapshot", WAIT, || {
        let st = c.replica(lagging).status();
        st.snapshot_index.is_some().then_some(st)
    })
    .await;
    assert!(st.snapshot_index.unwrap_or(0) > lagging_last);
    assert!(
        c.sms[&lagging].restores() >= 1,
        "the leader's snapshot was installed"
    );
    assert!(c
        .base
        .path()
        .join(format!("r{lagging}"))
        .join("snapshot.bin")
        .exists());

    // And it keeps following through the log afterwards.
    c.replica(leader)
        .propose(b"after".to_vec())
        .await
        .expect("propose");
    proposed.push(b"after".to_vec());
    assert_eq!(c.converged(proposed.len()).await, proposed);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_calls_fail_within_their_deadline() {
    let mut c = Cluster::start(3, Arc::new(|cfg| cfg.op_timeout = Duration::from_secs(1))).await;
    let (leader, _) = c.leader(0).await;
    let followers: Vec<u64> = c
        .running
        .keys()
        .copied()
        .filter(|id| *id != leader)
        .collect();
    for f in followers {
        c.stop(f).await;
    }
    let started = std::time::Instant::now();
    let res = c.replica(leader).propose(b"lost".to_vec()).await;
    assert!(
        matches!(res, Err(ProposeError::Unavailable { .. })),
        "got {res:?}"
    );
    let res = c.replica(leader).ensure_leader().await;
    assert!(
        matches!(
            res,
            Err(ProposeError::Unavailable { .. } | ProposeError::NotLeader { .. })
        ),
        "got {res:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls must not hang"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_replicas_commit_with_three_and_stop_with_two() {
    let op_timeout = Duration::from_secs(1);
    let mut c = Cluster::start(5, Arc::new(move |cfg| cfg.op_timeout = op_timeout)).await;
    let (leader, term) = c.leader(0).await;
    assert_eq!(
        c.replica(leader).status().voters,
        (1..=5).collect::<std::collections::BTreeSet<u64>>()
    );
    let mut proposed = Vec::new();
    for i in 0..3u8 {
        c.replica(leader).propose(vec![i]).await.expect("propose");
        proposed.push(vec![i]);
    }
    assert_eq!(c.converged(3).await, proposed);

    // Lose two, the leader among them: the other three elect and keep committing.
    let follower = *c
        .running
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    c.stop(leader).await;
    c.stop(follower).await;
    let (leader2, term2) = c.leader(term).await;
    assert!(term2 > term);
    for i in 3..6u8 {
        c.replica(leader2)
            .propose(vec![i])
            .await
            .expect("propose with 3 of 5");
        proposed.push(vec![i]);
    }
    assert_eq!(c.converged(6).await, proposed);

    // Lose a third: the leader cannot commit and says so within its deadline.
    let third = *c
        .running
        .keys()
        .find(|id| **id != leader2)
        .expect("a follower");
    c.stop(third).await;
    let started = std::time::Instant::now();
    let res = c.replica(leader2).propose(b"no quorum".to_vec()).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(res, Err(ProposeError::Unavailable { .. })),
        "got {res:?}"
    );
    assert!(
        elapsed >= op_timeout && elapsed < op_timeout + Duration::from_millis(500),
        "failed after {elapsed:?}"
    );
    assert!(
        c.sms
            .values()
            .all(|sm| !sm.commands().contains(&b"no quorum".to_vec())),
        "nothing commits without a quorum"
    );
    // The remaining follower cannot elect itself either.
    let last = *c
        .running
        .keys()
        .find(|id| **id != leader2)
        .expect("the other survivor");
    assert!(matches!(
        c.replica(last).propose(b"follower".to_vec()).await,
        Err(ProposeError::NotLeader { .. } | ProposeError::Unavailable { .. })
    ));

    // One comes back: three of five again, commits resume (the pending entry with them).
    c.restart(third).await;
    c.replica(leader2)
        .propose(b"quorum again".to_vec())
        .await
        .expect("propose after the quorum is back");
    proposed.push(b"no quorum".to_vec());
    proposed.push(b"quorum again".to_vec());
    assert_eq!(c.converged(proposed.len()).await, proposed);
    c.shutdown().await;
}

/// When the leader dies, the survivor whose log is behind can never win; with the pre-vote it
/// does not even raise the term (which would make the one that is ahead lose a round to
/// learn it), so the survivor that is ahead leads the very next term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_survivor_that_is_ahead_leads_the_next_term() {
    let mut c = Cluster::start(3, no_tuning()).await;
    let (leader, term) = c.leader(0).await;
    let followers: Vec<u64> = c.running.keys().copied().filter(|i| *i != leader).collect();
    let (behind, ahead) = (followers[0], followers[1]);
    c.stop(behind).await;
    for i in 0..20u8 {
        c.replica(leader).propose(vec![i]).await.expect("propose");
    }
    let sm = c.sms[&ahead].clone();
    wait_for("the follower ahead to apply every entry", WAIT, || {
        (sm.commands().len() == 20).then_some(())
    })
    .await;
    c.stop(leader).await;
    c.restart(behind).await;
    let (new_leader, new_term) = c.leader(term).await;
    assert_eq!(new_leader, ahead, "the replica with the longer log leads");
    assert_eq!(
        new_term,
        term + 1,
        "the replica that is behind raised the term in elections it could not win"
    );
    assert_eq!(c.converged(20).await.len(), 20);
    c.shutdown().await;
}
