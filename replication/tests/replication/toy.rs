//! A toy state machine and test helpers.
//!
//! The toy state machine records every applied command. It models a store that commits
//! non-durably between durable checkpoints: `crash()` drops everything applied since the last
//! checkpoint, as a power loss would.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use rawfs_replication::Entry;
use rawfs_replication::StateMachine;
use rawfs_replication::StorageError;
use serde::Deserialize;
use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToyState {
    /// (index, term, command) of every applied command.
    pub applied: Vec<(u64, u64, Vec<u8>)>,
    /// Index of the last entry applied (commands or not); raft's first entry has index 0.
    pub last_index: Option<u64>,
    pub replication: Option<Vec<u8>>,
}

#[derive(Default)]
struct Inner {
    live: ToyState,
    durable: ToyState,
    batches_since_checkpoint: u64,
    restores: u64,
}

pub struct ToySm {
    inner: Mutex<Inner>,
    /// Checkpoint (make durable) after this many applied batches; `None`: never by itself.
    checkpoint_every: Option<u64>,
    /// Panic on a gap or a repeated index (off for openraft's suite, which applies arbitrary entries).
    strict: bool,
}

impl ToySm {
    /// A state machine whose every apply is durable.
    pub fn durable() -> Arc<ToySm> {
        Arc::new(ToySm {
            inner: Mutex::default(),
            checkpoint_every: Some(1),
            strict: true,
        })
    }

    /// A durable state machine that accepts any sequence of entries.
    pub fn lenient() -> Arc<ToySm> {
        Arc::new(ToySm {
            inner: Mutex::default(),
            checkpoint_every: Some(1),
            strict: false,
        })
    }

    /// A state machine that makes its applies durable only every `n` batches (`None`: never).
    pub fn checkpoint_every(n: Option<u64>) -> Arc<ToySm> {
        Arc::new(ToySm {
            inner: Mutex::default(),
            checkpoint_every: n,
            strict: true,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loses everything applied since the last checkpoint.
    pub fn crash(&self) {
        let mut g = self.lock();
        g.live = g.durable.clone();
        g.batches_since_checkpoint = 0;
    }

    pub fn state(&self) -> ToyState {
        self.lock().live.clone()
    }

    pub fn commands(&self) -> Vec<Vec<u8>> {
        self.lock()
            .live
            .applied
            .iter()
            .map(|(_, _, c)| c.clone())
            .collect()
    }

    /// How many snapshots were restored into this state machine.
    pub fn restores(&self) -> u64 {
        self.lock().restores
    }

    pub fn durable_commands(&self) -> usize {
        self.lock().durable.applied.len()
    }
}

fn err(e: impl std::fmt::Display) -> StorageError {
    StorageError {
        reason: e.to_string(),
    }
}

impl StateMachine for ToySm {
    fn apply(
        &self,
        entries: &[Entry<'_>],
        replication_state: &[u8],
    ) -> Result<Vec<Vec<u8>>, StorageError> {
        let mut g = self.lock();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            assert!(
                !self.strict || g.live.last_index.map_or(true, |l| e.index == l + 1),
                "entry {} applied after {:?}",
                e.index,
                g.live.last_index
            );
            g.live.last_index = Some(e.index);
            match e.command {
                Some(c) => {
                    g.live.applied.push((e.index, e.term, c.to_vec()));
                    let mut resp = (g.live.applied.len() as u64).to_be_bytes().to_vec();
                    resp.extend_from_slice(&e.index.to_be_bytes());
                    out.push(resp);
                }
                None => out.push(Vec::new()),
            }
        }
        g.live.replication = Some(replication_state.to_vec());
        g.batches_since_checkpoint += 1;
        if self
            .checkpoint_every
            .is_some_and(|n| g.batches_since_checkpoint >= n)
        {
            g.durable = g.live.clone();
            g.batches_since_checkpoint = 0;
        }
        Ok(out)
    }

    fn replication_state(&self) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(self.lock().live.replication.clone())
    }

    fn snapshot(&self) -> Result<Vec<u8>, StorageError> {
        rmp_serde::to_vec(&self.lock().live).map_err(err)
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), StorageError> {
        let st: ToyState = rmp_serde::from_slice(snapshot).map_err(err)?;
        let mut g = self.lock();
        g.live = st.clone();
        g.durable = st;
        g.batches_since_checkpoint = 0;
        g.restores += 1;
        Ok(())
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `f` until it returns `Some`, failing the test after `timeout`.
pub async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The response of the toy state machine: the number of commands applied so far (the
/// position of this command among them, from 1).
pub fn count(resp: &[u8]) -> u64 {
    let arr: [u8; 8] = resp
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .expect("16-byte response");
    u64::from_be_bytes(arr)
}

/// The response of the toy state machine: the log index of the command.
pub fn index_of(resp: &[u8]) -> u64 {
    let arr: [u8; 8] = resp
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .expect("16-byte response");
    u64::from_be_bytes(arr)
}
