//! Metadata failover with real processes: 3 replicas started by `rawfs up`, the leader
//! killed with SIGKILL in a loop under a model-checked workload, failover time measured, a
//! follower down across snapshots, a replica wiped and re-added, and a leader cut off with
//! SIGSTOP that must not commit anything once resumed, whose term chunkservers refuse.
//!
//! Each test polls for what it waits on and tears its cluster down on failure (the harness's
//! `Drop`). They use 3 chunkservers (the minimum for 3 replicas per chunk) to start fast.

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use rawfs_chunkserver_api::{connect_control, deadline, DataClient, DataError, WriteReq};
use rawfs_integration::fsutil::{drop_cache, pattern, seed};
use rawfs_integration::harness::{wait_until, Options};
use rawfs_integration::replicas::{block_on, runtime};
use rawfs_integration::workload::{verify, Workload};
use rawfs_integration::Cluster;
use rawfs_metadata_api::client::MAX_FRAME;
use rawfs_metadata_api::{Caller, FileKind, MetadataRpcClient, Name, NewNode, ReqId, ROOT_INO};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Leader kills in the loop test.
const ROUNDS: u64 = 5;
/// Worker threads of the workload.
const WORKERS: usize = 3;
/// Bound on a failover as users see it: from the leader's death (SIGKILL or SIGSTOP) to the
/// first mutation through the mount. Typical is 1.2-2.3 s (lease 1 s, pre-vote, election,
/// client retry); the target is 2 s.
const FAILOVER_LIMIT: Duration = Duration::from_secs(5);
/// How long replicas get to converge after the faults end.
const CONVERGE: Duration = Duration::from_secs(60);
/// Entries between snapshots in the catch-up test: small, so a short outage spans several.
const SNAPSHOT_EVERY: u64 = 500;

fn small_cluster(extra: &[&str]) -> Options {
    Options {
        chunkservers: 3,
        up_args: extra.iter().map(|s| s.to_string()).collect(),
        dir: None,
    }
}

fn name(s: &str) -> Name {
    Name::from(s.as_bytes().to_vec())
}

/// Lines of `log` containing `needle` (0 if it cannot be read).
fn count_lines(log: &Path, needle: &str) -> usize {
    fs::read_to_string(log)
        .map(|t| t.lines().filter(|l| l.contains(needle)).count())
        .unwrap_or(0)
}

/// What the replication layer logs when a follower installs the leader's snapshot.
const SNAPSHOT_INSTALLED: &str = "installing a snapshot from the leader";

#[test]
fn leader_killed_in_a_loop_loses_no_acknowledged_op() -> Result<()> {
    let seed = seed("leader_killed_in_a_loop_loses_no_acknowledged_op");
    let mut c = Cluster::start_with(small_cluster(&[]))?;
    let r = kill_the_leader_in_a_loop(&mut c, seed);
    c.diagnose(r)
}

