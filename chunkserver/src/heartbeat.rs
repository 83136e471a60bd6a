//! The heartbeat loop: report capacity, health, inventory and corrupt chunks to the metadata
//! leader; apply its reply (raise the term fence, delete chunks).
//!
//! ```text
//!  Storage --(used, total, healthy, inventory, corrupt)--> Heartbeat --> metadata leader
//!  Storage <--(term fence, delete list)------------------- HeartbeatReply
//! ```
//!
//! The metadata service may be down or moving: a failed beat is logged and retried with
//! backoff, forever, and the next successful beat carries the full inventory again (the
//! service may have restarted and forgotten it).
//!
//! Fencing: a reply's orders are carried out only under a term at least as high as the
//! highest this chunkserver has seen (persisted first). A reply from a deposed leader (a
//! lower term: it was paused or cut off while a new leader took over) is refused whole and
//! counts as a failed beat, so the next beat, to the new leader, carries the inventory.

use crate::scrub::Scrubber;
use crate::storage::{Storage, StoreError};
use rawfs_metadata_api::{ClientTimeouts, Heartbeat, HeartbeatReply, MetaError, MetadataClient};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the full inventory is sent when nothing else asks for it.
const INVENTORY_EVERY: Duration = Duration::from_secs(60);
/// Longest pause between attempts while the metadata service is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Deadline of one heartbeat call, and of connecting.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one heartbeat may spend on retries and redirects across metadata replicas.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why one heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BeatError {
    /// The metadata client gave up (after its own retries across replicas) or the service
    /// refused the heartbeat.
    #[error("metadata service: {0}")]
    Meta(#[from] MetaError),
    /// The reply came from a leader of an older term than one already seen.
    #[error("refused orders of term {term}: term {fence} already seen")]
    StaleTerm { term: u64, fence: u64 },
    /// The reply's term could not be persisted, so its orders were not carried out.
    #[error("cannot persist the term fence: {0}")]
    Fence(std::io::Error),
}

/// Where heartbeats go. The real one is [`ClientLink`]; tests use a fake.
pub(crate) trait MetaLink: Send {
    fn heartbeat(
        &mut self,
        hb: Heartbeat,
    ) -> impl std::future::Future<Output = Result<HeartbeatReply, BeatError>> + Send;
}

/// Sends heartbeats through a [`MetadataClient`], which finds the leader, follows redirects
/// and applies deadlines.
pub(crate) struct ClientLink(MetadataClient);

impl ClientLink {
    pub fn new(addrs: Vec<String>) -> Self {
        // Short deadlines: a beat that cannot get through is better retried by the loop (with
        // fresh capacity figures) than held open.
        ClientLink(MetadataClient::new(
            addrs,
            ClientTimeouts {
                call: CALL_TIMEOUT,
                op: OP_TIMEOUT,
            },
        ))
    }
}

impl MetaLink for ClientLink {
    async fn heartbeat(&mut self, hb: Heartbeat) -> Result<HeartbeatReply, BeatError> {
        Ok(self.0.heartbeat(hb).await?)
    }
}

/// What a heartbeat says about this chunkserver besides storage state.
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub id: u64,
    pub data_addr: String,
    pub control_addr: String,
}

/// The scrub rate as heartbeat replies set it: the cluster's setting (`rawfs healer set
/// --scrub-rate`) when it changes, this server's own rate when the setting is unset again.
/// Only changes are applied, so a rate set through the control service between two changes
/// of the cluster setting stays.
pub(crate) struct ScrubRate {
    pub scrubber: Arc<Scrubber>,
    /// The `--scrub-rate` this server started with.
    pub own: u64,
    /// The cluster setting last applied (`None` before the first reply).
    seen: Option<Option<u64>>,
}

impl ScrubRate {
    pub fn new(scrubber: Arc<Scrubber>, own: u64) -> Self {
        ScrubRate {
            scrubber,
            own,
            seen: None,
        }
    }

    fn apply(&mut self, cluster: Option<u64>) {
        let first = self.seen.is_none();
        if self.seen.replace(cluster) == Some(cluster) || (first && cluster.is_none()) {
            return;
        }
        self.scrubber.set_rate(cluster.unwrap_or(self.own));
    }
}

