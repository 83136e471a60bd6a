//! Held directories (delegated creates, mount.rawfs(8) `delegate`): a mount answers creates
//! in a directory it made on its own and commits them in batches. Another mount must still
//! see every file as soon as it looks; what was fsynced survives the holder's SIGKILL.

use anyhow::{ensure, Context, Result};
use rawfs_integration::fsutil::{pattern, utimensat, write_and_close};
use rawfs_integration::harness::{pid_alive, wait_until};
use rawfs_integration::Cluster;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

fn names(dir: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        out.insert(e?.file_name().to_string_lossy().into_owned());
    }
    Ok(out)
}

#[test]
fn another_mount_sees_every_create_of_a_held_directory() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let b = c.path("");
    fs::create_dir(a.join("d"))?;
    let mut want = BTreeSet::new();
    for i in 0..500u64 {
        let name = format!("f{i:03}");
        let mut f = File::create(a.join(&format!("d/{name}")))?;
        if i % 50 == 0 {
            f.write_all(&pattern(i, 0, 10_000))?;
        }
        want.insert(name);
    }
    // The other mount's first look recalls the directory: everything is there at once.
    ensure!(names(&b.join("d"))? == want, "listing from the other mount");
    for i in (0..500u64).step_by(50) {
        let got = fs::read(b.join(format!("d/f{i:03}")))?;
        ensure!(got == pattern(i, 0, 10_000), "data of f{i:03}");
    }
    // Handed back: each mount now sees the other's changes.
    File::create(b.join("d/from_b"))?;
    ensure!(
        a.join("d/from_b").exists(),
        "the holder sees the other mount's create"
    );
    fs::remove_file(a.join("d/f000"))?;
    ensure!(!b.join("d/f000").exists(), "unlink through the first mount");

    // A file created held and still open is protected like any open file: an unlink by
    // the other mount leaves it readable through the descriptor.
    fs::create_dir(a.join("open"))?;
    let mut f = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(a.join("open/f"))?;
    f.write_all(b"still here")?;
    fs::remove_file(b.join("open/f"))?;
    ensure!(!a.join("open/f").exists(), "gone from the namespace");
    let mut got = String::new();
    f.read_to_string(&mut got)?;
    ensure!(got.is_empty(), "read at the end of what was written");
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 0)?;
    ensure!(&buf == b"still here", "the unlinked file's data");
    drop(f);

    // O_EXCL on a held name, and a non-exclusive open of one.
    fs::create_dir(a.join("x"))?;
    File::create(a.join("x/f"))?;
    let again = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(a.join("x/f"));
    ensure!(
        again.as_ref().err().map(|e| e.kind()) == Some(ErrorKind::AlreadyExists),
        "O_EXCL on an existing name: {again:?}"
    );
    fs::write(a.join("x/f"), b"second open")?;
    ensure!(fs::read(b.join("x/f"))? == b"second open", "rewritten file");

    // Unlinks and renames in a held directory are made there too, in order with the
    // creates: the other mount sees the result, and an open file renamed over or unlinked
    // stays readable through its descriptor.
    fs::create_dir(a.join("u"))?;
    for i in 0..100 {
        File::create(a.join(&format!("u/f{i:02}")))?;
    }
    let mut kept = File::create(a.join("u/kept"))?;
    kept.write_all(b"kept data")?;
    let reader = File::open(a.join("u/kept"))?;
    for i in 0..50 {
        fs::rename(a.join(&format!("u/f{i:02}")), a.join(&format!("u/r{i:02}")))?;
    }
    for i in 50..100 {
        fs::remove_file(a.join(&format!("u/f{i:02}")))?;
    }
    fs::rename(a.join("u/r00"), a.join("u/kept"))?;
    ensure!(
        fs::remove_file(a.join("u/nothing")).map_err(|e| e.kind()) == Err(ErrorKind::NotFound),
        "unlink of a missing name"
    );
    // A link gives the directory back first; the leader refuses the taken name.
    let taken = fs::hard_link(a.join("u/r01"), a.join("u/r02"));
    ensure!(taken.is_err(), "link over an existing name");
    let mut want: BTreeSet<String> = (1..50).map(|i| format!("r{i:02}")).collect();
    want.insert("kept".into());
    ensure!(names(&a.join("u"))? == want, "listing on the holder");
    ensure!(names(&b.join("u"))? == want, "listing from the other mount");
    ensure!(
        fs::metadata(b.join("u/kept"))?.len() == 0,
        "kept is the renamed empty file"
    );
    let mut buf = [0u8; 9];
    reader.read_exact_at(&mut buf, 0)?;
    ensure!(
        &buf == b"kept data",
        "the replaced file, still open, keeps its data"
    );
    drop((kept, reader));
    Ok(())
}

