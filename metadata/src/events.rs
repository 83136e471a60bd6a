//! The leader's cache invalidation log: after a change is applied, the names and inodes it
//! made stale are published here, and mounts long-poll them with `watch` to take back what
//! their kernels cache (see rawfs-mount's `coherence` module).
//!
//! ```text
//!  mutate_once ──propose──► applied ──invals(cmd)──► EventLog ring (seq, origin, Inval)
//!                                                        │ notify
//!  watch(epoch, from) ◄── events from `from`, or `lost` ─┘
//! ```
//!
//! The log is soft state of one leadership: it lives in memory, and its epoch changes with
//! the term (and with every process start), which tells a client it may have missed
//! events. A client that falls more than [`CAPACITY`] events behind is told the same.
//!
//! Each `watch` call acknowledges the events before its `from` (the mount asks again only
//! once its kernel has dropped them). A change is answered only when every other active
//! watcher has acknowledged its events, so once a client hears "done", no other mount
//! still shows the old name or attributes — unless a watcher fails to answer within
//! [`ACK_WAIT`]: it is then marked lagging and nobody waits for it until it catches up.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{HeldOp, Ino, Inval, InvalEvent, Name, WatchReply};

use crate::commands::Command;

/// Events kept for clients that poll late.
pub(crate) const CAPACITY: usize = 1 << 16;
/// Most events in one `watch` answer.
const MAX_EVENTS: usize = 4096;
/// Longest time a `watch` call is held open.
const MAX_WAIT: Duration = Duration::from_secs(5);
/// A watcher not heard from for this long is gone (it polls at least every `MAX_WAIT`).
const ACTIVE: Duration = Duration::from_secs(8);
/// How long a change waits for the other watchers to acknowledge its events.
pub(crate) const ACK_WAIT: Duration = Duration::from_millis(500);

struct Watcher {
    /// Events before this sequence number are acknowledged.
    acked: u64,
    seen: Instant,
    /// Missed an acknowledgement deadline; not waited for until it has caught up.
    lagging: bool,
}

struct Ring {
    /// The leader term the events belong to.
    term: u64,
    epoch: u64,
    /// Sequence number of `events[0]`.
    first: u64,
    /// Each event with whether its origin is spared it (see [`stale`]).
    events: VecDeque<(InvalEvent, bool)>,
    /// Clients watching this epoch, by client id.
    watchers: HashMap<u64, Watcher>,
}

impl Ring {
    fn end(&self) -> u64 {
        self.first + self.events.len() as u64
    }
}

/// The invalidation log of this replica while it leads.
pub(crate) struct EventLog {
    /// Random per process, so that a restarted leader in the same term is a new epoch.
    nonce: u64,
    ring: Mutex<Ring>,
    notify: tokio::sync::Notify,
    /// Woken when a watcher acknowledges.
    acked: tokio::sync::Notify,
}

impl EventLog {
    pub(crate) fn new() -> EventLog {
        EventLog {
            nonce: random_nonce(),
            ring: Mutex::new(Ring {
                term: 0,
                epoch: 0,
                first: 0,
                events: VecDeque::new(),
                watchers: HashMap::new(),
            }),
            notify: tokio::sync::Notify::new(),
            acked: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self, term: u64) -> std::sync::MutexGuard<'_, Ring> {
        let mut r = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if r.term != term || r.epoch == 0 {
            // A new leadership: clients must assume they missed what happened in between.
            r.term = term;
            r.epoch = epoch_of(self.nonce, term);
            r.first = r.end();
            r.events.clear();
            r.watchers.clear();
        }
        r
    }

    /// The epoch of this replica's leadership in `term` (what `watch` reports).
    pub(crate) fn epoch(&self, term: u64) -> u64 {
        self.lock(term).epoch
    }

    /// Publishes what a change applied in `term` by client `origin` made stale; returns the
    /// sequence number just past its events.
    pub(crate) fn publish(&self, term: u64, origin: u64, invals: Vec<(Inval, bool)>) -> u64 {
        let end = {
            let mut r = self.lock(term);
            for (inval, known) in invals {
                r.events.push_back((InvalEvent { origin, inval }, known));
            }
            while r.events.len() > CAPACITY {
                r.events.pop_front();
                r.first += 1;
            }
            r.end()
        };
        self.notify.notify_waiters();
        end
    }

