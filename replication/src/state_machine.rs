//! Adaptor from openraft's `RaftStateMachine` to the application's [`StateMachine`], and the
//! snapshot file.
//!
//! ```text
//!  openraft --apply(batch)------> StateMachine::apply(entries, replication_state blob)
//!           --build_snapshot----> StateMachine::snapshot() --> snapshot.bin (tmp, fsync, rename)
//!           --install_snapshot--> snapshot.bin, then StateMachine::restore()
//!           --applied_state-----> decoded replication_state (last applied log id, membership)
//! ```
//!
//! The replication state blob is MessagePack of [`ReplicationState`]; the state machine
//! stores it in the same transaction as the entries it describes, so the two never diverge.
//!
//! On the leader, small batches are applied inline on openraft's state machine task; big
//! ones, every batch on a follower, and every snapshot operation go to tokio's blocking pool
//! (see [`INLINE_MAX_ENTRIES`]).
//!
//! One async mutex serializes `apply`, `build_snapshot` and `install_snapshot`: openraft
//! builds snapshots on a separate task while it keeps applying, and the snapshot bytes must
//! correspond exactly to the log position recorded next to them.

use std::io::Cursor;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::EntryPayload;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::RaftSnapshotBuilder;
use openraft::StorageIOError;
use serde::Deserialize;
use serde::Serialize;

use crate::types::LogId;
use crate::types::RaftEntry;
use crate::types::Snapshot;
use crate::types::SnapshotMeta;
use crate::types::StorageError;
use crate::types::StoredMembership;
use crate::Entry;
use crate::Response;
use crate::StateMachine;
use crate::TypeConfig;

/// File name of the latest snapshot inside the replica directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";
const SNAPSHOT_TMP: &str = "snapshot.bin.tmp";
const FORMAT_VERSION: u8 = 1;
/// On the leader, batches up to this many entries and command bytes are applied inline on
/// the async task: a hop to the blocking pool (waking an idle thread and back, ~40 µs each
/// way on a small VM) costs more than applying a few small commands, and the proposer waits
/// for the apply anyway. Bigger batches go to the blocking pool.
///
/// A follower always applies on the blocking pool: nobody waits for its apply, but the
/// leader waits for its answer to the next AppendEntries, which an inline apply would hold
/// up behind a whole state machine commit.
pub const INLINE_MAX_ENTRIES: usize = 1024;
/// See [`INLINE_MAX_ENTRIES`].
pub const INLINE_MAX_BYTES: usize = 256 << 10;

/// What this crate stores inside the state machine (the `replication_state` blob).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationState {
    /// Format version of this blob.
    pub version: u8,
    /// The last entry applied to the state machine.
    pub last_applied: Option<LogId>,
    /// The last membership applied (with the id of its entry).
    pub membership: StoredMembership,
}

impl ReplicationState {
    /// Decodes a blob stored by the state machine; `None` (nothing applied yet) is the empty state.
    pub fn decode(blob: Option<&[u8]>) -> Result<ReplicationState, SmError> {
        let Some(blob) = blob else {
            return Ok(ReplicationState::default());
        };
        let st: ReplicationState = rmp_serde::from_slice(blob).map_err(|e| SmError::Corrupt {
            what: "replication state",
            reason: e.to_string(),
        })?;
        if st.version != FORMAT_VERSION {
            return Err(SmError::Corrupt {
                what: "replication state",
                reason: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    st.version
                ),
            });
        }
        Ok(st)
    }

    fn encode(&self) -> Result<Vec<u8>, SmError> {
        rmp_serde::to_vec_named(self).map_err(|e| SmError::Encode(e.to_string()))
    }
}

/// The snapshot file: the state machine's bytes and the log position they stand for.
#[derive(Serialize)]
struct SnapshotFileRef<'a> {
    version: u8,
    meta: &'a SnapshotMeta,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