#[test]
fn a_held_directory_stays_held_across_its_subdirectories() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let b = c.path("");
    // A tree made the way tar and cp -r make it: files, a subdirectory, more files, files
    // in the subdirectory, owner and mode set right after each create.
    fs::create_dir(a.join("t"))?;
    let mut want = BTreeSet::new();
    for (i, name) in ["f1", "sub", "f2", "f3"].iter().enumerate() {
        if *name == "sub" {
            fs::create_dir(a.join("t/sub"))?;
        } else {
            let mut f = File::create(a.join(&format!("t/{name}")))?;
            f.write_all(&pattern(i as u64, 0, 5000))?;
            std::os::unix::fs::fchown(&f, Some(1234), Some(5678))?;
            f.set_permissions(fs::Permissions::from_mode(0o4750))?;
        }
        want.insert(name.to_string());
    }
    fs::write(a.join("t/sub/inner"), b"inner")?;
    // The holder refuses what the leader would: unlink of a directory, a file renamed over
    // it, a mkdir of a taken name; a rename of the subdirectory goes through the leader.
    let kind = |r: std::io::Result<()>| r.map_err(|e| e.raw_os_error());
    ensure!(
        kind(fs::remove_file(a.join("t/sub"))) == Err(Some(libc::EISDIR)),
        "unlink of a subdirectory"
    );
    ensure!(
        kind(fs::rename(a.join("t/f3"), a.join("t/sub"))) == Err(Some(libc::EISDIR)),
        "a file renamed over a subdirectory"
    );
    ensure!(
        kind(fs::create_dir(a.join("t/f1"))) == Err(Some(libc::EEXIST)),
        "mkdir of a file's name"
    );
    fs::rename(a.join("t/sub"), a.join("t/moved"))?;
    want.remove("sub");
    want.insert("moved".into());
    File::create(a.join("t/f4"))?;
    want.insert("f4".into());
    ensure!(names(&a.join("t"))? == want, "listing on the holder");
    ensure!(names(&b.join("t"))? == want, "listing from the other mount");
    ensure!(
        fs::read(b.join("t/moved/inner"))? == b"inner",
        "file in the subdirectory"
    );
    ensure!(
        fs::metadata(b.join("t"))?.nlink() == 3,
        "the subdirectory's link"
    );
    for (i, name) in [(0, "f1"), (2, "f2"), (3, "f3")] {
        let p = b.join(format!("t/{name}"));
        let m = fs::metadata(&p)?;
        ensure!(
            (m.uid(), m.gid(), m.mode() & 0o7777) == (1234, 5678, 0o4750),
            "{name}: owner and mode set after the create: {} {} {:o}",
            m.uid(),
            m.gid(),
            m.mode()
        );
        ensure!(fs::read(&p)? == pattern(i, 0, 5000), "{name}: data");
    }
    Ok(())
}

