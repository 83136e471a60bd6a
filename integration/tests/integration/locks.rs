//! Byte-range and `flock` locks across mounts: processes on different mounts of one
//! cluster exclude each other, data written under a lock is what the next holder reads,
//! and the locks of a mount that dies come free while a failover keeps the others'.

use anyhow::{bail, ensure, Context, Result};
use rawfs_integration::fsutil::*;
use rawfs_integration::harness::wait_until;
use rawfs_integration::Cluster;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn open_rw(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .with_context(|| format!("open {}", p.display()))
}

/// `F_GETLK` of a write lock of `start..start+len`: (type, start, len) of what is in the way.
fn getlk(f: &File, start: i64, len: i64) -> Result<(i32, i64, i64)> {
    // SAFETY: a zeroed flock is valid; the fd is open.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: valid fd and pointer.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) } != 0 {
        bail!("F_GETLK: {}", std::io::Error::last_os_error());
    }
    Ok((i32::from(fl.l_type), fl.l_start, fl.l_len))
}

/// `flock(1)` with `args` on `path` running `cmd`, in a process group of its own.
fn flock_cmd(path: &Path, args: &[&str], cmd: &str) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    Ok(Command::new("flock")
        .args(args)
        .arg(path)
        .args(["-c", cmd])
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()?)
}

/// Kills `child`'s whole process group (flock(1) and the command it runs) and reaps it.
fn kill_group(child: &mut Child) {
    // SAFETY: signalling the process group our child leads.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

/// Waits until `child` sleeps in a FUSE lock request (its lock waits at the leader), as
/// its kernel stack shows (the tests run as root), failing if it exits first.
fn wait_blocked_in_fuse(child: &mut Child) -> Result<()> {
    let stack = format!("/proc/{}/stack", child.id());
    wait_until(
        "the locker to wait for the lock",
        Duration::from_secs(10),
        || {
            if let Some(st) = child.try_wait()? {
                bail!("the locker exited ({st:?}) instead of waiting");
            }
            Ok(fs::read_to_string(&stack)?.contains("fuse_setlk"))
        },
    )
}

fn wait_exit(child: &mut Child, what: &str, within: Duration) -> Result<std::process::ExitStatus> {
    let mut status = None;
    wait_until(what, within, || {
        status = child.try_wait()?;
        Ok(status.is_some())
    })?;
    status.context("exit status")
}

#[test]
fn fcntl_and_flock_locks_exclude_processes_on_different_mounts() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let p = c.path("f");
    fs::write(&p, b"shared")?;

    // POSIX locks: ranges, the holder reported, shared read locks, release at close.
    let here = open_rw(&p)?;
    let there = open_rw(&a.join("f"))?;
    fcntl_lock(&here, libc::F_WRLCK, 0, 100)?;
    ensure!(
        errno(fcntl_lock(&there, libc::F_WRLCK, 50, 10)) == libc::EAGAIN,
        "an overlapping write lock from the other mount is refused"
    );
    ensure!(
        getlk(&there, 0, 200)? == (libc::F_WRLCK, 0, 100),
        "F_GETLK names the holder's range: {:?}",
        getlk(&there, 0, 200)?
    );
    fcntl_lock(&there, libc::F_WRLCK, 100, 10).context("a disjoint range")?;
    fcntl_lock(&here, libc::F_RDLCK, 0, 100).context("downgrade")?;
    fcntl_lock(&there, libc::F_RDLCK, 0, 50).context("readers share")?;
    ensure!(getlk(&here, 0, 50)?.0 == libc::F_RDLCK, "the other reader");
    fcntl_lock(&there, libc::F_UNLCK, 0, 0)?;
    // Closing any descriptor of the file drops the process's locks on it (on that mount).
    drop(File::open(&p)?);
    fcntl_lock(&there, libc::F_WRLCK, 0, 0).context("after the holder's close")?;
    ensure!(
        errno(fcntl_lock(&here, libc::F_WRLCK, 5, 1)) == libc::EAGAIN,
        "now the other way round"
    );
    drop(there);
    fcntl_lock(&here, libc::F_WRLCK, 0, 0).context("after the other close")?;
    drop(here);

    // flock: exclusive between open files, given up at the last close.
    let g1 = File::open(&p)?;
    let g2 = File::open(a.join("f"))?;
    flock(&g1, libc::LOCK_EX | libc::LOCK_NB)?;
    ensure!(
        errno(flock(&g2, libc::LOCK_EX | libc::LOCK_NB)) == libc::EWOULDBLOCK,
        "flock from the other mount waits"
    );
    ensure!(errno(flock(&g2, libc::LOCK_SH | libc::LOCK_NB)) == libc::EWOULDBLOCK);
    drop(g1);
    wait_until(
        "the closed file's flock to go",
        Duration::from_secs(10),
        || Ok(flock(&g2, libc::LOCK_EX | libc::LOCK_NB).is_ok()),
    )?;

    // A blocked locker gets the lock as soon as it is given up.
    let mut waiter = flock_cmd(&p, &["-x"], "true")?;
    wait_blocked_in_fuse(&mut waiter)?;
    let given_up = Instant::now();
    drop(g2);
    ensure!(wait_exit(&mut waiter, "the waiter", Duration::from_secs(20))?.success());
    println!("handover_ms={}", given_up.elapsed().as_millis());

    // Waits end with the waiter's signals: a timeout (SIGALRM), SIGTERM and SIGKILL.
    let holder = File::open(&p)?;
    flock(&holder, libc::LOCK_EX)?;
    let t0 = Instant::now();
    let mut timed = flock_cmd(&a.join("f"), &["-x", "-w", "1"], "true")?;
    let st = wait_exit(&mut timed, "flock -w 1", Duration::from_secs(20))?;
    ensure!(st.code() == Some(1), "flock -w gives up: {st:?}");
    ensure!(
        t0.elapsed() >= Duration::from_secs(1),
        "not before its timeout"
    );
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let mut w = flock_cmd(&a.join("f"), &["-x"], "true")?;
        wait_blocked_in_fuse(&mut w)?;
        // SAFETY: signalling our own child.
        unsafe { libc::kill(w.id() as i32, signal) };
        let st = wait_exit(&mut w, "a signalled waiter", Duration::from_secs(10))?;
        ensure!(!st.success(), "signal {signal}: {st:?}");
    }
    // None of them took the lock on its way out.
    ensure!(
        errno(flock(
            &File::open(a.join("f"))?,
            libc::LOCK_EX | libc::LOCK_NB
        )) != 0
    );
    drop(holder);
    Ok(())
}