fn kill_the_leader_in_a_loop(c: &mut Cluster, seed: u64) -> Result<()> {
    let meta = c.meta_client()?;
    let ids = c.metadata_ids()?;
    ensure!(
        ids.len() == 3,
        "rawfs up started {} metadata replicas",
        ids.len()
    );
    let mut models = Workload::prepare(&c.mnt, WORKERS)?;
    let mut failovers = Vec::new();
    let mut term = 0;
    for round in 0..ROUNDS {
        let w = Workload::start(&c.mnt, models, seed.wrapping_add(round));
        let start = w.acked();
        w.wait_progress(&start, 3, Duration::from_secs(60))?;
        let (leader, t) = c.wait_leader(Duration::from_secs(30), term, None)?;

        // Killed in the middle of the workers' operations; the probe is one more mutation
        // through the mount, which blocks until a new leader takes it.
        let t0 = Instant::now();
        c.kill9("metadata", leader)?;
        // Beside the probe, when the replicas themselves report a new leader: the rest of
        // the failover time is the clients' (retry back-off, redirects).
        let (took, elected) = std::thread::scope(|s| {
            let watch = s.spawn(|| {
                c.wait_leader(Duration::from_secs(30), t + 1, Some(leader))
                    .map(|_| t0.elapsed())
            });
            let probe = fs::create_dir(c.path(&format!("probe-{round}")))
                .map(|()| t0.elapsed())
                .with_context(|| format!("the first mutation after killing leader {leader}"));
            (probe, watch.join())
        });
        let took = took?;
        let elected = match elected {
            Ok(Ok(d)) => d.as_millis().to_string(),
            _ => "?".into(),
        };
        println!(
            "failover_ms {} (round {round}: leader {leader} of term {t} killed; \
             new leader seen after {elected} ms)",
            took.as_millis()
        );
        failovers.push(took);
        // Every client resumes, not just the probe.
        let resumed = w.acked();
        w.wait_progress(&resumed, 2, Duration::from_secs(30))?;
        models = w.stop()?;

        let (new_leader, new_term) = c.wait_leader(Duration::from_secs(30), t + 1, Some(leader))?;
        ensure!(
            new_term > t,
            "the new leader {new_leader} has term {new_term}, not above {t}"
        );
        term = new_term;
        verify(&meta, &c.mnt, &models)
            .with_context(|| format!("after round {round} (leader {leader} killed)"))?;
        c.restart_process("metadata", leader)?;
        c.wait_caught_up(leader, CONVERGE)?;
    }
    verify(&meta, &c.mnt, &models)?;
    for round in 0..ROUNDS {
        ensure!(
            c.path(&format!("probe-{round}")).is_dir(),
            "probe {round} is gone"
        );
    }
    let d = c.wait_converged(&ids, CONVERGE)?;
    println!(
        "replicas converged at index {} digest {:#x}",
        d.applied, d.digest
    );
    let errors: Vec<&String> = models.iter().flat_map(|m| &m.errors).collect();
    ensure!(
        errors.is_empty(),
        "operations failed across failovers (a failover must only pause them): {errors:#?}"
    );
    let acked: u64 = models.iter().map(|m| m.acked).sum();
    println!("acknowledged operations: {acked}");
    let worst = failovers.iter().max().copied().unwrap_or_default();
    ensure!(
        worst < FAILOVER_LIMIT,
        "a failover took {worst:?} (limit {FAILOVER_LIMIT:?}); all: {failovers:?}"
    );
    Ok(())
}

/// A reader's open lives in the leader's memory (it costs no log entry): the mount sends it
/// to the next leader, which removes no link before its mounts could. So a file that
/// another mount unlinks right after the leader's SIGKILL stays readable through the
/// reader's descriptor, and is freed when that closes.
#[test]
fn a_readers_open_outlives_the_leader() -> Result<()> {
    let mut c = Cluster::start_with(small_cluster(&[]))?;
    let r = reader_across_failover(&mut c);
    c.diagnose(r)
}

fn reader_across_failover(c: &mut Cluster) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = c.meta_client()?;
    let other = c.mount_extra("other", "")?;
    let data = pattern(7, 0, 3 << 20);
    let p = c.path("kept");
    fs::write(&p, &data)?;
    let ino = fs::metadata(&p)?.ino();
    let mut reader = File::open(&p)?;
    let (leader, term) = c.wait_leader(Duration::from_secs(30), 0, None)?;
    c.kill9("metadata", leader)?;
    fs::remove_file(other.join("kept")).context("unlink through the other mount")?;
    ensure!(!p.exists(), "the name is gone");
    let (_, new_term) = c.wait_leader(Duration::from_secs(30), term + 1, Some(leader))?;
    ensure!(new_term > term, "a new leader");
    let orphan = block_on(meta.getattr(ino)).context("the unlinked file while open")?;
    ensure!(orphan.nlink == 0, "nlink {}", orphan.nlink);
    drop_cache(&reader);
    let mut got = Vec::new();
    reader.read_to_end(&mut got)?;
    ensure!(got == data, "the unlinked file's data through the reader");
    drop(reader);
    wait_until(
        "the orphan freed after its close",
        Duration::from_secs(20),
        || {
            Ok(matches!(
                block_on(meta.getattr(ino)),
                Err(rawfs_metadata_api::MetaError::NotFound)
            ))
        },
    )?;
    c.restart_process("metadata", leader)?;
    Ok(())
}

