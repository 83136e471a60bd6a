//! `rawfs healer`: runs a healer, or (`set`) changes the cluster's repair and scrub limits,
//! or (`status`) shows them with what each healer reports.
//!
//! ```text
//!  rawfs healer set [--repair-rate RATE] [--scrub-rate RATE]
//!     ──set_healer_settings(RateChange, RateChange)──▶ metadata leader (replicated)
//!        healers read it back with every report, chunkservers with every heartbeat
//!     ◀── HealerSettings as they are now ── printed
//!  rawfs healer status [--json] ──status()──▶ settings + healers[] (the leader's soft state)
//! ```
//!
//! RATE is bytes per second (`64M`, `64M/s`, `0`) or `default`, which unsets the cluster
//! setting so each daemon's own flag applies again.

use crate::admin::ClusterArgs;
use crate::size::{ByteSize, ParseValueError};
use crate::status::healer::{healers_json, healers_table, settings_text};
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use rawfs_metadata_api::{HealerSettings, RateChange};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

/// `rawfs healer`: the daemon's flags, or an operator subcommand.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct HealerCmd {
    #[command(subcommand)]
    pub admin: Option<HealerAdmin>,
    #[command(flatten)]
    pub run: crate::daemon::HealerArgs,
}

/// Operator subcommands of `rawfs healer`.
#[derive(clap::Subcommand, Debug)]
pub enum HealerAdmin {
    /// Change the cluster's repair and scrub limits (replicated; they survive restarts).
    Set(SetArgs),
    /// Show the limits and what each healer is doing.
    Status(HealerStatusArgs),
}

/// Flags of `rawfs healer set`; at least one limit is required.
#[derive(clap::Args, Debug)]
#[command(group(
    clap::ArgGroup::new("change")
        .required(true)
        .multiple(true)
        .args(["repair_rate", "scrub_rate"])
))]
pub struct SetArgs {
    /// Bytes per second repairs move at most, e.g. `64M` or `64M/s` (0 = unlimited;
    /// `default`: each healer's --repair-rate).
    #[arg(long, value_name = "RATE")]
    pub repair_rate: Option<Rate>,
    /// Bytes per second each chunkserver's scrub reads at most (0 = paused; `default`: each
    /// chunkserver's --scrub-rate).
    #[arg(long, value_name = "RATE")]
    pub scrub_rate: Option<Rate>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `rawfs healer status`.
#[derive(clap::Args, Debug)]
pub struct HealerStatusArgs {
    /// Print JSON in a stable shape instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// A limit given on the command line: bytes per second, or back to the daemons' defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// `default`: unset the cluster setting.
    Default,
    /// Bytes per second.
    PerSec(u64),
}

impl FromStr for Rate {
    type Err = ParseValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("default") {
            return Ok(Rate::Default);
        }
        let t = t.strip_suffix("/s").unwrap_or(t);
        t.parse::<ByteSize>()
            .map(|b| Rate::PerSec(b.0))
            .map_err(|_| ParseValueError::Size(s.to_string()))
    }
}

impl Rate {
    /// The change to send (`None`, flag not given: the limit is kept).
    pub fn change(rate: Option<Rate>) -> RateChange {
        match rate {
            None => RateChange::Keep,
            Some(Rate::Default) => RateChange::Unset,
            Some(Rate::PerSec(n)) => RateChange::Set(n),
        }
    }
}

/// How long `rawfs healer set` tries to reach the metadata leader.
const SET_TIMEOUT: Duration = Duration::from_secs(5);

/// Why `rawfs healer set` failed.
#[derive(Debug, thiserror::Error)]
enum SetError {
    #[error("cannot change the settings at {addrs}: {reason}")]
    Failed { addrs: String, reason: String },
}

async fn set(
    addrs: &[String],
    repair: RateChange,
    scrub: RateChange,
) -> Result<HealerSettings, SetError> {
    let failed = |reason: String| SetError::Failed {
        addrs: addrs.join(","),
        reason,
    };
    let client = MetadataClient::new(
        addrs.to_vec(),
        ClientTimeouts {
            call: Duration::from_secs(2),
            op: SET_TIMEOUT,
        },
    );
    let call = client.set_healer_settings(repair, scrub);
    match tokio::time::timeout(SET_TIMEOUT + Duration::from_millis(500), call).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(_) => Err(failed(format!("no answer within {SET_TIMEOUT:?}"))),
    }
}

/// Runs `rawfs healer set` or `rawfs healer status`. Exit 0 on success, 1 when the metadata
/// service cannot be reached or refuses, 2 for wrong arguments.
pub fn run(admin: HealerAdmin) -> ExitCode {
    let (cmd, cluster) = match &admin {
        HealerAdmin::Set(a) => ("set", &a.cluster),
        HealerAdmin::Status(a) => ("status", &a.cluster),
    };
    let (addrs, rt) = match crate::admin::prepare(&format!("healer {cmd}"), cluster) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let out = match admin {
        HealerAdmin::Set(a) => {
            let (repair, scrub) = (Rate::change(a.repair_rate), Rate::change(a.scrub_rate));
            rt.block_on(set(&addrs, repair, scrub))
                .map(|s| settings_text(&s))
                .map_err(|e| e.to_string())
        }
        HealerAdmin::Status(a) => rt
            .block_on(crate::status::fetch(&addrs, crate::status::STATUS_TIMEOUT))
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let v = healers_json(&s);
                if a.json {
                    serde_json::to_string_pretty(&v)
                        .map(|j| j + "\n")
                        .map_err(|e| e.to_string())
                } else {
                    Ok(healers_table(&v))
                }
            }),
    };
    match out {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rawfs healer {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_as_sizes_per_second_or_default() {
        assert_eq!("default".parse(), Ok(Rate::Default));
        assert_eq!("Default".parse(), Ok(Rate::Default));
        assert_eq!("0".parse(), Ok(Rate::PerSec(0)));
        assert_eq!("64M".parse(), Ok(Rate::PerSec(64 << 20)));
        assert_eq!("64M/s".parse(), Ok(Rate::PerSec(64 << 20)));
        assert_eq!("10MiB/s".parse(), Ok(Rate::PerSec(10 << 20)));
        for bad in ["", "/s", "fast", "-1", "64M/h", "64M/s/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} should not parse");
        }
        assert_eq!(Rate::change(None), RateChange::Keep);
        assert_eq!(Rate::change(Some(Rate::Default)), RateChange::Unset);
        assert_eq!(Rate::change(Some(Rate::PerSec(5))), RateChange::Set(5));
    }
}
