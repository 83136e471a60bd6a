//! Block volumes over NBD with real clients: `rawfs volume`, the NBD server that `rawfs up`
//! starts, libnbd's nbdinfo / nbdcopy / nbdfuse, QEMU's qemu-img, a kernel ext4 on a volume
//! (through nbdfuse and a loop device), a chunkserver killed mid-copy, and garbage on the
//! NBD port.

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, RngCore, SeedableRng};
use rawfs_integration::fsutil::{file_hash, seed, sh};
use rawfs_integration::harness::{is_mountpoint, wait_until};
use rawfs_integration::Cluster;
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
    c.rawfs_ok(&["volume", "create", "vm1", "--size", "1G"])?;
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
    fn attach(scratch: &Path, uri: &str) -> Result<FuseDisk> {
        let dir = scratch.join("nbdfuse");
        let ext = scratch.join("ext4");
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
fn ext4_on_a_volume_survives_umount_fsck_and_remount() -> Result<()> {
    let c = Cluster::start()?;
    let addr = nbd_addr(&c)?;
    c.rawfs_ok(&["volume", "create", "fs", "--size", "512M"])?;
    let src = source_tree(&c)?;
    let disk = FuseDisk::attach(c.scratch(), &uri(&addr, "fs"))?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(disk.file()))?;
    disk.mount()?;
    sh(
        &disk.ext,
        &format!("cp -a '{}' tree && sync", src.display()),
    )?;
    disk.umount()?;
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
        used_bytes(&c, "fs")? > 0,
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
