//! End to end: `serve` on loopback ports, driven through `MetadataClient` over real TCP.

mod common;
use common::{client, file, free_ports, n, start, ME};

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rawfs_metadata::{serve, MetadataConfig};
use rawfs_metadata_api::*;
use serde_bytes::ByteBuf;
use tokio::sync::oneshot;

fn hb(server: u64, inventory: Option<Vec<(ChunkId, u64)>>) -> Heartbeat {
    Heartbeat {
        server,
        data_addr: format!("127.0.0.1:{}", 9100 + server),
        control_addr: format!("127.0.0.1:{}", 9200 + server),
        total_bytes: 100 << 30,
        used_bytes: 1 << 30,
        healthy: true,
        inventory,
        corrupt: vec![],
        disk: 0,
    }
}

/// Waits out the election, then registers chunkservers `1..=n` with a first heartbeat each.
async fn register(c: &MetadataClient, n: u64) {
    c.getattr(ROOT_INO).await.unwrap();
    for s in 1..=n {
        c.heartbeat(hb(s, Some(vec![]))).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_chunks_and_heartbeats_through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());

    // The client waits out the election and the root's creation by itself.
    let root = c.getattr(ROOT_INO).await.unwrap();
    assert_eq!(root.kind, FileKind::Dir);
    let d = c
        .mknod(
            ROOT_INO,
            n("d"),
            NewNode {
                kind: FileKind::Dir,
                perm: 0o755,
                rdev: 0,
                exclusive: true,
            },
            ME,
        )
        .await
        .unwrap();
    let f = file(&c, d.ino, "f").await;
    assert_eq!(c.lookup(d.ino, n("f")).await.unwrap().ino, f.ino);
    assert_eq!(c.lookup(d.ino, n("nope")).await, Err(MetaError::NotFound));
    c.rename(d.ino, n("f"), ROOT_INO, n("g"), RenameFlags::default())
        .await
        .unwrap();
    let list = c.readdir(ROOT_INO, 0, 100).await.unwrap();
    let names: Vec<_> = list.iter().map(|e| e.name.to_vec()).collect();
    assert_eq!(names, vec![b"d".to_vec(), b"g".to_vec()]);
    c.setxattr(
        f.ino,
        n("user.k"),
        ByteBuf::from(b"v".to_vec()),
        XattrMode::Create,
    )
    .await
    .unwrap();
    assert_eq!(
        c.getxattr(f.ino, n("user.k")).await.unwrap().as_slice(),
        b"v"
    );

    // Chunk placement needs live chunkservers: three heartbeats register them.
    for s in 1..=3 {
        let r = c.heartbeat(hb(s, Some(vec![]))).await.unwrap();
        assert!(r.term >= 1);
        assert!(r.delete.is_empty());
    }
    let loc = c.allocate_chunk(f.ino, 0).await.unwrap();
    let mut servers: Vec<_> = loc.replicas.iter().map(|r| r.server).collect();
    servers.sort_unstable();
    assert_eq!(servers, vec![1, 2, 3]);
    assert!(loc.term >= 1);
    assert_eq!(
        loc.replicas[0].data_addr,
        format!("127.0.0.1:{}", 9100 + loc.replicas[0].server)
    );
    assert_eq!(
        c.allocate_chunk(f.ino, 0).await.unwrap(),
        loc,
        "allocation is idempotent"
    );
    let a = c.commit_write(f.ino, 4096, 4096).await.unwrap();
    assert_eq!((a.size, a.stored), (4096, 4096));
    let st = c.statfs().await.unwrap();
    assert_eq!(
        (st.total_bytes, st.free_bytes, st.replicas),
        (300 << 30, 297 << 30, 3)
    );
    assert_eq!(st.files, 3);

    let status = c.status().await.unwrap();
    assert_eq!(status.leader, Some(1));
    assert_eq!(status.chunkservers.len(), 3);
    assert!(status.chunkservers.iter().all(|s| s.up && s.chunks == 1));
    assert_eq!((status.chunks.healthy, status.chunks.replicated), (1, 1));

    let dropped = c.drop_replica(loc.chunk, loc.version, 2).await.unwrap();
    assert_eq!(dropped.version, loc.version + 1);
    let status = c.status().await.unwrap();
    assert_eq!(status.chunks.under_replicated, 1);
    // Server 2 is told to delete its now stale copy, and only once.
    assert_eq!(
        c.heartbeat(hb(2, None)).await.unwrap().delete,
        vec![loc.chunk]
    );
    assert!(c.heartbeat(hb(2, None)).await.unwrap().delete.is_empty());
    // An inventory names it again (and an id nobody allocated yet): only the known one goes,
    // and only at the version the inventory showed (a newer copy made since stays).
    let inv = Some(vec![(loc.chunk, 1), (loc.chunk + 1000, 1)]);
    let reply = c.heartbeat(hb(2, inv)).await.unwrap();
    assert_eq!(
        (reply.delete, reply.delete_stale),
        (vec![], vec![(loc.chunk, 1)])
    );

    // A corrupt copy reported by server 3 goes while server 1 still serves the chunk.
    let mut bad = hb(3, None);
    bad.corrupt = vec![loc.chunk];
    c.heartbeat(bad).await.unwrap();
    let now = c.chunks(f.ino, 0, 1).await.unwrap();
    let left: Vec<_> = now[0].replicas.iter().map(|r| r.server).collect();
    assert_eq!((left, now[0].version), (vec![1], loc.version + 2));
    assert_eq!(
        c.heartbeat(hb(3, None)).await.unwrap().delete,
        vec![loc.chunk]
    );
    // The last copy is never dropped, corrupt or not.
    let mut bad = hb(1, None);
    bad.corrupt = vec![loc.chunk];
    c.heartbeat(bad).await.unwrap();
    assert_eq!(c.chunks(f.ino, 0, 1).await.unwrap()[0].replicas.len(), 1);

    // Unlinking the file frees its chunk on the server that still holds it.
    c.unlink(ROOT_INO, n("g")).await.unwrap();
    assert_eq!(
        c.heartbeat(hb(1, None)).await.unwrap().delete,
        vec![loc.chunk]
    );

    // Garbage on the client port closes that connection only.
    let mut raw = std::net::TcpStream::connect(h.addr()).unwrap();
    raw.write_all(&[0, 0, 0, 5, 0xc1, 0xff, 0x00, 0x13, 0x37])
        .unwrap();
    raw.write_all(&[0xff; 64]).unwrap();
    drop(raw);
    assert_eq!(c.getattr(d.ino).await.unwrap().ino, d.ino);

    stop.send(()).unwrap();
    h.join().await.unwrap();

    // Everything acknowledged is back after a restart.
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    assert_eq!(c.lookup(ROOT_INO, n("d")).await.unwrap().ino, d.ino);
    assert_eq!(c.lookup(ROOT_INO, n("g")).await, Err(MetaError::NotFound));
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

#[tokio::test]
async fn heartbeats_fence_a_snapshots_chunks_and_copies_behind_the_map() {
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    register(&c, 3).await;
    let f = file(&c, ROOT_INO, "vol").await;
    let loc = c.allocate_chunk(f.ino, 0).await.unwrap();
    c.commit_write(f.ino, 4096, 4096).await.unwrap();
    for s in 1..=3 {
        assert!(c.heartbeat(hb(s, None)).await.unwrap().fence.is_empty());
    }

    // The snapshot bumps the shared chunk's version; a client that took it and died before
    // fencing leaves the servers at the old one. Their next heartbeats carry the FENCE.
    c.snapshot(
        f.ino,
        ROOT_INO,
        n("snap"),
        true,
        ByteBuf::from(b"s".to_vec()),
    )
    .await
    .unwrap();
    let now = c.chunks(f.ino, 0, 1).await.unwrap()[0].clone();
    assert!(now.version > loc.version && now.shared);
    for s in 1..=3 {
        let reply = c.heartbeat(hb(s, None)).await.unwrap();
        assert_eq!(reply.fence, vec![(loc.chunk, now.version)], "server {s}");
        // Sent once; the inventory is the backstop.
        assert!(c.heartbeat(hb(s, None)).await.unwrap().fence.is_empty());
    }
    // An inventory showing a copy behind the chunk map gets it fenced too; one at the
    // map's version does not.
    let behind = Some(vec![(loc.chunk, loc.version)]);
    assert_eq!(
        c.heartbeat(hb(2, behind)).await.unwrap().fence,
        vec![(loc.chunk, now.version)]
    );
    let current = Some(vec![(loc.chunk, now.version)]);
    assert!(c.heartbeat(hb(2, current)).await.unwrap().fence.is_empty());

    stop.send(()).unwrap();
    h.join().await.unwrap();
}

#[tokio::test]
async fn a_drained_server_takes_no_chunks_and_loses_its_copies_once_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    register(&c, 4).await;
    let f = file(&c, ROOT_INO, "f").await;
    let loc = c.allocate_chunk(f.ino, 0).await.unwrap();
    c.commit_write(f.ino, 4096, 4096).await.unwrap();
    let held: Vec<u64> = loc.replicas.iter().map(|r| r.server).collect();
    let gone = held[0];
    let spare = (1..=4).find(|s| !held.contains(s)).unwrap();
    assert_eq!(
        c.drain_chunkserver(99, true).await,
        Err(MetaError::NotFound)
    );
    c.drain_chunkserver(gone, true).await.unwrap();

    // No new chunk lands on it; its copy counts as missing for the healer.
    for i in 1..=8 {
        let l = c.allocate_chunk(f.ino, i).await.unwrap();
        assert!(l.replicas.iter().all(|r| r.server != gone), "chunk {i}");
    }
    let page = c.endangered_chunks(0, 100).await.unwrap();
    assert_eq!(page.chunks.len(), 1);
    assert_eq!(page.chunks[0].chunk, loc.chunk);
    let liveness = page.servers.iter().find(|s| s.id == gone).unwrap();
    assert!(!liveness.up, "not a copy target");
    let status = c.status().await.unwrap();
    assert!(status
        .chunkservers
        .iter()
        .any(|s| s.id == gone && s.draining));

    // The healer's copy on the spare server makes the draining copy surplus: its next
    // heartbeat gets it dropped, and the one after tells it to delete the file.
    c.add_replica(loc.chunk, loc.version, spare, page.term)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut deleted = Vec::new();
    loop {
        deleted.extend(c.heartbeat(hb(gone, None)).await.unwrap().delete);
        let now = c.chunks(f.ino, 0, 1).await.unwrap()[0].clone();
        if now.replicas.iter().all(|r| r.server != gone) && !deleted.is_empty() {
            assert_eq!(now.replicas.len(), 3);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "copy not dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(deleted, vec![loc.chunk]);
    let status = c.status().await.unwrap();
    let drained = status.chunkservers.iter().find(|s| s.id == gone).unwrap();
    assert_eq!(drained.chunks, 0);

    // Draining survives a restart; cancelling it lets the server take chunks again.
    stop.send(()).unwrap();
    h.join().await.unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    let status = c.status().await.unwrap();
    assert!(status
        .chunkservers
        .iter()
        .any(|s| s.id == gone && s.draining));
    c.drain_chunkserver(gone, false).await.unwrap();
    let status = c.status().await.unwrap();
    assert!(status.chunkservers.iter().all(|s| !s.draining));
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_survives_a_restart_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    let f = file(&c, ROOT_INO, "f").await;
    c.open(f.ino, 42).await.unwrap();
    c.unlink(ROOT_INO, n("f")).await.unwrap();
    assert_eq!(c.getattr(f.ino).await.unwrap().nlink, 0);
    stop.send(()).unwrap();
    h.join().await.unwrap();

    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    assert_eq!(c.getattr(f.ino).await.unwrap().nlink, 0);
    c.release(f.ino, 42).await.unwrap();
    assert_eq!(c.getattr(f.ino).await, Err(MetaError::NotFound));
    // With no chunkserver heard from, allocation is refused (first retryable, then NoSpace).
    let g = file(&c, ROOT_INO, "g").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c.allocate_chunk(g.ino, 0).await {
            Err(MetaError::NoSpace { .. }) => break,
            other => assert!(Instant::now() < deadline, "unexpected {other:?}"),
        }
    }
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

/// A leader that has just taken over knows only the chunkservers whose heartbeats reached it
/// so far: a new chunk waits for enough of them rather than going to fewer than three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_places_no_chunk_short_while_it_hears_from_servers() {
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    register(&c, 4).await;
    stop.send(()).unwrap();
    h.join().await.unwrap();

    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    let f = file(&c, ROOT_INO, "f").await;
    c.heartbeat(hb(1, None)).await.unwrap();
    // The leader's answer itself, not the client's retries of it: a client that gives up
    // after its first tries (well inside the 2 s warm-up).
    let impatient = MetadataClient::new(
        vec![h.addr().to_string()],
        ClientTimeouts {
            call: Duration::from_millis(200),
            op: Duration::from_millis(300),
        },
    );
    let early = impatient.allocate_chunk(f.ino, 0).await;
    assert!(
        matches!(early, Err(MetaError::Unavailable { .. })),
        "placed with one server heard from: {early:?}"
    );
    for s in 2..=3 {
        c.heartbeat(hb(s, None)).await.unwrap();
    }
    let loc = c.allocate_chunk(f.ino, 0).await.unwrap();
    let mut servers: Vec<_> = loc.replicas.iter().map(|r| r.server).collect();
    servers.sort_unstable();
    assert_eq!(servers, vec![1, 2, 3]);
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

/// A reader's leased open costs no log entry, yet keeps an unlinked file as an orphan until
/// released, also across a restart once the reader sent it again (`reopen`); an orphan's
/// open, and every leased open when a link goes, reach the log. Logged and leased opens
/// are released each by their own call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_opens_keep_unlinked_files_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    let f = file(&c, ROOT_INO, "f").await;
    let g = file(&c, ROOT_INO, "g").await;
    // The first leased open of a term records the term (a later leader then waits for its
    // mounts); the others cost nothing in the log.
    c.open_leased(f.ino, 42).await.unwrap();
    c.release_leased(vec![f.ino], 42).await.unwrap();
    let before = c.replica_status().await.unwrap().last_log_index;
    let mut epochs = Vec::new();
    for _ in 0..20 {
        let o = c.open_leased(f.ino, 42).await.unwrap();
        assert_eq!((o.attr.ino, o.attr.nlink), (f.ino, 1));
        assert!(o.chunks.is_empty(), "an empty file has no chunks");
        epochs.push(o.epoch);
        c.release_leased(vec![f.ino], 42).await.unwrap();
    }
    assert_eq!(c.replica_status().await.unwrap().last_log_index, before);
    let epoch = epochs[0];
    assert!(epochs.iter().all(|e| *e == epoch && *e != 0));

    // Released: the unlink frees it. Open: the unlink keeps it, also when a logged open
    // of the same session is released (a writer's, say).
    c.unlink(ROOT_INO, n("f")).await.unwrap();
    assert_eq!(c.getattr(f.ino).await, Err(MetaError::NotFound));
    c.open(g.ino, 42).await.unwrap();
    c.open_leased(g.ino, 42).await.unwrap();
    c.release(g.ino, 42).await.unwrap();
    c.unlink(ROOT_INO, n("g")).await.unwrap();
    c.release(g.ino, 42).await.unwrap();
    assert_eq!(c.getattr(g.ino).await.unwrap().nlink, 0);
    // An orphan's open is logged, so it survives a restart nobody reports it in.
    let orphan = c.open_leased(g.ino, 7).await.unwrap().attr;
    assert_eq!(orphan.nlink, 0);
    let k = file(&c, ROOT_INO, "k").await;
    c.open_leased(k.ino, 42).await.unwrap();
    stop.send(()).unwrap();
    h.join().await.unwrap();

    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    let opens = vec![(k.ino, epoch), (g.ino, epoch), (999_999, epoch)];
    let now = c.reopen(opens, 42).await.unwrap();
    assert!(now != epoch, "a restarted leader is a new epoch");
    // The first removal of a link waits for the mounts to report their leased opens.
    c.unlink(ROOT_INO, n("k")).await.unwrap();
    assert_eq!(c.getattr(k.ino).await.unwrap().nlink, 0);
    c.release_leased(vec![g.ino], 42).await.unwrap();
    assert_eq!(c.getattr(g.ino).await.unwrap().nlink, 0, "session 7 has it");
    c.release_leased(vec![g.ino], 7).await.unwrap();
    assert_eq!(c.getattr(g.ino).await, Err(MetaError::NotFound));
    // Reopened in this epoch already: nothing more to record (a second release would
    // otherwise be needed).
    c.reopen(vec![(k.ino, now)], 42).await.unwrap();
    c.release_leased(vec![k.ino], 42).await.unwrap();
    assert_eq!(c.getattr(k.ino).await, Err(MetaError::NotFound));
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

/// A cluster that never granted a lease grants one at once; once one was granted, a
/// restarted leader (same term: a sole replica keeps it) grants only renewals at first,
/// since the old process's leases may still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_wait_after_a_restart_only_if_one_was_ever_granted() {
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    let vol = file(&c, ROOT_INO, "vol").await;
    // Probes take nothing and record nothing.
    assert_eq!(c.volume_lease(vol.ino, 1, 0, false).await, Ok(0));
    assert_eq!(c.volume_lease(vol.ino, 1, 5000, false).await, Ok(5000));
    assert!(c.healer_lease(7, 3000).await.is_ok());
    stop.send(()).unwrap();
    h.join().await.unwrap();

    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    let refused = c.volume_lease(vol.ino, 2, 5000, false).await;
    assert!(
        matches!(refused, Err(MetaError::LeaseHeld { holder: 0, .. })),
        "{refused:?}"
    );
    assert!(matches!(
        c.healer_lease(8, 3000).await,
        Err(MetaError::LeaseHeld { holder: 0, .. })
    ));
    // The holder from before the restart renews, and keeps it.
    assert_eq!(c.volume_lease(vol.ino, 1, 5000, true).await, Ok(5000));
    assert!(matches!(
        c.volume_lease(vol.ino, 2, 5000, false).await,
        Err(MetaError::LeaseHeld { holder: 1, .. })
    ));
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

#[cfg(rawfs_bench)]
fn rss_mib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

/// A load figure, not a pass/fail check: `cargo test -p rawfs-metadata --test service --
/// --ignored --nocapture creates_per_second` (set RAWFS_CREATES for more files).
// A benchmark, not a check: `RUSTFLAGS="--cfg rawfs_bench" cargo test ... -- --nocapture`.
#[cfg(rawfs_bench)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_per_second() {
    let total: u64 = std::env::var("RAWFS_CREATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let (h, stop) = start(dir.path()).await;
    let c = client(h.addr());
    c.getattr(ROOT_INO).await.unwrap();
    let tasks: u64 = std::env::var("RAWFS_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let start = Instant::now();
    let mut js = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let c = c.clone();
        js.spawn(async move {
            let d = c
                .mknod(
                    ROOT_INO,
                    n(&format!("d{t}")),
                    NewNode {
                        kind: FileKind::Dir,
                        perm: 0o755,
                        rdev: 0,
                        exclusive: true,
                    },
                    ME,
                )
                .await
                .unwrap();
            for i in 0..total / tasks {
                file(&c, d.ino, &format!("file-{i}")).await;
            }
        });
    }
    while let Some(r) = js.join_next().await {
        r.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{total} creates in {secs:.1}s: {:.0}/s, RSS {} MiB",
        total as f64 / secs,
        rss_mib()
    );
    let start = Instant::now();
    for i in 0..2000u64 {
        c.getattr(ROOT_INO + 1 + (i % 100)).await.unwrap();
    }
    println!(
        "2000 getattr: {:.0}/s",
        2000.0 / start.elapsed().as_secs_f64()
    );
    stop.send(()).unwrap();
    h.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_redirect_and_survive_the_leader() {
    let ports = free_ports(6);
    let client_addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let raft_addr = |i: usize| format!("127.0.0.1:{}", ports[3 + i]);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let peers = (0..3)
            .filter(|&j| j != i)
            .map(|j| rawfs_metadata::Peer {
                id: j as u64 + 1,
                addr: client_addr(j),
                raft_addr: raft_addr(j),
            })
            .collect();
        let cfg = MetadataConfig {
            id: i as u64 + 1,
            listen: client_addr(i).parse().unwrap(),
            raft_listen: raft_addr(i).parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            peers,
            bootstrap: true,
            chunkserver_timeout: Duration::from_secs(2),
            snapshot_every: rawfs_metadata::DEFAULT_SNAPSHOT_EVERY,
        };
        let (tx, rx) = oneshot::channel::<()>();
        let h = serve(cfg, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        nodes.push(Some((h, tx)));
    }
    // The client knows only a follower-or-leader list in an arbitrary order.
    let c = MetadataClient::new(
        (0..3).rev().map(client_addr).collect(),
        ClientTimeouts {
            call: Duration::from_secs(3),
            op: Duration::from_secs(30),
        },
    );
    let f = file(&c, ROOT_INO, "before").await;
    let leader = c.status().await.unwrap().leader.unwrap();
    // Asking a follower directly gives a redirect naming the leader's client address.
    let follower = (1..=3u64).find(|&id| id != leader).unwrap();
    let direct = client(client_addr(follower as usize - 1).parse().unwrap());
    assert_eq!(direct.getattr(f.ino).await.unwrap().ino, f.ino, "followed");

    let (h, tx) = nodes[leader as usize - 1].take().unwrap();
    tx.send(()).unwrap();
    h.join().await.unwrap();
    // The survivors elect a new leader; the client finds it and nothing acknowledged is lost.
    assert_eq!(c.lookup(ROOT_INO, n("before")).await.unwrap().ino, f.ino);
    let g = file(&c, ROOT_INO, "after").await;
    let st = c.status().await.unwrap();
    assert_ne!(st.leader, Some(leader));
    assert_ne!(g.ino, f.ino);
    for (h, tx) in nodes.into_iter().flatten() {
        tx.send(()).unwrap();
        h.join().await.unwrap();
    }
}

const CHILD_ENV: &str = "RAWFS_METADATA_CHILD_DIR";

/// The child side of the crash test: serve until killed, announcing the address.
fn run_child(dir: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let cfg = MetadataConfig {
            id: 1,
            listen: "127.0.0.1:0".parse().unwrap(),
            raft_listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.into(),
            peers: vec![],
            bootstrap: true,
            chunkserver_timeout: Duration::from_secs(2),
            snapshot_every: rawfs_metadata::DEFAULT_SNAPSHOT_EVERY,
        };
        let h = serve(cfg, futures::future::pending()).await.unwrap();
        println!("CHILD-ADDR {}", h.addr());
        let _ = h.join().await;
    });
}

#[test]
fn killed_metadata_loses_no_acknowledged_operation() {
    use std::io::BufRead;
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_child(&dir);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "killed_metadata_loses_no_acknowledged_operation",
            "--nocapture",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr: SocketAddr = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("CHILD-ADDR ").map(|a| a.parse().unwrap()))
        .expect("child announced its address");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names: Vec<String> = (0..300).map(|i| format!("f{i}")).collect();
    rt.block_on(async {
        let c = client(addr);
        let mut js = tokio::task::JoinSet::new();
        for chunk in names.chunks(30) {
            let (c, chunk) = (c.clone(), chunk.to_vec());
            js.spawn(async move {
                for name in chunk {
                    file(&c, ROOT_INO, &name).await;
                }
            });
        }
        while let Some(r) = js.join_next().await {
            r.unwrap();
        }
    });
    // kill -9 right after the last acknowledgement: some applies are not durable yet.
    child.kill().unwrap();
    child.wait().unwrap();
    rt.block_on(async {
        let (h, stop) = start(dir.path()).await;
        let c = client(h.addr());
        for name in &names {
            c.lookup(ROOT_INO, n(name)).await.unwrap();
        }
        let listed = c.readdir(ROOT_INO, 0, 1000).await.unwrap();
        assert_eq!(listed.len(), names.len());
        stop.send(()).unwrap();
        h.join().await.unwrap();
    });
}
