//! The healer under two losses at once (issue 6): chunks left with one copy are repaired
//! before those left with two, every chunk gets back to 3 copies, and the dead chunkservers,
//! once restarted, have their stale copies recognized and deleted (never served); a standby
//! healer finishes the repairs of a leader killed in the middle of them.

use anyhow::{ensure, Context, Result};
use rawfs_integration::fsutil::{chunk_files, verify_pattern, write_pattern};
use rawfs_integration::harness::wait_until;
use rawfs_integration::{Cluster, Options};
use std::time::Duration;

const MIB: usize = 1 << 20;
/// Chunk files of this size or more belong to the test's files (not an empty chunk).
const MIN_CHUNK_FILE: u64 = MIB as u64;

/// The `copies_left` of every "repaired chunk" line of healer `id`'s log, in order.
fn repairs_logged(c: &Cluster, id: u64) -> Result<Vec<u64>> {
    let Some(log) = c.process("healer", id)?.log else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    Ok(text
        .lines()
        .filter(|l| l.contains("repaired chunk"))
        .filter_map(|l| {
            let v = l.split("copies_left=").nth(1)?;
            v.split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .collect())
}

#[test]
fn two_losses_heal_the_most_endangered_first_and_stale_copies_go() -> Result<()> {
    let mut c = Cluster::start_with(Options::healing(5))?;
    // 24 one-chunk files on 5 servers: about 3 in 10 have both victims among their 3 copies.
    let files: Vec<(String, u64, usize)> = (0..24)
        .map(|i| (format!("f{i}"), 300 + i as u64, MIB + 1000 * i))
        .collect();
    for (name, seed, len) in &files {
        write_pattern(&c.path(name), *seed, *len)?;
    }
    let total = c.status()?["chunks"]["replicated"]
        .as_u64()
        .context("no chunk count")?;
    ensure!(total == 24, "expected 24 chunks, status counts {total}");

    // The healers stop first, so that their first scan afterwards sees both losses at once
    // (with them running, one loss may be noticed a scan before the other).
    c.kill9("healer", 1)?;
    c.kill9("healer", 2)?;
    let victims = [1u64, 2];
    for v in victims {
        c.kill9("chunkserver", v)?;
    }
    let r = wait_until(
        "both victims down for the metadata service",
        Duration::from_secs(60),
        || {
            let s = c.status()?;
            let down = s["chunkservers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|cs| {
                    victims.iter().any(|v| cs["id"] == *v)
                        && cs["last_seen_ms"].as_u64() > Some(2500)
                })
                .count();
            Ok(down == 2 && s["chunks"]["under_replicated"].as_u64() > Some(0))
        },
    );
    c.diagnose(r)?;
    let h = &c.status()?["healer"];
    ensure!(
        h["queue"].as_u64() > Some(0)
            && h["one_loss_from_lost"].as_u64() > Some(0)
            && h["bytes_at_risk"].as_u64() > Some(0),
        "status shows no repair waiting: {h}"
    );
    c.restart_process("healer", 1)?;
    c.restart_process("healer", 2)?;
    let r = wait_until(
        "every chunk back at 3 copies",
        Duration::from_secs(120),
        || {
            let s = c.status()?;
            let ch = &s["chunks"];
            Ok(ch["under_replicated"] == 0 && ch["lost"] == 0 && ch["healthy"] == total)
        },
    );
    c.diagnose(r)?;
    let h = &c.status()?["healer"];
    ensure!(
        h["queue"] == 0 && h["bytes_at_risk"] == 0 && h["leader"].is_u64(),
        "status after the repairs: {h}"
    );

    // One healer did the work (the other stands by); its first repair is of a chunk that
    // had one copy left, and every such chunk was repaired before the last two-copy one.
    let logs = [repairs_logged(&c, 1)?, repairs_logged(&c, 2)?];
    let order = logs
        .iter()
        .max_by_key(|l| l.len())
        .context("no healer log")?;
    let ones = order.iter().filter(|&&n| n == 1).count();
    ensure!(ones >= 1, "no chunk had one copy left: {order:?}");
    ensure!(
        order[0] == 1,
        "the first repair was not a one-copy chunk: {order:?}"
    );
    let last_one = order.iter().rposition(|&n| n == 1).unwrap_or(0);
    let first_two = order.iter().position(|&n| n == 2).unwrap_or(order.len());
    // Repairs run a few at a time, so completions may interleave at the border.
    ensure!(
        last_one < first_two + 4,
        "two-copy chunks went before one-copy ones: {order:?}"
    );

    // The victims come back with copies the chunk map no longer lists: deleted, never read.
    for v in victims {
        c.start_process("chunkserver", v, |_| {})?;
    }
    let r = wait_until(
        "the returned servers' stale copies deleted",
        Duration::from_secs(60),
        || {
            let left = chunk_files(&c.dir, MIN_CHUNK_FILE)?;
            Ok(left.iter().all(|(id, _)| !victims.contains(id)))
        },
    );
    c.diagnose(r)?;
    std::fs::write("/proc/sys/vm/drop_caches", b"3").context("drop_caches (needs root)")?;
    for (name, seed, len) in &files {
        verify_pattern(&c.path(name), *seed, *len)?;
    }
    let s = c.status()?;
    ensure!(s["chunks"]["healthy"] == total, "{}", s["chunks"]);
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}

#[test]
fn the_standby_healer_finishes_a_repair_its_killed_leader_began() -> Result<()> {
    let mut c = Cluster::start_with(Options::healing(4))?;
    // Ten full chunks: with 4 servers, about 3 in 4 lose a copy with the victim, and each
    // copy takes a while, so the leader is killed with most of the work still to do.
    let files: Vec<(String, u64, usize)> = (0..10)
        .map(|i| (format!("big{i}"), 400 + i as u64, 64 * MIB))
        .collect();
    for (name, seed, len) in &files {
        write_pattern(&c.path(name), *seed, *len)?;
    }
    let total = c.status()?["chunks"]["replicated"]
        .as_u64()
        .context("no chunk count")?;
    // Slow enough that the first copies take seconds: the leader dies in the middle of them.
    c.rawfs_ok(&["healer", "set", "--repair-rate", "32M"])?;
    c.kill9("chunkserver", 1)?;
    // The healer whose workers are moving bytes holds the lease: kill it mid-copy.
    let mut leader = 0;
    let r = wait_until("a repair under way", Duration::from_secs(60), || {
        let out = c.rawfs_ok(&["healer", "status", "--json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let busy = v["healers"].as_array().into_iter().flatten().find(|h| {
            h["workers"]
                .as_array()
                .is_some_and(|w| w.iter().any(|w| w["done_bytes"].as_u64() > Some(0)))
        });
        leader = busy.and_then(|h| h["id"].as_u64()).unwrap_or(0);
        Ok(leader != 0)
    });
    c.diagnose(r)?;
    ensure!(
        repairs_logged(&c, leader)?.len() < total as usize,
        "the leader had already finished"
    );
    c.kill9("healer", leader)?;
    let standby = 3 - leader;
    let r = wait_until(
        "every chunk back at 3 copies",
        Duration::from_secs(180),
        || {
            let ch = &c.status()?["chunks"];
            Ok(ch["under_replicated"] == 0 && ch["lost"] == 0 && ch["healthy"] == total)
        },
    );
    c.diagnose(r)?;
    ensure!(
        !repairs_logged(&c, standby)?.is_empty(),
        "the standby healer repaired nothing"
    );
    // No chunk was listed twice on one server or left with extra copies: exactly 3 copies
    // per chunk across the live servers.
    let s = c.status()?;
    let listed: u64 = s["chunkservers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|cs| cs["id"] != 1)
        .map(|cs| cs["chunks"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        listed == 3 * total,
        "{listed} copies listed for {total} chunks: {s}"
    );
    std::fs::write("/proc/sys/vm/drop_caches", b"3").context("drop_caches (needs root)")?;
    for (name, seed, len) in &files {
        verify_pattern(&c.path(name), *seed, *len)?;
    }
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
