//! The operator commands around a running cluster: `rawfs up` refusing to double-start,
//! `rawfs status` in both forms, and the roles that are not implemented yet.

use anyhow::Result;
use rawfs_integration::harness::rawfs_bin;
use rawfs_integration::Cluster;
use std::process::Command;

fn rawfs(args: &[&std::ffi::OsStr]) -> Result<std::process::Output> {
    Ok(Command::new(rawfs_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()?)
}

#[test]
fn up_refuses_a_busy_dir_and_a_mounted_mountpoint() -> Result<()> {
    let c = Cluster::start()?;
    let other = c.scratch().join("other");
    let out = rawfs(&[
        "up".as_ref(),
        "--dir".as_ref(),
        c.dir.as_os_str(),
        "--mount".as_ref(),
        other.as_os_str(),
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{out:?}"
    );
    let out = rawfs(&[
        "up".as_ref(),
        "--dir".as_ref(),
        other.as_os_str(),
        "--mount".as_ref(),
        c.mnt.as_os_str(),
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already a mountpoint"),
        "{out:?}"
    );
    // The running cluster is untouched.
    std::fs::write(c.path("still"), b"works")?;
    assert_eq!(std::fs::read(c.path("still"))?, b"works");
    Ok(())
}

#[test]
fn status_shows_a_killed_chunkserver_as_down_at_once() -> Result<()> {
    let mut c = Cluster::start()?;
    let out = rawfs(&["status".as_ref(), "--dir".as_ref(), c.dir.as_os_str()])?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("6 of 6 up"),
        "{table}"
    );
    let (leader, term) = c.wait_leader(std::time::Duration::from_secs(30), 0, None)?;
    assert!(
        table.contains(&format!("leader {leader}, term {term}")),
        "{table}"
    );
    // Any one replica's address is enough: the client finds the leader.
    let follower = if leader == 1 { 2 } else { 1 };
    let meta = c.process("metadata", follower)?.addr;
    let out = Command::new(rawfs_bin())
        .args(["status", "--json"])
        .env("RAWFS_METADATA", &meta)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let replicas = v["metadata"]["replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(replicas.len(), 3, "{v}");
    for r in &replicas {
        let want = if r["id"] == leader {
            "leader"
        } else {
            "follower"
        };
        assert_eq!(r["role"], want, "{r}");
        assert_eq!(r["up"], true, "{r}");
        assert_eq!(r["term"], term, "{r}");
    }
    assert_eq!(v["healer"]["queue"], 0);

    c.kill9("chunkserver", 2)?;
    // With --dir the dead pid shows at once, before the heartbeat timeout.
    let s = c.status()?;
    let cs2 = s["chunkservers"]
        .as_array()
        .and_then(|a| a.iter().find(|cs| cs["id"] == 2))
        .cloned();
    assert_eq!(
        cs2.map(|cs| cs["up"].clone()),
        Some(serde_json::Value::Bool(false))
    );
    Ok(())
}

#[test]
fn unreachable_cluster_and_later_roles_fail_clearly() -> Result<()> {
    let out = rawfs(&["healer".as_ref()])?;
    assert_eq!(out.status.code(), Some(2), "rawfs healer");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not implemented yet (issue 6)"));
    // `rawfs nbd` without a cluster to serve is a usage error.
    let out = Command::new(rawfs_bin())
        .arg("nbd")
        .env_remove("RAWFS_METADATA")
        .output()?;
    assert_eq!(out.status.code(), Some(2), "rawfs nbd: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no metadata address"));
    // Nothing listens on port 1.
    let out = rawfs(&[
        "status".as_ref(),
        "--metadata".as_ref(),
        "127.0.0.1:1".as_ref(),
    ])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "{out:?}"
    );
    Ok(())
}
