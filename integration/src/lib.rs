//! End-to-end tests of rawfs: real processes, real mounts.
//!
//! The library half holds the cluster harness and small filesystem helpers; the tests live in
//! one test binary (`tests/integration.rs`, modules under `tests/integration/`) to save link
//! time.
//!
//! ```text
//!  test ──> harness::Cluster ──spawns──> rawfs up --dir TMP/cluster --mount TMP/mnt
//!    │            │ polls cluster.json, `rawfs status --json`, mountinfo
//!    │            ├─ kill9 / sigstop / restart_process / restart / Drop (unmount + kill leftovers)
//!    │            └─ replicas: leader, replica_status, digest, wait_converged (3 metadata)
//!    └── std::fs, libc syscalls, cp/tar/git/sqlite3/rsync on TMP/mnt
//! ```
//!
//! Run with `cargo build --workspace && cargo test --workspace -- --test-threads=2` as root
//! (FUSE and the unprivileged-user checks need it). `RAWFS_SEED` reproduces a randomized test;
//! `RAWFS_BIN_DIR` points at the binaries, `RAWFS_TEST_DIR` at where clusters live (default
//! `/var/tmp`), `RAWFS_KEEP=1` keeps each cluster's directory (data, logs) after the test. `bench.sh` beside this crate is the performance benchmark (not run in CI).

#![warn(missing_docs)]

pub mod fsutil;
pub mod harness;
pub mod mounts;
pub mod replicas;
pub mod workload;

pub use harness::{Cluster, Options};
