//! The durable raft log: a redb database (`raft-log.redb`) next to the snapshots.
//!
//! ```text
//!  openraft --append(batch)--> one write txn, Durability::Immediate (1 fsync) --> callback
//!           --save_vote------> write txn, Immediate (the vote is on disk before it is used)
//!           --save_committed-> write txn, Durability::None (made durable by the next fsync)
//!           --truncate/purge-> write txn, Immediate
//! ```
//!
//! Tables: `log` maps an index to a MessagePack-encoded `openraft::Entry`; `meta` holds the
//! vote, the committed log id, the last purged log id and the on-disk format version.
//!
//! The committed log id is only a hint that lets a restarted replica re-apply entries it
//! already knows to be committed without waiting for a leader; losing its last update costs
//! nothing but that wait, so it rides on the next durable commit instead of paying an fsync.
//!
//! redb calls block, so every operation runs on tokio's blocking pool.

use std::fmt::Debug;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use openraft::storage::LogFlushed;
use openraft::storage::RaftLogStorage;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogState;
use openraft::RaftLogReader;
use openraft::StorageIOError;
use redb::Database;
use redb::Durability;
use redb::ReadableTable;
use redb::TableDefinition;

use crate::types::LogId;
use crate::types::RaftEntry;
use crate::types::StorageError;
use crate::types::Vote;
use crate::TypeConfig;

/// File name of the log database inside the replica directory.
pub const LOG_FILE: &str = "raft-log.redb";

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_FORMAT: &str = "format";
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// Version of the on-disk encoding; bumped (with a migration) whenever it changes.
const FORMAT_VERSION: u8 = 1;

/// Errors of the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogStoreError {
    /// redb failed (I/O, or a damaged database file).
    #[error("log database: {0}")]
    Db(Box<redb::Error>),
    /// A stored record does not decode, or is not what its key says.
    #[error("corrupt {what} in the log store: {reason}")]
    Corrupt {
        /// The kind of record.
        what: &'static str,
        /// Why it is considered corrupt.
        reason: String,
    },
    /// The database was written by a build with another on-disk format.
    #[error("log store format version {found} is not supported (this build reads {expected})")]
    Format {
        /// The version found on disk.
        found: u8,
        /// The version this build reads.
        expected: u8,
    },
    /// A record could not be serialized.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// The kind of record.
        what: &'static str,
        /// The serializer's message.
        reason: String,
    },
    /// The blocking task running a database operation panicked or was cancelled.
    #[error("log store task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl LogStoreError {
    fn db(e: impl Into<redb::Error>) -> Self {
        LogStoreError::Db(Box::new(e.into()))
    }

    fn into_storage(self, subject: ErrorSubject<u64>, verb: ErrorVerb) -> StorageError {
        tracing::error!(error = %self, ?verb, "raft log store");
        StorageIOError::new(subject, verb, &self).into()
    }
}