#[test]
fn a_counter_and_a_database_shared_by_two_mounts_lose_no_update() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::write(c.path("ctr"), b"0\n")?;
    // Read, add one, write back under flock(1), from both mounts at once: the reader must
    // see the other mount's write even while its own flock(1) keeps the file open.
    let rounds = 100;
    let bump = |dir: &Path| -> Result<Child> {
        let f = dir.join("ctr");
        let script = format!(
            "for i in $(seq {rounds}); do flock -x {f} -c 'n=$(cat {f}); echo $((n+1)) > {f}' \
             || exit 1; done",
            f = f.display()
        );
        Ok(Command::new("sh").args(["-c", &script]).spawn()?)
    };
    let mut workers = [bump(&c.mnt)?, bump(a.path())?];
    for w in &mut workers {
        let st = wait_exit(w, "the counter loops", Duration::from_secs(300))?;
        ensure!(st.success(), "counter loop: {st:?}");
    }
    let total = fs::read_to_string(a.join("ctr"))?;
    ensure!(total.trim() == "200", "counter: {total:?}, want 200");

    // sqlite3 processes on both mounts insert into one database at once.
    let db = c.path("shared.db");
    sh(
        &c.mnt,
        "sqlite3 shared.db 'create table t(who text, n int)'",
    )?;
    let inserts = |dir: &Path, who: &str| -> Result<Child> {
        let script = format!(
            "for i in $(seq 60); do sqlite3 -cmd '.timeout 60000' {db} \
             \"insert into t values('{who}', $i)\" || exit 1; done",
            db = dir.join("shared.db").display()
        );
        Ok(Command::new("sh").args(["-c", &script]).spawn()?)
    };
    let mut writers = [inserts(&c.mnt, "main")?, inserts(a.path(), "a")?];
    for w in &mut writers {
        let st = wait_exit(w, "the sqlite writers", Duration::from_secs(300))?;
        ensure!(st.success(), "sqlite writer: {st:?}");
    }
    let out = sh(
        a.path(),
        "sqlite3 shared.db \"select who, count(distinct n) from t group by who order by who; \
         pragma integrity_check;\"",
    )?;
    ensure!(out == "a|60\nmain|60\nok\n", "database: {out:?}");
    ensure!(db.exists());
    Ok(())
}