#[test]
fn attributes_set_in_a_held_directory_are_what_every_mount_sees() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::{Duration as D, SystemTime};
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let b = c.path("");
    fs::create_dir(a.join("t"))?;
    let old = SystemTime::UNIX_EPOCH + D::from_secs(1_600_000_000);
    // As tar does: data, then times, owner and mode through the descriptor; the times
    // outlast the data's own commit, and later changes of one file stack up.
    for i in 0..20u64 {
        let p = a.join(&format!("t/f{i}"));
        let mut f = File::create(&p)?;
        f.write_all(&pattern(i, 0, 3000))?;
        f.set_modified(old + D::from_secs(i))?;
        std::os::unix::fs::fchown(&f, Some(100 + i as u32), Some(200))?;
        f.set_permissions(fs::Permissions::from_mode(0o640))?;
        drop(f);
        if i % 2 == 0 {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
        }
    }
    // A file renamed after its changes, and one unlinked while open and changed after.
    fs::rename(a.join("t/f1"), a.join("t/g1"))?;
    let open = File::open(a.join("t/f3"))?;
    fs::remove_file(a.join("t/f3"))?;
    open.set_permissions(fs::Permissions::from_mode(0o444))?;
    ensure!(
        open.metadata()?.mode() & 0o777 == 0o444,
        "the unlinked file's mode"
    );
    drop(open);
    // A file with a change queued, then unlinked while open: its descriptor says so.
    fs::write(a.join("t/h"), b"h")?;
    let h = File::open(a.join("t/h"))?;
    fs::set_permissions(a.join("t/h"), fs::Permissions::from_mode(0o604))?;
    fs::remove_file(a.join("t/h"))?;
    let m = h.metadata()?;
    ensure!(
        (m.nlink(), m.mode() & 0o777) == (0, 0o604),
        "unlinked with a change queued: nlink {} mode {:o}",
        m.nlink(),
        m.mode()
    );
    drop(h);
    for mnt in [a.join("t"), b.join("t")] {
        for i in (0..20u64).filter(|i| *i != 3) {
            let name = if i == 1 {
                "g1".to_string()
            } else {
                format!("f{i}")
            };
            let p = mnt.join(&name);
            let m = fs::metadata(&p)?;
            let mode = if i % 2 == 0 { 0o600 } else { 0o640 };
            ensure!(
                (m.mode() & 0o7777, m.uid(), m.gid()) == (mode, 100 + i as u32, 200),
                "{}: mode {:o} owner {}:{}",
                p.display(),
                m.mode(),
                m.uid(),
                m.gid()
            );
            ensure!(
                m.modified()? == old + D::from_secs(i),
                "{}: mtime",
                p.display()
            );
            let got = fs::read(&p)?;
            let want = pattern(i, 0, 3000);
            ensure!(
                got == want,
                "{}: data: {} bytes, first wrong at {:?}",
                p.display(),
                got.len(),
                got.iter().zip(&want).position(|(g, w)| g != w)
            );
        }
        ensure!(!mnt.join("f3").exists(), "f3 unlinked");
    }
    Ok(())
}

