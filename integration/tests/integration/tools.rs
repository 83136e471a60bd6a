//! Real tools on the mount: tar, cp -a, git, sqlite3, rsync.

use anyhow::Result;
use rawfs_integration::fsutil::sh;
use rawfs_integration::Cluster;
use std::path::{Path, PathBuf};

/// A stable copy of this repository's sources (no target/, no .git) in the test's scratch
/// directory, plus a symlink, an empty directory and an executable, so the tree has a bit of
/// everything. Copied first because other builds may be changing the work tree meanwhile.
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
    sh(&src, "ln -s Cargo.toml link-to-manifest && mkdir -p empty/dir && printf '#!/bin/sh\\n' > run.sh && chmod 755 run.sh")?;
    Ok(src)
}

/// `find` listing with type, mode, size, mtime and symlink target, for comparing trees.
fn listing(dir: &Path) -> Result<String> {
    sh(
        dir,
        "find . -mindepth 1 -printf '%y %m %s %T@ %l %P\\n' | grep -v '^d' | sort",
    )
}

/// The same with whole-second mtimes: the tar format keeps no fractions of a second.
fn listing_seconds(dir: &Path) -> Result<String> {
    sh(
        dir,
        "find . -mindepth 1 -printf '%y %m %s %Ts %l %P\\n' | grep -v '^d' | sort",
    )
}

#[test]
fn tar_extract_and_recreate_of_a_source_tree() -> Result<()> {
    let c = Cluster::start()?;
    let src = source_tree(&c)?;
    let m = c.mnt.clone();
    sh(&src, &format!("tar -cf '{}/src.tar' .", m.display()))?;
    sh(&m, "mkdir x && tar -C x -xpf src.tar")?;
    sh(
        &m,
        &format!("diff -r --no-dereference '{}' x", src.display()),
    )?;
    assert_eq!(listing_seconds(&src)?, listing_seconds(&m.join("x"))?);
    // Re-create from the mount and extract again.
    sh(
        &m,
        "tar -C x -cf again.tar . && mkdir y && tar -C y -xpf again.tar",
    )?;
    sh(
        &m,
        &format!("diff -r --no-dereference '{}' y", src.display()),
    )?;
    assert_eq!(
        sh(&m, "tar -tf src.tar | sort")?,
        sh(&m, "tar -tf again.tar | sort")?
    );
    Ok(())
}

#[test]
fn cp_a_preserves_tree_and_diff_finds_nothing() -> Result<()> {
    let c = Cluster::start()?;
    let src = source_tree(&c)?;
    sh(&c.mnt, &format!("cp -a '{}' copy", src.display()))?;
    sh(
        &c.mnt,
        &format!("diff -r --no-dereference '{}' copy", src.display()),
    )?;
    assert_eq!(listing(&src)?, listing(&c.path("copy"))?);
    // And back out again.
    let back = c.scratch().join("back");
    sh(&c.mnt, &format!("cp -a copy '{}'", back.display()))?;
    assert_eq!(listing(&src)?, listing(&back)?);
    Ok(())
}

#[test]
fn git_init_add_commit_log_and_fsck() -> Result<()> {
    let c = Cluster::start()?;
    let src = source_tree(&c)?;
    let repo = c.path("repo");
    sh(&c.mnt, &format!("cp -r '{}' repo", src.display()))?;
    let git =
        "git -c user.name=rawfs -c user.email=rawfs@example.invalid -c init.defaultBranch=main";
    sh(
        &repo,
        &format!("{git} init -q && {git} add -A && {git} commit -qm first"),
    )?;
    sh(&repo, &format!("echo change >> README.md && {git} mv Cargo.toml Renamed.toml && {git} commit -qam second"))?;
    let log = sh(&repo, "git log --oneline")?;
    assert_eq!(log.lines().count(), 2, "{log}");
    assert!(log.contains("second") && log.contains("first"));
    sh(&repo, "git fsck --strict --no-progress")?;
    assert_eq!(sh(&repo, "git status --porcelain")?, "");
    sh(
        &repo,
        &format!(
            "{git} gc -q && git fsck --no-progress && git checkout -q HEAD~1 && test -f Cargo.toml"
        ),
    )?;
    Ok(())
}

#[test]
fn sqlite_transactions_pass_integrity_check() -> Result<()> {
    let c = Cluster::start()?;
    let mut script = String::from("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, n INTEGER);\n");
    for i in 0..2000 {
        script.push_str(&format!(
            "BEGIN; INSERT INTO t(v, n) VALUES ('{}', {i}); UPDATE t SET n = n + 1 WHERE id = {}; COMMIT;\n",
            "x".repeat(i % 300),
            i / 2 + 1
        ));
    }
    script.push_str("DELETE FROM t WHERE id % 7 = 0; VACUUM;\n");
    let sql = c.scratch().join("load.sql");
    std::fs::write(&sql, script)?;
    sh(&c.mnt, &format!("sqlite3 db.sqlite < '{}'", sql.display()))?;
    assert_eq!(
        sh(&c.mnt, "sqlite3 db.sqlite 'PRAGMA integrity_check;'")?.trim(),
        "ok"
    );
    let n: u64 = sh(&c.mnt, "sqlite3 db.sqlite 'SELECT count(*) FROM t;'")?
        .trim()
        .parse()?;
    assert_eq!(n, 2000 - 2000 / 7);
    // WAL mode uses shared memory maps on the filesystem too.
    sh(
        &c.mnt,
        "sqlite3 db.sqlite \"PRAGMA journal_mode=WAL; INSERT INTO t(v, n) VALUES ('wal', 1);\"",
    )?;
    assert_eq!(
        sh(&c.mnt, "sqlite3 db.sqlite 'PRAGMA integrity_check;'")?.trim(),
        "ok"
    );
    Ok(())
}

#[test]
fn rsync_copies_and_verifies_by_checksum() -> Result<()> {
    let c = Cluster::start()?;
    let src = source_tree(&c)?;
    sh(&c.mnt, &format!("rsync -a '{}/' r/", src.display()))?;
    let changes = sh(
        &c.mnt,
        &format!(
            "rsync -a --checksum --dry-run --itemize-changes '{}/' r/",
            src.display()
        ),
    )?;
    assert_eq!(changes.trim(), "", "rsync sees differences");
    sh(
        &c.mnt,
        &format!("diff -r --no-dereference '{}' r", src.display()),
    )?;
    // An update in place: change one file and rsync again.
    sh(&src, "echo more >> Cargo.toml")?;
    sh(
        &c.mnt,
        &format!(
            "rsync -a --inplace '{}/' r/ && cmp '{}/Cargo.toml' r/Cargo.toml",
            src.display(),
            src.display()
        ),
    )?;
    Ok(())
}
