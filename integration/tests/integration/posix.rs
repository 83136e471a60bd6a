//! POSIX behaviour of the mount, one operation family per test, with the error codes.

use anyhow::Result;
use rawfs_integration::fsutil::*;
use rawfs_integration::Cluster;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;

#[test]
fn namespace_ops_return_posix_error_codes() -> Result<()> {
    let c = Cluster::start()?;
    let m = &c.mnt;
    fs::write(m.join("a"), b"hello")?;
    assert_eq!(fs::read(m.join("a"))?, b"hello");
    assert_eq!(
        errno(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.join("a"))
        ),
        libc::EEXIST
    );
    assert_eq!(errno(fs::metadata(m.join("missing"))), libc::ENOENT);
    assert_eq!(errno(fs::remove_file(m.join("missing"))), libc::ENOENT);
    assert_eq!(errno(File::open(m.join("missing/x"))), libc::ENOENT);
    // A path through a file.
    assert_eq!(errno(fs::metadata(m.join("a/b"))), libc::ENOTDIR);
    assert_eq!(errno(fs::create_dir(m.join("a/b"))), libc::ENOTDIR);
    assert_eq!(errno(fs::remove_dir(m.join("a"))), libc::ENOTDIR);
    fs::create_dir(m.join("d"))?;
    assert_eq!(errno(fs::create_dir(m.join("d"))), libc::EEXIST);
    assert_eq!(errno(fs::remove_file(m.join("d"))), libc::EISDIR);
    assert_eq!(
        errno(OpenOptions::new().write(true).open(m.join("d"))),
        libc::EISDIR
    );
    fs::write(m.join("d/x"), b"")?;
    assert_eq!(errno(fs::remove_dir(m.join("d"))), libc::ENOTEMPTY);
    fs::remove_file(m.join("d/x"))?;
    fs::remove_dir(m.join("d"))?;
    assert_eq!(errno(fs::metadata(m.join("d"))), libc::ENOENT);

    // Names of 255 bytes work, 256 do not.
    let long = "n".repeat(255);
    fs::write(m.join(&long), b"x")?;
    assert_eq!(fs::read(m.join(&long))?, b"x");
    assert!(fs::read_dir(m)?.any(|e| e.map(|e| e.file_name() == long.as_str()).unwrap_or(false)));
    assert_eq!(
        errno(fs::write(m.join("n".repeat(256)), b"")),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno(fs::create_dir(m.join("m".repeat(256)))),
        libc::ENAMETOOLONG
    );

    // Renaming out of the filesystem is EXDEV.
    assert_eq!(
        errno(fs::rename(m.join("a"), c.scratch().join("a"))),
        libc::EXDEV
    );

    // Listing a directory larger than one readdir batch.
    fs::create_dir(m.join("many"))?;
    for i in 0..300 {
        File::create(m.join(format!("many/f{i:04}")))?;
    }
    let mut names: Vec<String> = fs::read_dir(m.join("many"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let want: Vec<String> = (0..300).map(|i| format!("f{i:04}")).collect();
    assert_eq!(names, want);
    Ok(())
}

#[test]
fn setattr_changes_mode_owner_times_and_size() -> Result<()> {
    let c = Cluster::start()?;
    let p = c.path("f");
    fs::write(&p, b"0123456789")?;
    let before = fs::metadata(&p)?;
    assert_eq!(before.len(), 10);
    assert_eq!(before.uid(), 0);

    fs::set_permissions(&p, fs::Permissions::from_mode(0o640))?;
    assert_eq!(fs::metadata(&p)?.mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&p, Some(1000), Some(1001))?;
    let md = fs::metadata(&p)?;
    assert_eq!((md.uid(), md.gid()), (1000, 1001));

    // Nanosecond timestamps survive.
    let times = [
        libc::timespec {
            tv_sec: 1_000_000_000,
            tv_nsec: 123_456_789,
        },
        libc::timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 987_654_321,
        },
    ];
    let cp = cpath(&p);
    utimensat(&p, times)?;
    let md = fs::metadata(&p)?;
    assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));

    // Truncate down and up: the regrown part reads as zeros.
    let f = OpenOptions::new().write(true).open(&p)?;
    f.set_len(4)?;
    assert_eq!(fs::read(&p)?, b"0123");
    f.set_len(8)?;
    assert_eq!(fs::read(&p)?, b"0123\0\0\0\0");
    drop(f);
    // Truncating set mtime to now; a write moves it forward again (nanoseconds count).
    let md = fs::metadata(&p)?;
    assert!(md.mtime() > 1_500_000_000, "truncate updates mtime");
    let old = (md.mtime(), md.mtime_nsec());
    fs::write(&p, b"new")?;
    let md = fs::metadata(&p)?;
    assert!((md.mtime(), md.mtime_nsec()) > old, "a write updates mtime");

    // As on Linux filesystems: ftruncate to the same size still stamps mtime and ctime,
    // and chown to -1, -1 stamps ctime.
    let stamp = |m: &fs::Metadata| ((m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec()));
    let (m0, c0) = stamp(&fs::metadata(&p)?);
    OpenOptions::new().write(true).open(&p)?.set_len(3)?;
    let (m1, c1) = stamp(&fs::metadata(&p)?);
    assert!(
        m1 > m0 && c1 > c0,
        "same-size ftruncate: {m0:?} {c0:?} -> {m1:?} {c1:?}"
    );
    // SAFETY: valid path; -1 (as uid_t/gid_t) leaves owner and group as they are.
    assert_eq!(unsafe { libc::chown(cp.as_ptr(), u32::MAX, u32::MAX) }, 0);
    let (m2, c2) = stamp(&fs::metadata(&p)?);
    assert!(
        m2 == m1 && c2 > c1,
        "chown -1 -1: ctime {c1:?} -> {c2:?}, mtime kept"
    );

    // Times before 1970 keep their nanoseconds (-1.5 s is -2 s + 0.5 s).
    let old_times = [
        libc::timespec {
            tv_sec: -2,
            tv_nsec: 500_000_000,
        },
        libc::timespec {
            tv_sec: -100,
            tv_nsec: 1,
        },
    ];
    utimensat(&p, old_times)?;
    let md = fs::metadata(&p)?;
    assert_eq!((md.atime(), md.atime_nsec()), (-2, 500_000_000));
    assert_eq!((md.mtime(), md.mtime_nsec()), (-100, 1));
    Ok(())
}

