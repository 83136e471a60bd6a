//! `rawfs status`: the cluster's state from the metadata service, as a table or stable JSON.
//!
//! ```text
//!  --metadata ADDRS | --dir DIR (cluster.json) | $RAWFS_METADATA
//!        -> MetadataClient::status() (5 s deadline; the leader answers, asking each member)
//!           | no leader? -> replica_status() of every address, so the table still shows
//!           |               who is up, in which term and how far each got (exit 1)
//!        -> + pids from cluster.json (a dead process shows as down at once)
//!        -> + volumes (rawfs_nbd::Volumes::list: size, used bytes) and their NBD clients
//!             (the NBD server's status file, see crate::nbd_status; only with --dir)
//!        -> table | JSON in DESIGN.md's stable shape
//! ```
//!
//! The `healer` object (and the table's `healer:` line) comes from `status/healer.rs`: the
//! lease holder, what waits for repair, and from the working healer's last report its
//! `throughput`, the `eta_seconds` to full redundancy and its effective `repair_rate`, plus
//! the cluster's `scrub_rate` setting (null when unset). `rawfs healer status` shows the
//! reports in full.

mod data;
pub mod healer;

use crate::admin::{ClusterArgs, TargetError};
use crate::cluster_file::{pid_alive, ClusterFile, Role};
use crate::size::Human;
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use rawfs_metadata_api::{ChunkserverStatus, ClusterStatus, ReplicaStatus};
use rawfs_nbd::{VolumeInfo, Volumes};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

/// How long `rawfs status` waits for the metadata service before saying it is unreachable.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one replica gets to describe itself when there is no leader to ask.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(2);

/// Flags of `rawfs status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print JSON in the stable shape (see DESIGN.md) instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Why the status could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("metadata service at {addrs} is unreachable: {reason}")]
    Unreachable { addrs: String, reason: String },
}

/// Asks the metadata service at `addrs` for the cluster status, giving up after `timeout`.
pub async fn fetch(addrs: &[String], timeout: Duration) -> Result<ClusterStatus, StatusError> {
    let unreachable = |reason: String| StatusError::Unreachable {
        addrs: addrs.join(","),
        reason,
    };
    let client = MetadataClient::new(
        addrs.to_vec(),
        ClientTimeouts {
            call: timeout.min(Duration::from_secs(2)),
            op: timeout,
        },
    );
    match tokio::time::timeout(timeout + Duration::from_millis(500), client.status()).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable(format!("no answer within {timeout:?}"))),
    }
}

