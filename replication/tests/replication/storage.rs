//! openraft's storage conformance suite, run against the segmented log store and the state
//! machine adaptor (over the toy state machine).

use openraft::testing::StoreBuilder;
use openraft::testing::Suite;
use openraft::StorageError;
use openraft::StorageIOError;
use rawfs_replication::log_store::LogStore;
use rawfs_replication::log_store::LOG_DIR;
use rawfs_replication::state_machine::SmStore;
use rawfs_replication::TypeConfig;
use tempfile::TempDir;

use crate::toy::ToySm;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, SmStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, SmStore), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let log =
            LogStore::open(&dir.path().join(LOG_DIR)).map_err(|e| StorageIOError::write(&e))?;
        let sm =
            SmStore::open(ToySm::lenient(), dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn log_store_and_state_machine_pass_openraft_conformance_suite() {
    crate::toy::init_tracing();
    Suite::test_all(Builder).expect("openraft storage suite");
}