#[test]
fn rename_replaces_and_honours_noreplace_and_exchange() -> Result<()> {
    let c = Cluster::start()?;
    let m = &c.mnt;
    fs::write(m.join("a"), b"A")?;
    fs::write(m.join("b"), b"B")?;
    fs::rename(m.join("a"), m.join("b"))?;
    assert_eq!(fs::read(m.join("b"))?, b"A");
    assert_eq!(errno(fs::metadata(m.join("a"))), libc::ENOENT);

    fs::create_dir_all(m.join("d1/sub"))?;
    fs::create_dir(m.join("d2"))?;
    fs::write(m.join("d1/sub/f"), b"F")?;
    fs::rename(m.join("d1/sub"), m.join("d2/moved"))?;
    assert_eq!(fs::read(m.join("d2/moved/f"))?, b"F");
    // Directory over a non-empty directory, file over directory, directory over file.
    fs::create_dir(m.join("e"))?;
    assert_eq!(
        errno(fs::rename(m.join("e"), m.join("d2"))),
        libc::ENOTEMPTY
    );
    assert_eq!(errno(fs::rename(m.join("b"), m.join("e"))), libc::EISDIR);
    assert_eq!(errno(fs::rename(m.join("e"), m.join("b"))), libc::ENOTDIR);
    // A directory into its own subtree.
    assert_eq!(
        errno(fs::rename(m.join("d2"), m.join("d2/moved/x"))),
        libc::EINVAL
    );

    fs::write(m.join("x"), b"X")?;
    fs::write(m.join("y"), b"Y")?;
    assert_eq!(
        errno(renameat2(
            &m.join("x"),
            &m.join("y"),
            libc::RENAME_NOREPLACE
        )),
        libc::EEXIST
    );
    renameat2(&m.join("x"), &m.join("z"), libc::RENAME_NOREPLACE)?;
    assert_eq!(fs::read(m.join("z"))?, b"X");
    renameat2(&m.join("y"), &m.join("z"), libc::RENAME_EXCHANGE)?;
    assert_eq!(fs::read(m.join("z"))?, b"Y");
    assert_eq!(fs::read(m.join("y"))?, b"X");
    // Exchange a file with a directory.
    renameat2(&m.join("y"), &m.join("e"), libc::RENAME_EXCHANGE)?;
    assert!(fs::metadata(m.join("y"))?.is_dir());
    assert_eq!(fs::read(m.join("e"))?, b"X");
    assert_eq!(
        errno(renameat2(
            &m.join("z"),
            &m.join("nope"),
            libc::RENAME_EXCHANGE
        )),
        libc::ENOENT
    );
    Ok(())
}

