//! The segment file format: encoding records and scanning a segment on open.
//!
//! ```text
//!  log/00000000000000000042.seg = header | record | record | ...
//!  header (16 B) = magic "RAWFSLOG" | format version u32 | reserved u32
//!  record        = len u32 | crc32c u32 | index u64 | term u64 | payload (len bytes)
//!                  crc32c covers index, term and payload; all integers little-endian
//! ```
//!
//! The payload is the MessagePack of the `openraft::Entry`. A segment holds consecutive
//! entries and is named after the index it was created for; the first record, if any, has
//! that index.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;

use super::LogStoreError;

/// Magic bytes opening every segment.
const MAGIC: &[u8; 8] = b"RAWFSLOG";
/// Version of the segment format; bumped (with a migration) whenever it changes.
pub(super) const FORMAT_VERSION: u32 = 1;
/// Bytes of the segment header.
pub(super) const HEADER_LEN: u64 = 16;
/// Bytes of a record header (len, crc, index, term).
pub(super) const RECORD_HEADER_LEN: usize = 24;
/// File name suffix of segments.
const SUFFIX: &str = ".seg";

/// The segment header for the current format.
pub(super) fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// File name of the segment whose first entry is `first`: 20 digits sort like the numbers.
pub(super) fn file_name(first: u64) -> String {
    format!("{first:020}{SUFFIX}")
}

/// The first index of a segment from its file name, `None` if it is not a segment name.
pub(super) fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn crc(index: u64, term: u64, payload: &[u8]) -> u32 {
    let c = crc32c::crc32c(&index.to_le_bytes());
    let c = crc32c::crc32c_append(c, &term.to_le_bytes());
    crc32c::crc32c_append(c, payload)
}

/// Appends one record to `buf`, the payload being the MessagePack of `value`. Returns the
/// record's length.
pub(super) fn encode_record<T: serde::Serialize>(
    buf: &mut Vec<u8>,
    index: u64,
    term: u64,
    value: &T,
) -> Result<u32, LogStoreError> {
    let start = buf.len();
    buf.resize(start + RECORD_HEADER_LEN, 0);
    rmp_serde::encode::write(buf, value).map_err(|e| {
        buf.truncate(start);
        LogStoreError::Encode {
            what: "log entry",
            reason: e.to_string(),
        }
    })?;
    let record_len = buf.len() - start;
    // The whole record's length must fit the u32 the index keeps for it.
    let Ok(total) = u32::try_from(record_len) else {
        buf.truncate(start);
        return Err(LogStoreError::Encode {
            what: "log entry",
            reason: format!("{record_len} bytes is too large for a record"),
        });
    };
    let len = total - RECORD_HEADER_LEN as u32;
    let c = crc(index, term, &buf[start + RECORD_HEADER_LEN..]);
    let h = &mut buf[start..start + RECORD_HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&c.to_le_bytes());
    h[8..16].copy_from_slice(&index.to_le_bytes());
    h[16..24].copy_from_slice(&term.to_le_bytes());
    Ok(total)
}

/// A record decoded from a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawRecord<'a> {
    pub index: u64,
    pub term: u64,
    pub payload: &'a [u8],
}

/// Why the bytes at some offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BadRecord {
    /// The buffer ends before the record does.
    Short,
    /// The checksum does not match.
    Crc,
}

/// Parses the record at the start of `buf`; returns it and its total length.
pub(super) fn parse_record(buf: &[u8]) -> Result<(RawRecord<'_>, usize), BadRecord> {
    let Some(h) = buf.get(..RECORD_HEADER_LEN) else {
        return Err(BadRecord::Short);
    };
    let le32 = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&h[r]);
        u32::from_le_bytes(b)
    };
    let le64 = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    let len = le32(0..4) as usize;
    let stored_crc = le32(4..8);
    let index = le64(8..16);
    let term = le64(16..24);
    let Some(payload) = buf.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
        return Err(BadRecord::Short);
    };
    if crc(index, term, payload) != stored_crc {
        return Err(BadRecord::Crc);
    }
    Ok((
        RawRecord {
            index,
            term,
            payload,
        },
        RECORD_HEADER_LEN + len,
    ))
}

/// One valid record found by [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scanned {
    pub index: u64,
    pub term: u64,
    pub offset: u64,
    pub len: u32,
}

/// What [`scan`] found in a segment.
#[derive(Debug)]
pub(super) struct ScanResult {
    /// The valid records, in order (consecutive indexes from the segment's first).
    pub records: Vec<Scanned>,
    /// Length of the valid prefix of the file; the file is longer if a torn tail was found.
    pub valid_len: u64,
    /// Why the tail was dropped, for the warning.
    pub torn: Option<String>,
}

