//! The healer's run-time limits and its progress reports.
//!
//! ```text
//!  rawfs healer set ──set_healer_settings──▶ log: SetHealerSettings ──▶ COUNTERS
//!     ("healer.repair_rate", "healer.scrub_rate"; absent = not set)
//!  healer ──healer_report(id, report) every lease renewal──▶ leader: reports (soft state)
//!         ◀── the settings (repair rate)
//!  chunkserver ──heartbeat──▶ leader ◀── reply.scrub_rate
//!  rawfs status / rawfs healer status ◀── settings + fresh reports
//! ```
//!
//! The limits are replicated so that they hold across restarts and failovers; the reports
//! are not (they are rebuilt within one renewal after a failover), and a report older than
//! [`REPORT_FRESH`] is no longer shown.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rawfs_metadata_api::{
    HealerInfo, HealerReport, HealerSettings, MetaResult, RateChange, ReqId, Timespec,
};

use crate::commands::Command;
use crate::server::{tracked, Server};
use crate::store::{Op, ReadTables, Tables};

const REPAIR_RATE: &str = "healer.repair_rate";
const SCRUB_RATE: &str = "healer.scrub_rate";

/// A healer that has not reported for this long is left out of the status.
pub(crate) const REPORT_FRESH: Duration = Duration::from_secs(30);

/// The limits as the applied state has them.
pub(crate) fn settings(rt: &ReadTables) -> Op<HealerSettings> {
    let get = |k| -> Op<Option<u64>> { Ok(rt.counters.get(k)?.map(|g| g.value())) };
    Ok(HealerSettings {
        repair_rate: get(REPAIR_RATE)?,
        scrub_rate: get(SCRUB_RATE)?,
    })
}

/// Applies `SetHealerSettings`.
pub(crate) fn set_settings(t: &mut Tables, repair: RateChange, scrub: RateChange) -> Op<()> {
    for (key, change) in [(REPAIR_RATE, repair), (SCRUB_RATE, scrub)] {
        match change {
            RateChange::Keep => {}
            RateChange::Unset => {
                t.counters.remove(key)?;
            }
            RateChange::Set(v) => {
                t.counters.insert(key, v)?;
            }
        }
    }
    Ok(())
}

/// The latest report of each healer, on the leader.
#[derive(Debug, Default)]
pub(crate) struct Reports(HashMap<u64, (HealerReport, Instant)>);

impl Reports {
    pub fn record(&mut self, holder: u64, report: HealerReport, now: Instant) {
        self.0
            .retain(|_, (_, at)| now.duration_since(*at) < REPORT_FRESH);
        self.0.insert(holder, (report, now));
    }

    /// The fresh reports by healer id; `leader` is the lease holder now.
    pub fn view(&self, leader: Option<u64>, now: Instant) -> Vec<HealerInfo> {
        let mut out: Vec<HealerInfo> = self
            .0
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) < REPORT_FRESH)
            .map(|(&id, (report, at))| HealerInfo {
                id,
                leader: leader == Some(id),
                age_ms: now.saturating_duration_since(*at).as_millis() as u64,
                report: report.clone(),
            })
            .collect();
        out.sort_by_key(|h| h.id);
        out
    }
}

impl Server {
    /// The limits, read from this replica's applied state.
    pub(crate) fn healer_settings(&self) -> MetaResult<HealerSettings> {
        self.0.sm.read(settings)
    }

    /// `set_healer_settings`: one replicated change, then the limits as they are now.
    pub(crate) async fn do_set_healer_settings(
        &self,
        repair_rate: RateChange,
        scrub_rate: RateChange,
        req: ReqId,
    ) -> MetaResult<HealerSettings> {
        let cmd = Command::SetHealerSettings {
            repair_rate,
            scrub_rate,
        };
        self.propose(tracked(req, Timespec::now(), cmd))
            .await?
            .into_unit()?;
        tracing::info!(?repair_rate, ?scrub_rate, "healer limits changed");
        self.healer_settings()
    }

    /// `healer_report`: kept while fresh; answered with the limits (from the leader only, so
    /// that a healer applies what was last committed).
    pub(crate) async fn do_healer_report(
        &self,
        holder: u64,
        report: HealerReport,
    ) -> MetaResult<HealerSettings> {
        self.leader_term().await?;
        self.registry()
            .reports
            .record(holder, report, Instant::now());
        self.healer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_age_out_and_name_the_leader() {
        let t0 = Instant::now();
        let mut r = Reports::default();
        r.record(7, HealerReport::default(), t0);
        r.record(3, HealerReport::default(), t0 + Duration::from_secs(20));
        let v = r.view(Some(7), t0 + Duration::from_secs(25));
        assert_eq!(
            v.iter().map(|h| (h.id, h.leader)).collect::<Vec<_>>(),
            [(3, false), (7, true)]
        );
        let v = r.view(Some(7), t0 + Duration::from_secs(31));
        assert_eq!(v.iter().map(|h| h.id).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn rate_changes_keep_unset_and_set() {
        assert_eq!(RateChange::Keep.apply(Some(5)), Some(5));
        assert_eq!(RateChange::Unset.apply(Some(5)), None);
        assert_eq!(RateChange::Set(0).apply(None), Some(0));
    }
}
