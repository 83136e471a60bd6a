//! How many metadata replicas `rawfs up` runs: `--metadata-replicas` (1, 3 or 5) on a fresh
//! DIR, and on a DIR with state exactly as many as it was created with.

use super::{dir_is_empty, UpError, ALLOWED_METADATA_REPLICAS, DEFAULT_METADATA_REPLICAS};
use crate::cluster_file::{ClusterFile, Role};
use std::path::Path;

/// Parses `--metadata-replicas`: 1, 3 or 5.
pub(super) fn parse_metadata_replicas(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of replicas"))?;
    if ALLOWED_METADATA_REPLICAS.contains(&n) {
        Ok(n)
    } else if n % 2 == 0 {
        Err(format!(
            "{n} is even: a group of {n} needs {} votes for a majority and survives no more \
             failures than {} replicas would; use 1, 3 or 5",
            n / 2 + 1,
            n.saturating_sub(1)
        ))
    } else {
        Err(format!("{n} replicas are not supported; use 1, 3 or 5"))
    }
}

/// Ids of the metadata replicas with state in `dir` (non-empty `metadata-ID` directories).
fn replicas_with_state(dir: &Path) -> Vec<u64> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let id = e
                .file_name()
                .to_str()?
                .strip_prefix("metadata-")?
                .parse()
                .ok()?;
            (!dir_is_empty(&e.path())).then_some(id)
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// How many metadata replicas to run, and whether the group is new (no replica has state
/// yet, so they start with `--bootstrap`). An existing group keeps its size: the previous
/// run's cluster.json says how many it had (a replica whose disk was wiped still counts),
/// else the replica directories with state do.
pub(super) fn replica_count(
    requested: Option<u64>,
    prev: Option<&ClusterFile>,
    dir: &Path,
) -> Result<(u64, bool), UpError> {
    let with_state = replicas_with_state(dir);
    if with_state.is_empty() {
        return Ok((requested.unwrap_or(DEFAULT_METADATA_REPLICAS), true));
    }
    let listed = prev.map_or(0, |p| p.by_role(Role::Metadata).count() as u64);
    let existing = if listed > 0 {
        listed
    } else {
        with_state
            .last()
            .copied()
            .unwrap_or(DEFAULT_METADATA_REPLICAS)
    };
    match requested {
        Some(n) if n != existing => Err(UpError::ReplicaCount {
            dir: dir.to_path_buf(),
            existing,
            requested: n,
        }),
        _ => Ok((existing, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_file::ProcessEntry;

    #[test]
    fn only_odd_replica_counts_up_to_five_are_accepted() {
        for n in [1, 3, 5] {
            assert_eq!(parse_metadata_replicas(&n.to_string()), Ok(n));
        }
        for n in ["0", "2", "4", "6"] {
            let e = parse_metadata_replicas(n).expect_err(n);
            assert!(e.contains("even"), "{e}");
        }
        assert!(parse_metadata_replicas("7")
            .expect_err("7")
            .contains("not supported"));
        assert!(parse_metadata_replicas("three").is_err());
    }

    #[test]
    fn an_existing_group_keeps_its_size() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            replica_count(None, None, d.path()).expect("fresh"),
            (3, true)
        );
        assert_eq!(
            replica_count(Some(5), None, d.path()).expect("fresh"),
            (5, true)
        );
        let state = |id: u64| {
            let m = d.path().join(format!("metadata-{id}"));
            std::fs::create_dir_all(&m).expect("mkdir");
            std::fs::write(m.join("meta.redb"), b"x").expect("write");
        };
        state(1);
        assert_eq!(
            replica_count(None, None, d.path()).expect("one"),
            (1, false)
        );
        assert_eq!(
            replica_count(Some(1), None, d.path()).expect("one"),
            (1, false)
        );
        match replica_count(Some(3), None, d.path()) {
            Err(UpError::ReplicaCount {
                existing: 1,
                requested: 3,
                ..
            }) => {}
            other => panic!("expected ReplicaCount, got {other:?}"),
        }
        // cluster.json counts a replica whose directory was wiped.
        state(2);
        let prev = ClusterFile {
            mount: "/m".into(),
            processes: (1..=3)
                .map(|id| ProcessEntry {
                    role: Role::Metadata,
                    id,
                    pid: 1,
                    addr: String::new(),
                    data_dir: "/d".into(),
                    raft_addr: None,
                    control_addr: None,
                    exe: None,
                    args: vec![],
                    log: None,
                })
                .collect(),
            up_pid: None,
            ready: true,
        };
        assert_eq!(
            replica_count(None, Some(&prev), d.path()).expect("three"),
            (3, false)
        );
    }
}
