//! End-to-end tests of rawfs: real processes, real mounts.
//!
//! The library half holds the cluster harness and small filesystem helpers; the tests live in
//! one test binary (`tests/integration.rs`, modules under `tests/integration/`) to save link
//! time.
//!
//! ```text
//!  test ──> harness::Cluster ──spawns──> rawfs up --dir TMP/cluster --mount TMP/mnt
//!    │            │ polls cluster.json, `rawfs status --json`, mountinfo
//!    │            └─ kill9 / restart_process / restart / Drop (unmount + kill leftovers)
//!    └── std::fs, libc syscalls, cp/tar/git/sqlite3/rsync on TMP/mnt
//! ```
//!
//! Run with `cargo build --workspace && cargo test --workspace -- --test-threads=2` as root
//! (FUSE and the unprivileged-user checks need it). `RAWFS_SEED` reproduces a randomized test;
//! `RAWFS_BIN_DIR` points at the binaries, `RAWFS_TEST_DIR` at where clusters live (default
//! `/var/tmp`). `bench.sh` beside this crate is the performance benchmark (not run in CI).

#![warn(missing_docs)]

pub mod fsutil;
pub mod harness;

pub use harness::{Cluster, Options};
