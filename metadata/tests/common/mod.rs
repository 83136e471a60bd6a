//! Helpers shared by the metadata service's integration tests.

/// Free loopback ports for replicas that must know each other's addresses before they bind.
///
/// Drawn at random from below the kernel's ephemeral range (`ip_local_port_range`, 32768 up
/// by default): a port the kernel hands out for `127.0.0.1:0` is also one it hands to the
/// next outgoing connection, so a replica started later in a test (after its peers had
/// connected to each other) could find its port taken by one of those connections.
/// Every port is held open until all are chosen, so none repeats.
pub fn free_ports(n: usize) -> Vec<u16> {
    let lo_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&lo| lo > 12000)
        .unwrap_or(32768);
    let (lo, hi) = (lo_ephemeral - 12000, lo_ephemeral);
    let mut held = Vec::new();
    for _ in 0..n * 200 {
        if held.len() == n {
            break;
        }
        let port = lo + rand::random::<u16>() % (hi - lo);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    assert_eq!(held.len(), n, "no {n} free ports in {lo}..{hi}");
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}
