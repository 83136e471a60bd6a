//! The slow file operations: starting a segment, truncating, purging, reading entries that
//! are no longer cached.

use std::fs::File;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use super::log_id;
use super::meta;
use super::segment;
use super::Loc;
use super::LogStoreError;
use super::Seg;
use super::Shared;
use super::State;
use crate::types::LogId;
use crate::types::RaftEntry;

/// Starts a new segment for entry `start` (and after the entries of the current one): the
/// current one is fsynced first, so a later segment never survives a power loss that loses
/// the end of an earlier one. An empty current segment is removed instead.
pub(super) fn roll_segment(dir: &Path, st: &mut State, start: u64) -> Result<(), LogStoreError> {
    if let Some((&k, s)) = st.segments.last_key_value() {
        if s.len <= segment::HEADER_LEN {
            std::fs::remove_file(&s.path).map_err(LogStoreError::io("remove", &s.path))?;
            st.segments.remove(&k);
        } else {
            s.file
                .sync_data()
                .map_err(LogStoreError::io("fsync", &s.path))?;
        }
    }
    let (path, file) = segment::create(dir, start)?;
    tracing::debug!(path = %path.display(), "new raft log segment");
    st.segments.insert(
        start,
        Seg {
            path,
            file: Arc::new(file),
            len: segment::HEADER_LEN,
            next: start,
        },
    );
    st.dir_dirty = true;
    Ok(())
}

/// Removes the entries from `cut` on, durably: later segments are unlinked (newest first, so
/// a crash midway leaves a prefix) and the directory fsynced, then the segment holding `cut`
/// is cut and fsynced.
pub(super) fn truncate(sh: &Shared, cut: u64) -> Result<(), LogStoreError> {
    let mut st = sh.lock();
    st.check_failed()?;
    let Some(last) = st.last_index() else {
        return Ok(());
    };
    if cut > last {
        return Ok(());
    }
    // Purged entries are gone already.
    let cut = cut.max(st.first);
    let keep_loc = st.locs[(cut - st.first) as usize];
    let doomed: Vec<u64> = st.segments.range(cut..).map(|(k, _)| *k).collect();
    for k in doomed.into_iter().rev() {
        if let Some(s) = st.segments.remove(&k) {
            std::fs::remove_file(&s.path).map_err(LogStoreError::io("remove", &s.path))?;
            st.dir_dirty = true;
        }
    }
    // The removals are durable before the cut: a crash in between leaves a log that is still
    // contiguous (only longer than wanted), never a cut segment followed by stale ones.
    if st.dir_dirty {
        meta::sync_dir(&sh.dir)?;
        st.dir_dirty = false;
    }
    if let Some(s) = st.segments.get_mut(&keep_loc.seg) {
        s.file
            .set_len(keep_loc.offset)
            .and_then(|()| s.file.sync_data())
            .map_err(LogStoreError::io("truncate", &s.path))?;
        s.len = keep_loc.offset;
        s.next = cut;
    }
    let keep = (cut - st.first) as usize;
    st.locs.truncate(keep);
    st.uncache_from(cut);
    st.truncations += 1;
    sh.poke(st);
    Ok(())
}

/// Forgets the entries up to `log_id`: the purge marker is made durable first, then whole
/// segments below it are removed (entries below it in the remaining first segment stay on
/// disk and are skipped on open).
pub(super) fn purge(sh: &Shared, log_id: LogId) -> Result<(), LogStoreError> {
    if sh.lock().purged.is_some_and(|p| p.index >= log_id.index) {
        return Ok(());
    }
    meta::write_durable(&sh.dir, meta::PURGED, "last purged log id", &log_id)?;
    let mut st = sh.lock();
    st.purged = Some(log_id);
    while st.first <= log_id.index && !st.locs.is_empty() {
        st.locs.pop_front();
        st.first += 1;
    }
    while let Some(&(ref e, n)) = st.cache.front() {
        if e.log_id.index > log_id.index {
            break;
        }
        st.cache_bytes -= n;
        st.cache.pop_front();
    }
    st.remove_purged_segments(log_id.index)
}

/// Reads entries at known positions, one read per run of neighbours in a segment.
pub(super) fn read_locs(
    locs: &[(u64, Loc, PathBuf, Arc<File>)],
) -> Result<Vec<RaftEntry>, LogStoreError> {
    let mut out = Vec::with_capacity(locs.len());
    let mut i = 0;
    while i < locs.len() {
        let (_, first, path, file) = &locs[i];
        let mut j = i + 1;
        while j < locs.len() && locs[j].1.seg == first.seg {
            j += 1;
        }
        let last = locs[j - 1].1;
        let span = (last.offset + u64::from(last.len) - first.offset) as usize;
        let buf = segment::read_at(file, path, first.offset, span)?;
        for (index, loc, ..) in &locs[i..j] {
            let at = (loc.offset - first.offset) as usize;
            let corrupt = |reason: String| LogStoreError::Corrupt {
                path: path.clone(),
                offset: loc.offset,
                reason,
            };
            let rec = match segment::parse_record(&buf[at..at + loc.len as usize]) {
                Ok((rec, _)) => rec,
                Err(e) => return Err(corrupt(format!("entry {index}: {e:?}"))),
            };
            if rec.index != *index || rec.term != loc.term {
                return Err(corrupt(format!(
                    "holds entry {}-{} where {}-{index} was expected",
                    rec.term, rec.index, loc.term
                )));
            }
            let entry: RaftEntry = rmp_serde::from_slice(rec.payload)
                .map_err(|e| corrupt(format!("entry {index} does not decode: {e}")))?;
            if entry.log_id != log_id(rec.term, rec.index) {
                return Err(corrupt(format!(
                    "record {}-{} holds entry {}",
                    rec.term, rec.index, entry.log_id
                )));
            }
            out.push(entry);
        }
        i = j;
    }
    Ok(out)
}
