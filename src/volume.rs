//! `rawfs volume create | list | resize | delete | snapshot | clone`: block volumes, served
//! over NBD by `rawfs nbd` as exports named after them.
//!
//! ```text
//!  --metadata ADDRS | --dir DIR | $RAWFS_METADATA ─▶ rawfs_client::Client ─▶ rawfs_nbd::Volumes
//!      (a volume is the sparse file /.rawfs-volumes/NAME; snapshots and clones share its
//!       chunks copy-on-write, and snapshots are fenced on the chunkservers)
//! ```

use crate::admin::ClusterArgs;
use crate::size::{ByteSize, Human};
use rawfs_client::{Client, ClientConfig};
use rawfs_metadata_api::StorageClass;
use rawfs_nbd::{CreateOptions, Origin, VolumeError, VolumeInfo, Volumes};
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
    /// Delete a volume (or snapshot, or clone) and free the space only it uses.
    Delete(DeleteArgs),
    /// Take an instant, read-only snapshot of a volume (copy-on-write: it shares the
    /// volume's chunks until either side writes them).
    Snapshot(SnapshotArgs),
    /// Make a writable volume from a snapshot, sharing its chunks until written.
    Clone(CloneArgs),
    /// Change a volume's settings (storage class, multi-conn).
    Set(SetArgs),
}

/// Flags of `rawfs volume create`.
#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// Volume name (also its NBD export name): 1-128 of A-Z a-z 0-9 . _ -
    pub name: String,
    /// Size of the block device: bytes, or with a K/M/G/T suffix; a multiple of 512.
    #[arg(long)]
    pub size: ByteSize,
    /// Storage class of its data: hot (3 replicas), cold (RS 4+2), auto (replicas, RS 4+2
    /// once quiet). Default: auto.
    #[arg(long)]
    pub class: Option<StorageClass>,
    /// Let several NBD clients write the volume at once (advertised as multi-conn; for
    /// clients that coordinate, e.g. nbdcopy's parallel connections). Without it one client
    /// writes at a time and any other connection gets the volume read-only.
    #[arg(long)]
    pub multi_conn: bool,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `rawfs volume set`.
