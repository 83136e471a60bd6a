//! rawfs end-to-end tests: each test starts its own cluster (`rawfs up` in a temporary
//! directory, see `rawfs_integration::harness`) and tears it down, even on failure.
//!
//! The test modules live in `tests/integration/` (named by `#[path]`, so cargo does not take
//! them for separate test binaries). Needs root, /dev/fuse, and the binaries built (`cargo build --workspace`).

#[path = "integration/bad_input.rs"]
mod bad_input;
#[path = "integration/caching.rs"]
mod caching;
#[path = "integration/cli.rs"]
mod cli;
#[path = "integration/drain.rs"]
mod drain;
#[path = "integration/ec_heal.rs"]
mod ec_heal;
#[path = "integration/erasure.rs"]
mod erasure;
#[path = "integration/failover.rs"]
mod failover;
#[path = "integration/fault_storm.rs"]
mod fault_storm;
#[path = "integration/faults.rs"]
mod faults;
#[path = "integration/full_disk.rs"]
mod full_disk;
#[path = "integration/healer.rs"]
mod healer;
#[path = "integration/healer_limits.rs"]
mod healer_limits;
#[path = "integration/healer_order.rs"]
mod healer_order;
#[path = "integration/healer_throttle.rs"]
mod healer_throttle;
#[path = "integration/held.rs"]
mod held;
#[path = "integration/integrity.rs"]
mod integrity;
#[path = "integration/locks.rs"]
mod locks;
#[path = "integration/nbd.rs"]
mod nbd;
#[path = "integration/posix.rs"]
mod posix;
#[path = "integration/posix_perms.rs"]
mod posix_perms;
#[path = "integration/restart.rs"]
mod restart;
#[path = "integration/scrub.rs"]
mod scrub;
#[path = "integration/tools.rs"]
mod tools;
#[path = "integration/wiped_disk.rs"]
mod wiped_disk;
