//! Block volumes over NBD with real clients: `rawfs volume`, the NBD server that `rawfs up`
//! starts, libnbd's nbdinfo / nbdcopy / nbdfuse, QEMU's qemu-img, a kernel ext4 on a volume
//! (through nbdfuse and a loop device), a chunkserver killed mid-copy, and garbage on the
//! NBD port.

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use rawfs_integration::fsutil::{file_hash, seed, sh};
use rawfs_integration::harness::{is_mountpoint, wait_until};
use rawfs_integration::{Cluster, Options};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Bytes copied through nbdcopy in and out (the issue asks for 1 GiB; the debug build moves
/// it in about 25 s here).
const BIG: u64 = 1 << 30;

/// The NBD server's address from cluster.json.
fn nbd_addr(c: &Cluster) -> Result<String> {
    Ok(c.process("nbd", 1)?.addr)
}

fn uri(addr: &str, volume: &str) -> String {
    format!("nbd://{addr}/{volume}")
}

/// Runs a command; fails with its output unless it exits 0.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} (install libnbd-bin, qemu-utils)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn volumes(c: &Cluster) -> Result<Vec<Value>> {
    let out = c.rawfs_ok(&["volume", "list", "--json"])?;
    let v: Value = serde_json::from_str(&out).context("volume list --json")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn used_bytes(c: &Cluster, name: &str) -> Result<u64> {
    volumes(c)?
        .iter()
        .find(|v| v["name"] == name)
        .and_then(|v| v["used_bytes"].as_u64())
        .with_context(|| format!("volume {name} not listed"))
}

/// A file of `len` random bytes in the test's scratch directory.
fn random_file(c: &Cluster, name: &str, len: u64, seed: u64) -> Result<PathBuf> {
    let p = c.scratch().join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&p)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..len >> 20 {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(p)
}

#[test]
fn volumes_are_served_to_real_nbd_clients() -> Result<()> {
    let c = Cluster::start()?;
    let addr = nbd_addr(&c)?;
    // Multi-conn: nbdcopy below writes over 4 connections at once.
    c.rawfs_ok(&["volume", "create", "vm1", "--size", "1G", "--multi-conn"])?;
    ensure!(
        c.path(".rawfs-volumes/vm1").metadata()?.len() == BIG,
        "the volume is a file in the namespace"
    );

    // Capabilities, as libnbd sees them.
    let info: Value = serde_json::from_str(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(uri(&addr, "vm1")))?)?;
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], BIG);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_cache",
        "can_multi_conn",
    ] {
        assert_eq!(e[cap], true, "{cap}: {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg(format!("nbd://{addr}")))?;
    assert!(list.contains("vm1"), "{list}");

    // An unwritten volume is one hole.
    let map = run(Command::new("nbdinfo").arg("--map").arg(uri(&addr, "vm1")))?;
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(map.contains("hole,zero"), "{map}");
    assert_eq!(used_bytes(&c, "vm1")?, 0);

    // Block status follows the blocks written (4 KiB), not the 64 MiB chunks holding them.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x11 10M 4k"])
        .args(["-c", "write -P 0x22 200M 8k"])
        .arg(uri(&addr, "vm1")))?;
    let map = run(Command::new("nbdinfo").arg("--map").arg(uri(&addr, "vm1")))?;
    let extents: Vec<(u64, u64, bool)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2] == "0")
        })
        .collect();
    let (m, k) = (1u64 << 20, 4096u64);
    assert_eq!(
        extents,
        vec![
            (0, 10 * m, false),
            (10 * m, k, true),
            (10 * m + k, 190 * m - k, false),
            (200 * m, 2 * k, true),
            (200 * m + 2 * k, BIG - 200 * m - 2 * k, false),
        ],
        "{map}"
    );
    // Trimmed blocks are holes again, though their chunks stay.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-d", "unmap", "-c", "discard 10M 4k"])
        .args(["-c", "discard 200M 8k"])
        .arg(uri(&addr, "vm1")))?;
    let map = run(Command::new("nbdinfo").arg("--map").arg(uri(&addr, "vm1")))?;
    assert_eq!(map.lines().count(), 1, "{map}");
    assert!(map.contains("hole,zero"), "{map}");

    // 1 GiB of random data in over 4 connections, and out again.
    let src = random_file(&c, "src.img", BIG, seed("nbdcopy"))?;
    let back = c.scratch().join("back.img");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(uri(&addr, "vm1")))?;
    run(Command::new("nbdcopy").arg(uri(&addr, "vm1")).arg(&back))?;
    assert_eq!(file_hash(&src)?, file_hash(&back)?, "1 GiB round trip");
    assert_eq!(used_bytes(&c, "vm1")?, BIG);
    std::fs::remove_file(&back)?;

    // A qcow2 image converted into a volume compares equal.
    c.rawfs_ok(&["volume", "create", "img", "--size", "256M"])?;
    let qcow = c.scratch().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("200M"))?;
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5c 0 3M",
            "-c",
            "write -P 0xa7 130M 1M",
        ])
        .arg(&qcow))?;
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow)
        .arg(uri(&addr, "img")))?;
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qcow)
        .arg(uri(&addr, "img")))?;

    // Garbage on the NBD port: each connection is dropped, the server keeps serving.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed("nbd garbage"));
    let greeting_ok = b"\0\0\0\x03IHAVEOPT\0\0\0\x07";
    for i in 0..40 {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let input: Vec<u8> = match i % 4 {
            0 => (0..rng.gen_range(1..300)).map(|_| rng.gen()).collect(),
            1 => greeting_ok[..rng.gen_range(0..greeting_ok.len())].to_vec(),
            2 => {
                // A GO that claims more data than it sends.
                let mut m = greeting_ok.to_vec();
                m.extend_from_slice(&rng.gen_range(5u32..5000).to_be_bytes());
                m.extend_from_slice(b"vm1");
                m
            }
            _ => b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        };
        let _ = s.write_all(&input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // The server ends the connection (EOF) instead of waiting or crashing.
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut sink).context("server did not close")?;
    }
    let again = run(Command::new("nbdinfo").arg("--size").arg(uri(&addr, "vm1")))?;
    assert_eq!(again.trim(), BIG.to_string());
    let pid = c.pid("nbd", 1)?;
    ensure!(
        rawfs_integration::harness::pid_alive(pid),
        "the NBD server survived"
    );

    // Deleting frees the name; the list shows what is left.
    c.rawfs_ok(&["volume", "delete", "img"])?;
    let names: Vec<String> = volumes(&c)?
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["vm1"]);
    let gone = Command::new("nbdinfo").arg(uri(&addr, "img")).output()?;
    ensure!(!gone.status.success(), "a deleted volume is no export");
    Ok(())
}