#[derive(clap::Args, Debug)]
pub struct SetArgs {
    /// Volume name.
    pub name: String,
    /// New storage class: hot, cold or auto (applies to its data from now on).
    #[arg(long)]
    pub class: Option<StorageClass>,
    /// Allow several writers (`true`) or one at a time (`false`); applies when the volume
    /// is next opened with no client connected.
    #[arg(long)]
    pub multi_conn: Option<bool>,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `rawfs volume list`.
#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// Print JSON: `[{"name", "size", "used_bytes", "read_only", "origin"}]` (`origin`:
    /// the volume a snapshot was taken of, or the snapshot a clone was made from; null for
    /// a plain volume).
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

/// Flags of `rawfs volume snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// The volume to snapshot.
    pub name: String,
    /// Name of the new snapshot (a read-only volume, exported read-only over NBD).
    pub snap: String,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Flags of `rawfs volume clone`.
#[derive(clap::Args, Debug)]
pub struct CloneArgs {
    /// The snapshot to clone.
    pub snap: String,
    /// Name of the new, writable volume.
    pub new: String,
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

/// A list with where each snapshot or clone came from, as JSON.
fn list_json(list: &[(VolumeInfo, Option<Origin>)]) -> serde_json::Value {
    let plain: Vec<VolumeInfo> = list.iter().map(|(v, _)| v.clone()).collect();
    let mut json = volumes_json(&plain);
    if let Some(items) = json.as_array_mut() {
        for (item, (_, origin)) in items.iter_mut().zip(list) {
            item["read_only"] = serde_json::json!(origin.as_ref().is_some_and(|o| o.read_only));
            item["origin"] = serde_json::json!(origin.as_ref().map(|o| o.from.clone()));
        }
    }
    json
}

/// How the ORIGIN column describes a volume.
fn origin_text(origin: &Option<Origin>) -> String {
    match origin {
        Some(o) if o.read_only => format!("snapshot of {} (read-only)", o.from),
        Some(o) => format!("clone of {}", o.from),
        None => "-".to_string(),
    }
}

fn table(list: &[(VolumeInfo, Option<Origin>)]) -> String {
    let width = list
        .iter()
        .map(|(v, _)| v.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(
        "{:<width$}  {:>12}  {:>12}  ORIGIN\n",
        "NAME", "SIZE", "USED"
    );
    for (v, origin) in list {
        out.push_str(&format!(
            "{:<width$}  {:>12}  {:>12}  {}\n",
            v.name,
            Human(v.size).to_string(),
            Human(v.used_bytes).to_string(),
            origin_text(origin)
        ));
    }
    out
}

/// Every volume with its origin (one extra metadata call per volume).
async fn list_with_origins(
    volumes: &Volumes,
) -> Result<Vec<(VolumeInfo, Option<Origin>)>, VolumeError> {
    let mut out = Vec::new();
    for v in volumes.list().await? {
        let origin = volumes.origin(v.ino).await?;
        out.push((v, origin));
    }
    Ok(out)
}

/// `rawfs volume set`: applies each setting given, and says what it did.
async fn set(volumes: &Volumes, a: &SetArgs) -> Result<String, VolumeError> {
    let v = volumes
        .find(&a.name)
        .await?
        .ok_or_else(|| VolumeError::NotFound(a.name.clone()))?;
    let mut out = String::new();
    if let Some(class) = a.class {
        volumes.set_class(v.ino, class).await?;
        out.push_str(&format!("volume {}: class {class}\n", a.name));
    }
    if let Some(on) = a.multi_conn {
        volumes.set_multi_conn(&a.name, on).await?;
        out.push_str(&format!("volume {}: multi-conn {on}\n", a.name));
    }
    if out.is_empty() {
        out = format!(
            "volume {}: nothing to change (give --class or --multi-conn)\n",
            a.name
        );
    }
    Ok(out)
}

/// Runs a `rawfs volume` subcommand: exit 0 on success, 1 when it failed, 2 for wrong
/// arguments.
pub fn run(cmd: VolumeCmd) -> ExitCode {
    let cluster = match &cmd.action {
        VolumeAction::Create(a) => &a.cluster,
        VolumeAction::List(a) => &a.cluster,
        VolumeAction::Resize(a) => &a.cluster,
        VolumeAction::Delete(a) => &a.cluster,
        VolumeAction::Snapshot(a) => &a.cluster,
        VolumeAction::Clone(a) => &a.cluster,
        VolumeAction::Set(a) => &a.cluster,
    };
    let (addrs, rt) = match crate::admin::prepare("volume", cluster) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // Snapshots also talk to the chunkservers (to fence the shared chunks).
    let client = Client::new(ClientConfig::new(addrs));
    let volumes = Volumes::new(client.meta().clone());
    let outcome: Result<String, VolumeError> = rt.block_on(async {
        match cmd.action {
            VolumeAction::Create(a) => {
                let opts = CreateOptions {
                    class: a.class,
                    multi_conn: a.multi_conn,
                };
                volumes
                    .create_with(&a.name, a.size.0, opts)
                    .await
                    .map(|v| format!("created volume {} ({})\n", v.name, Human(v.size)))
            }
            VolumeAction::Set(a) => set(&volumes, &a).await,
            VolumeAction::List(a) => list_with_origins(&volumes).await.map(|list| {
                if a.json {
                    format!("{}\n", list_json(&list))
                } else {
                    table(&list)
                }
            }),
            VolumeAction::Snapshot(a) => volumes
                .snapshot(client.data(), &a.name, &a.snap)
                .await
                .map(|v| {
                    format!(
                        "created snapshot {} of {} ({})\n",
                        v.name,
                        a.name,
                        Human(v.size)
                    )
                }),
            VolumeAction::Clone(a) => volumes
                .clone_snapshot(client.data(), &a.snap, &a.new)
                .await
                .map(|v| {
                    format!(
                        "created volume {} from snapshot {} ({})\n",
                        v.name,
                        a.snap,
                        Human(v.size)
                    )
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
        let vm1 = VolumeInfo {
            name: "vm1".into(),
            ino: 9,
            size: 1 << 30,
            used_bytes: 3 << 20,
        };
        let snap = VolumeInfo {
            name: "vm1-snap".into(),
            ino: 10,
            ..vm1.clone()
        };
        let origin = Origin {
            read_only: true,
            from: "vm1".into(),
        };
        let list = vec![(vm1.clone(), None), (snap, Some(origin))];
        let t = table(&list);
        assert!(t.starts_with("NAME"));
        assert!(
            t.contains("vm1") && t.contains("1.0 GiB") && t.contains("3.0 MiB"),
            "{t}"
        );
        assert!(t.contains("snapshot of vm1 (read-only)"), "{t}");
        assert_eq!(
            volumes_json(&[vm1]),
            serde_json::json!([{"name": "vm1", "size": 1073741824u64, "used_bytes": 3145728u64}])
        );
        let json = list_json(&list);
        assert_eq!(json[0]["origin"], serde_json::Value::Null);
        assert_eq!(json[1]["origin"], "vm1");
        assert_eq!(json[1]["read_only"], true);
    }
}
