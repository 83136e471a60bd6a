//! The healers in `rawfs status` (the `healer` JSON object and the `healer:` line) and in
//! `rawfs healer status` (settings, each healer's report and its workers).
//!
//! ```text
//!  ClusterStatus { healer (lease holder), healers: [HealerInfo { id, leader, report }],
//!                  healer_settings { repair_rate, scrub_rate }, chunks.at_risk_bytes }
//!     ─▶ status_json:   healer.{leader, queue, one_loss_from_lost, bytes_at_risk,
//!                               throughput, eta_seconds, repair_rate, scrub_rate}
//!     ─▶ status_line:   "healer: healer 2 holds the lease; 3 chunks to repair (...),
//!                        6.0 MiB at risk, repairing at 85.3 MiB/s, full redundancy in ~2m10s"
//!     ─▶ healers_json:  {"settings": {...}, "healers": [{..., "workers": [...]}]}
//!     ─▶ healers_table: the same for a person
//! ```
//!
//! The reports are the leader's soft state: a healer reports every ~2 s, so after a
//! metadata failover `healers` is empty until the next reports arrive.

use crate::size::Human;
use rawfs_metadata_api::{ClusterStatus, HealerInfo, HealerSettings, WorkerReport};
use serde_json::{json, Value};
use std::fmt::Write;

/// The healer that works: the one whose report the leader marks as the lease holder, else
/// the one with the lease holder's id.
pub fn working(s: &ClusterStatus) -> Option<&HealerInfo> {
    s.healers
        .iter()
        .find(|h| h.leader)
        .or_else(|| s.healers.iter().find(|h| Some(h.id) == s.healer))
}

/// Seconds until `bytes` are repaired at `throughput` bytes/s, rounded up; `None` when
/// nothing is at risk or nothing moves.
pub fn eta_seconds(bytes: u64, throughput: u64) -> Option<u64> {
    (bytes > 0 && throughput > 0).then(|| bytes.div_ceil(throughput))
}

/// The `healer` object of `rawfs status --json`.
pub fn status_json(s: &ClusterStatus) -> Value {
    let ch = &s.chunks;
    let report = working(s).map(|h| &h.report);
    let throughput = report.map_or(0, |r| r.throughput);
    json!({
        "leader": s.healer,
        "queue": ch.under_replicated + ch.degraded,
        "one_loss_from_lost": ch.one_loss_from_lost,
        "bytes_at_risk": ch.at_risk_bytes,
        "throughput": throughput,
        "eta_seconds": eta_seconds(ch.at_risk_bytes, throughput),
        "repair_rate": report.map(|r| r.repair_rate),
        "scrub_rate": s.healer_settings.scrub_rate,
    })
}

/// The `healer` object of a cluster without a metadata leader: nothing is known.
pub fn leaderless_json() -> Value {
    json!({
        "leader": null, "queue": 0, "one_loss_from_lost": 0, "bytes_at_risk": 0,
        "throughput": 0, "eta_seconds": null, "repair_rate": null, "scrub_rate": null,
    })
}

/// `2m10s`, `45s`, `1h05m`, `3d04h`: a short duration for an estimate.
pub fn short_duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..=86399 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// The table's `healer:` line (with its newline), from the JSON `healer` object: who works,
/// what waits for repair, and how fast it goes.
pub fn status_line(h: &Value) -> String {
    let who = match h["leader"].as_u64() {
        Some(id) => format!("healer {id} holds the lease"),
        None => "no healer holds the lease".to_string(),
    };
    let queue = h["queue"].as_u64().unwrap_or(0);
    if queue == 0 {
        return format!("healer: {who}; every chunk at full redundancy\n");
    }
    let mut line = format!(
        "healer: {who}; {queue} chunks to repair ({} one loss from lost), {} at risk",
        h["one_loss_from_lost"].as_u64().unwrap_or(0),
        Human(h["bytes_at_risk"].as_u64().unwrap_or(0))
    );
    let throughput = h["throughput"].as_u64().unwrap_or(0);
    if throughput > 0 {
        let _ = write!(line, ", repairing at {}/s", Human(throughput));
        if let Some(eta) = h["eta_seconds"].as_u64() {
            let _ = write!(line, ", full redundancy in ~{}", short_duration(eta));
        }
    }
    line.push('\n');
    line
}

/// A repair limit for people: `64.0 MiB/s`, `unlimited` (0).
pub fn repair_rate_text(rate: u64) -> String {
    if rate == 0 {
        "unlimited".into()
    } else {
        format!("{}/s", Human(rate))
    }
}

/// A scrub limit for people: `4.0 MiB/s`, `paused` (0).
pub fn scrub_rate_text(rate: u64) -> String {
    if rate == 0 {
        "paused".into()
    } else {
        format!("{}/s", Human(rate))
    }
}