#[derive(Deserialize)]
struct SnapshotFile {
    version: u8,
    meta: SnapshotMeta,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// Errors of the state machine adaptor and the snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SmError {
    /// The application's state machine failed.
    #[error(transparent)]
    StateMachine(#[from] crate::StorageError),
    /// The replication state blob, the snapshot file or an apply result is not valid.
    #[error("corrupt {what}: {reason}")]
    Corrupt {
        /// What is corrupt.
        what: &'static str,
        /// Why it is considered corrupt.
        reason: String,
    },
    /// The replication state or the snapshot file could not be serialized.
    #[error("cannot encode replication state: {0}")]
    Encode(String),
    /// Reading or writing the snapshot file failed.
    #[error("snapshot file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The blocking task running the state machine panicked or was cancelled.
    #[error("state machine task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// The replica stopped: the state machine is no longer touched.
    #[error("the replica stopped using its state machine")]
    Closed,
}

impl SmError {
    fn into_storage(self, subject: ErrorSubject<u64>, verb: ErrorVerb) -> StorageError {
        tracing::error!(error = %self, ?verb, "raft state machine");
        StorageIOError::new(subject, verb, &self).into()
    }
}

/// The openraft state machine of a replica. Cloning shares it (the clone is the snapshot builder).
#[derive(Clone)]
pub struct SmStore {
    inner: Arc<Shared>,
}

struct Shared {
    sm: Arc<dyn StateMachine>,
    dir: PathBuf,
    /// Position of the state machine; the lock also serializes apply / snapshot / restore.
    applied: tokio::sync::Mutex<ReplicationState>,
    snapshot_seq: AtomicU64,
    /// Set by [`SmStore::close`] under the lock: later operations fail instead of running.
    closed: AtomicBool,
    /// This replica leads (kept by [`SmStore::follow_role`]): small batches apply inline.
    leading: AtomicBool,
}

impl SmStore {
    /// Opens the adaptor over `sm`, with the snapshot file in `dir`. Blocking.
    ///
    /// A state machine behind the snapshot file (it lost non-durable applies after the log
    /// was purged past them) is first restored from the snapshot, so openraft can re-apply
    /// the rest from the log.
    pub fn open(sm: Arc<dyn StateMachine>, dir: &Path) -> Result<SmStore, SmError> {
        let mut applied = ReplicationState::decode(sm.replication_state()?.as_deref())?;
        if let Some(file) = read_snapshot_file(dir)? {
            if file.meta.last_log_id > applied.last_applied {
                tracing::warn!(
                    state_machine = ?applied.last_applied,
                    snapshot = ?file.meta.last_log_id,
                    "state machine is behind the snapshot file; restoring the snapshot"
                );
                applied = restore(&*sm, &file.meta, &file.data)?;
            }
        }
        tracing::info!(last_applied = ?applied.last_applied, "state machine opened");
        Ok(SmStore {
            inner: Arc::new(Shared {
                sm,
                dir: dir.to_path_buf(),
                applied: tokio::sync::Mutex::new(applied),
                snapshot_seq: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                leading: AtomicBool::new(false),
            }),
        })
    }
}

impl SmStore {
    /// Keeps the leader flag that chooses where batches are applied in step with `server`
    /// (openraft's server metrics, which change only with the role, vote or membership).
    /// Returns when the replica shuts down.
    pub(crate) async fn follow_role(
        &self,
        mut server: tokio::sync::watch::Receiver<
            openraft::metrics::RaftServerMetrics<u64, crate::Node>,
        >,
    ) {
        loop {
            let leading = server.borrow_and_update().state == openraft::ServerState::Leader;
            if self.inner.leading.swap(leading, Ordering::Relaxed) != leading {
                self.inner.sm.set_leading(leading);
            }
            if server.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits for the operation in progress (an apply, a snapshot being built or installed,
    /// possibly on a task openraft leaves running after its shutdown) and refuses every later
    /// one: once this returns the application may use its state machine alone.
    pub async fn close(&self) {
        let _applied = self.inner.applied.lock().await;
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    /// Takes the lock serializing the operations, unless the store is closed.
    async fn lock_open(
        &self,
        subject: ErrorSubject<u64>,
        verb: ErrorVerb,
    ) -> Result<tokio::sync::MutexGuard<'_, ReplicationState>, StorageError> {
        let guard = self.inner.applied.lock().await;
        if self.inner.closed.load(Ordering::SeqCst) {
            // Not logged as an error: only a task that outlived the replica gets here.
            return Err(StorageIOError::new(subject, verb, &SmError::Closed).into());
        }
        Ok(guard)
    }
}

/// Restores `data` into the state machine and checks that it now stands where `meta` says.
fn restore(
    sm: &dyn StateMachine,
    meta: &SnapshotMeta,
    data: &[u8],
) -> Result<ReplicationState, SmError> {
    sm.restore(data)?;
    let st = ReplicationState::decode(sm.replication_state()?.as_deref())?;
    if st.last_applied != meta.last_log_id {
        return Err(SmError::Corrupt {
            what: "snapshot",
            reason: format!(
                "restored state machine is at {:?}, the snapshot claims {:?}",
                st.last_applied, meta.last_log_id
            ),
        });
    }
    Ok(st)
}

fn read_snapshot_file(dir: &Path) -> Result<Option<SnapshotFile>, SmError> {
    let path = dir.join(SNAPSHOT_FILE);
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SmError::Io { path, source }),
    };
    let file: SnapshotFile = rmp_serde::from_slice(&raw).map_err(|e| SmError::Corrupt {
        what: "snapshot file",
        reason: e.to_string(),
    })?;
    if file.version != FORMAT_VERSION {
        return Err(SmError::Corrupt {
            what: "snapshot file",
            reason: format!("format version {}", file.version),
        });
    }
    Ok(Some(file))
}

/// Writes the snapshot file crash-safely: a temp file, fsync, rename, fsync of the directory.
fn write_snapshot_file(dir: &Path, meta: &SnapshotMeta, data: &[u8]) -> Result<(), SmError> {
    let bytes = rmp_serde::to_vec(&SnapshotFileRef {
        version: FORMAT_VERSION,
        meta,
        data,
    })
    .map_err(|e| SmError::Encode(e.to_string()))?;
    let tmp = dir.join(SNAPSHOT_TMP);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SmError::Io { path, source }
    };
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    let dst = dir.join(SNAPSHOT_FILE);
    std::fs::rename(&tmp, &dst).map_err(io(&dst))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

/// Hands `entries` to the application's state machine.
fn apply_batch(
    sm: &dyn StateMachine,
    entries: &[RaftEntry],
    blob: &[u8],
) -> Result<Vec<Vec<u8>>, crate::StorageError> {
    let view: Vec<Entry<'_>> = entries
        .iter()
        .map(|e| Entry {
            index: e.log_id.index,
            term: e.log_id.leader_id.term,
            command: command_of(e),
        })
        .collect();
    sm.apply(&view, blob)
}

fn command_of(entry: &RaftEntry) -> Option<&[u8]> {
    match &entry.payload {
        EntryPayload::Normal(cmd) => Some(cmd.0.as_slice()),
        EntryPayload::Blank | EntryPayload::Membership(_) => None,
    }
}

impl RaftStateMachine<TypeConfig> for SmStore {
    type SnapshotBuilder = SmStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let st = self.inner.applied.lock().await;
        Ok((st.last_applied, st.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<RaftEntry> = entries.into_iter().collect();
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let mut applied = self
            .lock_open(ErrorSubject::Apply(last), ErrorVerb::Write)
            .await?;
        let mut next = applied.clone();
        next.version = FORMAT_VERSION;
        next.last_applied = Some(last);
        for e in &entries {
            if let EntryPayload::Membership(m) = &e.payload {
                next.membership = StoredMembership::new(Some(e.log_id), m.clone());
            }
        }
        let subject = ErrorSubject::Apply(last);
        let blob = next
            .encode()
            .map_err(|e| e.into_storage(subject.clone(), ErrorVerb::Write))?;
        let sm = self.inner.sm.clone();
        let n = entries.len();
        let bytes: usize = entries
            .iter()
            .map(|e| command_of(e).map_or(0, <[u8]>::len))
            .sum();
        let inline = self.inner.leading.load(Ordering::Relaxed)
            && n <= INLINE_MAX_ENTRIES
            && bytes <= INLINE_MAX_BYTES;
        let responses = if inline {
            apply_batch(&*sm, &entries, &blob).map_err(SmError::from)
        } else {
            tokio::task::spawn_blocking(move || apply_batch(&*sm, &entries, &blob))
                .await
                .map_err(SmError::from)
                .and_then(|r| r.map_err(SmError::from))
        }
        .map_err(|e| e.into_storage(subject.clone(), ErrorVerb::Write))?;
        if responses.len() != n {
            let e = SmError::Corrupt {
                what: "apply result",
                reason: format!("{} responses for {n} entries", responses.len()),
            };
            return Err(e.into_storage(subject, ErrorVerb::Write));
        }
        *applied = next;
        Ok(responses.into_iter().map(Response).collect())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        tracing::info!(%meta, "installing a snapshot from the leader");
        let mut applied = self
            .lock_open(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
            )
            .await?;
        let data = snapshot.into_inner();
        let sm = self.inner.sm.clone();
        let dir = self.inner.dir.clone();
        let m = meta.clone();
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        // The file first: if we crash after it, `open` sees the state machine behind the file
        // and restores from it.
        let st = tokio::task::spawn_blocking(move || {
            write_snapshot_file(&dir, &m, &data)?;
            restore(&*sm, &m, &data)
        })
        .await
        .map_err(SmError::from)
        .and_then(|r| r)
        .map_err(|e| e.into_storage(subject, ErrorVerb::Write))?;
        *applied = st;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let dir = self.inner.dir.clone();
        let file = tokio::task::spawn_blocking(move || read_snapshot_file(&dir))
            .await
            .map_err(SmError::from)
            .and_then(|r| r)
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        Ok(file.map(|f| Snapshot {
            meta: f.meta,
            snapshot: Box::new(Cursor::new(f.data)),
        }))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SmStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // Hold the lock so that no apply slips between the bytes and their position.
        let applied = self
            .lock_open(ErrorSubject::Snapshot(None), ErrorVerb::Read)
            .await?;
        let sm = self.inner.sm.clone();
        let data = tokio::task::spawn_blocking(move || sm.snapshot())
            .await
            .map_err(SmError::from)
            .and_then(|r| r.map_err(SmError::from))
            .map_err(|e| e.into_storage(ErrorSubject::Snapshot(None), ErrorVerb::Read))?;
        let seq = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        let snapshot_id = match applied.last_applied {
            Some(l) => format!("{}-{}-{millis}-{seq}", l.leader_id.term, l.index),
            None => format!("0-0-{millis}-{seq}"),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        // Still under the lock: an install_snapshot must not interleave with this file write.
        let dir = self.inner.dir.clone();
        let m = meta.clone();
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        let data = tokio::task::spawn_blocking(move || {
            write_snapshot_file(&dir, &m, &data).map(|()| data)
        })
        .await
        .map_err(SmError::from)
        .and_then(|r| r)
        .map_err(|e| e.into_storage(subject, ErrorVerb::Write))?;
        drop(applied);
        tracing::info!(%meta, bytes = data.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}
