//! Bad input on every listening port: random bytes, truncated and oversized frames, idle
//! connections. Every daemon keeps serving and nothing is lost.

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rawfs_integration::fsutil::{file_hash, pattern, seed};
use rawfs_integration::harness::pid_alive;
use rawfs_integration::Cluster;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Payloads that break framing in different ways.
fn payloads(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let mut random = vec![0u8; rng.gen_range(1..65536)];
    rng.fill_bytes(&mut random);
    let mut small = vec![0u8; rng.gen_range(1..16)];
    rng.fill_bytes(&mut small);
    let mut truncated = 1000u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&random[..10.min(random.len())]);
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0x93, 0x01, 0x02]);
    let mut huge64 = u64::MAX.to_le_bytes().to_vec();
    huge64.extend_from_slice(&[0u8; 32]);
    let mut msgpackish = 24u32.to_be_bytes().to_vec();
    msgpackish.extend_from_slice(&[
        0x92, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xc4, 0xff,
    ]);
    msgpackish.extend_from_slice(&[0xde; 12]);
    vec![
        random,
        small,
        truncated,
        huge,
        huge64,
        msgpackish,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        Vec::new(),
    ]
}

fn send(addr: SocketAddr, data: &[u8]) {
    if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(data);
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
}

#[test]
fn garbage_on_every_port_leaves_every_daemon_serving() -> Result<()> {
    let seed = seed("garbage_on_every_port_leaves_every_daemon_serving");
    let mut rng = StdRng::seed_from_u64(seed);
    let c = Cluster::start()?;
    std::fs::write(c.path("before"), pattern(1, 0, 3 << 20))?;
    let before = file_hash(&c.path("before"))?;

    let info = c.info()?;
    let mut ports: Vec<(String, SocketAddr)> = Vec::new();
    for p in info.processes.iter().filter(|p| p.role != "mount") {
        // A healer listens on nothing (its address is empty).
        for a in [Some(&p.addr), p.raft_addr.as_ref(), p.control_addr.as_ref()]
            .into_iter()
            .flatten()
            .filter(|a| !a.is_empty())
        {
            ports.push((format!("{} {} {a}", p.role, p.id), a.parse()?));
        }
    }
    assert!(ports.len() >= 2 + 2 * 6, "every daemon port: {ports:?}");
    // Connections that open and then say nothing stay open while everything else goes on.
    let idle: Vec<TcpStream> = ports
        .iter()
        .filter_map(|(_, a)| TcpStream::connect_timeout(a, Duration::from_secs(2)).ok())
        .collect();
    for round in 0..3 {
        for (name, addr) in &ports {
            for data in payloads(&mut rng) {
                send(*addr, &data);
            }
            eprintln!("round {round}: sent garbage to {name}");
        }
    }

    for p in &info.processes {
        assert!(
            pid_alive(p.pid),
            "{} {} died on bad input:\n{}",
            p.role,
            p.id,
            c.diagnostics()
        );
    }
    let s = c.status()?;
    assert!(!s["metadata"]["leader"].is_null());
    let ups = s["chunkservers"]
        .as_array()
        .map_or(0, |a| a.iter().filter(|cs| cs["up"] == true).count());
    assert_eq!(ups, 6, "every chunkserver still up");
    assert_eq!(
        file_hash(&c.path("before"))?,
        before,
        "data written before is intact"
    );
    std::fs::write(c.path("after"), pattern(2, 0, 1 << 20))?;
    assert_eq!(std::fs::read(c.path("after"))?, pattern(2, 0, 1 << 20));
    drop(idle);
    Ok(())
}
