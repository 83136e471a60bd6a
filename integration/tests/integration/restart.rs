//! Stopping the whole cluster and starting it again on the same directory loses nothing.

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rawfs_integration::fsutil::{file_hash, getxattr, seed, setxattr};
use rawfs_integration::Cluster;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

#[test]
fn whole_cluster_restart_keeps_every_file_and_checksum() -> Result<()> {
    let seed = seed("whole_cluster_restart_keeps_every_file_and_checksum");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster::start()?;
    let m = c.mnt.clone();
    for d in 0..5 {
        fs::create_dir_all(m.join(format!("d{d}/sub")))?;
        for f in 0..8 {
            let rel = format!("d{d}/sub/f{f}");
            let len = if rng.gen_bool(0.1) {
                rng.gen_range(1 << 20..3 << 20)
            } else {
                rng.gen_range(0..20_000)
            };
            let mut data = vec![0u8; len];
            rng.fill_bytes(&mut data);
            fs::write(m.join(&rel), &data)?;
        }
    }
    fs::set_permissions(m.join("d0/sub/f0"), fs::Permissions::from_mode(0o751))?;
    std::os::unix::fs::symlink("d1/sub/f1", m.join("sym"))?;
    fs::hard_link(m.join("d2/sub/f2"), m.join("hard"))?;
    setxattr(&m.join("d3/sub/f3"), "user.kept", b"across restarts", 0)?;
    let sparse = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.join("sparse"))?;
    sparse.set_len(100 << 20)?;
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (100 << 20) - 3)?;
    sparse.sync_all()?;
    drop(sparse);
    let before = snapshot(&m)?;

    c.restart()?;

    let after = snapshot(&c.mnt)?;
    assert_eq!(before.len(), after.len());
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v), "{k} changed across the restart");
    }
    assert_eq!(fs::read_link(c.path("sym"))?.to_string_lossy(), "d1/sub/f1");
    assert_eq!(fs::metadata(c.path("hard"))?.nlink(), 2);
    assert_eq!(
        getxattr(&c.path("d3/sub/f3"), "user.kept")?,
        b"across restarts"
    );
    assert_eq!(fs::metadata(c.path("d0/sub/f0"))?.mode() & 0o7777, 0o751);
    // And it still takes writes.
    fs::write(c.path("after"), b"written after the restart")?;
    assert_eq!(fs::read(c.path("after"))?, b"written after the restart");
    Ok(())
}

/// Every regular file's (hash, length, mode) by relative path.
fn snapshot(root: &std::path::Path) -> Result<BTreeMap<String, (u64, u64, u32)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let md = fs::symlink_metadata(e.path())?;
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                let (h, len) = file_hash(&e.path())?;
                let rel = e.path().strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(rel, (h, len, md.mode()));
            }
        }
    }
    Ok(out)
}
