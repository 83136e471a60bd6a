//! Tests of the replicated log: one test binary (faster to link) with a toy state machine.

// Benchmarks, not checks: `RUSTFLAGS="--cfg rawfs_bench" cargo test ... -- --nocapture`.
#[cfg(rawfs_bench)]
mod bench;
mod chaos;
mod cluster;
mod harness;
mod membership;
mod single;
mod storage;
mod toy;
