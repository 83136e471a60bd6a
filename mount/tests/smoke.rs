//! A live mount over an in-process cluster (1 metadata, 3 chunkservers on 127.0.0.1:0),
//! exercised with std::fs and libc. Needs root and /dev/fuse; skips itself otherwise.
//! The full POSIX suite lives in `integration/`; this is the mount crate's own check that
//! the pieces fit.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use rawfs_chunkserver::{ChunkserverConfig, ChunkserverHandle};
use rawfs_metadata::{MetadataConfig, MetadataHandle};
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use rawfs_mount::{run_foreground, MountOptions};

/// Lazily unmounts on drop, so a failing test leaves no mount behind.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_string_lossy();
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            f.get(1) == Some(&want.as_ref()) && f.get(2) == Some(&"fuse.rawfs")
        })
    })
}

struct Cluster {
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    meta: Option<MetadataHandle>,
    chunkservers: Vec<ChunkserverHandle>,
    addr: String,
}

impl Cluster {
    fn start(dir: &Path) -> Result<Cluster> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let shutdown = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let local = "127.0.0.1:0".parse()?;
        let meta = rt.block_on(rawfs_metadata::serve(
            MetadataConfig {
                id: 1,
                listen: local,
                raft_listen: local,
                data_dir: dir.join("meta"),
                peers: Vec::new(),
                bootstrap: true,
                chunkserver_timeout: Duration::from_secs(5),
                snapshot_every: rawfs_metadata::DEFAULT_SNAPSHOT_EVERY,
            },
            shutdown(),
        ))?;
        let addr = meta.addr().to_string();
        let mut chunkservers = Vec::new();
        for id in 1..=3 {
            let cs = rt.block_on(rawfs_chunkserver::serve(
                ChunkserverConfig {
                    id,
                    data_dir: dir.join(format!("cs{id}")),
                    data_listen: local,
                    control_listen: local,
                    metadata: vec![addr.clone()],
                    capacity: Some(4 << 30),
                    heartbeat_interval: Duration::from_millis(200),
                },
                shutdown(),
            ))?;
            chunkservers.push(cs);
        }
        let client = MetadataClient::new(vec![addr.clone()], ClientTimeouts::default());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = rt
                .block_on(client.status())
                .map(|s| s.chunkservers.iter().filter(|c| c.up).count())
                .unwrap_or(0);
            if up == 3 {
                break;
            }
            ensure!(Instant::now() < deadline, "chunkservers did not register");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Cluster {
            rt,
            stop: Some(tx),
            meta: Some(meta),
            chunkservers,
            addr,
        })
    }

    fn stop(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        for cs in self.chunkservers.drain(..) {
            self.rt.block_on(cs.join())?;
        }
        if let Some(m) = self.meta.take() {
            self.rt.block_on(m.join())?;
        }
        Ok(())
    }
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn xattr_get(path: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: a size probe with a null buffer, then a read into a buffer of that size.
    let size = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    if size < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; size as usize];
    let got = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if got < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(got as usize);
    Ok(buf)
}