#[test]
fn a_dead_mounts_locks_come_free_and_a_failover_keeps_the_rest() -> Result<()> {
    let mut c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let p = c.path("f");
    fs::write(&p, b"x")?;
    fs::write(c.path("g"), b"y")?;

    // This mount holds a lock across a leader's kill -9.
    let held = open_rw(&c.path("g"))?;
    fcntl_lock(&held, libc::F_WRLCK, 0, 0)?;
    let (leader, term) = c.wait_leader(Duration::from_secs(30), 0, None)?;
    c.kill9("metadata", leader)?;
    c.wait_leader(Duration::from_secs(30), term + 1, Some(leader))?;
    let other = open_rw(&a.join("g"))?;
    ensure!(
        errno(fcntl_lock(&other, libc::F_WRLCK, 0, 1)) == libc::EAGAIN,
        "the new leader still knows the lock"
    );
    fcntl_lock(&held, libc::F_UNLCK, 0, 0)?;
    fcntl_lock(&other, libc::F_WRLCK, 0, 1).context("given up after the failover")?;
    drop(other);

    // Mount a takes a lock and dies without giving it back.
    let mut holder = flock_cmd(&a.join("f"), &["-x"], "sleep 600")?;
    let mine = File::open(&p)?;
    wait_until("mount a's flock", Duration::from_secs(10), || {
        if flock(&mine, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return Ok(true);
        }
        // Got it first: give it back for flock(1) to take.
        flock(&mine, libc::LOCK_UN)?;
        Ok(false)
    })?;
    // And one on a file nobody else asked about: its locks are still delegated to mount a
    // (decided there, not at the leader) when it dies.
    fs::write(c.path("h"), b"z")?;
    let marker = std::env::temp_dir().join(format!("rawfs-locks-{}-h", std::process::id()));
    let _ = fs::remove_file(&marker);
    let cmd = format!("touch {}; sleep 600", marker.display());
    let mut delegated = flock_cmd(&a.join("h"), &["-x"], &cmd)?;
    wait_until("mount a's flock of h", Duration::from_secs(10), || {
        Ok(marker.exists())
    })?;
    let t0 = Instant::now();
    // SAFETY: killing the extra mount's helper process.
    unsafe { libc::kill(a.pid() as i32, libc::SIGKILL) };
    let h = File::open(c.path("h"))?;
    ensure!(
        errno(flock(&h, libc::LOCK_EX | libc::LOCK_NB)) == libc::EWOULDBLOCK,
        "a dead mount's delegated lock still stands"
    );
    wait_until(
        "the dead mount's locks to come free",
        Duration::from_secs(40),
        || {
            Ok(flock(&mine, libc::LOCK_EX | libc::LOCK_NB).is_ok()
                && flock(&h, libc::LOCK_EX | libc::LOCK_NB).is_ok())
        },
    )?;
    println!("dead_mount_lock_free_ms={}", t0.elapsed().as_millis());
    kill_group(&mut holder);
    kill_group(&mut delegated);
    let _ = fs::remove_file(&marker);
    Ok(())
}