/// What `ls -l`, `tar x` and `rm -rf` do to a tree made here, which the holder lists,
/// re-times and removes without giving its directories back (readdir_held, the
/// directory's own setattr queued, rmdir_held): each mount sees the same sizes, times,
/// modes and entries.
#[test]
fn a_tree_made_here_is_listed_retimed_and_removed_alike_on_every_mount() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::{Duration as D, SystemTime};
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let b = c.path("");
    let len = |i: u64| 1 + (i as usize * 7919) % 300_000;
    for d in ["t", "t/s1", "t/s2", "t/s2/deep"] {
        fs::create_dir(a.join(d))?;
        for i in 0..30u64 {
            fs::write(a.join(&format!("{d}/f{i:02}")), pattern(i, 0, len(i)))?;
        }
    }
    // Listed by the holder right after the closes: whole sizes, from the leader.
    let listing = |dir: &Path| -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let size = if e.file_type()?.is_dir() {
                0
            } else {
                e.metadata()?.len()
            };
            out.push((e.file_name().to_string_lossy().into_owned(), size));
        }
        out.sort();
        Ok(out)
    };
    let mut want: Vec<_> = (0..30u64)
        .map(|i| (format!("f{i:02}"), len(i) as u64))
        .collect();
    want.push(("deep".into(), 0));
    want.sort();
    ensure!(listing(&a.join("t/s2"))? == want, "the holder's listing");
    // As tar does on leaving each directory: its times and mode, then more work in it.
    let old = SystemTime::UNIX_EPOCH + D::from_secs(1_500_000_000);
    File::open(a.join("t/s1"))?.set_modified(old)?;
    fs::set_permissions(a.join("t/s2"), fs::Permissions::from_mode(0o750))?;
    fs::write(a.join("t/s2/late"), b"late")?;
    want.push(("late".into(), 4));
    want.sort();
    ensure!(
        listing(&a.join("t/s2"))? == want,
        "listed again by the holder"
    );
    ensure!(
        listing(&b.join("t/s2"))? == want,
        "listed by the other mount"
    );
    // A directory's own attributes are queued with its changes, which other mounts see
    // once committed (within the commit interval; at once after an fsync of it).
    File::open(a.join("t/s1"))?.sync_all()?;
    for mnt in [&a.join(""), &b] {
        let s1 = fs::metadata(mnt.join("t/s1"))?;
        ensure!(s1.modified()? == old, "{}: t/s1 mtime", mnt.display());
        let s2 = fs::metadata(mnt.join("t/s2"))?;
        ensure!(
            (s2.mode() & 0o7777, s2.nlink()) == (0o750, 3),
            "{}: t/s2 mode {:o} nlink {}",
            mnt.display(),
            s2.mode(),
            s2.nlink()
        );
    }
    // rmdir as the holder: errors the leader would give, then a whole subtree.
    let err = |r: std::io::Result<()>| r.map_err(|e| e.raw_os_error());
    ensure!(
        err(fs::remove_dir(a.join("t/s1"))) == Err(Some(libc::ENOTEMPTY)),
        "rmdir of a full directory"
    );
    ensure!(
        err(fs::remove_dir(a.join("t/f00"))) == Err(Some(libc::ENOTDIR)),
        "rmdir of a file"
    );
    ensure!(
        err(fs::remove_dir(a.join("t/none"))) == Err(Some(libc::ENOENT)),
        "rmdir of nothing"
    );
    fs::remove_dir_all(a.join("t/s1"))?;
    fs::remove_dir_all(a.join("t/s2/deep"))?;
    fs::write(a.join("t/after"), b"after")?;
    for mnt in [&a.join(""), &b] {
        let mut names: Vec<_> = (0..30u64).map(|i| format!("f{i:02}")).collect();
        names.extend(["after".to_string(), "s2".to_string()]);
        ensure!(
            self::names(&mnt.join("t"))? == names.into_iter().collect(),
            "{}: t after the removals",
            mnt.display()
        );
        ensure!(
            fs::metadata(mnt.join("t"))?.nlink() == 3,
            "{}: t's links",
            mnt.display()
        );
        ensure!(!mnt.join("t/s2/deep").exists(), "{}: deep", mnt.display());
    }
    fs::remove_dir_all(b.join("t"))?;
    ensure!(!a.join("t").exists(), "removed by the other mount");
    Ok(())
}

#[test]
fn fsynced_creates_survive_a_killed_holder() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::create_dir(a.join("d"))?;
    for i in 0..100 {
        File::create(a.join(&format!("d/f{i:03}")))?;
    }
    let f = File::create(a.join("d/synced"))?;
    f.sync_all()?;
    for i in 0..50 {
        File::create(a.join(&format!("d/late{i:03}")))?;
    }
    let pid = a.pid();
    // SAFETY: kill(2) on a child process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until("the holder to die", Duration::from_secs(10), || {
        Ok(!pid_alive(pid))
    })?;
    // The other mount's listing waits for the dead holder's recall, then the leader
    // takes the directory back: what was fsynced (and everything created before it) is
    // there.
    let seen = names(&c.path("d"))?;
    for i in 0..100 {
        ensure!(seen.contains(&format!("f{i:03}")), "f{i:03} lost: {seen:?}");
    }
    ensure!(seen.contains("synced"), "the fsynced file was lost");
    File::create(c.path("d/after"))?;
    ensure!(
        c.path("d/after").exists(),
        "the directory takes creates again"
    );
    Ok(())
}