/// An NBD export as a file through `nbdfuse`, with a loop-mounted filesystem on it;
/// everything is unmounted and stopped on drop, even when the test fails.
struct FuseDisk {
    dir: PathBuf,
    ext: PathBuf,
    child: Child,
}

impl FuseDisk {
    /// `uri` as the file `nbd` in `scratch/name`.
    fn attach(scratch: &Path, name: &str, uri: &str) -> Result<FuseDisk> {
        let dir = scratch.join(name);
        let ext = scratch.join(format!("{name}.ext4"));
        std::fs::create_dir_all(&dir)?;
        std::fs::create_dir_all(&ext)?;
        let child = Command::new("nbdfuse")
            .arg(&dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot run nbdfuse (install libnbd-bin)")?;
        let d = FuseDisk { dir, ext, child };
        wait_until(
            "nbdfuse to expose the volume",
            Duration::from_secs(30),
            || Ok(is_mountpoint(&d.dir) && d.file().exists()),
        )?;
        Ok(d)
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    fn mount(&self) -> Result<()> {
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(self.file())
            .arg(&self.ext))?;
        Ok(())
    }

    fn umount(&self) -> Result<()> {
        run(Command::new("umount").arg(&self.ext))?;
        Ok(())
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        if is_mountpoint(&self.ext) {
            let _ = Command::new("umount").arg("-l").arg(&self.ext).status();
        }
        if is_mountpoint(&self.dir) {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .status();
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A copy of this repository's sources (no target/, no .git) in the scratch directory.
fn source_tree(c: &Cluster) -> Result<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = c.scratch().join("src");
    std::fs::create_dir_all(&src)?;
    sh(
        &ws,
        &format!(
            "tar --exclude=./target --exclude=./.git -cf - . | tar -C '{}' -xf -",
            src.display()
        ),
    )?;
    Ok(src)
}

#[test]
fn ext4_on_a_hot_volume_survives_umount_fsck_and_remount() -> Result<()> {
    let c = Cluster::start()?;
    ext4_round_trip(&c, "hot")
}

/// The same on a cold volume: the healer erasure codes its chunks as they are written
/// (ext4 keeps writing into them, which turns them back into replicas first), and the
/// second mount reads the tree back from RS 4+2 shards.
#[test]
fn ext4_on_a_cold_volume_survives_umount_fsck_and_remount() -> Result<()> {
    let c = Cluster::start_with(Options {
        up_args: ["--healer-scan-interval", "1s"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Options::default()
    })?;
    ext4_round_trip(&c, "cold")
}

/// mkfs.ext4 on a volume of `class` through nbdfuse, copy a source tree in, umount, fsck,
/// mount again and compare.
fn ext4_round_trip(c: &Cluster, class: &str) -> Result<()> {
    let addr = nbd_addr(c)?;
    c.rawfs_ok(&["volume", "create", "fs", "--size", "512M", "--class", class])?;
    let src = source_tree(c)?;
    let disk = FuseDisk::attach(c.scratch(), "nbdfuse", &uri(&addr, "fs"))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(disk.file()))?;
    disk.mount()?;
    sh(
        &disk.ext,
        &format!("cp -a '{}' tree && sync", src.display()),
    )?;
    disk.umount()?;
    if class == "cold" {
        // Once written, every chunk of the volume becomes RS 4+2.
        let r = wait_until(
            "the cold volume erasure coded",
            Duration::from_secs(180),
            || {
                let s = c.status()?;
                let ch = &s["chunks"];
                Ok(ch["ec"].as_u64() > Some(0) && ch["replicated"].as_u64() == Some(0))
            },
        );
        c.diagnose(r)?;
    }
    // -f: check even though it is clean; -n: change nothing. Exit 0 means no problem.
    let fsck = run(Command::new("fsck.ext4").arg("-fn").arg(disk.file()))?;
    assert!(!fsck.contains("UNEXPECTED"), "{fsck}");
    disk.mount()?;
    sh(
        &disk.ext,
        &format!("diff -r --no-dereference '{}' tree", src.display()),
    )?;
    disk.umount()?;
    drop(disk);
    // What the filesystem wrote is in the cluster: the volume's chunks exist.
    ensure!(
        used_bytes(c, "fs")? > 0,
        "the filesystem's blocks are allocated"
    );
    Ok(())
}

#[test]
fn a_chunkserver_killed_during_nbdcopy_loses_nothing() -> Result<()> {
    let mut c = Cluster::start()?;
    let addr = nbd_addr(&c)?;
    let size = 512u64 << 20;
    c.rawfs_ok(&["volume", "create", "busy", "--size", "512M"])?;
    let src = random_file(&c, "busy.img", size, seed("nbdcopy kill"))?;
    let mut copy = Command::new("nbdcopy")
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(uri(&addr, "busy"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nbdcopy")?;
    // Kill once data is flowing: the first chunks exist.
    let flowing = wait_until("nbdcopy to store data", Duration::from_secs(60), || {
        Ok(used_bytes(&c, "busy")? > 0)
    });
    if let Err(e) = flowing {
        let _ = copy.kill();
        let _ = copy.wait();
        return Err(e);
    }
    c.kill9("chunkserver", 2)?;
    let out = copy.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nbdcopy failed after the kill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = c.scratch().join("busy.back");
    run(Command::new("nbdcopy").arg(uri(&addr, "busy")).arg(&back))?;
    assert_eq!(file_hash(&src)?, file_hash(&back)?, "every byte survived");
    Ok(())
}

/// Bytes all chunkservers hold, from their heartbeats (`rawfs status`).
fn chunkserver_used(c: &Cluster) -> Result<u64> {
    let st = c.status()?;
    let servers = st["chunkservers"]
        .as_array()
        .context("status lists chunkservers")?;
    Ok(servers
        .iter()
        .filter_map(|s| s["used_bytes"].as_u64())
        .sum())
}

/// Runs qemu-io commands against an export; fails unless every command succeeded.
fn qemu_io(uri: &str, cmds: &[&str]) -> Result<String> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(uri))?;
    ensure!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?}: {out}"
    );
    Ok(out)
}

fn volume_entry(c: &Cluster, name: &str) -> Result<Value> {
    volumes(c)?
        .into_iter()
        .find(|v| v["name"] == name)
        .with_context(|| format!("volume {name} not listed"))
}

#[test]
fn snapshots_and_clones_share_chunks_until_written() -> Result<()> {
    const CHUNK: u64 = 64 << 20;
    let c = Cluster::start()?;
    let addr = nbd_addr(&c)?;
    let size = 3 * CHUNK;
    c.rawfs_ok(&["volume", "create", "vol", "--size", "192M"])?;
    let a = random_file(&c, "a.img", size, seed("snapshot a"))?;
    let mut expect_vol = std::fs::read(&a)?;
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&a)
        .arg(uri(&addr, "vol")))?;
    // Three replicas of three chunks, as the chunkservers report them.
    wait_until(
        "the volume's data on the chunkservers",
        Duration::from_secs(30),
        || Ok(chunkserver_used(&c)? >= 3 * size),
    )?;
    let before = chunkserver_used(&c)?;

    // A writer that holds the volume open through the mount caches its chunk locations
    // across the snapshot: its next write must not land in the snapshot's data.
    let through_mount = c.path(".rawfs-volumes/vol");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&through_mount)?;
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&expect_vol[..4096], 0)?;
        f.sync_all()?;
    }

    c.rawfs_ok(&["volume", "snapshot", "vol", "snap1"])?;
    let snap = volume_entry(&c, "snap1")?;
    assert_eq!(snap["read_only"], true, "{snap}");
    assert_eq!(snap["origin"], "vol", "{snap}");
    assert_eq!(snap["size"], size);
    let vol = volume_entry(&c, "vol")?;
    assert_eq!(vol["read_only"], false);
    assert_eq!(vol["origin"], Value::Null);
    let table = c.rawfs_ok(&["volume", "list"])?;
    assert!(table.contains("snapshot of vol (read-only)"), "{table}");
    let instant = chunkserver_used(&c)?;
    ensure!(
        instant < before + CHUNK,
        "a snapshot copies nothing: {before} -> {instant} bytes"
    );

    // Keep writing the origin: through the still-open file (stale cached locations), and
    // over NBD.
    {
        use std::os::unix::fs::FileExt;
        let fresh = vec![0x5au8; 4096];
        f.write_all_at(&fresh, 4096)?;
        f.sync_all()?;
        expect_vol[4096..8192].copy_from_slice(&fresh);
    }
    drop(f);
    qemu_io(&uri(&addr, "vol"), &["write -P 0xab 64M 4M", "flush"])?;
    expect_vol[(64 << 20)..(68 << 20)].fill(0xab);

    // The snapshot still reads the old data.
    let snap_back = c.scratch().join("snap1.img");
    run(Command::new("nbdcopy")
        .arg(uri(&addr, "snap1"))
        .arg(&snap_back))?;
    assert_eq!(
        file_hash(&snap_back)?,
        file_hash(&a)?,
        "the snapshot kept the data it was taken with"
    );
    let vol_back = c.scratch().join("vol.img");
    run(Command::new("nbdcopy")
        .arg(uri(&addr, "vol"))
        .arg(&vol_back))?;
    assert!(
        std::fs::read(&vol_back)? == expect_vol,
        "the origin has its new writes"
    );

    // Space is shared until written: two chunks were copied (three replicas each), not the
    // whole volume.
    wait_until(
        "the copies on the chunkservers",
        Duration::from_secs(30),
        || Ok(chunkserver_used(&c)? >= before + 2 * 3 * CHUNK * 9 / 10),
    )?;
    let after = chunkserver_used(&c)?;
    eprintln!(
        "chunkserver bytes: {before} before the snapshot, {instant} after it, {after} after \
         writing 2 of the 3 chunks of the origin"
    );
    ensure!(
        after < before + 3 * 3 * CHUNK,
        "more than the written chunks were copied: {before} -> {after}"
    );

    // The snapshot is read-only: over NBD and through the mount.
    let info: Value = serde_json::from_str(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(uri(&addr, "snap1")))?)?;
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(uri(&addr, "snap1"))
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    ensure!(
        !refused.status.success() || said.contains("failed") || said.contains("read-only"),
        "a write to a snapshot over NBD was accepted: {said}"
    );
    let snap_file = c.path(".rawfs-volumes/snap1");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&snap_file.metadata()?.permissions()) & 0o222,
        0,
        "a snapshot file has no write bits"
    );
    {
        // Even root (who may open it for writing) cannot change it.
        use std::os::unix::fs::FileExt;
        let g = std::fs::OpenOptions::new().write(true).open(&snap_file)?;
        let w = g.write_all_at(b"nope", 0).and_then(|()| g.sync_all());
        ensure!(w.is_err(), "a write to the snapshot file succeeded");
        ensure!(g.set_len(0).is_err(), "the snapshot file was truncated");
    }
    match c.rawfs_ok(&["volume", "resize", "snap1", "--size", "256M"]) {
        Ok(out) => bail!("a snapshot was resized: {out}"),
        Err(e) => ensure!(format!("{e:#}").contains("read-only snapshot"), "{e:#}"),
    }

    // A clone is writable and independent of its snapshot and of the origin.
    c.rawfs_ok(&["volume", "clone", "snap1", "cl"])?;
    let cl = volume_entry(&c, "cl")?;
    assert_eq!(cl["read_only"], false);
    assert_eq!(cl["origin"], "snap1");
    qemu_io(&uri(&addr, "cl"), &["write -P 0xcd 0 1M", "flush"])?;
    let mut expect_cl = std::fs::read(&a)?;
    expect_cl[..1 << 20].fill(0xcd);
    let cl_back = c.scratch().join("cl.img");
    run(Command::new("nbdcopy").arg(uri(&addr, "cl")).arg(&cl_back))?;
    assert!(
        std::fs::read(&cl_back)? == expect_cl,
        "the clone has its write"
    );
    run(Command::new("nbdcopy")
        .arg(uri(&addr, "snap1"))
        .arg(&snap_back))?;
    assert_eq!(file_hash(&snap_back)?, file_hash(&a)?, "snapshot unchanged");
    run(Command::new("nbdcopy")
        .arg(uri(&addr, "vol"))
        .arg(&vol_back))?;
    assert!(std::fs::read(&vol_back)? == expect_vol, "origin unchanged");

    // The origin goes; its snapshot stays readable. Then everything goes, and the space
    // with it (the last reference of each chunk queues its deletion).
    c.rawfs_ok(&["volume", "delete", "vol"])?;
    run(Command::new("nbdcopy")
        .arg(uri(&addr, "snap1"))
        .arg(&snap_back))?;
    assert_eq!(
        file_hash(&snap_back)?,
        file_hash(&a)?,
        "snapshot outlives its origin"
    );
    c.rawfs_ok(&["volume", "delete", "snap1"])?;
    run(Command::new("nbdcopy").arg(uri(&addr, "cl")).arg(&cl_back))?;
    assert!(
        std::fs::read(&cl_back)? == expect_cl,
        "clone outlives its snapshot"
    );
    c.rawfs_ok(&["volume", "delete", "cl"])?;
    wait_until(
        "the chunkservers to free the space",
        Duration::from_secs(60),
        || Ok(chunkserver_used(&c)? < CHUNK),
    )?;
    Ok(())
}

