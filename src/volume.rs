//! `rawfs volume create | list | resize | delete`: block volumes, served over NBD by
//! `rawfs nbd` as exports named after them.
//!
//! ```text
//!  --metadata ADDRS | --dir DIR | $RAWFS_METADATA ─▶ MetadataClient ─▶ rawfs_nbd::Volumes
//!      (a volume is the sparse file /.rawfs-volumes/NAME)
//! ```

use crate::admin::ClusterArgs;
use crate::size::{ByteSize, Human};
use rawfs_metadata_api::client::{ClientTimeouts, MetadataClient};
use rawfs_nbd::{VolumeError, VolumeInfo, Volumes};
use std::process::ExitCode;

/// `rawfs volume`.
#[derive(clap::Args, Debug)]
pub struct VolumeCmd {
    #[command(subcommand)]
    pub action: VolumeAction,
}

/// What `rawfs volume` does.
#[derive(clap::Subcommand, Debug)]
pub enum VolumeAction {
    /// Create a thin volume (nothing is allocated until written).
    Create(CreateArgs),
    /// List volumes with their size and the bytes they use.
    List(ListArgs),
    /// Grow a volume (volumes never shrink).
    Resize(ResizeArgs),
    /// Delete a volume and free its space.
    Delete(DeleteArgs),
}

/// Flags of `rawfs volume create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Volume name (also its NBD export name): 1-128 of A-Z a-z 0-9 . _ -
    pub name: String,
    /// Size of the block device: bytes, or with a K/M/G/T suffix; a multiple of 512.
    #[arg(long)]
    pub size: ByteSize,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `rawfs volume list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Print JSON: `[{"name", "size", "used_bytes"}]`.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `rawfs volume resize`.
#[derive(clap::Args, Debug)]
pub struct ResizeArgs {
    /// Volume name.
    pub name: String,
    /// New size, not smaller than the current one.
    #[arg(long)]
    pub size: ByteSize,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `rawfs volume delete`.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    /// Volume name.
    pub name: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// The volumes of a list as JSON (the same keys as `rawfs status --json` uses).
pub fn volumes_json(list: &[VolumeInfo]) -> serde_json::Value {
    serde_json::Value::Array(
        list.iter()
            .map(
                |v| serde_json::json!({"name": v.name, "size": v.size, "used_bytes": v.used_bytes}),
            )
            .collect(),
    )
}

fn table(list: &[VolumeInfo]) -> String {
    let width = list.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{:<width$}  {:>12}  {:>12}\n", "NAME", "SIZE", "USED");
    for v in list {
        out.push_str(&format!(
            "{:<width$}  {:>12}  {:>12}\n",
            v.name,
            Human(v.size).to_string(),
            Human(v.used_bytes).to_string()
        ));
    }
    out
}

/// Runs a `rawfs volume` subcommand: exit 0 on success, 1 when it failed, 2 for wrong
/// arguments.
pub fn run(cmd: VolumeCmd) -> ExitCode {
    let cluster = match &cmd.action {
        VolumeAction::Create(a) => &a.cluster,
        VolumeAction::List(a) => &a.cluster,
        VolumeAction::Resize(a) => &a.cluster,
        VolumeAction::Delete(a) => &a.cluster,
    };
    let addrs = match cluster.resolve() {
        Ok((addrs, _)) => addrs,
        Err(e) => {
            eprintln!("rawfs volume: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rawfs volume: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let volumes = Volumes::new(MetadataClient::new(addrs, ClientTimeouts::default()));
    let outcome: Result<String, VolumeError> = rt.block_on(async {
        match cmd.action {
            VolumeAction::Create(a) => volumes
                .create(&a.name, a.size.0)
                .await
                .map(|v| format!("created volume {} ({})\n", v.name, Human(v.size))),
            VolumeAction::List(a) => volumes.list().await.map(|list| {
                if a.json {
                    format!("{}\n", volumes_json(&list))
                } else {
                    table(&list)
                }
            }),
            VolumeAction::Resize(a) => volumes
                .resize(&a.name, a.size.0)
                .await
                .map(|v| format!("volume {} is {}\n", v.name, Human(v.size))),
            VolumeAction::Delete(a) => volumes
                .delete(&a.name)
                .await
                .map(|()| format!("deleted volume {}\n", a.name)),
        }
    });
    match outcome {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e @ (VolumeError::BadName(_) | VolumeError::BadSize { .. })) => {
            eprintln!("rawfs volume: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("rawfs volume: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_output_has_a_table_and_stable_json() {
        let list = vec![VolumeInfo {
            name: "vm1".into(),
            ino: 9,
            size: 1 << 30,
            used_bytes: 3 << 20,
        }];
        let t = table(&list);
        assert!(t.starts_with("NAME"));
        assert!(
            t.contains("vm1") && t.contains("1.0 GiB") && t.contains("3.0 MiB"),
            "{t}"
        );
        assert_eq!(
            volumes_json(&list),
            serde_json::json!([{"name": "vm1", "size": 1073741824u64, "used_bytes": 3145728u64}])
        );
    }
}