#[test]
fn new_files_written_in_a_held_directory_keep_data_size_and_times() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    use std::time::SystemTime;
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::create_dir(a.join("d"))?;
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let len = |i: u64| 1000 + i as usize * 300;
    for i in 0..30u64 {
        // As `tar x` does: the data, then mode and times, then close. The write's commit
        // waits in the directory's queue; the holder answers for the file at once.
        let p = a.join(&format!("d/f{i:02}"));
        let mut f = File::create(&p)?;
        f.write_all(&pattern(i, 0, len(i)))?;
        f.set_permissions(fs::Permissions::from_mode(0o640))?;
        f.set_modified(when)?;
        drop(f);
        let m = fs::metadata(&p)?;
        ensure!(
            m.len() == len(i) as u64 && m.modified()? == when,
            "f{i:02} as its holder sees it: {m:?}"
        );
    }
    // The other mount's look recalls the directory and its queue: every file whole.
    for i in 0..30u64 {
        let p = c.path(&format!("d/f{i:02}"));
        let m = fs::metadata(&p)?;
        ensure!(
            m.len() == len(i) as u64
                && m.modified()? == when
                && m.permissions().mode() & 0o777 == 0o640,
            "f{i:02} as the other mount sees it: {m:?}"
        );
        ensure!(fs::read(&p)? == pattern(i, 0, len(i)), "data of f{i:02}");
    }
    // A file closed and then fsynced through another descriptor survives its holder.
    fs::create_dir(a.join("e"))?;
    fs::write(a.join("e/synced"), pattern(99, 0, 5000))?;
    File::open(a.join("e/synced"))?.sync_all()?;
    let pid = a.pid();
    // SAFETY: kill(2) on a child process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_until("the holder to die", Duration::from_secs(10), || {
        Ok(!pid_alive(pid))
    })?;
    ensure!(
        fs::read(c.path("e/synced"))? == pattern(99, 0, 5000),
        "the fsynced file after its holder's SIGKILL"
    );
    Ok(())
}

/// What `rsync` does for each file, and what editors and build tools do: a file written and
/// closed (its data goes behind the close), then perhaps its times set (through a new
/// writable descriptor or by path) and its mode through a new read-only descriptor, then
/// read back. Whatever is asked of the leader meanwhile, the holder sees the whole file at
/// once (a file reopened right after its close once read as empty, or with size 0), and
/// the times outlast the data's own commit, on the holder and on another mount.
#[test]
fn a_file_reopened_right_after_close_is_whole_and_keeps_its_times() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    use std::time::SystemTime;
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::create_dir(a.join("d"))?;
    // (times through a writable descriptor, times by path, mode through the reader)
    let ways = [
        (false, false, false),
        (true, false, false),
        (true, false, true),
        (false, true, true),
        (false, false, true),
        (false, true, false),
    ];
    let per_way = 20;
    let files = (ways.len() * per_way) as u64;
    let way = |i: u64| ways[i as usize / per_way];
    let when = |i: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(1_500_000_000 + i * 7);
    let len = |i: u64| 3000 + i as usize * 100;
    let want_mode = |i: u64| if way(i).2 { 0o644 } else { 0o600 };
    for i in 0..files {
        let (by_fd, by_path, chmod) = way(i);
        let p = a.join(&format!("d/f{i:03}"));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)?;
        f.write_all(&pattern(i, 0, len(i)))?;
        drop(f);
        if by_fd {
            File::options()
                .write(true)
                .open(&p)?
                .set_modified(when(i))?;
        }
        if by_path {
            let t = libc::timespec {
                tv_sec: when(i).duration_since(SystemTime::UNIX_EPOCH)?.as_secs() as i64,
                tv_nsec: 0,
            };
            utimensat(&p, [t, t])?;
        }
        let mut ro = File::open(&p)?;
        if chmod {
            ro.set_permissions(fs::Permissions::from_mode(0o644))?;
        }
        let m = ro.metadata()?;
        let mut got = Vec::new();
        ro.read_to_end(&mut got)?;
        ensure!(
            m.len() == len(i) as u64
                && (!(by_fd || by_path) || m.modified()? == when(i))
                && m.mode() & 0o777 == want_mode(i),
            "f{i:03} through its descriptor on the holder: {m:?}"
        );
        ensure!(
            got == pattern(i, 0, len(i)),
            "f{i:03} read on the holder right after its close: {} bytes",
            got.len()
        );
    }
    for (who, root) in [("holder", a.join("d")), ("other mount", c.path("d"))] {
        for i in 0..files {
            let p = root.join(format!("f{i:03}"));
            let m = fs::metadata(&p)?;
            let (by_fd, by_path, _) = way(i);
            ensure!(
                m.len() == len(i) as u64
                    && (!(by_fd || by_path) || m.modified()? == when(i))
                    && m.mode() & 0o777 == want_mode(i),
                "f{i:03} as the {who} sees it: {m:?}"
            );
            ensure!(fs::read(&p)? == pattern(i, 0, len(i)), "data of f{i:03}");
        }
    }
    Ok(())
}