#[test]
fn hard_links_and_symlinks_behave() -> Result<()> {
    let c = Cluster::start()?;
    let m = &c.mnt;
    fs::write(m.join("orig"), b"data")?;
    fs::hard_link(m.join("orig"), m.join("link"))?;
    let (a, b) = (fs::metadata(m.join("orig"))?, fs::metadata(m.join("link"))?);
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.nlink(), 2);
    OpenOptions::new()
        .append(true)
        .open(m.join("link"))?
        .write_all(b"+more")?;
    assert_eq!(fs::read(m.join("orig"))?, b"data+more");
    assert_eq!(
        errno(fs::hard_link(m.join("orig"), m.join("link"))),
        libc::EEXIST
    );
    fs::create_dir(m.join("dir"))?;
    assert_eq!(
        errno(fs::hard_link(m.join("dir"), m.join("dirlink"))),
        libc::EPERM
    );
    fs::remove_file(m.join("orig"))?;
    assert_eq!(fs::metadata(m.join("link"))?.nlink(), 1);
    assert_eq!(fs::read(m.join("link"))?, b"data+more");

    std::os::unix::fs::symlink("link", m.join("sym"))?;
    assert_eq!(fs::read_link(m.join("sym"))?, Path::new("link"));
    assert!(fs::symlink_metadata(m.join("sym"))?
        .file_type()
        .is_symlink());
    assert_eq!(fs::read(m.join("sym"))?, b"data+more");
    std::os::unix::fs::symlink("missing", m.join("dangling"))?;
    assert_eq!(errno(fs::read(m.join("dangling"))), libc::ENOENT);
    assert_eq!(
        errno(std::os::unix::fs::symlink("x", m.join("sym"))),
        libc::EEXIST
    );
    let target = "t/".repeat(2000) + "end";
    std::os::unix::fs::symlink(&target, m.join("longsym"))?;
    assert_eq!(fs::read_link(m.join("longsym"))?, Path::new(&target));
    assert_eq!(errno(fs::read_link(m.join("link"))), libc::EINVAL);
    Ok(())
}

