//! The operator commands around a running cluster: `rawfs up` refusing to double-start,
//! its metadata replica count and stop order, `rawfs status` in both forms (with volumes
//! and their NBD clients), and the roles that are not implemented yet.

use anyhow::{Context, Result};
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
    // `rawfs healer` without a metadata address is a usage error.
    let out = rawfs(&["healer".as_ref()])?;
    assert_eq!(out.status.code(), Some(2), "rawfs healer");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metadata"));
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

/// `rawfs up --metadata-replicas N` refuses an even N (and one it does not support) before
/// starting anything.
#[test]
fn up_refuses_an_even_number_of_metadata_replicas() -> Result<()> {
    let d = tempfile::tempdir()?;
    for (n, why) in [("2", "even"), ("4", "even"), ("7", "not supported")] {
        let out = rawfs(&[
            "up".as_ref(),
            "--dir".as_ref(),
            d.path().join("cluster").as_os_str(),
            "--mount".as_ref(),
            d.path().join("mnt").as_os_str(),
            "--metadata-replicas".as_ref(),
            n.as_ref(),
        ])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{n}: {err}");
        assert!(
            err.contains(why) && err.contains("use 1, 3 or 5"),
            "{n}: {err}"
        );
    }
    assert!(
        !d.path().join("cluster").exists(),
        "nothing was started or created"
    );
    Ok(())
}

/// Attaches to `export` over NBD (fixed newstyle, NBD_OPT_EXPORT_NAME) and returns the
/// connection in transmission phase with the export's size. A raw client: the NBD tools
/// disconnect at once, and the test needs a client that stays connected.
fn nbd_attach(addr: &str, export: &str) -> Result<(std::net::TcpStream, u64)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting)?;
    anyhow::ensure!(&greeting[..16] == b"NBDMAGICIHAVEOPT", "not an NBD server");
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    let no_zeroes = server_flags & 2 != 0;
    // FIXED_NEWSTYLE, and NO_ZEROES if offered.
    let client_flags: u32 = if no_zeroes { 3 } else { 1 };
    let mut msg = client_flags.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    msg.extend_from_slice(&u32::try_from(export.len())?.to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    s.write_all(&msg)?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply)?;
    if !no_zeroes {
        s.read_exact(&mut [0u8; 124])?;
    }
    let size = u64::from_be_bytes(reply[..8].try_into()?);
    Ok((s, size))
}

/// The clients column of volume `name` in `rawfs status --json`.
fn volume_in_status(c: &Cluster, name: &str) -> Result<Option<serde_json::Value>> {
    let s = c.status()?;
    Ok(s["volumes"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == name))
        .cloned())
}

/// A one-replica cluster: `up --metadata-replicas 1` runs it, status and cluster.json show one
/// replica, status lists a volume with its size and its connected NBD clients, a different
/// count is refused on the same DIR, and the stop runs in order (NBD server and mount first,
/// metadata last) without losing a write that was never fsynced.
#[test]
fn one_replica_cluster_with_volumes_in_status_stops_in_order() -> Result<()> {
    let mut c = Cluster::start_with(rawfs_integration::Options {
        chunkservers: 3,
        up_args: vec!["--metadata-replicas".into(), "1".into()],
        dir: None,
    })?;
    let r = (|| -> Result<()> {
        let s = c.status()?;
        let replicas = s["metadata"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(replicas.len(), 1, "{s}");
        assert_eq!(replicas[0]["role"], "leader", "{s}");
        assert_eq!(s["metadata"]["leader"], replicas[0]["id"], "{s}");
        let metas = c
            .info()?
            .processes
            .iter()
            .filter(|p| p.role == "metadata")
            .count();
        assert_eq!(metas, 1, "cluster.json lists one replica");
        let table = rawfs(&["status".as_ref(), "--dir".as_ref(), c.dir.as_os_str()])?;
        let table = String::from_utf8_lossy(&table.stdout).into_owned();
        assert!(table.contains("3 of 3 up"), "{table}");

        c.rawfs_ok(&["volume", "create", "vm1", "--size", "64M"])?;
        let v = volume_in_status(&c, "vm1")?.context("vm1 in status")?;
        assert_eq!(v["size"], 64u64 << 20, "{v}");
        assert_eq!(v["used_bytes"], 0, "thin: {v}");
        assert_eq!(v["clients"], 0, "{v}");
        let nbd = c.process("nbd", 1)?.addr;
        let (conn, size) = nbd_attach(&nbd, "vm1")?;
        assert_eq!(size, 64 << 20);
        rawfs_integration::harness::wait_until(
            "status to show vm1's NBD client",
            std::time::Duration::from_secs(15),
            || Ok(volume_in_status(&c, "vm1")?.is_some_and(|v| v["clients"] == 1)),
        )?;
        let table = rawfs(&["status".as_ref(), "--dir".as_ref(), c.dir.as_os_str()])?;
        let table = String::from_utf8_lossy(&table.stdout).into_owned();
        let row = table
            .lines()
            .find(|l| l.trim_start().starts_with("vm1 "))
            .with_context(|| format!("no vm1 row in\n{table}"))?;
        assert!(
            row.contains("64.0 MiB") && row.trim_end().ends_with(" 1"),
            "{table}"
        );
        drop(conn);
        rawfs_integration::harness::wait_until(
            "status to show vm1 without clients",
            std::time::Duration::from_secs(15),
            || Ok(volume_in_status(&c, "vm1")?.is_some_and(|v| v["clients"] == 0)),
        )?;

        // Written, not fsynced: the stop must flush it through the mount before the
        // chunkservers and the metadata service go away.
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(c.path("unsynced"), &data)?;
        c.stop()?;
        let up_log = std::fs::read_to_string(c.scratch().join("up.log"))?;
        let stopped: Vec<&str> = up_log
            .lines()
            .filter_map(|l| l.strip_prefix("rawfs up: stopped "))
            .collect();
        let pos = |name: &str| {
            stopped
                .iter()
                .position(|l| l.starts_with(&format!("{name} (")))
                .with_context(|| format!("{name} not in the stop lines {stopped:?}"))
        };
        let (nbd_at, mount_at, meta_at) = (pos("nbd 1")?, pos("mount 1")?, pos("metadata 1")?);
        for cs in 1..=3 {
            let at = pos(&format!("chunkserver {cs}"))?;
            assert!(nbd_at < at && mount_at < at && at < meta_at, "{stopped:?}");
        }
        assert_eq!(meta_at, stopped.len() - 1, "{stopped:?}");
        assert!(
            stopped[mount_at].contains("exit status: 0"),
            "the mount ended cleanly: {stopped:?}"
        );

        // The DIR keeps its group of one.
        let out = rawfs(&[
            "up".as_ref(),
            "--dir".as_ref(),
            c.dir.as_os_str(),
            "--mount".as_ref(),
            c.mnt.as_os_str(),
            "--metadata-replicas".as_ref(),
            "3".as_ref(),
        ])?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("--metadata-replicas 1"), "{err}");

        c.restart()?;
        assert_eq!(std::fs::read(c.path("unsynced"))?, data);
        let v = volume_in_status(&c, "vm1")?.context("vm1 after restart")?;
        assert_eq!(v["size"], 64u64 << 20, "{v}");
        Ok(())
    })();
    c.diagnose(r)
}