    /// Waits (at most [`ACK_WAIT`]) until every active watcher but `origin` has acknowledged
    /// the events before `seq` of `term`. Watchers that miss the deadline are marked lagging.
    pub(crate) async fn wait_acked(&self, term: u64, origin: u64, seq: u64) {
        let deadline = tokio::time::Instant::now() + ACK_WAIT;
        loop {
            let acked = self.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            let late = {
                let mut r = self.lock(term);
                let now = Instant::now();
                r.watchers
                    .retain(|_, w| now.duration_since(w.seen) < ACTIVE);
                let late = r
                    .watchers
                    .iter()
                    .any(|(id, w)| *id != origin && !w.lagging && w.acked < seq);
                if late && tokio::time::Instant::now() >= deadline {
                    for (id, w) in r.watchers.iter_mut() {
                        if *id != origin && w.acked < seq && !w.lagging {
                            tracing::warn!(watcher = id, "a mount did not acknowledge cache events in time; not waiting for it until it catches up");
                            w.lagging = true;
                        }
                    }
                    return;
                }
                late
            };
            if !late {
                return;
            }
            let _ = tokio::time::timeout_at(deadline, acked).await;
        }
    }

    /// The events from `from` on in `epoch` for client `watcher` (which acknowledges those
    /// before `from`), waiting up to `wait` for one to arrive. Events of the watcher's own
    /// changes that its kernel already knows are passed over (see [`stale`]).
    pub(crate) async fn watch(
        &self,
        term: u64,
        watcher: u64,
        epoch: u64,
        mut from: u64,
        wait: Duration,
    ) -> WatchReply {
        self.ack(term, watcher, epoch, from);
        let wait = wait.min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register for the wake-up before looking, so that a publish in between is seen.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let r = self.lock(term);
                let end = r.end();
                if epoch != r.epoch || from < r.first || from > end {
                    return WatchReply {
                        epoch: r.epoch,
                        next: end,
                        lost: true,
                        events: Vec::new(),
                    };
                }
                if from < end {
                    let skip = (from - r.first) as usize;
                    let mut events = Vec::new();
                    for (e, known) in r.events.iter().skip(skip) {
                        if events.len() == MAX_EVENTS {
                            break;
                        }
                        from += 1;
                        if !(*known && e.origin == watcher) {
                            events.push(e.clone());
                        }
                    }
                    if !events.is_empty() {
                        return WatchReply {
                            epoch: r.epoch,
                            next: from,
                            lost: false,
                            events,
                        };
                    }
                    // Only the watcher's own, already known: keep waiting past them.
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return WatchReply {
                    epoch,
                    next: from,
                    lost: false,
                    events: Vec::new(),
                };
            }
        }
    }
}

/// A random number without a dependency: std seeds each `RandomState` from the OS.
fn random_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

impl EventLog {
    fn ack(&self, term: u64, watcher: u64, epoch: u64, from: u64) {
        {
            let mut r = self.lock(term);
            if epoch != r.epoch || from > r.end() {
                return;
            }
            let end = r.end();
            let w = r.watchers.entry(watcher).or_insert(Watcher {
                acked: from,
                seen: Instant::now(),
                lagging: false,
            });
            w.acked = w.acked.max(from);
            w.seen = Instant::now();
            if w.acked >= end {
                w.lagging = false;
            }
        }
        self.acked.notify_waiters();
    }
}

fn epoch_of(nonce: u64, term: u64) -> u64 {
    // Any mix that differs per (process, term) and is never 0 (0 means "no epoch yet").
    let x = nonce ^ term.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x.max(1)
}

/// Inodes named by the entries a change replaces, read just before it is proposed (their
/// link counts change, and the change itself does not name them).
#[derive(Default)]
pub(crate) struct Replaced {
    pub(crate) inos: Vec<Ino>,
}