#[test]
fn xattrs_set_get_list_and_remove() -> Result<()> {
    let c = Cluster::start()?;
    let p = c.path("f");
    fs::write(&p, b"")?;
    setxattr(&p, "user.a", b"1", 0)?;
    setxattr(&p, "user.b", &[7u8; 4000], 0)?;
    assert_eq!(getxattr(&p, "user.a")?, b"1");
    assert_eq!(getxattr(&p, "user.b")?, vec![7u8; 4000]);
    let mut names = listxattr(&p)?;
    names.sort();
    assert_eq!(names, ["user.a", "user.b"]);
    assert_eq!(
        errno(setxattr(&p, "user.a", b"2", libc::XATTR_CREATE)),
        libc::EEXIST
    );
    assert_eq!(
        errno(setxattr(&p, "user.c", b"2", libc::XATTR_REPLACE)),
        libc::ENODATA
    );
    setxattr(&p, "user.a", b"22", libc::XATTR_REPLACE)?;
    assert_eq!(getxattr(&p, "user.a")?, b"22");
    removexattr(&p, "user.a")?;
    assert_eq!(errno(getxattr(&p, "user.a")), libc::ENODATA);
    assert_eq!(errno(removexattr(&p, "user.a")), libc::ENODATA);
    assert_eq!(listxattr(&p)?, ["user.b"]);
    let d = c.path("dir");
    fs::create_dir(&d)?;
    setxattr(&d, "user.dir", b"yes", 0)?;
    assert_eq!(getxattr(&d, "user.dir")?, b"yes");
    // A namespace Linux does not know is refused, as local filesystems refuse it.
    assert_eq!(errno(setxattr(&p, "osx.a", b"1", 0)), libc::EOPNOTSUPP);
    assert_eq!(errno(getxattr(&p, "osx.a")), libc::ENODATA);
    setxattr(&p, "trusted.t", b"t", 0)?;
    setxattr(&p, "security.s", b"s", 0)?;
    assert_eq!(getxattr(&p, "trusted.t")?, b"t");
    // Names stop with ENOSPC where listxattr(2) could no longer return them all (64 KiB).
    let many = c.path("many");
    fs::write(&many, b"")?;
    let name = |i: usize| format!("user.{i:0>200}");
    let mut set = 0;
    let refused = loop {
        match setxattr(&many, &name(set), b"", 0) {
            Ok(()) => set += 1,
            Err(e) => break e,
        }
        assert!(set < 1000, "no limit on names");
    };
    assert_eq!(refused.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!(listxattr(&many)?.len(), set, "every name is listed");
    assert!(
        set * 206 <= 65536 && (set + 1) * 206 > 65536,
        "{set} names fit"
    );
    Ok(())
}

#[test]
fn fallocate_punches_holes_and_copy_file_range_copies() -> Result<()> {
    let c = Cluster::start()?;
    let p = c.path("f");
    let data = pattern(1, 0, 3 << 20);
    fs::write(&p, &data)?;
    let f = OpenOptions::new().read(true).write(true).open(&p)?;
    let (off, len) = ((1 << 20) + 100, 500 << 10);
    let before = f.metadata()?;
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )?;
    let mut want = data.clone();
    want[off as usize..(off + len) as usize].fill(0);
    let after = f.metadata()?;
    assert_eq!(after.len(), 3 << 20);
    assert!(
        after.modified()? > before.modified()?
            && (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
        "a punch moves mtime and ctime"
    );
    drop_cache(&f);
    assert_eq!(fs::read(&p)?, want);
    // Plain fallocate extends with zeros.
    fallocate(&f, 0, 3 << 20, 1 << 20)?;
    assert_eq!(f.metadata()?.len(), 4 << 20);
    let mut tail = vec![1u8; 1 << 20];
    f.read_exact_at(&mut tail, 3 << 20)?;
    assert!(tail.iter().all(|b| *b == 0));
    // ZERO_RANGE zeros inside the size; without KEEP_SIZE it also extends.
    f.write_all_at(&[7u8; 8192], 4 << 20)?;
    fallocate(
        &f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        (4 << 20) + 1000,
        100_000,
    )?;
    assert_eq!(f.metadata()?.len(), (4 << 20) + 8192, "KEEP_SIZE keeps it");
    fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 4 << 20, 10_000)?;
    assert_eq!(
        f.metadata()?.len(),
        (4 << 20) + 10_000,
        "grown to the range's end"
    );
    drop_cache(&f);
    let mut zeroed = vec![1u8; 10_000];
    f.read_exact_at(&mut zeroed, 4 << 20)?;
    assert!(
        zeroed.iter().all(|b| *b == 0),
        "zeroed range reads as zeros"
    );

    // A hole punched across a chunk boundary (64 MiB) of a sparse file.
    let s = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(c.path("sparse"))?;
    let edge = 64u64 << 20;
    s.write_all_at(&pattern(2, edge - (1 << 20), 2 << 20), edge - (1 << 20))?;
    s.sync_all()?;
    fallocate(
        &s,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        edge - 4096,
        8192,
    )?;
    let mut got = vec![0u8; 2 << 20];
    drop_cache(&s);
    s.read_exact_at(&mut got, edge - (1 << 20))?;
    let mut want = pattern(2, edge - (1 << 20), 2 << 20);
    want[(1 << 20) - 4096..(1 << 20) + 4096].fill(0);
    assert!(got == want, "punched range across the chunk boundary");

    let dst = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(c.path("copy"))?;
    let mut done = 0;
    while done < (2 << 20) {
        let n = copy_file_range(&f, done as u64, &dst, 4096 + done as u64, (2 << 20) - done)?;
        assert!(n > 0, "copy_file_range made no progress");
        done += n;
    }
    let mut got = vec![0u8; 2 << 20];
    dst.read_exact_at(&mut got, 4096)?;
    assert!(got == want_prefix(&data, off, len), "copied range");

    // Punched whole blocks (4 KiB) are holes again, as is the range fallocate added.
    drop((f, s, dst));
    let f = File::open(&p)?;
    let (hole, data_again) = (off.div_ceil(4096) * 4096, (off + len) / 4096 * 4096);
    assert_eq!(seek(&f, 0, libc::SEEK_HOLE), Ok(hole));
    assert_eq!(seek(&f, hole, libc::SEEK_DATA), Ok(data_again));
    assert_eq!(seek(&f, data_again, libc::SEEK_HOLE), Ok(3 << 20));
    let s = File::open(c.path("sparse"))?;
    assert_eq!(seek(&s, edge - (1 << 20), libc::SEEK_HOLE), Ok(edge - 4096));
    assert_eq!(seek(&s, edge - 4096, libc::SEEK_DATA), Ok(edge + 4096));
    Ok(())
}

fn want_prefix(data: &[u8], hole: u64, len: u64) -> Vec<u8> {
    let mut w = data[..2 << 20].to_vec();
    w[hole as usize..(hole + len) as usize].fill(0);
    w
}