/// The raft log of one replica. Cloning shares the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (or creates) the log database at `path` and checks its format version.
    /// Blocking: call it from a blocking context or at start-up.
    pub fn open(path: &Path) -> Result<LogStore, LogStoreError> {
        let db = Database::create(path).map_err(LogStoreError::db)?;
        let tx = db.begin_write().map_err(LogStoreError::db)?;
        {
            tx.open_table(LOG).map_err(LogStoreError::db)?;
            let mut meta = tx.open_table(META).map_err(LogStoreError::db)?;
            let found = meta
                .get(KEY_FORMAT)
                .map_err(LogStoreError::db)?
                .map(|v| v.value().to_vec());
            match found.as_deref() {
                None => {
                    meta.insert(KEY_FORMAT, [FORMAT_VERSION].as_slice())
                        .map_err(LogStoreError::db)?;
                }
                Some([v]) if *v == FORMAT_VERSION => {}
                Some([v]) => {
                    return Err(LogStoreError::Format {
                        found: *v,
                        expected: FORMAT_VERSION,
                    })
                }
                Some(other) => {
                    return Err(LogStoreError::Corrupt {
                        what: "format version",
                        reason: format!("{} bytes", other.len()),
                    })
                }
            }
        }
        tx.commit().map_err(LogStoreError::db)?;
        Ok(LogStore { db: Arc::new(db) })
    }

    /// Runs a blocking database operation on tokio's blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, LogStoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, LogStoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await?
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        db: &Database,
        key: &str,
        what: &'static str,
    ) -> Result<Option<T>, LogStoreError> {
        let tx = db.begin_read().map_err(LogStoreError::db)?;
        let table = tx.open_table(META).map_err(LogStoreError::db)?;
        let Some(raw) = table.get(key).map_err(LogStoreError::db)? else {
            return Ok(None);
        };
        rmp_serde::from_slice(raw.value())
            .map(Some)
            .map_err(|e| LogStoreError::Corrupt {
                what,
                reason: e.to_string(),
            })
    }

    fn put_meta<T: serde::Serialize>(
        db: &Database,
        key: &str,
        what: &'static str,
        value: &T,
        durability: Durability,
    ) -> Result<(), LogStoreError> {
        let bytes = encode(what, value)?;
        let mut tx = db.begin_write().map_err(LogStoreError::db)?;
        tx.set_durability(durability);
        {
            let mut table = tx.open_table(META).map_err(LogStoreError::db)?;
            table
                .insert(key, bytes.as_slice())
                .map_err(LogStoreError::db)?;
        }
        tx.commit().map_err(LogStoreError::db)
    }

    fn read_entries(
        db: &Database,
        range: (Bound<u64>, Bound<u64>),
    ) -> Result<Vec<RaftEntry>, LogStoreError> {
        let tx = db.begin_read().map_err(LogStoreError::db)?;
        let table = tx.open_table(LOG).map_err(LogStoreError::db)?;
        let mut out = Vec::new();
        for item in table.range(range).map_err(LogStoreError::db)? {
            let (k, v) = item.map_err(LogStoreError::db)?;
            out.push(decode_entry(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn last_entry(db: &Database) -> Result<Option<RaftEntry>, LogStoreError> {
        let tx = db.begin_read().map_err(LogStoreError::db)?;
        let table = tx.open_table(LOG).map_err(LogStoreError::db)?;
        let last = match table.last().map_err(LogStoreError::db)? {
            None => None,
            Some((k, v)) => Some(decode_entry(k.value(), v.value())?),
        };
        Ok(last)
    }
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, LogStoreError> {
    rmp_serde::to_vec(value).map_err(|e| LogStoreError::Encode {
        what,
        reason: e.to_string(),
    })
}

/// Decodes the entry stored under `index`, checking that it really is that entry.
fn decode_entry(index: u64, raw: &[u8]) -> Result<RaftEntry, LogStoreError> {
    let entry: RaftEntry = rmp_serde::from_slice(raw).map_err(|e| LogStoreError::Corrupt {
        what: "log entry",
        reason: format!("index {index}: {e}"),
    })?;
    if entry.log_id.index != index {
        return Err(LogStoreError::Corrupt {
            what: "log entry",
            reason: format!("key {index} holds entry {}", entry.log_id),
        });
    }
    Ok(entry)
}

fn to_bounds<RB: RangeBounds<u64>>(range: &RB) -> (Bound<u64>, Bound<u64>) {
    (range.start_bound().cloned(), range.end_bound().cloned())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<RaftEntry>, StorageError> {
        let bounds = to_bounds(&range);
        self.run(move |db| LogStore::read_entries(db, bounds))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.run(|db| {
            let last_purged: Option<LogId> =
                LogStore::get_meta(db, KEY_PURGED, "last purged log id")?;
            let last = LogStore::last_entry(db)?.map(|e| e.log_id);
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last.or(last_purged),
            })
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let vote = *vote;
        self.run(move |db| LogStore::put_meta(db, KEY_VOTE, "vote", &vote, Durability::Immediate))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.run(|db| LogStore::get_meta(db, KEY_VOTE, "vote"))
            .await
            .map_err(|e| e.into_storage(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // A hint only (see the module docs): the next fsync'ed commit carries it to disk.
        self.run(move |db| {
            LogStore::put_meta(
                db,
                KEY_COMMITTED,
                "committed log id",
                &committed,
                Durability::None,
            )
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.run(|db| {
            let c: Option<Option<LogId>> =
                LogStore::get_meta(db, KEY_COMMITTED, "committed log id")?;
            Ok(c.flatten())
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = RaftEntry> + Send,
        I::IntoIter: Send,
    {
        // Encode on this task, write and fsync on the blocking pool: one transaction per batch.
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = encode("log entry", &entry)
                .map_err(|e| e.into_storage(ErrorSubject::Log(entry.log_id), ErrorVerb::Write))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let res = self
            .run(move |db| {
                let mut tx = db.begin_write().map_err(LogStoreError::db)?;
                tx.set_durability(Durability::Immediate);
                {
                    let mut table = tx.open_table(LOG).map_err(LogStoreError::db)?;
                    for (index, bytes) in &encoded {
                        table
                            .insert(*index, bytes.as_slice())
                            .map_err(LogStoreError::db)?;
                    }
                }
                tx.commit().map_err(LogStoreError::db)
            })
            .await;
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(e.into_storage(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "truncating the raft log from here on");
        self.run(move |db| {
            let mut tx = db.begin_write().map_err(LogStoreError::db)?;
            tx.set_durability(Durability::Immediate);
            {
                let mut table = tx.open_table(LOG).map_err(LogStoreError::db)?;
                table
                    .retain_in(log_id.index.., |_, _| false)
                    .map_err(LogStoreError::db)?;
            }
            tx.commit().map_err(LogStoreError::db)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        tracing::debug!(%log_id, "purging the raft log up to here");
        self.run(move |db| {
            let bytes = encode("last purged log id", &log_id)?;
            let mut tx = db.begin_write().map_err(LogStoreError::db)?;
            tx.set_durability(Durability::Immediate);
            {
                let mut meta = tx.open_table(META).map_err(LogStoreError::db)?;
                meta.insert(KEY_PURGED, bytes.as_slice())
                    .map_err(LogStoreError::db)?;
                let mut table = tx.open_table(LOG).map_err(LogStoreError::db)?;
                table
                    .retain_in(..=log_id.index, |_, _| false)
                    .map_err(LogStoreError::db)?;
            }
            tx.commit().map_err(LogStoreError::db)
        })
        .await
        .map_err(|e| e.into_storage(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;
    use openraft::EntryPayload;

    use super::*;

    fn entry(term: u64, index: u64) -> RaftEntry {
        RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(term, 0), index),
            payload: EntryPayload::Normal(crate::Command(vec![index as u8])),
        }
    }

    fn put_raw(store: &LogStore, index: u64, raw: &[u8]) {
        let tx = store.db.begin_write().expect("write txn");
        tx.open_table(LOG)
            .expect("table")
            .insert(index, raw)
            .expect("insert");
        tx.commit().expect("commit");
    }

    #[tokio::test]
    async fn garbage_entry_is_a_storage_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = LogStore::open(&dir.path().join(LOG_FILE)).expect("open");
        put_raw(&store, 3, b"\xc1 not msgpack");
        assert!(store.try_get_log_entries(0..10).await.is_err());
        assert!(store.get_log_state().await.is_err());
    }

    #[tokio::test]
    async fn entry_under_the_wrong_index_is_a_storage_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = LogStore::open(&dir.path().join(LOG_FILE)).expect("open");
        let raw = rmp_serde::to_vec(&entry(1, 7)).expect("encode");
        put_raw(&store, 3, &raw);
        assert!(store.try_get_log_entries(3..4).await.is_err());
    }

    #[tokio::test]
    async fn vote_committed_and_purge_point_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LOG_FILE);
        {
            let mut store = LogStore::open(&path).expect("open");
            store
                .save_vote(&Vote::new_committed(4, 2))
                .await
                .expect("vote");
            let raw: Vec<_> = (0..6)
                .map(|i| rmp_serde::to_vec(&entry(4, i)).expect("encode"))
                .collect();
            for (i, r) in raw.iter().enumerate() {
                put_raw(&store, i as u64, r);
            }
            store.purge(entry(4, 2).log_id).await.expect("purge");
            store.truncate(entry(4, 5).log_id).await.expect("truncate");
            store
                .save_committed(Some(entry(4, 4).log_id))
                .await
                .expect("committed");
            // A durable commit after the non-durable committed hint, as an append would do.
            store
                .save_vote(&Vote::new_committed(4, 2))
                .await
                .expect("vote");
        }
        let mut store = LogStore::open(&path).expect("reopen");
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(Vote::new_committed(4, 2))
        );
        assert_eq!(
            store.read_committed().await.expect("committed"),
            Some(entry(4, 4).log_id)
        );
        let st = store.get_log_state().await.expect("state");
        assert_eq!(st.last_purged_log_id, Some(entry(4, 2).log_id));
        assert_eq!(st.last_log_id, Some(entry(4, 4).log_id));
        let got: Vec<u64> = store
            .try_get_log_entries(0..100)
            .await
            .expect("read")
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, vec![3, 4]);
    }

    #[test]
    fn unknown_format_version_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LOG_FILE);
        {
            let store = LogStore::open(&path).expect("open");
            let tx = store.db.begin_write().expect("write txn");
            tx.open_table(META)
                .expect("table")
                .insert(KEY_FORMAT, [FORMAT_VERSION + 1].as_slice())
                .expect("insert");
            tx.commit().expect("commit");
        }
        assert!(matches!(
            LogStore::open(&path),
            Err(LogStoreError::Format { .. })
        ));
    }
}
