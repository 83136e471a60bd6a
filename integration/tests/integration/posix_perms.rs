//! Permission checks as the kernel expects them: an unprivileged user, sticky and setgid
//! directories, the umask.

use anyhow::Result;
use rawfs_integration::fsutil::*;
use rawfs_integration::Cluster;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn denied(out: &std::process::Output) -> bool {
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied")
}

fn not_permitted(out: &std::process::Output) -> bool {
    !out.status.success()
        && String::from_utf8_lossy(&out.stderr).contains("Operation not permitted")
}

#[test]
fn unprivileged_user_gets_eacces() -> Result<()> {
    let c = Cluster::start()?;
    let m = &c.mnt;
    fs::set_permissions(m, fs::Permissions::from_mode(0o755))?;
    fs::create_dir(m.join("private"))?;
    fs::set_permissions(m.join("private"), fs::Permissions::from_mode(0o700))?;
    fs::write(m.join("private/f"), b"secret")?;
    fs::write(m.join("ro"), b"root only")?;
    fs::set_permissions(m.join("ro"), fs::Permissions::from_mode(0o600))?;
    fs::write(m.join("public"), b"everyone")?;
    fs::set_permissions(m.join("public"), fs::Permissions::from_mode(0o644))?;

    assert!(denied(&sh_as_nobody(m, "ls private")?), "list a 0700 dir");
    assert!(
        denied(&sh_as_nobody(m, "cat private/f")?),
        "traverse a 0700 dir"
    );
    assert!(denied(&sh_as_nobody(m, "cat ro")?), "read a 0600 file");
    assert!(
        denied(&sh_as_nobody(m, "echo x >> public")?),
        "write a 0644 file"
    );
    assert!(
        denied(&sh_as_nobody(m, "touch newfile")?),
        "create in a 0755 dir"
    );
    assert!(
        denied(&sh_as_nobody(m, "mkdir newdir")?),
        "mkdir in a 0755 dir"
    );
    assert!(
        denied(&sh_as_nobody(m, "rm -f public")?),
        "unlink in a 0755 dir"
    );
    assert!(
        not_permitted(&sh_as_nobody(m, "chmod 777 public")?),
        "chmod someone else's file"
    );
    let out = sh_as_nobody(
        m,
        "cat public; test -r public && test ! -w public && test ! -x public",
    )?;
    assert!(out.status.success(), "access(2) answers: {out:?}");
    assert_eq!(out.stdout, b"everyone");
    Ok(())
}

#[test]
fn sticky_directory_protects_other_users_files() -> Result<()> {
    let c = Cluster::start()?;
    let t = c.path("tmp");
    fs::create_dir(&t)?;
    fs::set_permissions(&t, fs::Permissions::from_mode(0o1777))?;
    assert_eq!(fs::metadata(&t)?.mode() & 0o7777, 0o1777);
    fs::write(t.join("roots"), b"r")?;
    fs::set_permissions(t.join("roots"), fs::Permissions::from_mode(0o666))?;
    let out = sh_as_nobody(&t, "rm -f roots")?;
    assert!(not_permitted(&out) || denied(&out), "sticky: {out:?}");
    assert!(t.join("roots").exists());
    let out = sh_as_nobody(&t, "mv roots mine")?;
    assert!(!out.status.success(), "rename out of a sticky dir");
    // nobody may create and delete their own files there.
    let out = sh_as_nobody(&t, "echo mine > mine && rm mine")?;
    assert!(out.status.success(), "{out:?}");
    Ok(())
}

#[test]
fn setgid_directory_passes_its_group_on() -> Result<()> {
    let c = Cluster::start()?;
    let d = c.path("shared");
    fs::create_dir(&d)?;
    std::os::unix::fs::chown(&d, Some(0), Some(4242))?;
    fs::set_permissions(&d, fs::Permissions::from_mode(0o2775))?;
    assert_eq!(fs::metadata(&d)?.mode() & 0o7777, 0o2775);
    fs::write(d.join("f"), b"")?;
    assert_eq!(fs::metadata(d.join("f"))?.gid(), 4242);
    fs::create_dir(d.join("sub"))?;
    let sub = fs::metadata(d.join("sub"))?;
    assert_eq!(sub.gid(), 4242);
    assert_ne!(
        sub.mode() & 0o2000,
        0,
        "a new directory keeps the setgid bit"
    );
    Ok(())
}

