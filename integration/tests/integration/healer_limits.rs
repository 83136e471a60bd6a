//! The cluster's run-time repair and scrub limits (issue 6): `rawfs healer set` stores them in
//! the replicated metadata state, `rawfs status` and `rawfs healer status` show them, the
//! chunkservers apply the scrub limit from their heartbeat replies and the healers the repair
//! limit from their report replies, the setting survives a `kill -9` of the metadata leader,
//! and `default` gives each chunkserver its own rate back.

use anyhow::{ensure, Context, Result};
use rawfs_integration::harness::wait_until;
use rawfs_integration::{Cluster, Options};
use serde_json::Value;
use std::time::{Duration, Instant};

const CHUNKSERVERS: u64 = 3;
/// The scrub rate every chunkserver is started with (`rawfs up --scrub-rate`).
const START_SCRUB_RATE: u64 = 8 << 20;
/// How long a chunkserver may take to pick up a changed setting (a few heartbeats).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until every chunkserver scrubs at `rate` bytes per second.
fn wait_scrub_rate(c: &Cluster, rate: u64) -> Result<()> {
    let r = wait_until(
        &format!("every chunkserver to scrub at {rate} B/s"),
        APPLY_TIMEOUT,
        || {
            for id in 1..=CHUNKSERVERS {
                if c.scrub_status(id)?.rate != rate {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    );
    c.diagnose(r)
}

/// `rawfs healer status --json --dir DIR`, parsed.
fn healer_status(c: &Cluster) -> Result<Value> {
    let out = c.rawfs_ok(&["healer", "status", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("healer status JSON: {out}"))
}

#[test]
fn healer_set_limits_survive_a_leader_kill_and_reach_the_chunkservers() -> Result<()> {
    let rate = START_SCRUB_RATE.to_string();
    let mut c = Cluster::start_with(Options::new(
        CHUNKSERVERS as u32,
        &["--metadata-replicas", "3", "--scrub-rate", &rate],
    ))?;
    for id in 1..=CHUNKSERVERS {
        ensure!(
            c.scrub_status(id)?.rate == START_SCRUB_RATE,
            "chunkserver {id} did not start at --scrub-rate"
        );
    }
    // Nothing set yet: the daemons' own flags apply.
    let h = healer_status(&c)?;
    ensure!(
        h["settings"]["repair_rate"].is_null() && h["settings"]["scrub_rate"].is_null(),
        "settings before any `healer set`: {h}"
    );
    ensure!(c.status()?["healer"]["scrub_rate"].is_null());

    let out = c.rawfs_ok(&["healer", "set", "--repair-rate", "10M", "--scrub-rate", "0"])?;
    ensure!(
        out.contains("repair rate: 10.0 MiB/s (set)") && out.contains("scrub rate: paused (set)"),
        "healer set printed: {out}"
    );
    let s = c.status()?;
    ensure!(
        s["healer"]["scrub_rate"] == 0,
        "status healer: {}",
        s["healer"]
    );
    for k in ["throughput", "eta_seconds", "repair_rate"] {
        ensure!(
            s["healer"].get(k).is_some(),
            "status healer lacks {k}: {}",
            s["healer"]
        );
    }
    let h = healer_status(&c)?;
    ensure!(
        h["settings"]["repair_rate"] == 10u64 << 20 && h["settings"]["scrub_rate"] == 0,
        "healer status settings: {}",
        h["settings"]
    );
    ensure!(h["healers"].is_array(), "healer status: {h}");
    wait_scrub_rate(&c, 0)?;
    // The healers apply the repair limit from their next report's reply, and the working
    // one's shows in `rawfs status` (the lease may take a few seconds after the start).
    let r = wait_until(
        "the healers to apply the repair limit",
        APPLY_TIMEOUT,
        || {
            let h = healer_status(&c)?;
            let healers = h["healers"].as_array().cloned().unwrap_or_default();
            let applied =
                !healers.is_empty() && healers.iter().all(|x| x["repair_rate"] == 10u64 << 20);
            Ok(applied && c.status()?["healer"]["repair_rate"] == 10u64 << 20)
        },
    );
    c.diagnose(r)?;

    // The setting is replicated state: the next leader has it.
    let (old, term) = c.leader()?.context("no metadata leader")?;
    c.kill9("metadata", old)?;
    c.wait_leader(Duration::from_secs(20), term + 1, Some(old))?;
    let r = wait_until(
        "the new leader to answer with the settings",
        Duration::from_secs(20),
        || {
            let h = healer_status(&c)?;
            Ok(h["settings"]["repair_rate"] == 10u64 << 20 && h["settings"]["scrub_rate"] == 0)
        },
    );
    c.diagnose(r)?;
    ensure!(c.status()?["healer"]["scrub_rate"] == 0);
    // Only the scrub limit goes back to the chunkservers' own rate; the repair limit stays.
    let out = c.rawfs_ok(&["healer", "set", "--scrub-rate", "default"])?;
    ensure!(
        out.contains("repair rate: 10.0 MiB/s (set)")
            && out.contains("scrub rate: default (each chunkserver's --scrub-rate)"),
        "healer set printed: {out}"
    );
    wait_scrub_rate(&c, START_SCRUB_RATE)?;
    let h = healer_status(&c)?;
    ensure!(
        h["settings"]["repair_rate"] == 10u64 << 20 && h["settings"]["scrub_rate"].is_null(),
        "healer status settings: {}",
        h["settings"]
    );
    ensure!(c.status()?["healer"]["scrub_rate"].is_null());
    // The killed replica comes back and catches up.
    c.restart_process("metadata", old)?;
    c.wait_caught_up(old, Duration::from_secs(30))?;

    // Wrong arguments: 2, without contacting anything.
    let dir = c.dir.to_string_lossy().into_owned();
    let out = c.rawfs(&["healer", "set", "--dir", &dir])?;
    ensure!(out.status.code() == Some(2), "no limit given: {out:?}");
    let out = c.rawfs(&["healer", "set", "--scrub-rate", "fast", "--dir", &dir])?;
    ensure!(out.status.code() == Some(2), "bad rate: {out:?}");
    // Nobody there: 1, with a message, in a few seconds.
    let started = Instant::now();
    let out = c.rawfs(&[
        "healer",
        "set",
        "--repair-rate",
        "1M",
        "--metadata",
        "127.0.0.1:1",
    ])?;
    let took = started.elapsed();
    ensure!(out.status.code() == Some(1), "unreachable: {out:?}");
    ensure!(took < Duration::from_secs(10), "unreachable took {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("127.0.0.1:1"), "message: {err}");
    let out = c.rawfs(&["healer", "status", "--metadata", "127.0.0.1:1"])?;
    ensure!(out.status.code() == Some(1), "status unreachable: {out:?}");
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