/// Every volume with its size and used bytes, giving up after `timeout`.
pub async fn fetch_volumes(addrs: &[String], timeout: Duration) -> Result<Vec<VolumeInfo>, String> {
    let client = MetadataClient::new(
        addrs.to_vec(),
        ClientTimeouts {
            call: timeout.min(Duration::from_secs(2)),
            op: timeout,
        },
    );
    match tokio::time::timeout(timeout, Volumes::new(client).list()).await {
        Ok(Ok(list)) => Ok(list),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// What `rawfs status` knows about the NBD server of a `rawfs up` cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdView {
    pub addr: String,
    pub up: bool,
    /// Connections per volume; `None` when the server is up but has not said (yet).
    pub clients: Option<BTreeMap<String, usize>>,
}

/// The NBD server listed in `cluster` (none without a cluster file): a dead one has no
/// clients; a live one's come from its status file.
pub fn nbd_view(cluster: Option<&ClusterFile>, alive: &dyn Fn(u32) -> bool) -> Option<NbdView> {
    let e = cluster?.find(Role::Nbd, 1)?;
    let up = alive(e.pid);
    let clients = if up {
        crate::nbd_status::read(&crate::nbd_status::path(&e.data_dir), e.pid)
    } else {
        Some(BTreeMap::new())
    };
    Some(NbdView {
        addr: e.addr.clone(),
        up,
        clients,
    })
}

/// Fills the `volumes` key (each with `clients`, null when unknown) and adds `nbd`.
pub fn add_volumes(v: &mut Value, list: &[VolumeInfo], nbd: Option<&NbdView>) {
    let clients_of = |name: &str| -> Value {
        match nbd.and_then(|n| n.clients.as_ref()) {
            Some(c) => json!(c.get(name).copied().unwrap_or(0)),
            None => Value::Null,
        }
    };
    v["volumes"] = list
        .iter()
        .map(|vol| {
            json!({
                "name": vol.name, "size": vol.size, "used_bytes": vol.used_bytes,
                "clients": clients_of(&vol.name),
            })
        })
        .collect();
    v["nbd"] = match nbd {
        Some(n) => json!({
            "addr": n.addr, "up": n.up,
            "clients": n.clients.as_ref().map(|c| c.values().sum::<usize>()),
        }),
        None => Value::Null,
    };
}

/// Asks every address for its own `replica_status`, in parallel, each with a short
/// deadline; an address that does not answer is listed as down.
pub async fn fetch_replicas(addrs: &[String]) -> Vec<ReplicaStatus> {
    let asks = addrs.iter().map(|addr| async move {
        // One address per client: a replica answers about itself, no redirect is involved.
        let client = MetadataClient::new(
            vec![addr.clone()],
            ClientTimeouts {
                call: REPLICA_TIMEOUT,
                op: REPLICA_TIMEOUT,
            },
        );
        let answer = tokio::time::timeout(
            REPLICA_TIMEOUT + Duration::from_millis(200),
            client.replica_status(),
        )
        .await;
        match answer {
            Ok(Ok(mut r)) => {
                r.up = true;
                r.addr = addr.clone();
                r
            }
            _ => ReplicaStatus {
                addr: addr.clone(),
                role: "down".into(),
                ..ReplicaStatus::default()
            },
        }
    });
    futures::future::join_all(asks).await
}

/// `rawfs status`. Exit 0 with the status, 1 if the cluster cannot be reached or has no
/// leader (what the replicas say about themselves is still printed), 2 without an address.
pub fn run(args: StatusArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rawfs status: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (addrs, cluster) = match args.cluster.resolve() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rawfs status: {e}");
            return ExitCode::from(2);
        }
    };
    let (value, failure) = match rt.block_on(fetch(&addrs, STATUS_TIMEOUT)) {
        Ok(s) => {
            let alive = |pid| cluster.as_ref().map_or(pid_alive(pid), |c| c.runs(pid));
            let mut v = status_json(&s, cluster.as_ref(), &alive);
            let volumes = rt
                .block_on(fetch_volumes(&addrs, STATUS_TIMEOUT))
                .unwrap_or_else(|e| {
                    eprintln!("rawfs status: cannot list volumes: {e}");
                    Vec::new()
                });
            add_volumes(
                &mut v,
                &volumes,
                nbd_view(cluster.as_ref(), &alive).as_ref(),
            );
            (Some(v), None)
        }
        Err(e) => {
            // No leader (an election, a lost majority): show what each replica says.
            let replicas = rt.block_on(fetch_replicas(&addrs));
            let v = replicas
                .iter()
                .any(|r| r.up)
                .then(|| leaderless_json(&replicas));
            (v, Some(e))
        }
    };
    if let Some(v) = value {
        if args.json {
            match serde_json::to_string_pretty(&v) {
                Ok(s) => println!("{s}"),
                Err(e) => {
                    eprintln!("rawfs status: {e}");
                    return ExitCode::FAILURE;
                }
            }
        } else {
            print!("{}", render_table(&v));
        }
    }
    match failure {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("rawfs status: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One replica in the JSON shape: the stable keys (`id`, `addr`, `role`, `applied`) and more.
fn replica_json(r: &ReplicaStatus, role: &str, up: bool) -> Value {
    json!({
        "id": r.id, "addr": r.addr, "role": role, "applied": r.applied, "term": r.term,
        "lag": r.lag, "up": up, "voter": r.voter, "last_log_index": r.last_log_index,
    })
}

/// The JSON of a cluster without a leader: only the replicas' own views are known.
pub fn leaderless_json(replicas: &[ReplicaStatus]) -> Value {
    let term = replicas.iter().map(|r| r.term).max().unwrap_or(0);
    let list: Vec<Value> = replicas
        .iter()
        .map(|r| replica_json(r, &r.role, r.up))
        .collect();
    json!({
        "metadata": {"leader": null, "term": term, "replicas": list},
        "chunkservers": [],
        "chunks": {
            "healthy": 0, "under_replicated": 0, "degraded": 0, "lost": 0, "replicated": 0,
            "ec": 0, "replicated_bytes": 0, "ec_bytes": 0, "saved_bytes": 0,
        },
        "healer": healer::leaderless_json(),
        "volumes": [],
    })
}

/// Builds the stable JSON shape, marking processes of `cluster` whose pid is dead as down.
///
/// `healer` is `{"leader", "queue", "one_loss_from_lost", "bytes_at_risk", "throughput",
/// "eta_seconds", "repair_rate", "scrub_rate"}` (see [`healer::status_json`]).
pub fn status_json(
    s: &ClusterStatus,
    cluster: Option<&ClusterFile>,
    alive: &dyn Fn(u32) -> bool,
) -> Value {
    let dead = |role: Role, id: u64| {
        cluster
            .and_then(|c| c.find(role, id))
            .is_some_and(|p| !alive(p.pid))
    };
    let mut replicas: Vec<Value> = s
        .replicas
        .iter()
        .map(|r: &ReplicaStatus| {
            let down = dead(Role::Metadata, r.id) || (!r.up && s.leader != Some(r.id));
            let role = if down { "down" } else { r.role.as_str() };
            replica_json(r, role, !down)
        })
        .collect();
    let mut chunkservers: Vec<Value> = s
        .chunkservers
        .iter()
        .map(|c: &ChunkserverStatus| {
            json!({
                "id": c.id, "addr": c.data_addr, "up": c.up && !dead(Role::Chunkserver, c.id),
                "used_bytes": c.used_bytes, "total_bytes": c.total_bytes,
                "control_addr": c.control_addr, "healthy": c.healthy, "chunks": c.chunks,
                "last_seen_ms": c.last_seen_ms, "draining": c.draining,
            })
        })
        .collect();
    // Processes that cluster.json knows but the service has never heard of are down too
    // (or, for a replica, not a member: removed, or not added yet).
    if let Some(c) = cluster {
        for p in c.by_role(Role::Chunkserver) {
            if !s.chunkservers.iter().any(|cs| cs.id == p.id) {
                chunkservers.push(json!({
                    "id": p.id, "addr": p.addr, "up": false, "used_bytes": 0, "total_bytes": 0,
                    "chunks": 0, "registered": false,
                }));
            }
        }
        for p in c.by_role(Role::Metadata) {
            if !s.replicas.iter().any(|r| r.id == p.id) {
                let up = alive(p.pid);
                let role = if up { "not-member" } else { "down" };
                replicas.push(json!({
                    "id": p.id, "addr": p.addr, "role": role, "applied": 0, "term": 0,
                    "lag": 0, "up": up, "voter": false,
                }));
            }
        }
    }
    replicas.sort_by_key(|v| v["id"].as_u64());
    chunkservers.sort_by_key(|v| v["id"].as_u64());
    let ch = &s.chunks;
    let mut chunks = json!({
        "healthy": ch.healthy, "under_replicated": ch.under_replicated, "degraded": ch.degraded,
        "lost": ch.lost, "replicated": ch.replicated, "ec": ch.ec,
    });
    data::add_json(&mut chunks, ch);
    json!({
        "metadata": {"leader": s.leader, "term": s.term, "replicas": replicas},
        "chunkservers": chunkservers,
        "chunks": chunks,
        "healer": healer::status_json(s),
        "volumes": [],
        "files": s.files,
    })
}

/// Renders the JSON status as the human table.
pub fn render_table(v: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let m = &v["metadata"];
    let leader = m["leader"]
        .as_u64()
        .map_or("none".to_string(), |l| l.to_string());
    let _ = writeln!(out, "metadata: leader {leader}, term {}", m["term"]);
    let _ = writeln!(
        out,
        "  {:<4} {:<22} {:<10} {:>6} {:>10} {:>8} {:<5}",
        "ID", "ADDR", "ROLE", "TERM", "APPLIED", "LAG", "STATE"
    );
    for r in m["replicas"].as_array().into_iter().flatten() {
        let up = r["up"].as_bool().unwrap_or(false);
        let _ = writeln!(
            out,
            "  {:<4} {:<22} {:<10} {:>6} {:>10} {:>8} {:<5}",
            r["id"].as_u64().unwrap_or(0),
            r["addr"].as_str().unwrap_or("?"),
            r["role"].as_str().unwrap_or("?"),
            r["term"].as_u64().unwrap_or(0),
            r["applied"].as_u64().unwrap_or(0),
            r["lag"].as_u64().unwrap_or(0),
            if up { "up" } else { "down" },
        );
    }
    let cs = v["chunkservers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let up = cs
        .iter()
        .filter(|c| c["up"].as_bool() == Some(true))
        .count();
    let _ = writeln!(out, "chunkservers: {up} of {} up", cs.len());
    let _ = writeln!(
        out,
        "  {:<4} {:<22} {:<8} {:>11} {:>11} {:>8}",
        "ID", "ADDR", "STATE", "USED", "TOTAL", "CHUNKS"
    );
    for c in cs {
        let room = c["total_bytes"].as_u64() > c["used_bytes"].as_u64();
        let state = match (
            c["up"].as_bool(),
            c["draining"].as_bool(),
            c["healthy"].as_bool(),
        ) {
            (Some(true), Some(true), _) => "draining",
            // Its disk refuses writes: for want of room (its filesystem is down to the
            // chunkserver's reserve, or the capacity is reached), or because a write failed.
            (Some(true), _, Some(false)) if !room => "full",
            (Some(true), _, Some(false)) => "failing",
            (Some(true), ..) => "up",
            _ => "down",
        };
        let _ = writeln!(
            out,
            "  {:<4} {:<22} {:<8} {:>11} {:>11} {:>8}",
            c["id"].as_u64().unwrap_or(0),
            c["addr"].as_str().unwrap_or("?"),
            state,
            Human(c["used_bytes"].as_u64().unwrap_or(0)).to_string(),
            Human(c["total_bytes"].as_u64().unwrap_or(0)).to_string(),
            c["chunks"].as_u64().unwrap_or(0)
        );
    }
    let ch = &v["chunks"];
    let _ = writeln!(
        out,
        "chunks: {} healthy, {} under-replicated, {} degraded, {} lost ({} replicated, {} erasure-coded)",
        ch["healthy"], ch["under_replicated"], ch["degraded"], ch["lost"], ch["replicated"], ch["ec"]
    );
    out.push_str(&data::line(ch));
    out.push_str(&healer::status_line(&v["healer"]));
    render_volumes(&mut out, v);
    out
}

/// The NBD server and volumes part of the table.
fn render_volumes(out: &mut String, v: &Value) {
    use std::fmt::Write;
    let n = &v["nbd"];
    if let Some(addr) = n["addr"].as_str() {
        let state = if n["up"].as_bool() == Some(true) {
            "up"
        } else {
            "down"
        };
        let _ = writeln!(out, "nbd: {addr} {state}");
    }
    let vols = v["volumes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let _ = writeln!(out, "volumes: {}", vols.len());
    if vols.is_empty() {
        return;
    }
    let width = vols
        .iter()
        .filter_map(|x| x["name"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "  {:<width$} {:>11} {:>11} {:>7}",
        "NAME", "SIZE", "USED", "CLIENTS"
    );
    for x in vols {
        let clients = x["clients"]
            .as_u64()
            .map_or("-".to_string(), |c| c.to_string());
        let _ = writeln!(
            out,
            "  {:<width$} {:>11} {:>11} {:>7}",
            x["name"].as_str().unwrap_or("?"),
            Human(x["size"].as_u64().unwrap_or(0)).to_string(),
            Human(x["used_bytes"].as_u64().unwrap_or(0)).to_string(),
            clients
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_file::ProcessEntry;
    use rawfs_metadata_api::ChunkCounts;

    fn sample() -> ClusterStatus {
        ClusterStatus {
            leader: Some(1),
            term: 2,
            replicas: (1..=3)
                .map(|id| ReplicaStatus {
                    id,
                    addr: format!("127.0.0.1:70{id:02}"),
                    role: if id == 1 { "leader" } else { "follower" }.into(),
                    term: 2,
                    applied: 10 - id,
                    last_log_index: 10,
                    leader: Some(1),
                    lag: id - 1,
                    up: id != 3,
                    voter: true,
                })
                .collect(),
            chunkservers: (1..=2)
                .map(|id| ChunkserverStatus {
                    id,
                    data_addr: format!("127.0.0.1:71{id:02}"),
                    control_addr: String::new(),
                    up: true,
                    healthy: true,
                    used_bytes: 1 << 20,
                    total_bytes: 1 << 30,
                    chunks: 3,
                    last_seen_ms: 100,
                    draining: id == 2,
                })
                .collect(),
            chunks: ChunkCounts {
                healthy: 3,
                under_replicated: 1,
                replicated: 4,
                one_loss_from_lost: 1,
                at_risk_bytes: 2 << 20,
                ..Default::default()
            },
            files: 5,
            healer: Some(2),
            healers: vec![],
            healer_settings: Default::default(),
        }
    }

    fn entry(role: Role, id: u64, pid: u32) -> ProcessEntry {
        ProcessEntry {
            role,
            id,
            pid,
            addr: format!("127.0.0.1:{}", 9000 + id),
            data_dir: "/d".into(),
            raft_addr: None,
            control_addr: None,
            exe: None,
            args: vec![],
            log: None,
        }
    }

    #[test]
    fn json_has_the_stable_shape() {
        let v = status_json(&sample(), None, &|_| true);
        assert_eq!(v["metadata"]["leader"], 1);
        assert_eq!(v["metadata"]["term"], 2);
        let r = &v["metadata"]["replicas"][0];
        for k in ["id", "addr", "role", "applied", "term", "lag", "up"] {
            assert!(!r[k].is_null(), "replica key {k}");
        }
        let r3 = &v["metadata"]["replicas"][2];
        assert_eq!(r3["role"], "down", "a member the leader cannot reach");
        assert_eq!(r3["up"], false);
        assert_eq!(r3["lag"], 2);
        let c = &v["chunkservers"][0];
        for k in ["id", "addr", "up", "used_bytes", "total_bytes"] {
            assert!(!c[k].is_null(), "chunkserver key {k}");
        }
        for k in [
            "healthy",
            "under_replicated",
            "degraded",
            "lost",
            "replicated",
            "ec",
            "replicated_bytes",
            "ec_bytes",
            "saved_bytes",
        ] {
            assert!(v["chunks"][k].is_u64(), "chunks key {k}");
        }
        assert_eq!(v["healer"]["leader"], 2);
        assert_eq!(v["healer"]["queue"], 1);
        assert_eq!(v["healer"]["one_loss_from_lost"], 1);
        assert_eq!(v["healer"]["bytes_at_risk"], 2 << 20);
        // No healer has reported: nothing moves, no estimate, no known limits.
        assert_eq!(v["healer"]["throughput"], 0);
        for k in ["eta_seconds", "repair_rate", "scrub_rate"] {
            assert!(v["healer"][k].is_null(), "healer key {k}: {}", v["healer"]);
        }
        assert_eq!(v["volumes"], json!([]));
    }

    #[test]
    fn dead_pids_show_as_down() {
        let cf = ClusterFile {
            mount: "/m".into(),
            processes: vec![
                entry(Role::Metadata, 1, 100),
                entry(Role::Metadata, 2, 104),
                entry(Role::Metadata, 4, 105),
                entry(Role::Chunkserver, 1, 101),
                entry(Role::Chunkserver, 2, 102),
                entry(Role::Chunkserver, 3, 103),
            ],
            up_pid: None,
            ready: true,
        };
        let v = status_json(&sample(), Some(&cf), &|pid| ![102, 103, 104].contains(&pid));
        let cs = v["chunkservers"].as_array().expect("array");
        assert_eq!(cs.len(), 3);
        assert_eq!(cs[0]["up"], true);
        assert_eq!(cs[1]["up"], false, "dead pid");
        assert_eq!(
            cs[1]["draining"], true,
            "shown down, but still marked draining"
        );
        assert_eq!(cs[2]["up"], false, "never registered");
        let reps = v["metadata"]["replicas"].as_array().expect("array");
        let roles: Vec<&str> = reps.iter().filter_map(|r| r["role"].as_str()).collect();
        assert_eq!(roles, ["leader", "down", "down", "not-member"]);
        let table = render_table(&v);
        assert!(table.contains("1 of 3 up"), "{table}");
        assert!(
            table.lines().any(|l| l.trim_start().starts_with("2 ")
                && l.contains("down")
                && l.trim_end().ends_with("down")),
            "{table}"
        );
        assert!(table.contains("1.0 MiB"), "{table}");
        assert!(
            table.contains("healer 2 holds the lease; 1 chunks to repair (1 one loss from lost), 2.0 MiB at risk"),
            "{table}"
        );
        assert_eq!(v["healer"]["leader"], 2);
    }

    #[test]
    fn without_a_leader_each_replica_speaks_for_itself() {
        let reps = vec![
            ReplicaStatus {
                id: 2,
                addr: "a:1".into(),
                role: "candidate".into(),
                term: 7,
                applied: 40,
                up: true,
                ..Default::default()
            },
            ReplicaStatus {
                addr: "a:2".into(),
                role: "down".into(),
                ..Default::default()
            },
        ];
        let v = leaderless_json(&reps);
        assert!(v["metadata"]["leader"].is_null());
        assert_eq!(v["metadata"]["term"], 7);
        assert_eq!(v["metadata"]["replicas"][0]["role"], "candidate");
        assert_eq!(v["metadata"]["replicas"][1]["up"], false);
        let table = render_table(&v);
        assert!(table.contains("leader none, term 7"), "{table}");
    }

    #[test]
    fn a_chunkserver_refusing_writes_shows_as_full_or_failing() {
        let mut s = sample();
        for c in &mut s.chunkservers {
            c.healthy = false;
            c.draining = false;
        }
        s.chunkservers[0].total_bytes = s.chunkservers[0].used_bytes;
        let table = render_table(&status_json(&s, None, &|_| true));
        let state = |addr: &str| {
            table
                .lines()
                .find(|l| l.contains(addr))
                .and_then(|l| l.split_whitespace().nth(2))
                .map(str::to_string)
        };
        assert_eq!(state(":7101").as_deref(), Some("full"), "{table}");
        assert_eq!(state(":7102").as_deref(), Some("failing"), "{table}");
    }

    fn volume(name: &str, size: u64, used_bytes: u64) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            ino: 7,
            size,
            used_bytes,
        }
    }

    #[test]
    fn volumes_show_size_used_and_clients() {
        let mut v = status_json(&sample(), None, &|_| true);
        let nbd = NbdView {
            addr: "127.0.0.1:10809".into(),
            up: true,
            clients: Some([("vm1".to_string(), 2)].into_iter().collect()),
        };
        let list = [volume("vm1", 1 << 30, 64 << 20), volume("idle", 1 << 20, 0)];
        add_volumes(&mut v, &list, Some(&nbd));
        assert_eq!(
            v["volumes"],
            json!([
                {"name": "vm1", "size": 1u64 << 30, "used_bytes": 64u64 << 20, "clients": 2},
                {"name": "idle", "size": 1u64 << 20, "used_bytes": 0, "clients": 0},
            ])
        );
        assert_eq!(
            v["nbd"],
            json!({"addr": "127.0.0.1:10809", "up": true, "clients": 2})
        );
        let table = render_table(&v);
        assert!(table.contains("nbd: 127.0.0.1:10809 up"), "{table}");
        assert!(table.contains("volumes: 2"), "{table}");
        let row = table
            .lines()
            .find(|l| l.trim_start().starts_with("vm1"))
            .unwrap_or_default();
        assert!(
            row.contains("1.0 GiB") && row.contains("64.0 MiB") && row.trim_end().ends_with(" 2"),
            "{table}"
        );
        // Without a cluster file the clients are unknown, not zero.
        let mut v = status_json(&sample(), None, &|_| true);
        add_volumes(&mut v, &list[..1], None);
        assert!(v["volumes"][0]["clients"].is_null());
        assert!(v["nbd"].is_null());
        assert!(render_table(&v).contains(" -\n"), "{}", render_table(&v));
    }

    #[test]
    fn a_dead_nbd_server_has_no_clients_and_a_live_one_says_how_many() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut e = entry(Role::Nbd, 1, 300);
        e.data_dir = d.path().to_path_buf();
        let cf = ClusterFile {
            mount: "/m".into(),
            processes: vec![e],
            up_pid: None,
            ready: true,
        };
        let dead = nbd_view(Some(&cf), &|_| false).expect("listed");
        assert!(!dead.up);
        assert_eq!(dead.clients, Some(BTreeMap::new()));
        let unknown = nbd_view(Some(&cf), &|_| true).expect("listed");
        assert_eq!(unknown.clients, None, "no status file yet");
        let file = crate::nbd_status::NbdClients {
            pid: 300,
            volumes: [("vm1".to_string(), 1)].into_iter().collect(),
        };
        std::fs::write(
            crate::nbd_status::path(d.path()),
            serde_json::to_vec(&file).expect("json"),
        )
        .expect("write");
        let live = nbd_view(Some(&cf), &|_| true).expect("listed");
        assert_eq!(live.clients, Some(file.volumes));
        assert!(nbd_view(None, &|_| true).is_none());
    }
}