/// Beats every `interval` until `stop` is cancelled.
pub(crate) async fn run<L: MetaLink>(
    mut link: L,
    me: Identity,
    storage: Arc<Storage>,
    mut scrub: ScrubRate,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut inventory_due = Instant::now();
    let mut backoff = interval;
    let mut failures = 0u32;
    loop {
        let with_inventory = Instant::now() >= inventory_due;
        // A beat may spend a while retrying an absent metadata service; shutdown cuts it
        // short (an undelivered corrupt report is lost with the process anyway).
        let result = tokio::select! {
            _ = stop.cancelled() => break,
            r = beat(&mut link, &me, &storage, &mut scrub, with_inventory) => r,
        };
        let wait = match result {
            Ok((sent_inventory, want_inventory)) => {
                if failures > 0 {
                    tracing::info!(failures, "metadata service reachable again");
                }
                failures = 0;
                if sent_inventory {
                    inventory_due = Instant::now() + INVENTORY_EVERY;
                }
                if want_inventory {
                    inventory_due = Instant::now();
                }
                backoff = interval;
                interval
            }
            Err(e) => {
                // Every failure is logged at first, then one in ten, so a long outage does not
                // flood the log.
                if failures % 10 == 0 {
                    tracing::warn!(error = %e, failures, "heartbeat failed; retrying");
                }
                failures = failures.saturating_add(1);
                inventory_due = Instant::now();
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF.max(interval));
                wait
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Sends one heartbeat and applies the reply. Returns whether the inventory was included,
/// and whether the leader wants one with the next beat.
async fn beat<L: MetaLink>(
    link: &mut L,
    me: &Identity,
    storage: &Arc<Storage>,
    scrub: &mut ScrubRate,
    with_inventory: bool,
) -> Result<(bool, bool), BeatError> {
    let corrupt = storage.take_corrupt();
    let hb = Heartbeat {
        server: me.id,
        data_addr: me.data_addr.clone(),
        control_addr: me.control_addr.clone(),
        total_bytes: storage.total(),
        used_bytes: storage.used(),
        healthy: storage.healthy(),
        inventory: with_inventory.then(|| storage.inventory()),
        corrupt: corrupt.clone(),
        disk: storage.disk_id(),
    };
    let reply = match link.heartbeat(hb).await {
        Ok(r) => r,
        Err(e) => {
            storage.restore_corrupt(&corrupt);
            return Err(e);
        }
    };
    scrub.apply(reply.scrub_rate);
    let want = reply.want_inventory;
    apply(storage.clone(), reply).await?;
    Ok((with_inventory, want))
}

/// Applies a heartbeat reply: raise the fence (persisted), then, if the reply's term is
/// still the newest seen, delete what the leader no longer wants.
async fn apply(storage: Arc<Storage>, reply: HeartbeatReply) -> Result<(), BeatError> {
    let done = tokio::task::spawn_blocking(move || {
        let fence = storage.observe_term(reply.term).map_err(BeatError::Fence)?;
        if fence > reply.term {
            return Err(BeatError::StaleTerm {
                term: reply.term,
                fence,
            });
        }
        for chunk in reply.delete {
            if let Err(e) = storage.delete(chunk) {
                tracing::error!(chunk, error = %e, "cannot delete chunk");
            }
        }
        for (chunk, version) in reply.delete_stale {
            if let Err(e) = storage.delete_stale(chunk, version) {
                tracing::error!(chunk, version, error = %e, "cannot delete stale chunk");
            }
        }
        for (chunk, version) in reply.fence {
            match storage.fence(chunk, version, reply.term) {
                // Gone or already newer: nothing older can be written there anyway.
                Ok(()) | Err(StoreError::NotFound) | Err(StoreError::StaleVersion { .. }) => {}
                Err(e) => tracing::error!(chunk, version, error = %e, "cannot fence chunk"),
            }
        }
        Ok(())
    })
    .await;
    match done {
        Ok(r) => r,
        Err(e) => {
            // Only a panic gets here; the deletes are repaired by the next inventory.
            tracing::error!(error = %e, "applying heartbeat reply failed");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records heartbeats; fails the first `fail` of them, then answers `reply`.
    #[derive(Clone)]
    struct FakeLink {
        seen: Arc<Mutex<Vec<Heartbeat>>>,
        fail: Arc<Mutex<u32>>,
        reply: HeartbeatReply,
    }

    impl MetaLink for FakeLink {
        async fn heartbeat(&mut self, hb: Heartbeat) -> Result<HeartbeatReply, BeatError> {
            self.seen.lock().unwrap().push(hb);
            let mut fail = self.fail.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(BeatError::Meta(MetaError::Unavailable {
                    reason: "test".into(),
                }));
            }
            Ok(self.reply.clone())
        }
    }

    async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Runs the heartbeat loop of server 3 against a fake link whose first `fail` beats
    /// fail and whose other beats get `reply`.
    fn start_beats(
        storage: &Arc<Storage>,
        fail: u32,
        reply: HeartbeatReply,
        every: Duration,
    ) -> (FakeLink, CancellationToken, tokio::task::JoinHandle<()>) {
        let link = FakeLink {
            seen: Arc::default(),
            fail: Arc::new(Mutex::new(fail)),
            reply,
        };
        let me = Identity {
            id: 3,
            data_addr: "127.0.0.1:1".into(),
            control_addr: "127.0.0.1:2".into(),
        };
        let stop = CancellationToken::new();
        let scrub = ScrubRate::new(Scrubber::new(0), 0);
        let task = tokio::spawn(run(
            link.clone(),
            me,
            storage.clone(),
            scrub,
            every,
            stop.clone(),
        ));
        (link, stop, task)
    }

    #[tokio::test]
    async fn beats_report_state_and_apply_replies() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
        storage.write(1, 1, 1, 0, b"keep", false).unwrap();
        storage.write(2, 4, 1, 0, b"drop", false).unwrap();
        storage.restore_corrupt(&[77]);
        storage.write(3, 2, 1, 0, b"fence", false).unwrap();
        let reply = HeartbeatReply {
            term: 12,
            delete: vec![2],
            // Chunk 1 is newer than the stale copy the order names: it stays.
            delete_stale: vec![(1, 0)],
            // Chunk 3 is fenced at version 5; chunk 9 is not here (ignored).
            fence: vec![(3, 5), (9, 1)],
            scrub_rate: None,
            want_inventory: false,
        };
        let (link, stop, task) = start_beats(&storage, 2, reply, Duration::from_millis(10));
        wait_until("the fence and the delete", || {
            storage.term() == 12 && storage.chunk_count() == 2
        })
        .await;
        wait_until("the chunk fence", || storage.inventory().contains(&(3, 5))).await;
        assert_eq!(
            storage.write(3, 2, 12, 0, b"late", false),
            Err(StoreError::StaleVersion { current: 5 }),
            "a writer at the old version is refused"
        );
        wait_until("a few beats", || link.seen.lock().unwrap().len() >= 4).await;
        stop.cancel();
        task.await.unwrap();

        let seen = link.seen.lock().unwrap();
        // Failed beats keep the corrupt report and the inventory for the next attempt.
        for hb in &seen[..3] {
            assert_eq!(hb.server, 3);
            assert_eq!(hb.corrupt, vec![77]);
            assert_eq!(hb.inventory, Some(vec![(1, 1), (2, 4), (3, 2)]));
            assert!(hb.healthy);
            assert!(hb.total_bytes > 0);
        }
        // After a successful beat, the corrupt list is empty and the inventory waits a minute.
        assert!(seen[3].corrupt.is_empty());
        assert_eq!(seen[3].inventory, None);
        assert_eq!(storage.inventory(), vec![(1, 1), (3, 5)]);
    }

    #[tokio::test]
    async fn orders_of_a_deposed_leader_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(Storage::open(dir.path(), None).unwrap());
        storage.write(2, 1, 12, 0, b"keep", false).unwrap();
        assert_eq!(storage.term(), 12, "a write of term 12 raised the fence");
        let reply = HeartbeatReply {
            term: 11,
            delete: vec![2],
            delete_stale: vec![(2, 1)],
            fence: vec![(2, 9)],
            scrub_rate: None,
            want_inventory: false,
        };
        let (link, stop, task) = start_beats(&storage, 0, reply, Duration::from_millis(5));
        wait_until("a few beats", || link.seen.lock().unwrap().len() >= 3).await;
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            storage.inventory(),
            vec![(2, 1)],
            "the delete and the fence were refused"
        );
        assert_eq!(storage.term(), 12);
        // A refused reply counts as a failed beat: the inventory goes out again.
        let seen = link.seen.lock().unwrap();
        assert!(seen.iter().all(|hb| hb.inventory.is_some()));
    }

    #[test]
    fn the_cluster_scrub_rate_applies_when_it_changes() {
        let scrubber = Scrubber::new(7);
        let mut rate = ScrubRate::new(scrubber.clone(), 7);
        let now = |s: &Arc<Scrubber>| s.status().rate;
        rate.apply(None);
        assert_eq!(now(&scrubber), 7, "unset: the server's own rate");
        scrubber.set_rate(9);
        rate.apply(None);
        assert_eq!(
            now(&scrubber),
            9,
            "a local change stays while the setting does not move"
        );
        rate.apply(Some(100));
        assert_eq!(now(&scrubber), 100);
        scrubber.set_rate(5);
        rate.apply(Some(100));
        assert_eq!(now(&scrubber), 5);
        rate.apply(Some(0));
        assert_eq!(now(&scrubber), 0, "0 pauses the scrub");
        rate.apply(None);
        assert_eq!(
            now(&scrubber),
            7,
            "unset again: back to the server's own rate"
        );
    }
}
