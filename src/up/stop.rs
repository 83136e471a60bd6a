//! How `rawfs up` stops its cluster: in phases, from the processes that hold unflushed data
//! to the ones that store it, each phase finished (or killed at its deadline) before the
//! next begins.
//!
//! ```text
//!  1. NBD server (SIGTERM: it flushes every open volume)  ┐ in parallel; both need the
//!     mount: umount MNT (the kernel writes back dirty     │ chunkservers and the metadata
//!     pages, the helper flushes and ends its session)     ┘ service still running
//!  2. healers          (a repair in flight finishes or is abandoned at a safe point)
//!  3. chunkservers     (their heartbeats need the metadata service)
//!  4. metadata replicas, last
//! ```
//!
//! Stopping everything at once (as before) let chunkservers or the metadata leader go away
//! while the mount or the NBD server were still flushing buffered writes, which then failed.

use super::Cluster;
use crate::cluster_file::Role;
use crate::procs;
use std::time::{Duration, Instant};

/// One stop phase: the roles stopped together and how long they get before SIGKILL.
struct Phase {
    roles: &'static [Role],
    deadline: Duration,
}

/// The phases, in order. The first gets the most time: it flushes data to the others.
const PHASES: [Phase; 4] = [
    Phase {
        roles: &[Role::Nbd, Role::Mount],
        deadline: Duration::from_secs(20),
    },
    Phase {
        roles: &[Role::Healer],
        deadline: Duration::from_secs(5),
    },
    Phase {
        roles: &[Role::Chunkserver],
        deadline: Duration::from_secs(8),
    },
    Phase {
        roles: &[Role::Metadata],
        deadline: Duration::from_secs(8),
    },
];

impl Cluster {
    /// Stops every child phase by phase (see the module docs); unmounts `MNT` cleanly first
    /// (a lazy detach only if it is busy). True if the mountpoint is free at the end.
    pub(super) async fn stop(&mut self) -> bool {
        let mut unmounted = true;
        for (i, phase) in PHASES.iter().enumerate() {
            let start = Instant::now();
            for (e, p) in &mut self.procs {
                // The mount helper is ended by unmounting, not by a signal: on SIGTERM it
                // would detach lazily, which returns before the kernel has written back.
                if phase.roles.contains(&e.role) && e.role != Role::Mount {
                    p.signal(libc::SIGTERM);
                }
            }
            if i == 0 {
                unmounted = self.unmount();
            }
            self.wait_phase(phase, start + phase.deadline).await;
        }
        unmounted
    }

    /// `umount MNT`, or a lazy detach if it is busy (the helper then ends once the last user
    /// has gone, or at the phase deadline). True if MNT is no longer mounted.
    fn unmount(&mut self) -> bool {
        let ok = procs::unmount(&self.mount);
        if !ok {
            eprintln!(
                "rawfs up: {} is still mounted; unmount it by hand",
                self.mount.display()
            );
        }
        ok
    }

    /// Waits until the processes of `phase` have exited, killing those still running at
    /// `deadline`.
    async fn wait_phase(&mut self, phase: &Phase, deadline: Instant) {
        let in_phase = |r: Role| phase.roles.contains(&r);
        while Instant::now() < deadline
            && self
                .procs
                .iter_mut()
                .any(|(e, p)| in_phase(e.role) && p.running())
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for (e, p) in &mut self.procs {
            if !in_phase(e.role) {
                continue;
            }
            if p.running() {
                eprintln!("rawfs up: {} did not stop in time; killing it", p.name);
                p.signal(libc::SIGKILL);
                let _ = p.child.wait();
            } else if let Some(st) = p.exited {
                // One line per process, in stop order: operators (and tests) see what ended
                // when, and whether it ended well.
                eprintln!("rawfs up: stopped {} ({st})", p.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushers_stop_first_and_the_metadata_service_last() {
        let order: Vec<&[Role]> = PHASES.iter().map(|p| p.roles).collect();
        let phase_of = |r: Role| order.iter().position(|p| p.contains(&r));
        let every = [
            Role::Nbd,
            Role::Mount,
            Role::Healer,
            Role::Chunkserver,
            Role::Metadata,
        ];
        for r in every {
            assert!(phase_of(r).is_some(), "{r} is stopped");
        }
        assert_eq!(phase_of(Role::Nbd), Some(0));
        assert_eq!(phase_of(Role::Mount), Some(0));
        assert!(phase_of(Role::Healer) < phase_of(Role::Chunkserver));
        assert_eq!(phase_of(Role::Metadata), Some(order.len() - 1));
    }
}