/// Reads and verifies the segment at `path` whose first entry is `first`.
///
/// A bad record in the last segment (`is_last`) is a torn tail (a crash in the middle of a
/// write, or a power loss before the sync) when no valid record follows it, or when it lies
/// at or beyond `unsynced_from`, the offset up to which the segment was known to be fsynced
/// (a power loss may keep later pages of an unsynced region and lose earlier ones): the
/// scan stops there and reports it. Anything else that is not a valid, consecutive record is
/// corruption.
pub(super) fn scan(
    path: &Path,
    first: u64,
    is_last: bool,
    unsynced_from: Option<u64>,
) -> Result<ScanResult, LogStoreError> {
    let data = std::fs::read(path).map_err(LogStoreError::io("read", path))?;
    let corrupt = |offset: u64, reason: String| LogStoreError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason,
    };
    let torn_header = || ScanResult {
        records: Vec::new(),
        valid_len: 0,
        torn: Some("incomplete segment header".to_string()),
    };
    let Some(h) = data.get(..HEADER_LEN as usize) else {
        if is_last {
            return Ok(torn_header());
        }
        return Err(corrupt(0, "segment shorter than its header".to_string()));
    };
    if &h[..8] != MAGIC {
        // A header torn by a power loss right after the file was created reads as zeros.
        if is_last && data.iter().all(|b| *b == 0) {
            return Ok(torn_header());
        }
        return Err(corrupt(
            0,
            "not a rawfs log segment (bad magic)".to_string(),
        ));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&h[8..12]);
    let version = u32::from_le_bytes(v);
    if version != FORMAT_VERSION {
        return Err(LogStoreError::Format {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }

    let mut records = Vec::new();
    let mut offset = HEADER_LEN as usize;
    let mut expected = first;
    while offset < data.len() {
        let bad = match parse_record(&data[offset..]) {
            Ok((rec, len)) if rec.index == expected => {
                records.push(Scanned {
                    index: rec.index,
                    term: rec.term,
                    offset: offset as u64,
                    // A record longer than u32::MAX + 24 cannot be encoded in the first place.
                    len: u32::try_from(len)
                        .map_err(|_| corrupt(offset as u64, format!("record of {len} bytes")))?,
                });
                offset += len;
                expected += 1;
                continue;
            }
            Ok((rec, _)) => {
                // A checksummed record with the wrong index is no torn write.
                return Err(corrupt(
                    offset as u64,
                    format!(
                        "record for index {} where {expected} was expected",
                        rec.index
                    ),
                ));
            }
            Err(bad) => bad,
        };
        let reason = match bad {
            BadRecord::Short => "incomplete record",
            BadRecord::Crc => "checksum mismatch",
        };
        let unsynced = unsynced_from.is_some_and(|u| offset as u64 >= u);
        if is_last && (unsynced || !valid_record_after(&data, offset, expected)) {
            return Ok(ScanResult {
                records,
                valid_len: offset as u64,
                torn: Some(format!("{reason} at offset {offset} (index {expected})")),
            });
        }
        return Err(corrupt(
            offset as u64,
            format!("{reason} at index {expected}, with valid records after it"),
        ));
    }
    Ok(ScanResult {
        records,
        valid_len: data.len() as u64,
        torn: None,
    })
}

/// Whether a valid record of index `expected` or later starts anywhere after `from`: then the
/// bad record at `from` is damage in the middle of the log, not a torn tail.
fn valid_record_after(data: &[u8], from: usize, expected: u64) -> bool {
    // An index more than this far ahead cannot be a record of this segment.
    let max_ahead = (data.len() / RECORD_HEADER_LEN) as u64 + 1;
    (from + 1..data.len().saturating_sub(RECORD_HEADER_LEN - 1)).any(|pos| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&data[pos + 8..pos + 16]);
        let index = u64::from_le_bytes(b);
        // Cheap filter first: only a plausible index is worth a checksum.
        index >= expected
            && index - expected <= max_ahead
            && parse_record(&data[pos..]).is_ok_and(|(r, _)| r.index == index)
    })
}

/// Reads `len` bytes at `offset` of a segment.
pub(super) fn read_at(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, LogStoreError> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(LogStoreError::io("read", path))?;
    Ok(buf)
}

/// Creates a new, empty segment (header only) in `dir`. The caller syncs the directory.
pub(super) fn create(dir: &Path, first: u64) -> Result<(PathBuf, File), LogStoreError> {
    let path = dir.join(file_name(first));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(LogStoreError::io("create", &path))?;
    file.write_all_at(&header(), 0)
        .map_err(LogStoreError::io("write", &path))?;
    Ok((path, file))
}

/// Opens an existing segment for reading and writing.
pub(super) fn open(path: &Path) -> Result<File, LogStoreError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(LogStoreError::io("open", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_damage_detection() {
        let mut buf = Vec::new();
        let len = encode_record(&mut buf, 7, 3, &"hello").expect("encode") as usize;
        assert_eq!(len, buf.len());
        let (rec, n) = parse_record(&buf).expect("parse");
        assert_eq!(n, len);
        assert_eq!((rec.index, rec.term), (7, 3));
        assert_eq!(
            rmp_serde::from_slice::<String>(rec.payload).expect("payload"),
            "hello"
        );
        assert_eq!(parse_record(&buf[..len - 1]), Err(BadRecord::Short));
        assert_eq!(parse_record(&buf[..10]), Err(BadRecord::Short));
        let mut flipped = buf.clone();
        flipped[len - 1] ^= 1;
        assert_eq!(parse_record(&flipped), Err(BadRecord::Crc));
        // Zeros (a power loss after the size grew) are no record either.
        assert_eq!(parse_record(&[0u8; 64]), Err(BadRecord::Crc));
    }

    #[test]
    fn file_names_sort_like_indexes() {
        assert_eq!(file_name(42), "00000000000000000042.seg");
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("00000000000000000042.seg.tmp"), None);
        assert_eq!(parse_file_name("42.seg"), None);
        assert!(file_name(9) < file_name(10));
    }
}
