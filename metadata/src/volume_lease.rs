//! Writer leases of block volumes: one NBD server at a time may write a single-writer volume,
//! whichever server its clients attach to (each server also keeps one writing connection
//! per volume itself, see the nbd crate's catalog).
//!
//! ```text
//!  nbd server ── volume_lease(ino, holder, ttl, renew) ─▶ leader registry (soft state)
//!     granted: writes allowed until request time + ttl; renewed every ttl / 3
//!     LeaseHeld: the connection gets the volume read-only
//!  last connection closes ── end_volume_lease(ino, holder)
//! ```
//!
//! Soft state, like the healer lease: a new leader does not know who held what. For
//! [`LEASE_MAX`] after taking office (or restarting) it grants only renewals (a holder whose lease, granted
//! by an earlier leader, is still running by its own clock says `renew`), and the first
//! renewal of a volume wins. After that every live holder has renewed, so a lease a new
//! claimant gets can have no other holder. A holder that cannot renew stops writing when
//! its own clock says the lease ran out. A cluster that never granted a lease skips the
//! wait (`leases.rs`), so the first attach after `rawfs up` is not held up.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{Ino, MetaError, MetaResult};

use crate::healing::LEASE_MAX;
use crate::server::Server;

/// One volume's writer lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VolumeLease {
    holder: u64,
    until: Instant,
    /// The leader term that granted it: a lease from an earlier term of this replica is
    /// treated like one from another leader.
    term: u64,
}

/// Every volume's writer lease granted by this leader.
pub(crate) type VolumeLeases = HashMap<Ino, VolumeLease>;

/// Grants (or refuses) `holder` the writer lease of `ino` for `ttl` (capped at
/// [`LEASE_MAX`]); returns how long it runs. A zero `ttl` only asks whether it would be
/// granted.
pub(crate) fn decide(
    leases: &mut VolumeLeases,
    (ino, holder): (Ino, u64),
    ttl: Duration,
    renew: bool,
    (term, in_office): (u64, Duration),
    now: Instant,
) -> Result<Duration, MetaError> {
    let ttl = ttl.min(LEASE_MAX);
    match leases.get(&ino) {
        Some(l) if l.term == term && l.until > now && l.holder != holder => {
            return Err(MetaError::LeaseHeld {
                holder: l.holder,
                remaining_ms: millis(l.until.saturating_duration_since(now)),
            });
        }
        Some(l) if l.term == term && l.until > now => {}
        // Nothing granted in this term: one from an earlier leader, or from this replica
        // before a restart (openraft restores a sole leader in its old term), may still run.
        _ if in_office < LEASE_MAX && !renew => {
            return Err(MetaError::LeaseHeld {
                holder: 0,
                remaining_ms: millis(LEASE_MAX - in_office),
            });
        }
        _ => {}
    }
    if ttl.is_zero() {
        // A probe: the lease is free for `holder`, nothing taken.
        return Ok(ttl);
    }
    leases.insert(
        ino,
        VolumeLease {
            holder,
            until: now + ttl,
            term,
        },
    );
    Ok(ttl)
}