fn exercise(m: &Path) -> Result<()> {
    // Create, write, read back; sizes and contents.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(m.join("a.bin"), &data)?;
    ensure!(fs::metadata(m.join("a.bin"))?.len() == data.len() as u64);
    ensure!(fs::read(m.join("a.bin"))? == data, "read back differs");

    // Append from two handles, with the size seen by getattr while writes are buffered.
    {
        let mut f1 = OpenOptions::new().append(true).open(m.join("a.bin"))?;
        let mut f2 = OpenOptions::new().append(true).open(m.join("a.bin"))?;
        f1.write_all(b"one")?;
        f2.write_all(b"two")?;
        ensure!(fs::metadata(m.join("a.bin"))?.len() == data.len() as u64 + 6);
    }
    let all = fs::read(m.join("a.bin"))?;
    ensure!(
        &all[data.len()..] == b"onetwo",
        "appends: {:?}",
        &all[data.len()..]
    );

    // Sparse file past 4 GiB: holes read as zeros.
    {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(m.join("sparse"))?;
        f.write_all_at(b"end", 5 << 30)?;
        f.sync_all()?;
        let mut buf = [1u8; 4096];
        f.read_exact_at(&mut buf, 1 << 30)?;
        ensure!(buf.iter().all(|b| *b == 0), "hole not zero");
        let mut tail = [0u8; 3];
        f.read_exact_at(&mut tail, 5 << 30)?;
        ensure!(&tail == b"end");
    }
    ensure!(fs::metadata(m.join("sparse"))?.len() == (5 << 30) + 3);

    // Truncate down then up: the dropped bytes come back as zeros.
    {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.join("a.bin"))?;
        f.set_len(10)?;
        f.set_len(20)?;
        let mut buf = Vec::new();
        (&f).seek(SeekFrom::Start(0))?;
        (&f).read_to_end(&mut buf)?;
        ensure!(
            buf[..10] == data[..10] && buf[10..].iter().all(|b| *b == 0),
            "truncate: {buf:?}"
        );
    }

    // futimens before close (what `cp -p` does) survives the flush at close.
    {
        let old = std::time::UNIX_EPOCH + Duration::from_secs(978_307_200);
        let mut f = fs::File::create(m.join("timed"))?;
        f.write_all(b"buffered")?;
        f.set_modified(old)?;
        drop(f);
        ensure!(
            fs::metadata(m.join("timed"))?.modified()? == old,
            "mtime lost"
        );
    }

    // Directories, rename, links, symlinks, permissions.
    fs::create_dir(m.join("d"))?;
    fs::write(m.join("d/x"), b"x")?;
    ensure!(
        fs::remove_dir(m.join("d")).is_err(),
        "rmdir of a non-empty dir"
    );
    fs::rename(m.join("d/x"), m.join("d/y"))?;
    fs::hard_link(m.join("d/y"), m.join("d/z"))?;
    ensure!(fs::metadata(m.join("d/y"))?.nlink() == 2);
    std::os::unix::fs::symlink("d/y", m.join("link"))?;
    ensure!(fs::read_link(m.join("link"))? == Path::new("d/y"));
    ensure!(fs::read(m.join("link"))? == b"x");
    fs::set_permissions(m.join("d/y"), fs::Permissions::from_mode(0o640))?;
    ensure!(fs::metadata(m.join("d/z"))?.mode() & 0o7777 == 0o640);
    let mut names: Vec<String> = fs::read_dir(m.join("d"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    ensure!(names == ["y", "z"], "listing {names:?}");
    let long = "n".repeat(255);
    fs::write(m.join(&long), b"")?;
    let too_long = "n".repeat(256);
    let e = fs::write(m.join(&too_long), b"").expect_err("256-byte name accepted");
    ensure!(e.raw_os_error() == Some(libc::ENAMETOOLONG), "{e}");

    // Many entries: listing pages through the metadata cookies.
    fs::create_dir(m.join("many"))?;
    for i in 0..1200 {
        fs::write(m.join(format!("many/f{i:04}")), b"")?;
    }
    ensure!(fs::read_dir(m.join("many"))?.count() == 1200);

    // Extended attributes.
    xattr_set(&m.join("d/y"), "user.k", b"v1")?;
    ensure!(xattr_get(&m.join("d/y"), "user.k")? == b"v1");
    let e = xattr_get(&m.join("d/y"), "user.none").expect_err("missing xattr");
    ensure!(e.raw_os_error() == Some(libc::ENODATA), "{e}");

    // statfs reports usable (replica-divided) capacity.
    let st = nix::sys::statvfs::statvfs(m)?;
    ensure!(st.blocks() > 0 && st.block_size() == 4096, "statfs {st:?}");

    // Unlink while open: the data stays readable until close.
    {
        let mut f = fs::File::open(m.join("d/z"))?;
        fs::remove_file(m.join("d/y"))?;
        fs::remove_file(m.join("d/z"))?;
        let mut s = String::new();
        f.read_to_string(&mut s)?;
        ensure!(s == "x");
    }
    ensure!(!m.join("d/z").exists());

    // The same for a file unlinked right after its create (its open is registered late).
    {
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(m.join("new"))?;
        f.write_all(b"fresh")?;
        fs::remove_file(m.join("new"))?;
        f.sync_all()?;
        let mut s = String::new();
        f.seek(SeekFrom::Start(0))?;
        f.read_to_string(&mut s)?;
        ensure!(s == "fresh", "unlinked new file reads {s:?}");
    }
    Ok(())
}

#[test]
fn mount_serves_posix_operations_and_unmounts_cleanly() -> Result<()> {
    if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
        eprintln!("skipped: needs root and /dev/fuse");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt)?;
    let cluster = Cluster::start(dir.path())?;
    let spec = format!("{}:/", cluster.addr);
    let _guard = Unmount(mnt.clone());
    let server = {
        let (spec, mnt) = (spec.clone(), mnt.clone());
        std::thread::spawn(move || run_foreground(&spec, &mnt, &MountOptions::default()))
    };
    wait_until("the mount", Duration::from_secs(30), || {
        is_mounted(&mnt) || server.is_finished()
    })?;
    ensure!(is_mounted(&mnt), "mount failed: {:?}", server.join());

    let result = exercise(&mnt);

    let status = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .context("umount")?;
    let served = server
        .join()
        .map_err(|_| anyhow::anyhow!("mount thread panicked"))?;
    result?;
    ensure!(status.success(), "umount failed");
    served?;
    ensure!(!is_mounted(&mnt));
    cluster.stop()
}
