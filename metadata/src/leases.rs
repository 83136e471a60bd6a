//! The warm-up shared by the leader's leases (the healer lease, `healing.rs`; volume writer
//! leases, `volume_lease.rs`; readers' leased opens, `open_table.rs`, whose removals of
//! links wait in place of grants).
//!
//! Leases are the leader's soft state. A new leader, or a sole leader restarted in its old
//! term, cannot know what its predecessor granted, so for [`LEASE_MAX`] after taking office
//! it grants no new lease (renewals only). That wait is needless when no lease was ever
//! granted, which is every cluster's first start: `rawfs up` followed at once by an NBD
//! attach would otherwise stall up to 10 s at the handshake.
//!
//! ```text
//!  first grant in term T ── RecordLeaseTerm{T} (replicated, committed) ──▶ then grant
//!  new leader, < LEASE_MAX in office: recorded term 0 ─▶ no lease ever: grant at once
//!                                      otherwise      ─▶ renewals only until LEASE_MAX
//! ```
//!
//! The record is committed before the first grant of each term, so a grant always has a
//! record at or above its term; a leader reading 0 (after `ensure_leader`, which applies
//! everything committed before it) knows no lease can be running.

use std::time::{Duration, Instant};

use rawfs_metadata_api::MetaResult;

use crate::commands::Command;
use crate::healing::LEASE_MAX;
use crate::server::Server;
use crate::store::{Op, Tables, LEASE_TERM};

/// Applies `RecordLeaseTerm`: the recorded term only grows.
pub(crate) fn record(t: &mut Tables, term: u64) -> Op<()> {
    if t.counter(LEASE_TERM)? < term {
        t.set_counter(LEASE_TERM, term)?;
    }
    Ok(())
}

impl Server {
    /// How long this leader counts as in office for lease decisions in `term` (call after
    /// `leader_term`): [`LEASE_MAX`] or more once no earlier lease can be running. Records
    /// the term first when `granting`, so that a later leader knows a lease may exist.
    pub(crate) async fn lease_office(&self, term: u64, granting: bool) -> MetaResult<Duration> {
        let (in_office, known) = {
            let reg = self.registry();
            let known = reg.leases_before.filter(|(t, _)| *t == term);
            (reg.in_office(Instant::now()), known)
        };
        let before = match known {
            Some((_, before)) => before,
            None if in_office >= LEASE_MAX => true,
            None => {
                // Read once per term, before this leader records anything itself.
                let recorded = self.0.sm.read(|rt| Ok(rt.counter(LEASE_TERM)?))?;
                let before = recorded != 0;
                self.registry().leases_before = Some((term, before));
                before
            }
        };
        let settled = if before { in_office } else { LEASE_MAX };
        if granting && self.registry().lease_term_recorded < term {
            self.propose(Command::RecordLeaseTerm { term }).await?;
            let mut reg = self.registry();
            reg.lease_term_recorded = reg.lease_term_recorded.max(term);
        }
        Ok(settled)
    }
}