#[test]
fn flock_and_fcntl_locks_conflict_across_opens() -> Result<()> {
    let c = Cluster::start()?;
    let p = c.path("lock");
    fs::write(&p, vec![0u8; 1000])?;
    let f1 = OpenOptions::new().read(true).write(true).open(&p)?;
    let f2 = OpenOptions::new().read(true).write(true).open(&p)?;
    flock(&f1, libc::LOCK_EX | libc::LOCK_NB)?;
    assert_eq!(
        errno(flock(&f2, libc::LOCK_EX | libc::LOCK_NB)),
        libc::EWOULDBLOCK
    );
    flock(&f1, libc::LOCK_UN)?;
    flock(&f2, libc::LOCK_SH | libc::LOCK_NB)?;
    flock(&f1, libc::LOCK_SH | libc::LOCK_NB)?;
    flock(&f2, libc::LOCK_UN)?;
    flock(&f1, libc::LOCK_UN)?;

    fcntl_lock(&f1, libc::F_WRLCK, 0, 100)?;
    let e = fcntl_lock_in_child(&p, 50, 10)?;
    assert!(
        e == libc::EAGAIN || e == libc::EACCES,
        "overlapping lock from another process: errno {e}"
    );
    assert_eq!(
        fcntl_lock_in_child(&p, 200, 100)?,
        0,
        "a disjoint range is free"
    );
    fcntl_lock(&f1, libc::F_UNLCK, 0, 100)?;
    assert_eq!(fcntl_lock_in_child(&p, 50, 10)?, 0, "free after unlock");
    Ok(())
}

#[test]
fn files_past_4gib_are_sparse_and_holes_read_zero() -> Result<()> {
    let c = Cluster::start()?;
    let p = c.path("big");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)?;
    let four = 4u64 << 30;
    f.write_all_at(b"abcd", four - 2)?;
    f.write_all_at(b"tail", (5 << 30) + 3)?;
    f.sync_all()?;
    let md = fs::metadata(&p)?;
    assert_eq!(md.len(), (5 << 30) + 7);
    assert!(
        md.blocks() * 512 < 512 << 20,
        "sparse: {} blocks",
        md.blocks()
    );
    drop_cache(&f);
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, four - 4)?;
    assert_eq!(&buf, b"\0\0abcd\0\0");
    let mut hole = vec![1u8; 1 << 20];
    f.read_exact_at(&mut hole, 3 << 30)?;
    assert!(hole.iter().all(|b| *b == 0));
    f.seek(SeekFrom::Start((5 << 30) + 3))?;
    let mut end = Vec::new();
    f.read_to_end(&mut end)?;
    assert_eq!(end, b"tail");

    // While a handle that may write is open, SEEK_DATA/SEEK_HOLE give the plain answer
    // (pages written through a map may not have reached the mount yet).
    let size = md.len();
    assert_eq!(seek(&f, 7, libc::SEEK_DATA), Ok(7));
    assert_eq!(seek(&f, 7, libc::SEEK_HOLE), Ok(size));
    drop(f);
    // Read-only, they see the blocks (4 KiB) written: "abcd" straddles 4 GiB.
    let f = File::open(&p)?;
    let block = 4096;
    assert_eq!(seek(&f, 0, libc::SEEK_DATA), Ok(four - block));
    assert_eq!(seek(&f, 0, libc::SEEK_HOLE), Ok(0));
    assert_eq!(seek(&f, four - block, libc::SEEK_HOLE), Ok(four + block));
    assert_eq!(seek(&f, four + block, libc::SEEK_DATA), Ok(5 << 30));
    assert_eq!(seek(&f, 5 << 30, libc::SEEK_HOLE), Ok(size));
    assert_eq!(seek(&f, size, libc::SEEK_DATA), Err(libc::ENXIO));
    assert_eq!(seek(&f, size, libc::SEEK_HOLE), Err(libc::ENXIO));
    // So `cp` keeps the copy sparse (it walks the file with SEEK_DATA/SEEK_HOLE).
    let copy = c.scratch().join("big-copy");
    sh(&c.mnt, &format!("cp --sparse=auto big {}", copy.display()))?;
    let cmd = fs::metadata(&copy)?;
    assert_eq!(cmd.len(), size);
    assert!(
        cmd.blocks() * 512 < 1 << 20,
        "copy not sparse: {} blocks",
        cmd.blocks()
    );
    let copied = File::open(&copy)?;
    copied.read_exact_at(&mut buf, four - 4)?;
    assert_eq!(&buf, b"\0\0abcd\0\0");
    let mut tail = [0u8; 4];
    copied.read_exact_at(&mut tail, (5 << 30) + 3)?;
    assert_eq!(&tail, b"tail");
    fs::remove_file(&copy)?;

    // A file filled in below its size (made long first, written into later) takes the space
    // of what was written, as `stat` and `du` say: with st_blocks 0 it would be "all hole" to
    // `tar --sparse`, which would archive it empty.
    let holey = c.path("holey");
    File::create(&holey)?.set_len(100 << 20)?;
    let piece = pattern(7, 0, 1 << 20);
    OpenOptions::new()
        .write(true)
        .open(&holey)?
        .write_all_at(&piece, 50 << 20)?;
    let stored = fs::metadata(&holey)?.blocks() * 512;
    assert!(
        (1 << 20..=(1 << 20) + 8192).contains(&stored),
        "1 MiB written into a hole, {stored} bytes stored"
    );
    let out = c.scratch().join("holey-out");
    fs::create_dir_all(&out)?;
    sh(
        &c.mnt,
        &format!(
            "tar -S -cf {0}/h.tar holey && tar -C {0} -xf {0}/h.tar",
            out.display()
        ),
    )?;
    let mut back = vec![0u8; 1 << 20];
    File::open(out.join("holey"))?.read_exact_at(&mut back, 50 << 20)?;
    assert!(back == piece, "tar --sparse kept the data");
    assert_eq!(fs::metadata(out.join("holey"))?.len(), 100 << 20);
    fs::remove_dir_all(&out)?;
    Ok(())
}