/// Makes directories under `dir` through the mount from 4 threads, 50 at a time each, until
/// `done` says enough; returns how many were made.
fn bulk_mkdirs(dir: &Path, done: impl Fn() -> bool + Sync) -> Result<u64> {
    fs::create_dir_all(dir)?;
    let made = AtomicU64::new(0);
    let end = Instant::now() + Duration::from_secs(180);
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let (made, done) = (&made, &done);
                s.spawn(move || -> Result<()> {
                    let mut n = 0u64;
                    while !done() {
                        if Instant::now() > end {
                            bail!("no end to the bulk writes in sight");
                        }
                        for _ in 0..50 {
                            fs::create_dir(dir.join(format!("t{t}-{n}")))?;
                            n += 1;
                            made.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a bulk writer panicked"))??;
        }
        Ok(())
    })?;
    Ok(made.load(Ordering::Relaxed))
}

#[test]
fn follower_down_catches_up_by_snapshot_and_a_wiped_replica_rejoins() -> Result<()> {
    let every = SNAPSHOT_EVERY.to_string();
    let mut c = Cluster::start_with(small_cluster(&["--snapshot-every", &every]))?;
    let r = follower_down_then_wiped(&mut c);
    c.diagnose(r)
}

fn follower_down_then_wiped(c: &mut Cluster) -> Result<()> {
    let ids = c.metadata_ids()?;
    let (leader, _) = c.wait_leader(Duration::from_secs(30), 0, None)?;
    let follower = *ids.iter().find(|i| **i != leader).context("a follower")?;
    let log = c.process("metadata", follower)?.log.context("log path")?;
    let installs = count_lines(&log, SNAPSHOT_INSTALLED);

    // Down for several snapshots' worth of entries: the leader compacts its log past it.
    c.kill9("metadata", follower)?;
    let from = c.replica_status(leader)?.applied;
    let target = from + 3 * SNAPSHOT_EVERY + 100;
    let made = bulk_mkdirs(&c.path("bulk"), || {
        c.replica_status(leader).is_ok_and(|s| s.applied >= target)
    })?;
    println!("{made} directories made while replica {follower} was down");
    c.restart_process("metadata", follower)?;
    let d = c.wait_converged(&ids, CONVERGE)?;
    println!(
        "replica {follower} caught up to index {} (from {from})",
        d.applied
    );
    ensure!(
        count_lines(&log, SNAPSHOT_INSTALLED) > installs,
        "replica {follower} caught up without installing a snapshot: the leader did not \
         compact its log (snapshot every {SNAPSHOT_EVERY})"
    );

    // A replica whose disk is lost: out of the group, wiped, started empty, added back.
    let (leader, _) = c.wait_leader(Duration::from_secs(30), 0, None)?;
    let wiped = *ids
        .iter()
        .find(|i| **i != leader && **i != follower)
        .or_else(|| ids.iter().find(|i| **i != leader))
        .context("a follower to wipe")?;
    let p = c.process("metadata", wiped)?;
    let wiped_log = p.log.clone().context("log path")?;
    let wiped_installs = count_lines(&wiped_log, SNAPSHOT_INSTALLED);
    c.kill9("metadata", wiped)?;
    c.rawfs_ok(&["metadata", "remove-peer", "--id", &wiped.to_string()])?;
    let meta = c.meta_client()?;
    let members: Vec<u64> = block_on(meta.status())?
        .replicas
        .iter()
        .map(|r| r.id)
        .collect();
    ensure!(
        !members.contains(&wiped),
        "replica {wiped} is still a member: {members:?}"
    );
    c.wipe_data("metadata", wiped)?;
    // The group goes on without it (and past another snapshot).
    let from = c.replica_status(leader)?.applied;
    bulk_mkdirs(&c.path("bulk2"), || {
        c.replica_status(leader)
            .is_ok_and(|s| s.applied >= from + SNAPSHOT_EVERY + 50)
    })?;

    // Started empty and without --bootstrap, it must wait to be added, not found a group.
    c.start_process("metadata", wiped, |args| {
        args.retain(|a| a != "--bootstrap")
    })?;
    let mut alone = None;
    wait_until(
        "the wiped replica to answer",
        Duration::from_secs(30),
        || {
            alone = c.replica_status(wiped).ok();
            Ok(alone.is_some())
        },
    )?;
    let alone = alone.context("status")?;
    ensure!(
        alone.role != "leader" && alone.applied == 0,
        "an empty replica started without --bootstrap formed a group of its own: {alone:?}"
    );
    c.rawfs_ok(&[
        "metadata",
        "add-peer",
        "--id",
        &wiped.to_string(),
        "--addr",
        &p.addr,
        "--raft-addr",
        p.raft_addr.as_deref().context("raft address")?,
    ])?;
    let d = c.wait_converged(&ids, CONVERGE)?;
    println!("wiped replica {wiped} rejoined at index {}", d.applied);
    ensure!(
        count_lines(&wiped_log, SNAPSHOT_INSTALLED) > wiped_installs,
        "the wiped replica {wiped} caught up without the leader's snapshot"
    );
    let mut seen = None;
    let shown = wait_until(
        "status to show the re-added replica",
        Duration::from_secs(20),
        || {
            let s = block_on(meta.status())?;
            seen = s.replicas.into_iter().find(|r| r.id == wiped);
            Ok(seen.as_ref().is_some_and(|r| r.voter && r.up))
        },
    );
    shown.with_context(|| format!("replica {wiped} after add-peer: {seen:?}"))?;
    // Nothing was lost on the way.
    let bulk = fs::read_dir(c.path("bulk"))?.count() as u64;
    ensure!(bulk == made, "{bulk} of {made} directories in bulk/");
    Ok(())
}

/// A raw connection to one replica: no redirects, no retries (what a deposed leader
/// answers is exactly what the test sees). Returns the client and its local address.
async fn raw_client(addr: &str) -> Result<(MetadataRpcClient, std::net::SocketAddr)> {
    let mut connect =
        tarpc::serde_transport::tcp::connect(addr, tokio_serde::formats::MessagePack::default);
    connect.config_mut().max_frame_length(MAX_FRAME);
    let transport = tokio::time::timeout(Duration::from_secs(5), connect).await??;
    let local = transport.local_addr()?;
    Ok((
        MetadataRpcClient::new(tarpc::client::Config::default(), transport).spawn(),
        local,
    ))
}

/// Bytes waiting unread in the receive queue of the TCP socket `local` <- `remote` on this
/// host (from /proc/net/tcp), if there is such a socket.
fn unread_bytes(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u64> {
    let hex = |a: std::net::SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(ip.octets()),
            a.port()
        )),
        std::net::IpAddr::V6(_) => None,
    };
    let (l, r) = (hex(local)?, hex(remote)?);
    let table = fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 4 && f[1] == l && f[2] == r {
            u64::from_str_radix(f[4].split(':').nth(1)?, 16).ok()
        } else {
            None
        }
    })
}

