//! Where the daemons of `rawfs up` listen: the previous run's addresses (so chunk locations
//! and clients stay valid), else a fixed layout from `--base-port`, else free loopback ports.
//!
//! ```text
//!  fixed layout from P:  metadata 1..3   P+2(i-1), +1      (P..P+5)
//!                        NBD server      P+6               (see crate::nbd)
//!                        chunkserver i   P+10+2(i-1), +1   (P+10..P+137 for 64)
//!                        metadata 4..5   P+138+2(i-4), +1  (after the largest chunkserver set,
//!                                                           so no layout ever overlaps)
//! ```

use super::UpError;
use crate::cluster_file::{ClusterFile, Role};

/// One daemon to run, with its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    pub role: Role,
    pub id: u64,
    pub addr: String,
    /// Raft address (metadata) or control address (chunkserver).
    pub second: String,
}

/// Chooses every daemon's addresses: the previous run's (so chunk locations and clients stay
/// valid), else a fixed layout from `base`, else free ports from `free_port`.
pub fn plan(
    prev: Option<&ClusterFile>,
    base: Option<u16>,
    metadata: u64,
    chunkservers: u64,
    mut free_port: impl FnMut() -> std::io::Result<u16>,
) -> Result<Vec<Planned>, UpError> {
    let mut out = Vec::new();
    let roles = (1..=metadata)
        .map(|id| (Role::Metadata, id))
        .chain((1..=chunkservers).map(|id| (Role::Chunkserver, id)));
    for (role, id) in roles {
        let reuse = prev.and_then(|p| p.find(role, id)).and_then(|e| {
            let second = match role {
                Role::Metadata => e.raft_addr.clone(),
                _ => e.control_addr.clone(),
            }?;
            Some((e.addr.clone(), second))
        });
        let (addr, second) = match (reuse, base) {
            (Some(r), _) => r,
            (None, Some(b)) => {
                let first = match role {
                    Role::Metadata => metadata_offset(id),
                    _ => 10 + 2 * (id - 1),
                };
                let p = u16::try_from(u64::from(b) + first).map_err(|_| UpError::Ports(b))?;
                let q = p.checked_add(1).ok_or(UpError::Ports(b))?;
                (format!("127.0.0.1:{p}"), format!("127.0.0.1:{q}"))
            }
            (None, None) => {
                let ioe = |e| UpError::Io {
                    what: "cannot find a free port on",
                    path: "127.0.0.1".into(),
                    source: e,
                };
                let p = free_port().map_err(ioe)?;
                let q = free_port().map_err(ioe)?;
                (format!("127.0.0.1:{p}"), format!("127.0.0.1:{q}"))
            }
        };
        out.push(Planned {
            role,
            id,
            addr,
            second,
        });
    }
    Ok(out)
}

/// Offset from `--base-port` of metadata replica `id`'s client port (its raft port is the
/// next one). Replicas 1 to 3 keep the layout of the first releases (`P`..`P+5`), so a cluster
/// grown from 3 to 5 replicas keeps its addresses; 4 and 5 come after the ports of the largest
/// set of chunkservers `up` starts (64).
fn metadata_offset(id: u64) -> u64 {
    if id <= 3 {
        2 * (id.max(1) - 1)
    } else {
        138 + 2 * (id - 4)
    }
}

/// Free loopback ports: every listener stays open until all ports are chosen, so none repeats.
/// They are drawn at random from below the kernel's ephemeral range: a port from that range
/// could be taken by some outgoing connection between this check and the daemon's bind.
pub struct FreePorts(pub Vec<std::net::TcpListener>);

/// Where random ports are drawn from when the ephemeral range cannot be read.
const FALLBACK_PORTS: (u16, u16) = (20000, 32768);

impl FreePorts {
    /// A free port, held open until this is dropped.
    pub fn next(&mut self) -> std::io::Result<u16> {
        let (lo, hi) = non_ephemeral_ports();
        for _ in 0..200 {
            let port = rand::random::<u16>() % (hi - lo) + lo;
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                self.0.push(l);
                return Ok(port);
            }
        }
        // Crowded: let the kernel choose.
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = l.local_addr()?.port();
        self.0.push(l);
        Ok(port)
    }
}

/// A port range below the kernel's ephemeral range (`ip_local_port_range`).
fn non_ephemeral_ports() -> (u16, u16) {
    let lo_eph = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok());
    match lo_eph {
        Some(lo) if lo > 12000 => (lo.saturating_sub(12000).max(10000), lo),
        _ => FALLBACK_PORTS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_file::ProcessEntry;

    fn counter(start: u16) -> impl FnMut() -> std::io::Result<u16> {
        let mut n = start;
        move || {
            n += 1;
            Ok(n)
        }
    }

    #[test]
    fn fixed_layout_from_base_port() {
        let p = plan(None, Some(7000), 3, 6, counter(0)).expect("plan");
        assert_eq!(p.len(), 9);
        assert_eq!(p[0].addr, "127.0.0.1:7000");
        assert_eq!(p[0].second, "127.0.0.1:7001");
        assert_eq!(p[2].role, Role::Metadata);
        assert_eq!(p[2].addr, "127.0.0.1:7004");
        assert_eq!(p[2].second, "127.0.0.1:7005");
        assert_eq!(p[3].role, Role::Chunkserver);
        assert_eq!(p[3].addr, "127.0.0.1:7010");
        assert_eq!(p[8].second, "127.0.0.1:7021");
        assert!(plan(None, Some(65530), 3, 6, counter(0)).is_err());
    }

    #[test]
    fn previous_addresses_are_reused_and_new_ones_picked() {
        let first = plan(None, None, 3, 3, counter(40000)).expect("plan");
        let mut all: Vec<&str> = first
            .iter()
            .flat_map(|p| [p.addr.as_str(), p.second.as_str()])
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 12, "distinct ports");
        let prev = ClusterFile {
            mount: "/m".into(),
            processes: first
                .iter()
                .map(|p| ProcessEntry {
                    role: p.role,
                    id: p.id,
                    pid: 1,
                    addr: p.addr.clone(),
                    data_dir: "/d".into(),
                    raft_addr: (p.role == Role::Metadata).then(|| p.second.clone()),
                    control_addr: (p.role == Role::Chunkserver).then(|| p.second.clone()),
                    exe: None,
                    args: vec![],
                    log: None,
                })
                .collect(),
            up_pid: None,
            ready: true,
        };
        let second = plan(Some(&prev), Some(9000), 3, 4, counter(50000)).expect("plan");
        assert_eq!(&second[..6], &first[..]);
        assert_eq!(
            second[6].addr, "127.0.0.1:9016",
            "a new chunkserver takes the fixed layout"
        );
    }

    #[test]
    fn every_replica_count_has_its_own_ports() {
        for n in [1, 3, 5] {
            let p = plan(None, Some(7000), n, 64, counter(0)).expect("plan");
            assert_eq!(p.len() as u64, n + 64);
            let metas = p.iter().filter(|x| x.role == Role::Metadata).count() as u64;
            assert_eq!(metas, n);
            let mut all: Vec<&str> = p
                .iter()
                .flat_map(|x| [x.addr.as_str(), x.second.as_str()])
                .collect();
            // The NBD server's fixed port (P+6) is taken by nobody else either.
            all.push("127.0.0.1:7006");
            let len = all.len();
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), len, "{n} replicas: every port distinct");
        }
        let p = plan(None, Some(7000), 5, 6, counter(0)).expect("plan");
        assert_eq!(p[3].addr, "127.0.0.1:7138");
        assert_eq!(p[4].second, "127.0.0.1:7141");
    }
}
