//! Rebuilding the store's state from its files on open (see "Crash recovery" in the parent
//! module's docs).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use super::meta;
use super::segment;
use super::Loc;
use super::LogStoreError;
use super::Seg;
use super::State;
use crate::types::LogId;
use crate::types::Vote;

/// Rebuilds the state from the files in `dir` (see "Crash recovery" in the module docs).
pub(super) fn recover(dir: &Path) -> Result<State, LogStoreError> {
    let vote: Option<Vote> = meta::read(dir, meta::VOTE)?;
    let purged: Option<LogId> = meta::read(dir, meta::PURGED)?;
    let hint: Option<meta::Hint> = meta::HintFile::read(dir, meta::COMMITTED);

    let mut names = Vec::new();
    for dent in std::fs::read_dir(dir).map_err(LogStoreError::io("list", dir))? {
        let dent = dent.map_err(LogStoreError::io("list", dir))?;
        let name = dent.file_name();
        let name = name.to_string_lossy();
        if let Some(first) = segment::parse_file_name(&name) {
            names.push(first);
        } else if name.ends_with(meta::TMP_SUFFIX) {
            // An atomic write interrupted before its rename: the old value stands.
            let path = dent.path();
            std::fs::remove_file(&path).map_err(LogStoreError::io("remove", &path))?;
        } else if ![meta::VOTE, meta::PURGED, meta::COMMITTED].contains(&name.as_ref()) {
            tracing::warn!(file = %name, dir = %dir.display(), "unknown file in the raft log directory");
        }
    }
    names.sort_unstable();

    let mut st = State {
        segments: BTreeMap::new(),
        first: 0,
        locs: VecDeque::new(),
        cache: VecDeque::new(),
        cache_bytes: 0,
        purged,
        vote,
        committed: None,
        appended: 0,
        synced: 0,
        syncs: 0,
        dir_dirty: false,
        committed_dirty: false,
        truncations: 0,
        failed: None,
        stop: false,
        sync_idle: false,
        urgent: false,
        #[cfg(test)]
        paused: false,
    };
    // Segments before the last one starting at or below the purge point hold only purged
    // entries (their removal was lost in a crash): skip them, `remove_purged_segments` below
    // deletes them.
    let skip = match purged {
        Some(p) => names
            .iter()
            .rposition(|n| *n <= p.index.saturating_add(1))
            .unwrap_or(0),
        None => 0,
    };
    let mut expected: Option<u64> = None;
    for (k, &first) in names.iter().enumerate().skip(skip) {
        let path = dir.join(segment::file_name(first));
        match (expected, purged) {
            (Some(e), _) if first != e => {
                return Err(LogStoreError::Corrupt {
                    path,
                    offset: 0,
                    reason: format!("segment starts at {first}, the previous one ends before {e}"),
                })
            }
            (None, Some(p)) if first > p.index.saturating_add(1) => {
                return Err(LogStoreError::Corrupt {
                    path,
                    offset: 0,
                    reason: format!(
                        "the log resumes at {first} after the purge point {}",
                        p.index
                    ),
                })
            }
            _ => {}
        }
        let is_last = k + 1 == names.len();
        // Where the last segment stops being known to be on disk (a hint lost or written
        // before the segment existed leaves only the torn-tail-record rule).
        let unsynced_from = match hint.and_then(|h| h.synced) {
            Some((seg, len)) if seg == first => Some(len),
            Some((seg, _)) if seg < first => Some(segment::HEADER_LEN),
            _ => None,
        };
        let scan = segment::scan(&path, first, is_last, unsynced_from)?;
        if let Some(why) = &scan.torn {
            tracing::warn!(path = %path.display(), cut_at = scan.valid_len, %why,
                "dropping the torn tail of the raft log (a crash interrupted a write)");
            if scan.valid_len < segment::HEADER_LEN {
                std::fs::remove_file(&path).map_err(LogStoreError::io("remove", &path))?;
                meta::sync_dir(dir)?;
                break;
            }
            let f = segment::open(&path)?;
            f.set_len(scan.valid_len)
                .and_then(|()| f.sync_data())
                .map_err(LogStoreError::io("truncate", &path))?;
        }
        let file = segment::open(&path)?;
        let next = first + scan.records.len() as u64;
        for r in &scan.records {
            if purged.is_some_and(|p| r.index <= p.index) {
                continue;
            }
            if st.locs.is_empty() {
                st.first = r.index;
            }
            st.locs.push_back(Loc {
                seg: first,
                offset: r.offset,
                len: r.len,
                term: r.term,
            });
        }
        st.segments.insert(
            first,
            Seg {
                path,
                file: Arc::new(file),
                len: scan.valid_len,
                next,
            },
        );
        expected = Some(next);
    }
    for &first in &names[..skip] {
        // Not in the map yet: give them an entry so the common removal path handles them.
        let path = dir.join(segment::file_name(first));
        let file = segment::open(&path)?;
        st.segments.insert(
            first,
            Seg {
                path,
                file: Arc::new(file),
                len: 0,
                next: first,
            },
        );
    }
    if let Some(p) = purged {
        st.remove_purged_segments(p.index)?;
    }

    // The hint is written after the fsync covering it, but a power loss may still have cut
    // the log behind an older hint write reordered by the disk: never point past the log.
    let last = st.last_log_id().or(purged);
    st.committed = match (hint.and_then(|h| h.committed), last) {
        (Some(c), Some(l)) if c.index > l.index => {
            tracing::warn!(%c, %l, "committed hint beyond the log; clamping it");
            Some(l)
        }
        (Some(_), None) => None,
        (c, _) => c,
    };
    tracing::info!(dir = %dir.display(), segments = st.segments.len(),
        first = st.first, last = ?st.last_index(), purged = ?purged.map(|p| p.index),
        "raft log opened");
    Ok(st)
}