/// `lseek(f, offset, whence)`: the new offset, or the errno.
fn seek(f: &File, offset: u64, whence: i32) -> std::result::Result<u64, i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor this File owns.
    let r = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as u64)
    }
}

#[test]
fn append_from_several_processes_keeps_every_line_whole() -> Result<()> {
    let c = Cluster::start()?;
    let script = "i=0; while [ $i -lt 150 ]; do echo \"p$P-$i-abcdefghijklmnopqrstuvwxyz\" >> log; i=$((i+1)); done";
    let children: Vec<_> = (0..4)
        .map(|p| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .env("P", p.to_string())
                .current_dir(&c.mnt)
                .spawn()
        })
        .collect::<Result<_, _>>()?;
    for mut ch in children {
        assert!(ch.wait()?.success());
    }
    let text = fs::read_to_string(c.path("log"))?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 600);
    for p in 0..4 {
        let mine: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with(&format!("p{p}-")))
            .collect();
        let want: Vec<String> = (0..150)
            .map(|i| format!("p{p}-{i}-abcdefghijklmnopqrstuvwxyz"))
            .collect();
        assert_eq!(mine, want, "process {p}'s lines are whole and in order");
    }
    Ok(())
}

#[test]
fn fifos_and_sockets_can_be_created_and_used() -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let c = Cluster::start()?;
    let fifo = c.path("fifo");
    mknod(&fifo, libc::S_IFIFO | 0o644, 0)?;
    assert!(fs::metadata(&fifo)?.file_type().is_fifo());
    let f2 = fifo.clone();
    let writer = std::thread::spawn(move || fs::write(f2, b"through the pipe"));
    assert_eq!(fs::read(&fifo)?, b"through the pipe");
    writer.join().expect("writer thread")?;
    let sock = c.path("sock");
    mknod(&sock, libc::S_IFSOCK | 0o600, 0)?;
    assert!(fs::metadata(&sock)?.file_type().is_socket());
    assert_eq!(errno(mknod(&fifo, libc::S_IFIFO | 0o644, 0)), libc::EEXIST);
    Ok(())
}