#[test]
fn umask_applies_to_new_files_and_directories() -> Result<()> {
    let c = Cluster::start()?;
    // The umask is per process: change it in a child, never in the test process.
    sh(
        &c.mnt,
        "umask 027 && touch f && mkdir d && umask 077 && touch g",
    )?;
    assert_eq!(fs::metadata(c.path("f"))?.mode() & 0o777, 0o640);
    assert_eq!(fs::metadata(c.path("d"))?.mode() & 0o777, 0o750);
    assert_eq!(fs::metadata(c.path("g"))?.mode() & 0o777, 0o600);
    Ok(())
}

#[test]
fn writes_truncates_and_chowns_drop_setuid_setgid_and_capabilities() -> Result<()> {
    use std::io::Write;
    let c = Cluster::start()?;
    let d = c.path("d");
    fs::create_dir(&d)?;
    fs::set_permissions(&d, fs::Permissions::from_mode(0o777))?;
    let mode = |n: &str| -> Result<u32> { Ok(fs::metadata(d.join(n))?.mode() & 0o7777) };
    let privileged = |n: &str, m: u32| -> Result<()> {
        fs::write(d.join(n), b"")?;
        fs::set_permissions(d.join(n), fs::Permissions::from_mode(m))?;
        Ok(())
    };
    for n in ["write", "truncate", "o_trunc", "fallocate"] {
        privileged(n, 0o6777)?;
    }
    // Setgid without group-execute marks locking, not privilege: kept for a group member
    // (root), dropped for a writer outside the group (nobody).
    privileged("sgid_outside", 0o2766)?;
    let out = sh_as_nobody(
        &d,
        "printf x >> write && truncate -s 3 truncate && : > o_trunc \
         && fallocate -l 8192 fallocate && printf x >> sgid_outside",
    )?;
    assert!(out.status.success(), "{out:?}");
    for n in ["write", "truncate", "o_trunc", "fallocate"] {
        assert_eq!(mode(n)?, 0o777, "{n} by an unprivileged user");
    }
    assert_eq!(mode("sgid_outside")?, 0o766);
    // Root (CAP_FSETID) keeps them through writes and truncates, not through a chown, even
    // one to the same owner.
    privileged("root", 0o6777)?;
    let mut f = fs::OpenOptions::new().append(true).open(d.join("root"))?;
    f.write_all(b"root writes")?;
    f.set_len(4)?;
    drop(f);
    assert_eq!(mode("root")?, 0o6777, "root's write and truncate");
    std::os::unix::fs::chown(d.join("root"), Some(0), Some(0))?;
    assert_eq!(mode("root")?, 0o777, "a chown");
    // So does a chown of a FIFO, even to -1, -1 (Linux drops them for all but directories);
    // a directory keeps its setgid.
    let fifo = d.join("fifo");
    mknod(&fifo, libc::S_IFIFO | 0o644, 0)?;
    fs::set_permissions(&fifo, fs::Permissions::from_mode(0o6775))?;
    std::os::unix::fs::chown(&fifo, None, None)?;
    assert_eq!(mode("fifo")?, 0o775, "a chown of a FIFO");
    fs::create_dir(d.join("sub"))?;
    fs::set_permissions(d.join("sub"), fs::Permissions::from_mode(0o2775))?;
    std::os::unix::fs::chown(d.join("sub"), Some(0), Some(0))?;
    assert_eq!(mode("sub")?, 0o2775, "a chown of a directory");
    // File capabilities go with any write, root's too.
    let caps = d.join("caps");
    fs::write(&caps, b"")?;
    let v2_no_caps = [[0x01, 0, 0, 0x02].as_slice(), &[0; 16]].concat();
    setxattr(&caps, "security.capability", &v2_no_caps, 0)?;
    assert_eq!(getxattr(&caps, "security.capability")?, v2_no_caps);
    fs::OpenOptions::new()
        .append(true)
        .open(&caps)?
        .write_all(b"x")?;
    assert_eq!(errno(getxattr(&caps, "security.capability")), libc::ENODATA);
    // A file with nothing to drop keeps its mode and data through many writes.
    let plain = d.join("plain");
    fs::write(&plain, b"")?;
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o666))?;
    let out = sh_as_nobody(&d, "for i in 1 2 3 4 5; do printf $i >> plain; done")?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        (mode("plain")?, fs::read(&plain)?),
        (0o666, b"12345".to_vec())
    );
    Ok(())
}
