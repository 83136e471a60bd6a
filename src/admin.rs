//! `rawfs metadata add-peer | remove-peer`: membership changes of the metadata group, online.
//!
//! ```text
//!  --metadata ADDRS | --dir DIR (cluster.json) | $RAWFS_METADATA
//!        -> MetadataClient (finds the leader, follows redirects, retries)
//!        -> add_peer(id, addr, raft_addr): learner, catch up, then voter
//!           remove_peer(id)
//! ```
//!
//! Adding a replica: start it first with `rawfs metadata --id N ...` and *without*
//! `--bootstrap` (an empty replica then waits to be added), then run `add-peer`; the call
//! returns once the new replica has caught up and votes. Replacing a replica whose disk was
//! lost: `remove-peer`, wipe its data directory, start it again without `--bootstrap`,
//! `add-peer`.

use crate::cluster_file::ClusterFile;
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// How the operator commands find the cluster: `--metadata`, `--dir` or `$RAWFS_METADATA`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ClusterArgs {
    /// A cluster directory of `rawfs up`: addresses (and pids) come from its cluster.json.
    #[arg(long, conflicts_with = "metadata")]
    pub dir: Option<PathBuf>,
    /// Metadata client addresses, comma separated.
    #[arg(long, env = "RAWFS_METADATA", value_delimiter = ',')]
    pub metadata: Vec<String>,
}

/// Why the cluster's addresses could not be found.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(transparent)]
    ClusterFile(#[from] crate::cluster_file::ClusterFileError),
    #[error("no cluster.json in {0}: is `rawfs up` running there?")]
    NoClusterFile(PathBuf),
    #[error("no metadata address: give --metadata ADDRS, --dir DIR or set RAWFS_METADATA")]
    NoAddress,
}

impl ClusterArgs {
    /// The metadata addresses, and the cluster file when `--dir` was given.
    pub fn resolve(&self) -> Result<(Vec<String>, Option<ClusterFile>), TargetError> {
        let (addrs, cluster) = match &self.dir {
            Some(dir) => {
                let cf = ClusterFile::load(dir)?
                    .ok_or_else(|| TargetError::NoClusterFile(dir.clone()))?;
                (cf.metadata_addrs(), Some(cf))
            }
            None => (
                self.metadata
                    .iter()
                    .map(|a| a.trim().to_string())
                    .filter(|a| !a.is_empty())
                    .collect(),
                None,
            ),
        };
        if addrs.is_empty() {
            return Err(TargetError::NoAddress);
        }
        Ok((addrs, cluster))
    }
}

/// `rawfs metadata`: runs a replica, or (with a subcommand) changes the group's membership.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct MetadataCmd {
    #[command(subcommand)]
    pub admin: Option<MetadataAdmin>,
    #[command(flatten)]
    pub run: crate::config::MetadataArgs,
}

/// Membership commands of `rawfs metadata`.
#[derive(clap::Subcommand, Debug)]
pub enum MetadataAdmin {
    /// Add a replica to the group online (it must already run, started without --bootstrap).
    AddPeer(AddPeerArgs),
    /// Remove a replica from the group online (the leader itself may be removed).
    RemovePeer(RemovePeerArgs),
}

/// Flags of `rawfs metadata add-peer`.
#[derive(clap::Args, Debug)]
pub struct AddPeerArgs {
    /// Id of the new replica (unique in the group, > 0).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,
    /// Its client address (what it was started with as --listen).
    #[arg(long)]
    pub addr: String,
    /// Its replication address (what it was started with as --raft-listen).
    #[arg(long)]
    pub raft_addr: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// How long to wait for the new replica to catch up and become a voter.
    #[arg(long, default_value = "5m")]
    pub timeout: crate::size::Dur,
}

/// Flags of `rawfs metadata remove-peer`.
#[derive(clap::Args, Debug)]
pub struct RemovePeerArgs {
    /// Id of the replica to remove.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub id: u64,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// How long to wait for the membership change to commit.
    #[arg(long, default_value = "1m")]
    pub timeout: crate::size::Dur,
}

/// Deadline of one attempt of a membership call: adding a learner waits for it to catch up,
/// which may take a while for a big namespace, so the attempt may use the whole timeout.
fn admin_client(addrs: Vec<String>, timeout: Duration) -> MetadataClient {
    MetadataClient::new(
        addrs,
        ClientTimeouts {
            call: timeout,
            op: timeout,
        },
    )
}

/// What an operator command needs first: the metadata addresses (`--dir`/`--metadata`) and a
/// runtime. On failure the error is printed as `rawfs {cmd}: ...` and the exit code returned
/// (2 for a missing or bad target, 1 if no runtime could be made).
pub fn prepare(
    cmd: &str,
    cluster: &ClusterArgs,
) -> Result<(Vec<String>, tokio::runtime::Runtime), ExitCode> {
    let addrs = match cluster.resolve() {
        Ok((addrs, _)) => addrs,
        Err(e) => {
            eprintln!("rawfs {cmd}: {e}");
            return Err(ExitCode::from(2));
        }
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Ok((addrs, rt)),
        Err(e) => {
            eprintln!("rawfs {cmd}: cannot start the async runtime: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// Runs a membership subcommand. Exit 0 when the change is committed, 1 when it failed, 2 for
/// wrong arguments.
pub fn run(admin: MetadataAdmin) -> ExitCode {
    let (cmd, cluster) = match &admin {
        MetadataAdmin::AddPeer(a) => ("add-peer", &a.cluster),
        MetadataAdmin::RemovePeer(a) => ("remove-peer", &a.cluster),
    };
    let (addrs, rt) = match prepare(&format!("metadata {cmd}"), cluster) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let outcome = match admin {
        MetadataAdmin::AddPeer(a) => {
            if a.addr.trim().is_empty() || a.raft_addr.trim().is_empty() {
                eprintln!("rawfs metadata add-peer: --addr and --raft-addr must not be empty");
                return ExitCode::from(2);
            }
            let client = admin_client(addrs, a.timeout.0);
            rt.block_on(client.add_peer(a.id, a.addr.clone(), a.raft_addr.clone()))
                .map(|()| format!("replica {} ({}) is a voting member", a.id, a.addr))
        }
        MetadataAdmin::RemovePeer(a) => {
            let client = admin_client(addrs, a.timeout.0);
            rt.block_on(client.remove_peer(a.id))
                .map(|()| format!("replica {} is no longer a member", a.id))
        }
    };
    match outcome {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rawfs metadata {cmd}: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_come_from_flags_or_the_cluster_file() {
        let a = ClusterArgs {
            dir: None,
            metadata: vec!["a:1".into(), " ".into(), "b:2".into()],
        };
        assert_eq!(a.resolve().expect("addrs").0, vec!["a:1", "b:2"]);
        assert!(matches!(
            ClusterArgs::default().resolve(),
            Err(TargetError::NoAddress)
        ));
        let d = tempfile::tempdir().expect("tempdir");
        let a = ClusterArgs {
            dir: Some(d.path().to_path_buf()),
            metadata: vec![],
        };
        assert!(matches!(a.resolve(), Err(TargetError::NoClusterFile(_))));
    }
}
