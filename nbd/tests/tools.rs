//! Real NBD clients (libnbd's nbdinfo and nbdcopy, QEMU's qemu-img and qemu-io) against the
//! server with in-memory exports: capabilities, sparse maps, bulk copies over several
//! connections, image conversion, read-only refusal.

mod support;

use serde_json::Value;
use std::process::Command;
use support::{run, TestServer, DISK_SIZE};

fn info_json(srv: &TestServer, export: &str) -> Value {
    let out = run(Command::new("nbdinfo").arg("--json").arg(srv.uri(export)));
    let v: Value = serde_json::from_str(&out).expect("nbdinfo --json");
    v["exports"][0].clone()
}

fn random_file(path: &std::path::Path, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, &data).expect("write random file");
}

#[test]
fn nbdinfo_shows_exports_and_capabilities() {
    let srv = TestServer::start();
    let e = info_json(&srv, "disk");
    assert_eq!(e["export-size"], DISK_SIZE);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_df",
    ] {
        assert_eq!(e[cap], true, "{cap} in {e}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["contexts"][0], "base:allocation");
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 65536);
    assert_eq!(e["block_size_maximum"], 33554432);
    let ro = info_json(&srv, "ro");
    assert_eq!(ro["is_read_only"], true);

    let list = run(Command::new("nbdinfo")
        .arg("--list")
        .arg("--json")
        .arg(srv.uri("")));
    let v: Value = serde_json::from_str(&list).expect("list json");
    let names: Vec<&str> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert_eq!(names, ["disk", "ro", "small"]);
}

#[test]
fn nbdinfo_map_reports_holes_and_data() {
    let srv = TestServer::start();
    let map = run(Command::new("nbdinfo").arg("--map").arg(srv.uri("disk")));
    let lines: Vec<&str> = map.lines().collect();
    assert_eq!(lines.len(), 1, "{map}");
    assert!(lines[0].contains("hole,zero"), "{map}");
    srv.disk.fill(4 << 20, &[1u8; 100]);
    let map = run(Command::new("nbdinfo")
        .arg("--map")
        .arg("--json")
        .arg(srv.uri("disk")));
    let v: Value = serde_json::from_str(&map).expect("map json");
    let ext: Vec<(u64, u64, u64)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().expect("offset"),
                e["length"].as_u64().expect("length"),
                e["type"].as_u64().expect("type"),
            )
        })
        .collect();
    assert_eq!(
        ext,
        vec![
            (0, 4 << 20, 3),
            (4 << 20, 64 << 10, 0),
            (
                (4 << 20) + (64 << 10),
                DISK_SIZE - (4 << 20) - (64 << 10),
                3
            )
        ]
    );
}

#[test]
fn nbdcopy_round_trips_random_data_over_several_connections() {
    let srv = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    random_file(&src, DISK_SIZE as usize, 4);
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--flush"])
        .arg(&src)
        .arg(srv.uri("disk")));
    assert!(srv.disk.flushes() > 0, "--flush reached the export");
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(srv.uri("disk"))
        .arg(&back));
    assert!(
        std::fs::read(&src).expect("src") == std::fs::read(&back).expect("back"),
        "copy differs"
    );
}

#[test]
fn qemu_img_converts_and_compares_a_qcow2_image() {
    let srv = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("x.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("32M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 3M",
            "-c",
            "write -P 0x11 20M 64k",
        ])
        .arg(&img));
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(srv.uri("disk")));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(srv.uri("disk")));
    // And a change on the export is noticed.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x22 2M 4k"])
        .arg(srv.uri("disk")));
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(srv.uri("disk"))
        .status()
        .expect("qemu-img compare");
    assert_eq!(out.code(), Some(1), "images differ now");
}

#[test]
fn qemu_io_cannot_write_a_read_only_export() {
    let srv = TestServer::start();
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(srv.uri("ro"))
        .output()
        .expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu opens the image read-write for a write and is refused at once.
    assert!(
        !out.status.success() && text.contains("Permission denied"),
        "write to a read-only export: {text}"
    );
    let read = run(Command::new("qemu-io")
        .args(["-f", "raw", "-r", "-c", "read -v 0 18"])
        .arg(srv.uri("ro")));
    assert!(read.contains("read.only.conten"), "{read}");
}