/// A second `rawfs nbd` on the same cluster, killed (SIGKILL) on drop.
struct SecondServer {
    addr: String,
    child: Child,
}

impl SecondServer {
    fn start(c: &Cluster) -> Result<SecondServer> {
        let addr = format!("127.0.0.1:{}", c.spare_port());
        let child = Command::new(rawfs_integration::harness::rawfs_bin())
            .args(["nbd", "--listen", &addr, "--dir"])
            .arg(&c.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(c.scratch().join("nbd2.log"))?)
            .spawn()?;
        let s = SecondServer { addr, child };
        wait_until(
            "the second NBD server to answer",
            Duration::from_secs(30),
            || {
                Ok(Command::new("nbdinfo")
                    .arg("--list")
                    .arg(format!("nbd://{}", s.addr))
                    .output()?
                    .status
                    .success())
            },
        )?;
        Ok(s)
    }
}

impl Drop for SecondServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a client connecting now through `addr` gets `volume` read-only.
fn read_only_via(addr: &str, volume: &str) -> Result<bool> {
    let info: Value = serde_json::from_str(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(uri(addr, volume)))?)?;
    info["exports"][0]["is_read_only"]
        .as_bool()
        .context("nbdinfo: no is_read_only")
}

#[test]
fn one_writer_per_volume_across_nbd_servers() -> Result<()> {
    let mut c = Cluster::start()?;
    c.rawfs_ok(&["volume", "create", "shared", "--size", "64M"])?;
    let a = nbd_addr(&c)?;
    let mut b = SecondServer::start(&c)?;
    // A writer attached through server A: server B serves the volume read-only.
    let disk = FuseDisk::attach(c.scratch(), "via-a", &uri(&a, "shared"))?;
    let write_a = |fill: u8| -> Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(disk.file())?;
        f.write_all_at(&[fill; 65536], 0)?;
        f.sync_all()?;
        Ok(())
    };
    write_a(0x11)?;
    // The metadata leader dies: the writer keeps its lease (renewed under the next leader)
    // and goes on writing.
    let (leader, term) = c.wait_leader(Duration::from_secs(10), 0, None)?;
    c.kill9("metadata", leader)?;
    c.wait_leader(Duration::from_secs(10), term + 1, Some(leader))?;
    // Writing (each write flushed) for longer than a lease: it must have been renewed.
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        write_a(0x22)?;
    }
    write_a(0xab)?;
    ensure!(
        read_only_via(&b.addr, "shared")?,
        "B served a volume A writes as writable"
    );
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(uri(&b.addr, "shared"))
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&refused.stdout),
        String::from_utf8_lossy(&refused.stderr)
    );
    ensure!(
        !refused.status.success() || said.contains("failed") || said.contains("read-only"),
        "a second writer through another server was accepted: {said}"
    );
    // The writer leaves: B may write (the lease was given back, no waiting for it to lapse).
    drop(disk);
    wait_until(
        "B to serve the volume writable",
        Duration::from_secs(5),
        || Ok(!read_only_via(&b.addr, "shared")?),
    )?;
    qemu_io(&uri(&b.addr, "shared"), &["write -P 0xcd 0 4k", "flush"])?;
    // A writer through B, and B killed: A can write once the lease lapses (10 s).
    let held = FuseDisk::attach(c.scratch(), "via-b", &uri(&b.addr, "shared"))?;
    ensure!(
        read_only_via(&a, "shared")?,
        "A served a volume B writes as writable"
    );
    b.child.kill()?;
    b.child.wait()?;
    let killed = std::time::Instant::now();
    drop(held);
    wait_until(
        "A to serve the volume writable",
        Duration::from_secs(30),
        || Ok(!read_only_via(&a, "shared")?),
    )?;
    eprintln!(
        "writer lease of a killed NBD server taken over after {:.1} s",
        killed.elapsed().as_secs_f64()
    );
    let back = qemu_io(
        &uri(&a, "shared"),
        &["read -P 0xcd 0 4k", "read -P 0xab 4k 60k"],
    )?;
    ensure!(!back.contains("Pattern verification failed"), "{back}");
    assert!(c.panics().is_empty(), "{:?}", c.panics());
    Ok(())
}