/// The two lines describing the cluster settings (`rawfs healer set` prints them too).
pub fn settings_text(s: &HealerSettings) -> String {
    let repair = match s.repair_rate {
        Some(r) => format!("{} (set)", repair_rate_text(r)),
        None => "default (each healer's --repair-rate)".into(),
    };
    let scrub = match s.scrub_rate {
        Some(r) => format!("{} (set)", scrub_rate_text(r)),
        None => "default (each chunkserver's --scrub-rate)".into(),
    };
    format!("repair rate: {repair}\nscrub rate: {scrub}\n")
}

fn worker_json(w: &WorkerReport) -> Value {
    json!({
        "worker": w.worker, "chunk": w.chunk, "kind": w.kind, "target": w.target,
        "copies_left": w.copies_left, "done_bytes": w.done_bytes, "bytes": w.bytes,
        "elapsed_ms": w.elapsed_ms,
    })
}

/// `rawfs healer status --json`: the settings and every healer heard from lately.
pub fn healers_json(s: &ClusterStatus) -> Value {
    let healers: Vec<Value> = s
        .healers
        .iter()
        .map(|h| {
            let r = &h.report;
            json!({
                "id": h.id, "leader": h.leader, "age_ms": h.age_ms, "phase": r.phase,
                "repair_rate": r.repair_rate, "throughput": r.throughput, "queued": r.queued,
                "queued_bytes": r.queued_bytes, "repaired": r.repaired,
                "repaired_bytes": r.repaired_bytes, "failed": r.failed, "tiered": r.tiered,
                "workers": r.workers.iter().map(worker_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "settings": {
            "repair_rate": s.healer_settings.repair_rate,
            "scrub_rate": s.healer_settings.scrub_rate,
        },
        "healers": healers,
    })
}

/// `rawfs healer status` as text, from [`healers_json`]'s value.
pub fn healers_table(v: &Value) -> String {
    let mut out = String::new();
    let settings = HealerSettings {
        repair_rate: v["settings"]["repair_rate"].as_u64(),
        scrub_rate: v["settings"]["scrub_rate"].as_u64(),
    };
    out.push_str(&settings_text(&settings));
    let healers = v["healers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if healers.is_empty() {
        out.push_str("healers: none has reported lately (is one running?)\n");
        return out;
    }
    let n = |h: &Value, k: &str| h[k].as_u64().unwrap_or(0);
    for h in healers {
        let role = if h["leader"].as_bool() == Some(true) {
            "leader"
        } else {
            "standby"
        };
        let _ = writeln!(
            out,
            "healer {}: {role}, {}, limit {}, moving {}/s (reported {:.1}s ago)",
            n(h, "id"),
            h["phase"].as_str().unwrap_or("?"),
            repair_rate_text(n(h, "repair_rate")),
            Human(n(h, "throughput")),
            n(h, "age_ms") as f64 / 1000.0,
        );
        let _ = writeln!(
            out,
            "  repaired {} ({}), failed {}, queued {} ({}), tiered {}",
            n(h, "repaired"),
            Human(n(h, "repaired_bytes")),
            n(h, "failed"),
            n(h, "queued"),
            Human(n(h, "queued_bytes")),
            n(h, "tiered"),
        );
        let workers = h["workers"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if workers.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "  {:<6} {:>20} {:<7} {:>6} {:>11} {:>25} {:>8}",
            "WORKER", "CHUNK", "KIND", "TARGET", "COPIES LEFT", "PROGRESS", "ELAPSED"
        );
        for w in workers {
            let (done, bytes) = (n(w, "done_bytes"), n(w, "bytes"));
            let progress = format!("{} / {}", Human(done), Human(bytes));
            let _ = writeln!(
                out,
                "  {:<6} {:>20} {:<7} {:>6} {:>11} {:>25} {:>7.1}s",
                n(w, "worker"),
                format!("{:#x}", n(w, "chunk")),
                w["kind"].as_str().unwrap_or("?"),
                n(w, "target"),
                n(w, "copies_left"),
                progress,
                n(w, "elapsed_ms") as f64 / 1000.0,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rawfs_metadata_api::{ChunkCounts, HealerReport};

    fn cluster(healers: Vec<HealerInfo>, settings: HealerSettings) -> ClusterStatus {
        ClusterStatus {
            leader: Some(1),
            term: 2,
            replicas: vec![],
            chunkservers: vec![],
            chunks: ChunkCounts {
                under_replicated: 3,
                one_loss_from_lost: 1,
                at_risk_bytes: 11_100 << 20,
                ..Default::default()
            },
            files: 1,
            healer: Some(2),
            healers,
            healer_settings: settings,
        }
    }

    fn info(id: u64, leader: bool, throughput: u64) -> HealerInfo {
        HealerInfo {
            id,
            leader,
            age_ms: 1500,
            report: HealerReport {
                active: leader,
                phase: if leader { "repairing" } else { "standby" }.into(),
                repair_rate: 64 << 20,
                throughput,
                queued: 3,
                queued_bytes: 6 << 20,
                repaired: 12,
                repaired_bytes: 24 << 20,
                failed: 1,
                tiered: 2,
                workers: if leader {
                    vec![WorkerReport {
                        worker: 0,
                        chunk: 0x2a,
                        kind: "copy".into(),
                        target: 4,
                        copies_left: 1,
                        done_bytes: 1 << 20,
                        bytes: 2 << 20,
                        elapsed_ms: 2500,
                    }]
                } else {
                    vec![]
                },
            },
        }
    }

    #[test]
    fn the_leader_healers_report_gives_throughput_eta_and_limits() {
        let speed = (853 << 20) / 10; // 85.3 MiB/s
        let s = cluster(
            vec![info(1, false, 0), info(2, true, speed)],
            HealerSettings {
                repair_rate: None,
                scrub_rate: Some(0),
            },
        );
        let h = status_json(&s);
        assert_eq!(h["leader"], 2);
        assert_eq!(h["queue"], 3);
        assert_eq!(h["throughput"], speed);
        let eta = (11_100u64 << 20).div_ceil(speed);
        assert_eq!(h["eta_seconds"], eta);
        assert_eq!(h["repair_rate"], 64u64 << 20);
        assert_eq!(h["scrub_rate"], 0);
        let line = status_line(&h);
        assert!(
            line.ends_with(&format!(
                "at risk, repairing at 85.3 MiB/s, full redundancy in ~{}\n",
                short_duration(eta)
            )),
            "{line}"
        );
        assert_eq!(short_duration(eta), "2m11s");
    }

    #[test]
    fn without_a_report_or_a_risk_there_is_no_estimate() {
        let s = cluster(vec![], HealerSettings::default());
        let h = status_json(&s);
        assert_eq!(h["throughput"], 0);
        assert!(h["eta_seconds"].is_null());
        assert!(h["repair_rate"].is_null());
        assert!(h["scrub_rate"].is_null());
        let line = status_line(&h);
        assert!(!line.contains("repairing at"), "{line}");
        assert!(line.ends_with("at risk\n"), "{line}");
        assert_eq!(eta_seconds(0, 100), None);
        assert_eq!(eta_seconds(101, 100), Some(2));
        let l = leaderless_json();
        assert!(l["eta_seconds"].is_null() && l["throughput"] == 0);
    }

    #[test]
    fn durations_and_rates_read_short() {
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(130), "2m10s");
        assert_eq!(short_duration(3900), "1h05m");
        assert_eq!(short_duration(2 * 86400 + 7200), "2d02h");
        assert_eq!(repair_rate_text(0), "unlimited");
        assert_eq!(scrub_rate_text(0), "paused");
        assert_eq!(repair_rate_text(64 << 20), "64.0 MiB/s");
        let text = settings_text(&HealerSettings {
            repair_rate: Some(64 << 20),
            scrub_rate: None,
        });
        assert_eq!(
            text,
            "repair rate: 64.0 MiB/s (set)\nscrub rate: default (each chunkserver's --scrub-rate)\n"
        );
        let text = settings_text(&HealerSettings {
            repair_rate: Some(0),
            scrub_rate: Some(0),
        });
        assert!(text.contains("repair rate: unlimited (set)"), "{text}");
        assert!(text.contains("scrub rate: paused (set)"), "{text}");
    }

    #[test]
    fn healer_status_lists_each_healer_and_its_workers() {
        let s = cluster(
            vec![info(2, true, 1 << 20), info(1, false, 0)],
            HealerSettings {
                repair_rate: Some(10 << 20),
                scrub_rate: None,
            },
        );
        let v = healers_json(&s);
        assert_eq!(
            v["settings"],
            json!({"repair_rate": 10u64 << 20, "scrub_rate": null})
        );
        let h = &v["healers"][0];
        for k in [
            "id",
            "leader",
            "age_ms",
            "phase",
            "repair_rate",
            "throughput",
            "queued",
            "queued_bytes",
            "repaired",
            "repaired_bytes",
            "failed",
            "tiered",
        ] {
            assert!(!h[k].is_null(), "healer key {k}");
        }
        assert_eq!(
            h["workers"][0],
            json!({
                "worker": 0, "chunk": 0x2a, "kind": "copy", "target": 4, "copies_left": 1,
                "done_bytes": 1u64 << 20, "bytes": 2u64 << 20, "elapsed_ms": 2500,
            })
        );
        assert_eq!(v["healers"][1]["workers"], json!([]));
        let t = healers_table(&v);
        assert!(t.starts_with("repair rate: 10.0 MiB/s (set)\n"), "{t}");
        assert!(
            t.contains("healer 2: leader, repairing, limit 64.0 MiB/s, moving 1.0 MiB/s"),
            "{t}"
        );
        assert!(t.contains("healer 1: standby, standby"), "{t}");
        assert!(
            t.contains("repaired 12 (24.0 MiB), failed 1, queued 3 (6.0 MiB), tiered 2"),
            "{t}"
        );
        let row = t.lines().find(|l| l.contains("0x2a")).unwrap_or_default();
        assert!(
            row.contains("copy") && row.contains("1.0 MiB / 2.0 MiB") && row.ends_with("2.5s"),
            "{t}"
        );
        let empty = healers_table(&healers_json(&cluster(vec![], HealerSettings::default())));
        assert!(empty.contains("none has reported"), "{empty}");
    }
}