#[test]
fn stopped_old_leader_commits_nothing_and_its_term_is_refused() -> Result<()> {
    let mut c = Cluster::start_with(small_cluster(&[]))?;
    let r = stop_the_leader(&mut c);
    c.diagnose(r)
}

fn stop_the_leader(c: &mut Cluster) -> Result<()> {
    let ids = c.metadata_ids()?;
    let local = c.mount_extra("local", "consistency=local")?;
    // Data written under the first leader, whose chunk a stale order will try to overwrite.
    let victim = pattern(77, 0, 256 * 1024);
    let mut f = File::create(c.path("victim"))?;
    f.write_all(&victim)?;
    f.sync_all()?;
    drop(f);
    fs::create_dir(c.path("before"))?;

    let (old, t1) = c.wait_leader(Duration::from_secs(30), 0, None)?;
    let meta = c.meta_client()?;
    let ino = block_on(meta.lookup(ROOT_INO, name("victim")))?.ino;
    let loc = block_on(meta.chunks(ino, 0, 1))?
        .into_iter()
        .next()
        .context("the victim's first chunk")?;
    let old_addr = c.metadata_addr(old)?;
    let (raw, raw_local) = block_on(raw_client(&old_addr))?;

    c.sigstop("metadata", old)?;
    let t0 = Instant::now();
    let (new, t2) = c.wait_leader(Duration::from_secs(30), t1 + 1, Some(old))?;
    println!(
        "election_ms {} (leader {old} of term {t1} stopped, {new} leads term {t2})",
        t0.elapsed().as_millis()
    );
    // Commits through the mount while the old leader is frozen.
    fs::create_dir(c.path("during"))?;
    let took = t0.elapsed();
    println!(
        "partition_failover_ms {} (first mutation through the mount after SIGSTOP)",
        took.as_millis()
    );
    ensure!(
        took < FAILOVER_LIMIT,
        "the mount needed {took:?} to leave a stopped leader (limit {FAILOVER_LIMIT:?})"
    );
    fs::write(c.path("during-file"), b"written under the new leader")?;
    File::open(c.path("during-file"))?.sync_all()?;

    // The frozen leader gets a mutation queued before it runs again, so that it meets the
    // request while it may still believe it leads.
    let req = ReqId {
        client: rand::random(),
        seq: 1,
    };
    let node = NewNode {
        kind: FileKind::Dir,
        perm: 0o755,
        rdev: 0,
        exclusive: true,
    };
    let pending = runtime().spawn(async move {
        raw.mknod(
            deadline(Duration::from_secs(15)),
            ROOT_INO,
            name("from-the-old-leader"),
            node,
            Caller { uid: 0, gid: 0 },
            req,
        )
        .await
    });
    let server: std::net::SocketAddr = old_addr.parse()?;
    wait_until(
        "the request to reach the old leader's socket",
        Duration::from_secs(10),
        || Ok(unread_bytes(server, raw_local).is_some_and(|n| n > 0)),
    )?;
    c.sigcont("metadata", old)?;
    let answer = block_on(pending)?;
    println!("the old leader answered: {answer:?}");
    ensure!(
        !matches!(answer, Ok(Ok(_))),
        "the deposed leader acknowledged a mutation: {answer:?}"
    );
    wait_until(
        "the old leader to step down",
        Duration::from_secs(30),
        || {
            let s = c.replica_status(old)?;
            Ok(s.role != "leader" && s.term >= t2)
        },
    )?;
    c.wait_converged(&ids, CONVERGE)?;
    match block_on(meta.lookup(ROOT_INO, name("from-the-old-leader"))) {
        Err(rawfs_metadata_api::MetaError::NotFound) => {}
        other => bail!("the old leader's mutation is visible: {other:?}"),
    }
    for d in ["before", "during"] {
        ensure!(c.path(d).is_dir(), "{d} is missing");
    }
    let during = fs::read(c.path("during-file"))?;
    ensure!(
        during == b"written under the new leader",
        "during-file reads {} bytes: {:?}",
        during.len(),
        String::from_utf8_lossy(&during[..during.len().min(64)])
    );

    // A chunkserver that has heard from the new leader refuses the old term.
    let holder = loc
        .replicas
        .first()
        .context("a replica of the victim chunk")?;
    let control = c
        .process("chunkserver", holder.server)?
        .control_addr
        .context("control address")?;
    wait_until(
        "the chunkserver to learn the new term",
        Duration::from_secs(30),
        || {
            let st = block_on(async {
                let cc = connect_control(&control, Duration::from_secs(2)).await?;
                anyhow::Ok(cc.status(deadline(Duration::from_secs(2))).await?)
            })?;
            Ok(st.term >= t2)
        },
    )?;
    ensure!(
        loc.term < t2,
        "the chunk location carries term {} (new term {t2})",
        loc.term
    );
    let data = DataClient::new(Duration::from_secs(5));
    let stale = block_on(data.write(
        &holder.data_addr,
        WriteReq {
            chunk: loc.chunk,
            version: loc.version,
            term: loc.term,
            offset: 0,
            data: Bytes::from(vec![0xEE; 4096]),
            sync: true,
        },
    ));
    match stale {
        Err(DataError::StaleTerm { current }) if current >= t2 => {}
        other => bail!(
            "a write stamped with the old term {} was not refused: {other:?}",
            loc.term
        ),
    }
    let mut f = File::open(c.path("victim"))?;
    drop_cache(&f);
    let mut back = Vec::new();
    f.read_to_end(&mut back)?;
    ensure!(back == victim, "the victim file changed");

    // A consistency=local mount sees what was committed (once its replica has applied it).
    wait_until(
        "the local-read mount to see the new file",
        Duration::from_secs(30),
        || {
            Ok(fs::read(local.join("during-file"))
                .is_ok_and(|d| d == b"written under the new leader"))
        },
    )?;
    ensure!(local.join("before").is_dir() && local.join("during").is_dir());
    Ok(())
}