#[test]
fn unlinked_file_stays_readable_until_close() -> Result<()> {
    let c = Cluster::start()?;
    let p = c.path("tmp");
    let data = pattern(3, 0, 300_000);
    fs::write(&p, &data)?;
    let mut r = File::open(&p)?;
    let w = OpenOptions::new().write(true).open(&p)?;
    fs::remove_file(&p)?;
    assert_eq!(errno(fs::metadata(&p)), libc::ENOENT);
    assert!(fs::read_dir(&c.mnt)?.all(|e| e.map(|e| e.file_name() != "tmp").unwrap_or(true)));
    w.write_all_at(b"still here", 10)?;
    w.sync_all()?;
    let mut got = Vec::new();
    r.read_to_end(&mut got)?;
    let mut want = data;
    want[10..20].copy_from_slice(b"still here");
    assert!(got == want, "orphan content");
    drop(w);
    drop(r);
    fs::write(&p, b"new")?;
    assert_eq!(fs::read(&p)?, b"new");

    // Replaced by a rename, an open file or directory still stats, with no links
    // (xfstests generic/035); a removed open directory lists as empty.
    fs::write(c.path("src"), b"src")?;
    let target = File::open(&p)?;
    fs::rename(c.path("src"), &p)?;
    assert_eq!(target.metadata()?.nlink(), 0);
    assert_eq!(fs::read(&p)?, b"src");
    fs::create_dir(c.path("d1"))?;
    fs::create_dir(c.path("d2"))?;
    let d2 = File::open(c.path("d2"))?;
    let mode = d2.metadata()?.mode();
    fs::rename(c.path("d1"), c.path("d2"))?;
    let md = d2.metadata()?;
    assert_eq!((md.nlink(), md.mode(), md.is_dir()), (0, mode, true));
    fs::create_dir(c.path("d3"))?;
    let d3 = File::open(c.path("d3"))?;
    fs::remove_dir(c.path("d3"))?;
    assert_eq!(d3.metadata()?.nlink(), 0);
    // fchmod of its handle works too (not ENOENT), and a new directory of the same name is
    // another one.
    fs::create_dir(c.path("d3"))?;
    fs::set_permissions(c.path("d3"), fs::Permissions::from_mode(0o751))?;
    d3.set_permissions(fs::Permissions::from_mode(0o700))?;
    assert_eq!(d3.metadata()?.mode() & 0o7777, 0o700);
    assert_eq!(fs::metadata(c.path("d3"))?.mode() & 0o7777, 0o751);
    let fd = d3.as_raw_fd();
    let listed = fs::read_dir(format!("/proc/self/fd/{fd}"));
    assert!(
        listed.map_or(true, |mut l| l.next().is_none()),
        "nothing listed"
    );
    Ok(())
}

#[test]
fn statfs_reports_real_capacity() -> Result<()> {
    let c = Cluster::start()?;
    let cp = cpath(&c.mnt);
    // SAFETY: zeroed statvfs is valid; the path is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cp.as_ptr(), &mut st) }, 0);
    let total = st.f_blocks * st.f_frsize;
    assert!(total > 1 << 30, "capacity {total}");
    assert!(st.f_bavail > 0 && st.f_bavail <= st.f_blocks);
    assert!(st.f_namemax >= 255 || st.f_namemax == 0);
    let out = sh(&c.mnt, "df -P .")?;
    assert!(out.contains(&*c.mnt.to_string_lossy()), "{out}");
    // Every chunkserver of this cluster is on the disk that holds its directory: the free
    // space shown, 3 copies of it, fits in that disk's free space (counted once, not once
    // per chunkserver, which showed it 6 times). The figure shown is up to a heartbeat old
    // and other tests write to the same disk meanwhile: half of it again is allowed.
    let mut local: libc::statvfs = unsafe { std::mem::zeroed() };
    let dir = cpath(&c.dir);
    assert_eq!(unsafe { libc::statvfs(dir.as_ptr(), &mut local) }, 0);
    let shown = st.f_bavail * st.f_frsize * 3;
    let disk_free = local.f_bavail * local.f_frsize;
    assert!(
        shown <= disk_free / 2 * 3 + (256 << 20),
        "the mount shows {shown} bytes free for 3 copies; the disk has {disk_free}"
    );
    Ok(())
}

#[test]
fn o_direct_handles_write_read_and_map_shared() -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let c = Cluster::start()?;
    let p = c.path("direct");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)?;
    const LEN: usize = 1 << 20;
    // O_DIRECT wants page-aligned buffers on most filesystems; keep to that here too.
    let mut backing = vec![0u8; LEN + 4096];
    let at = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[at..at + LEN];
    let data = pattern(7, 0, LEN);
    buf.copy_from_slice(&data);
    f.write_all_at(buf, 0)?;
    buf.fill(0);
    f.read_exact_at(buf, 0)?;
    assert!(*buf == data[..], "direct read differs from direct write");

    // A shared writable mapping of a direct handle works as on a local filesystem (the
    // kernel refuses it with ENODEV unless the mount allows mmap on direct-I/O handles).
    // SAFETY: shared mapping of an open file within its size; unmapped below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert!(
        ptr != libc::MAP_FAILED,
        "mmap of an O_DIRECT handle: {}",
        std::io::Error::last_os_error()
    );
    {
        // SAFETY: the mapping is LEN bytes long and nothing else aliases it here.
        let map = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), LEN) };
        assert!(map[..] == data[..], "mapped bytes differ from the file");
        map[4096..4102].copy_from_slice(b"mapped");
        // SAFETY: `ptr` is the start of a live mapping of LEN bytes.
        assert_eq!(unsafe { libc::msync(ptr, LEN, libc::MS_SYNC) }, 0);
        // SAFETY: as above; `map` is not used after this.
        assert_eq!(unsafe { libc::munmap(ptr, LEN) }, 0);
    }
    let page = &mut buf[..8192];
    f.read_exact_at(page, 0)?;
    assert_eq!(
        &page[4096..4102],
        b"mapped",
        "a direct read misses the msync'd write"
    );
    drop(f);
    let mut want = data;
    want[4096..4102].copy_from_slice(b"mapped");
    assert!(fs::read(&p)? == want, "content after close");
    Ok(())
}

