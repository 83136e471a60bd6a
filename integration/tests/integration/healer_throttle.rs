//! The repair throttle at work (issue 6): with `rawfs healer set --repair-rate 2M` a repair
//! after a chunkserver's loss moves no faster than that, `rawfs healer status` shows the
//! working healer's workers and throughput and `rawfs status` the time to full redundancy;
//! lifting the limit at run time (`--repair-rate 0`) lets the repair finish at once, and
//! every file reads back identical.

use anyhow::{ensure, Context, Result};
use rawfs_integration::fsutil::{verify_pattern, write_pattern};
use rawfs_integration::harness::{busiest_chunkserver, wait_until};
use rawfs_integration::{Cluster, Options};
use serde_json::Value;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const LIMIT: u64 = 2 << 20;
/// The healer's repair piece and its default number of workers.
const PIECE: u64 = 4 << 20;
const WORKERS: u64 = 4;

/// `rawfs healer status --json`, parsed.
fn healer_status(c: &Cluster) -> Result<Value> {
    let out = c.rawfs_ok(&["healer", "status", "--json"])?;
    serde_json::from_str(&out).with_context(|| format!("healer status JSON: {out}"))
}

/// Bytes the working healer has moved: repairs done, plus the pieces of those in flight.
fn moved(c: &Cluster) -> Result<u64> {
    let h = working_healer(&healer_status(c)?).context("no working healer")?;
    let in_flight: u64 = h["workers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["done_bytes"].as_u64())
        .sum();
    Ok(h["repaired_bytes"].as_u64().unwrap_or(0) + in_flight)
}

/// The report of the healer holding the lease, if it has sent one.
fn working_healer(v: &Value) -> Option<Value> {
    v["healers"]
        .as_array()?
        .iter()
        .find(|h| h["leader"] == true)
        .cloned()
}

#[test]
fn a_throttled_repair_keeps_to_its_rate_shows_its_progress_and_speeds_up_when_lifted() -> Result<()>
{
    let mut c = Cluster::start_with(Options::healing(4))?;
    c.rawfs_ok(&["healer", "set", "--repair-rate", "2M"])?;
    // Four one-chunk files of 20 MiB: the victim holds three of them, 60 MiB to copy, about
    // 30 s at the limit.
    let files: Vec<(String, u64, usize)> = (0..4)
        .map(|i| (format!("f{i}"), 40 + i as u64, 20 * MIB))
        .collect();
    for (name, seed, len) in &files {
        write_pattern(&c.path(name), *seed, *len)?;
    }
    let s = c.status()?;
    let victim = busiest_chunkserver(&s)?;
    c.kill9("chunkserver", victim)?;

    // The repair runs: workers busy, bytes moving, an estimate in `rawfs status`.
    let mut seen = None;
    let r = wait_until(
        "the healer repairing with a throughput and an estimate",
        Duration::from_secs(60),
        || {
            let Some(h) = working_healer(&healer_status(&c)?) else {
                return Ok(false);
            };
            let st = c.status()?;
            let busy = h["phase"] == "repairing"
                && h["workers"].as_array().is_some_and(|w| !w.is_empty())
                && h["throughput"].as_u64() > Some(0)
                && st["healer"]["eta_seconds"].as_u64() > Some(0);
            if busy {
                seen = Some((h, st["healer"].clone()));
            }
            Ok(busy)
        },
    );
    c.diagnose(r)?;
    let (h, st) = seen.context("no report")?;
    ensure!(h["repair_rate"] == LIMIT, "the healer applies {h}");
    ensure!(
        st["throughput"].as_u64() > Some(0),
        "rawfs status shows {st}"
    );
    let w = &h["workers"][0];
    ensure!(
        w["kind"] == "copy" && w["bytes"].as_u64() > Some(0) && w["chunk"].as_u64() > Some(0),
        "worker: {w}"
    );
    // Bytes moved over ten seconds: at most the limit's worth, plus the one second's burst
    // an idle throttle allows and a piece per worker booked before the interval began.
    let (t0, b0) = (Instant::now(), moved(&c)?);
    let r = wait_until(
        "ten seconds of throttled repair",
        Duration::from_secs(20),
        || Ok(t0.elapsed() >= Duration::from_secs(10)),
    );
    c.diagnose(r)?;
    let (dt, b1) = (t0.elapsed(), moved(&c)?);
    let allowed = LIMIT as f64 * (dt.as_secs_f64() + 1.0) + (WORKERS * PIECE) as f64;
    ensure!(
        ((b1 - b0) as f64) <= allowed,
        "repair moved {} bytes in {dt:?} with a limit of {LIMIT} B/s",
        b1 - b0
    );
    ensure!(b1 > b0, "the repair moved nothing in {dt:?}");
    let at_risk = c.status()?["healer"]["bytes_at_risk"].as_u64().unwrap_or(0);
    ensure!(at_risk > 0, "the throttled repair is already over");

    // Lifted: the rest goes at disk speed.
    c.rawfs_ok(&["healer", "set", "--repair-rate", "0"])?;
    let r = wait_until(
        "every chunk back at 3 copies once the limit is lifted",
        Duration::from_secs(30),
        || {
            let ch = &c.status()?["chunks"];
            Ok(ch["under_replicated"] == 0 && ch["lost"] == 0 && ch["healthy"] == 4)
        },
    );
    c.diagnose(r)?;
    let r = wait_until(
        "the healer reporting the lifted limit",
        Duration::from_secs(20),
        || Ok(working_healer(&healer_status(&c)?).is_some_and(|h| h["repair_rate"] == 0)),
    );
    c.diagnose(r)?;
    for (name, seed, len) in &files {
        verify_pattern(&c.path(name), *seed, *len)?;
    }
    Ok(())
}