/// Drops `holder`'s lease of `ino`, if it has it.
pub(crate) fn end(leases: &mut VolumeLeases, ino: Ino, holder: u64) {
    if leases.get(&ino).is_some_and(|l| l.holder == holder) {
        leases.remove(&ino);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Server {
    /// `volume_lease`: see the module docs.
    pub(crate) async fn do_volume_lease(
        &self,
        (ino, holder): (Ino, u64),
        ttl_ms: u64,
        renew: bool,
    ) -> MetaResult<u64> {
        let term = self.leader_term().await?;
        let in_office = self.lease_office(term, ttl_ms > 0).await?;
        let now = Instant::now();
        let mut reg = self.registry();
        // Expired leases go, so the map holds only volumes in use.
        reg.volume_leases.retain(|_, l| l.until > now);
        let granted = decide(
            &mut reg.volume_leases,
            (ino, holder),
            Duration::from_millis(ttl_ms),
            renew,
            (term, in_office),
            now,
        )?;
        Ok(millis(granted))
    }

    /// `end_volume_lease`.
    pub(crate) async fn do_end_volume_lease(&self, ino: Ino, holder: u64) -> MetaResult<()> {
        self.leader_term().await?;
        end(&mut self.registry().volume_leases, ino, holder);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TERM: u64 = 4;
    const SETTLED: Duration = Duration::from_secs(60);

    #[test]
    fn one_writer_per_volume_until_it_ends_or_lapses() {
        let t0 = Instant::now();
        let mut l = VolumeLeases::new();
        let ttl = Duration::from_secs(5);
        assert_eq!(
            decide(&mut l, (7, 1), ttl, false, (TERM, SETTLED), t0),
            Ok(ttl)
        );
        // Another holder is refused; another volume is not.
        let refused = decide(&mut l, (7, 2), ttl, false, (TERM, SETTLED), t0);
        assert!(matches!(
            refused,
            Err(MetaError::LeaseHeld { holder: 1, .. })
        ));
        assert!(decide(&mut l, (8, 2), ttl, false, (TERM, SETTLED), t0).is_ok());
        // The holder renews; the cap applies.
        let t1 = t0 + Duration::from_secs(4);
        let long = Duration::from_secs(3600);
        assert_eq!(
            decide(&mut l, (7, 1), long, true, (TERM, SETTLED), t1),
            Ok(LEASE_MAX)
        );
        // Lapsed: the next claimant gets it.
        let t2 = t1 + LEASE_MAX + Duration::from_millis(1);
        assert!(decide(&mut l, (7, 2), ttl, false, (TERM, SETTLED), t2).is_ok());
        // A probe answers like a claim but takes nothing.
        assert!(decide(&mut l, (7, 3), Duration::ZERO, false, (TERM, SETTLED), t2).is_err());
        assert!(decide(&mut l, (9, 3), Duration::ZERO, false, (TERM, SETTLED), t2).is_ok());
        assert!(decide(&mut l, (9, 4), ttl, false, (TERM, SETTLED), t2).is_ok());
        // Ended by its holder only.
        end(&mut l, 7, 1);
        assert!(decide(&mut l, (7, 3), ttl, false, (TERM, SETTLED), t2).is_err());
        end(&mut l, 7, 2);
        assert!(decide(&mut l, (7, 3), ttl, false, (TERM, SETTLED), t2).is_ok());
    }

    #[test]
    fn a_new_leader_grants_only_renewals_at_first() {
        let t0 = Instant::now();
        let mut l = VolumeLeases::new();
        let ttl = Duration::from_secs(5);
        // Granted in an earlier term: the new term's leader does not count it, but waits.
        decide(&mut l, (7, 1), ttl, false, (TERM, SETTLED), t0).unwrap();
        let early = Duration::from_secs(2);
        let refused = decide(&mut l, (7, 2), ttl, false, (TERM + 1, early), t0);
        assert!(matches!(
            refused,
            Err(MetaError::LeaseHeld { holder: 0, .. })
        ));
        // The holder's renewal is granted, and then it holds the lease in the new term.
        decide(&mut l, (7, 1), ttl, true, (TERM + 1, early), t0).unwrap();
        let refused = decide(&mut l, (7, 2), ttl, true, (TERM + 1, early), t0);
        assert!(matches!(
            refused,
            Err(MetaError::LeaseHeld { holder: 1, .. })
        ));
        let refused = decide(&mut l, (7, 2), ttl, false, (TERM + 1, SETTLED), t0);
        assert!(matches!(
            refused,
            Err(MetaError::LeaseHeld { holder: 1, .. })
        ));
        // A volume nobody renewed is free once the warm-up is over.
        assert!(decide(&mut l, (9, 2), ttl, false, (TERM + 1, early), t0).is_err());
        assert!(decide(&mut l, (9, 2), ttl, false, (TERM + 1, LEASE_MAX), t0).is_ok());
        // Even in the first term: a replica restarted as leader keeps its term, not its map.
        let mut restarted = VolumeLeases::new();
        assert!(decide(&mut restarted, (9, 2), ttl, false, (1, Duration::ZERO), t0).is_err());
    }
}