#[test]
fn files_closed_by_their_holder_are_whole_when_another_mount_looks_at_once() -> Result<()> {
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::create_dir(a.join("d"))?;
    // Small files are written behind their close (mount.rawfs(8), write-behind); the
    // larger ones, and a file written again after its close, are not, or wait for it.
    let len = |i: u64| match i % 50 {
        0 => (1 << 20) + 4096,
        _ if i >= 280 => 900_000,
        _ => 1 + (i as usize * 7919) % 200_000,
    };
    for i in 0..300u64 {
        fs::write(a.join(&format!("d/f{i:03}")), pattern(i, 0, len(i)))?;
        if i == 1 {
            // Written again at once, while its data may still be on its way.
            let mut again = OpenOptions::new().append(true).open(a.join("d/f001"))?;
            again.write_all(&pattern(1, len(1) as u64, 5000))?;
        }
    }
    // As `tar x` does on leaving a directory: its mode is set right after its last files
    // were closed, which gives the directory back while their data may be on its way.
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir(a.join("d/s"))?;
    for i in 0..20u64 {
        fs::write(
            a.join(&format!("d/s/g{i:02}")),
            pattern(500 + i, 0, 300_000),
        )?;
    }
    fs::set_permissions(a.join("d/s"), fs::Permissions::from_mode(0o750))?;
    for i in 0..20u64 {
        let got = fs::read(c.path(&format!("d/s/g{i:02}")))?;
        ensure!(
            got == pattern(500 + i, 0, 300_000),
            "d/s/g{i:02}: {} bytes",
            got.len()
        );
    }
    // No wait: the other mount's first look (at the file closed last) recalls the
    // directory, and the recall waits for the data of every file closed in it.
    for i in (0..300u64).rev() {
        let p = c.path(&format!("d/f{i:03}"));
        let want = match i {
            1 => pattern(1, 0, len(1) + 5000),
            _ => pattern(i, 0, len(i)),
        };
        let got = fs::read(&p).with_context(|| format!("f{i:03}"))?;
        ensure!(
            got.len() == want.len() && got == want,
            "f{i:03}: {} bytes read, {} written",
            got.len(),
            want.len()
        );
    }
    Ok(())
}

#[test]
fn a_file_whose_data_could_not_be_written_behind_reports_it() -> Result<()> {
    let mut c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    fs::create_dir(a.join("d"))?;
    fs::write(a.join("d/before"), b"fine")?;
    for id in 1..=6 {
        c.kill9("chunkserver", id)?;
    }
    // Its close may return before the data is sent (it is written behind); then the
    // failure comes back from the file's next fsync, and closes stop returning early.
    let p = a.join("d/lost");
    let closed = write_and_close(&p, &pattern(5, 0, 10_000));
    if closed.is_ok() {
        let synced = File::open(&p).and_then(|f| f.sync_all());
        ensure!(
            synced.is_err(),
            "fsync of a file whose data reached no chunkserver succeeded"
        );
        let next = write_and_close(&a.join("d/next"), &pattern(6, 0, 10_000));
        ensure!(
            next.is_err(),
            "a close after a failed write-behind returned before its data was sent"
        );
    }
    Ok(())
}