/// What `cmd` (applied successfully) made stale, each with whether the origin's own kernel
/// already knows: the FUSE kernel module drops the names a request of its own changes and
/// the attributes of their directories (`fuse_dir_changed`) by itself, so those events are
/// not sent back to the client that caused them (a mount creating files in a directory is
/// not woken once per file). Attribute changes of other inodes are always sent: the kernel
/// does not know, for example, the link count an unlink left on another name's inode.
pub(crate) fn stale(cmd: &Command, replaced: &Replaced) -> Vec<(Inval, bool)> {
    match cmd {
        Command::Tracked { cmd, .. }
        | Command::OpenMany {
            then: Some(cmd), ..
        } => return stale(cmd, replaced),
        Command::Batch(cmds) => return cmds.iter().flat_map(|c| stale(c, replaced)).collect(),
        _ => {}
    }
    let invals = invals(cmd, replaced);
    if let Command::CommitHeld { .. } = cmd {
        // The holder made every one of these changes through its own kernel (creates,
        // unlinks and renames in the held directory), which dropped what they made stale;
        // sent back, they cost it one invalidation per unlinked or renamed file and one of
        // the directory per batch, behind its next operations.
        return invals.into_iter().map(|i| (i, true)).collect();
    }
    let changed_dirs: Vec<Ino> = invals
        .iter()
        .filter_map(|i| match i {
            Inval::Entry { parent, .. } => Some(*parent),
            Inval::Inode(_) | Inval::Recall { .. } | Inval::RecallLocks { .. } => None,
        })
        .collect();
    invals
        .into_iter()
        .map(|i| {
            let known = match &i {
                Inval::Entry { .. } => true,
                Inval::Inode(ino) => changed_dirs.contains(ino) && !replaced.inos.contains(ino),
                Inval::Recall { .. } | Inval::RecallLocks { .. } => false,
            };
            (i, known)
        })
        .collect()
}