#[test]
fn a_mount_that_saw_no_xattrs_sees_another_mounts_xattrs_at_once() -> Result<()> {
    use rawfs_integration::harness::wait_until;
    use std::time::Duration;
    let c = Cluster::start()?;
    let a = c.mount_extra("a", "")?;
    let seen = |name: &str| a.join(&format!("d/{name}"));
    // Mount a makes the files: their creates are its own changes, which do not make it
    // distrust what it knows of them (another client's change would, for a second).
    fs::create_dir(a.join("d"))?;
    for i in 0..10 {
        fs::write(seen(&format!("f{i}")), b"x")?;
    }
    // Wait until mount a follows the change events: a chmod through the main mount shows in
    // a's cached attributes.
    fs::symlink_metadata(seen("f0"))?;
    fs::set_permissions(c.path("d/f0"), fs::Permissions::from_mode(0o600))?;
    wait_until("a follows events", Duration::from_secs(10), || {
        Ok(fs::symlink_metadata(seen("f0"))?.mode() & 0o777 == 0o600)
    })?;
    // As `ls -l` does through mount a: list, stat, ask for an xattr of every file.
    for e in fs::read_dir(a.join("d"))? {
        let p = e?.path();
        fs::symlink_metadata(&p)?;
        assert_eq!(errno(getxattr(&p, "security.selinux")), libc::ENODATA);
        assert_eq!(listxattr(&p)?, Vec::<String>::new());
    }
    // Another mount's set shows through a as soon as its event arrives (not after the
    // attribute timeout of 30 s), in getxattr and in listxattr, also through a descriptor
    // opened before. A security.* name: reading one needs no permission check, so the
    // kernel does not refresh the attributes first (for user.* it would).
    let open = File::open(seen("f3"))?;
    let fgetxattr = |f: &File| -> std::io::Result<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let mut buf = [0u8; 64];
        // SAFETY: valid descriptor, NUL-terminated name, buffer of the given length.
        let n = unsafe {
            libc::fgetxattr(
                f.as_raw_fd(),
                c"security.x".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(buf[..n as usize].to_vec())
    };
    assert_eq!(errno(fgetxattr(&open)), libc::ENODATA);
    setxattr(&c.path("d/f3"), "security.x", b"1", 0)?;
    wait_until("a sees security.x", Duration::from_secs(5), || {
        Ok(fgetxattr(&open).ok().as_deref() == Some(&b"1"[..]))
    })?;
    assert_eq!(getxattr(&seen("f3"), "security.x")?, b"1");
    assert_eq!(listxattr(&seen("f3"))?, ["security.x"]);
    removexattr(&c.path("d/f3"), "security.x")?;
    wait_until("a sees security.x gone", Duration::from_secs(5), || {
        Ok(listxattr(&seen("f3"))?.is_empty())
    })?;
    // A's own changes show at once (security.* again: no attribute refresh helps).
    setxattr(&seen("f5"), "security.y", b"2", 0)?;
    assert_eq!(getxattr(&seen("f5"), "security.y")?, b"2");
    assert_eq!(getxattr(&c.path("d/f5"), "security.y")?, b"2");
    removexattr(&seen("f5"), "security.y")?;
    assert_eq!(errno(getxattr(&seen("f5"), "security.y")), libc::ENODATA);
    // A file this mount creates has none, and then gets one.
    let fresh = seen("new");
    fs::write(&fresh, b"n")?;
    assert_eq!(errno(getxattr(&fresh, "security.z")), libc::ENODATA);
    setxattr(&fresh, "security.z", b"3", 0)?;
    assert_eq!(getxattr(&fresh, "security.z")?, b"3");
    assert_eq!(listxattr(&fresh)?, ["security.z"]);
    Ok(())
}