/// What `cmd` (applied successfully) made stale in clients' caches.
pub(crate) fn invals(cmd: &Command, replaced: &Replaced) -> Vec<Inval> {
    let entry = |parent: Ino, name: &Name| Inval::Entry {
        parent,
        name: name.clone(),
    };
    let mut out = match cmd {
        Command::SetAttr { ino, .. }
        | Command::SetXattr { ino, .. }
        | Command::RemoveXattr { ino, .. }
        | Command::CommitWrite { ino, .. }
        | Command::ReleaseChunks { ino, .. } => vec![Inval::Inode(*ino)],
        Command::Mknod { parent, name, .. }
        | Command::MkdirHeld { parent, name, .. }
        | Command::Create { parent, name, .. }
        | Command::Symlink { parent, name, .. }
        | Command::Unlink { parent, name, .. }
        | Command::Rmdir { parent, name, .. }
        | Command::Snapshot { parent, name, .. } => {
            vec![entry(*parent, name), Inval::Inode(*parent)]
        }
        Command::Link {
            ino,
            newparent,
            newname,
            ..
        } => vec![
            entry(*newparent, newname),
            Inval::Inode(*newparent),
            Inval::Inode(*ino),
        ],
        Command::Rename {
            parent,
            name,
            newparent,
            newname,
            ..
        } => {
            let mut v = vec![entry(*parent, name), Inval::Inode(*parent)];
            if (newparent, newname) != (parent, name) {
                v.push(entry(*newparent, newname));
                if newparent != parent {
                    v.push(Inval::Inode(*newparent));
                }
            }
            v
        }
        // Only the holder could have looked in the directory (anyone else recalls first),
        // and its kernel has what it was told; others may hold the directory's times, and
        // the attributes of files unlinked or renamed there (open elsewhere, or linked).
        Command::CommitHeld { dir, ops, .. } => std::iter::once(*dir)
            .chain(ops.iter().flat_map(|op| match op {
                HeldOp::Create(_) => vec![],
                HeldOp::Unlink { ino, .. } => vec![*ino],
                HeldOp::Rename { ino, replaced, .. } => {
                    std::iter::once(*ino).chain(*replaced).collect()
                }
                HeldOp::SetAttr { ino, .. } | HeldOp::Wrote { ino, .. } => vec![*ino],
            }))
            .map(Inval::Inode)
            .collect(),
        Command::Tracked { cmd, .. }
        | Command::OpenMany {
            then: Some(cmd), ..
        } => return invals(cmd, replaced),
        Command::Batch(cmds) => cmds.iter().flat_map(|c| invals(c, replaced)).collect(),
        Command::Init { .. }
        | Command::Open { .. }
        | Command::OpenMany { .. }
        | Command::Release { .. }
        | Command::ReleaseMany { .. }
        | Command::ReleaseLeased { .. }
        | Command::EndSession { .. }
        | Command::SetLock { .. }
        | Command::DropLocks { .. }
        | Command::DelegateLocks { .. }
        | Command::ReturnLocks { .. }
        | Command::AllocateChunk { .. }
        | Command::DropReplica { .. }
        | Command::AddReplica { .. }
        | Command::ReplaceShard { .. }
        | Command::RegisterServer { .. }
        | Command::SetDraining { .. }
        | Command::SetHealerSettings { .. }
        | Command::AckDeletes { .. }
        | Command::CowChunk { .. }
        | Command::CowDone { .. }
        | Command::CowPlaced { .. }
        | Command::EcPrepare { .. }
        | Command::EcCommit { .. }
        | Command::AllocateEc { .. }
        | Command::DropMissing { .. }
        | Command::EcExtend { .. }
        | Command::RecordLeaseTerm { .. }
        | Command::ReserveInodes { .. }
        | Command::Revoke { .. } => Vec::new(),
    };
    out.extend(replaced.inos.iter().map(|i| Inval::Inode(*i)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rawfs_metadata_api::Timespec;
    use serde_bytes::ByteBuf;

    fn unlink(n: &str) -> Command {
        Command::Unlink {
            parent: 1,
            name: ByteBuf::from(n.as_bytes().to_vec()),
            now: Timespec::default(),
        }
    }

    #[tokio::test]
    async fn watch_returns_published_events_in_order() {
        let log = EventLog::new();
        let first = log.watch(3, 1, 0, 0, Duration::ZERO).await;
        assert!(first.lost, "a client without an epoch starts over");
        log.publish(3, 7, stale(&unlink("a"), &Replaced { inos: vec![9] }));
        let r = log
            .watch(3, 1, first.epoch, first.next, Duration::ZERO)
            .await;
        assert!(!r.lost);
        assert_eq!(r.events.len(), 3);
        assert_eq!(r.events[2].inval, Inval::Inode(9));
        assert!(r.events.iter().all(|e| e.origin == 7));
        let again = log
            .watch(3, 1, r.epoch, r.next, Duration::from_millis(10))
            .await;
        assert!(again.events.is_empty() && !again.lost && again.next == r.next);
    }

    #[tokio::test]
    async fn a_client_is_not_sent_the_name_changes_its_kernel_made_itself() {
        let log = EventLog::new();
        let me = log.watch(3, 7, 0, 0, Duration::ZERO).await;
        let other = log.watch(3, 8, 0, 0, Duration::ZERO).await;
        // My unlink: the name and the directory's attributes are known to my kernel, the
        // unlinked inode's link count is not.
        let stale = stale(&unlink("a"), &Replaced { inos: vec![9] });
        assert_eq!(
            stale.iter().map(|(_, known)| *known).collect::<Vec<_>>(),
            [true, true, false]
        );
        log.publish(3, 7, stale);
        let mine = log.watch(3, 7, me.epoch, me.next, Duration::ZERO).await;
        assert_eq!(mine.events.len(), 1);
        assert_eq!(mine.events[0].inval, Inval::Inode(9));
        let theirs = log
            .watch(3, 8, other.epoch, other.next, Duration::ZERO)
            .await;
        assert_eq!(theirs.events.len(), 3);
        assert_eq!(mine.next, theirs.next);
        // Only known events of mine: the watch waits past them, and ends where they end.
        let end = log.publish(3, 7, stale_unlink_without_replaced());
        let t = Instant::now();
        let quiet = log
            .watch(3, 7, mine.epoch, mine.next, Duration::from_millis(50))
            .await;
        assert!(quiet.events.is_empty() && !quiet.lost);
        assert_eq!(quiet.next, end);
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    /// A held directory's changes are all the holder's own: its kernel is told nothing back,
    /// other mounts everything.
    #[tokio::test]
    async fn a_holder_is_not_sent_back_the_changes_of_its_held_directory() {
        let log = EventLog::new();
        let me = log.watch(3, 7, 0, 0, Duration::ZERO).await;
        let other = log.watch(3, 8, 0, 0, Duration::ZERO).await;
        let name = |n: &str| ByteBuf::from(n.as_bytes().to_vec());
        let commit = Command::CommitHeld {
            allocate: Vec::new(),
            dir: 5,
            holder: 7,
            ops: vec![
                HeldOp::Unlink {
                    name: name("a"),
                    ino: 9,
                    time: Timespec::default(),
                },
                HeldOp::Rename {
                    from: name("b"),
                    to: name("c"),
                    ino: 10,
                    replaced: Some(11),
                    time: Timespec::default(),
                },
            ],
            give_back: false,
        };
        let stale = stale(&commit, &Replaced::default());
        assert_eq!(stale.len(), 4);
        assert!(stale.iter().all(|(_, known)| *known));
        log.publish(3, 7, stale);
        let mine = log
            .watch(3, 7, me.epoch, me.next, Duration::from_millis(10))
            .await;
        assert!(mine.events.is_empty() && !mine.lost);
        let theirs = log
            .watch(3, 8, other.epoch, other.next, Duration::ZERO)
            .await;
        let invals: Vec<Inval> = theirs.events.into_iter().map(|e| e.inval).collect();
        assert_eq!(
            invals,
            [
                Inval::Inode(5),
                Inval::Inode(9),
                Inval::Inode(10),
                Inval::Inode(11)
            ]
        );
    }

    fn stale_unlink_without_replaced() -> Vec<(Inval, bool)> {
        stale(&unlink("b"), &Replaced::default())
    }

    #[tokio::test]
    async fn a_new_term_or_a_client_left_behind_is_told_it_lost_events() {
        let log = EventLog::new();
        let start = log.watch(3, 1, 0, 0, Duration::ZERO).await;
        log.publish(4, 1, vec![(Inval::Inode(5), false)]);
        let r = log
            .watch(4, 1, start.epoch, start.next, Duration::ZERO)
            .await;
        assert!(r.lost && r.epoch != start.epoch);
        for i in 0..(CAPACITY as u64 + 10) {
            log.publish(4, 1, vec![(Inval::Inode(i), false)]);
        }
        let behind = log.watch(4, 1, r.epoch, r.next, Duration::ZERO).await;
        assert!(behind.lost);
    }

    #[tokio::test]
    async fn a_change_waits_for_other_watchers_to_acknowledge() {
        let log = std::sync::Arc::new(EventLog::new());
        let start = log.watch(2, 5, 0, 0, Duration::ZERO).await;
        let registered = log
            .watch(2, 5, start.epoch, start.next, Duration::ZERO)
            .await;
        let end = log.publish(2, 9, vec![(Inval::Inode(3), false)]);
        // The origin itself is not waited for.
        tokio::time::timeout(Duration::from_millis(100), log.wait_acked(2, 5, end))
            .await
            .expect("the origin does not wait for itself");
        let l2 = log.clone();
        let waiting = tokio::spawn(async move { l2.wait_acked(2, 9, end).await });
        let got = log
            .watch(2, 5, registered.epoch, registered.next, Duration::ZERO)
            .await;
        assert_eq!(got.events.len(), 1);
        assert!(
            !waiting.is_finished(),
            "not acknowledged until the next call"
        );
        log.watch(2, 5, got.epoch, got.next, Duration::ZERO).await;
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("acknowledged")
            .expect("join");
    }

    #[tokio::test]
    async fn a_silent_watcher_is_waited_for_once_then_marked_lagging() {
        let log = EventLog::new();
        let start = log.watch(2, 5, 0, 0, Duration::ZERO).await;
        log.watch(2, 5, start.epoch, start.next, Duration::ZERO)
            .await;
        let end = log.publish(2, 9, vec![(Inval::Inode(3), false)]);
        let t = Instant::now();
        log.wait_acked(2, 9, end).await;
        assert!(t.elapsed() >= ACK_WAIT);
        let end = log.publish(2, 9, vec![(Inval::Inode(4), false)]);
        tokio::time::timeout(Duration::from_millis(100), log.wait_acked(2, 9, end))
            .await
            .expect("a lagging watcher is not waited for");
    }

    #[tokio::test]
    async fn a_waiting_watch_wakes_on_publish() {
        let log = std::sync::Arc::new(EventLog::new());
        let start = log.watch(2, 1, 0, 0, Duration::ZERO).await;
        let l2 = log.clone();
        let waiter = tokio::spawn(async move {
            l2.watch(2, 1, start.epoch, start.next, Duration::from_secs(5))
                .await
        });
        // Whether the watch is already waiting or not, it must return this event.
        log.publish(2, 1, vec![(Inval::Inode(3), false)]);
        let r = waiter.await.expect("join");
        assert_eq!(r.events.len(), 1);
    }
}
