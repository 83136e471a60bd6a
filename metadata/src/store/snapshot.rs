//! Snapshots of the whole state (for lagging replicas) and the state digest (to compare
//! replicas): one flat format, written and read table by table.

use super::*;

/// Snapshot layout (one flat buffer, so a large state does not fragment the heap):
/// `b"RAWFSMS4"`, then per table: name (u32 length + bytes), row count (u64), rows as
/// (u32 key length, key, u32 value length, value); the replication blob last (u32 length +
/// bytes, `u32::MAX` for none). Integers are little-endian. Version 1 (`b"RAWFSMS1"`) lacks
/// the tables of [`for_tables_v2`], version 2 those of [`for_tables_v3`], version 3 those
/// of [`for_tables_v4`], version 4 those of [`for_tables_v5`] and version 5 those of
/// [`for_tables_v6`]; all are still restored (with those tables empty).
const SNAPSHOT_MAGIC: &[u8; 8] = b"RAWFSMS6";
const SNAPSHOT_MAGIC_V5: &[u8; 8] = b"RAWFSMS5";
const SNAPSHOT_MAGIC_V4: &[u8; 8] = b"RAWFSMS4";
const SNAPSHOT_MAGIC_V3: &[u8; 8] = b"RAWFSMS3";
const SNAPSHOT_MAGIC_V2: &[u8; 8] = b"RAWFSMS2";
const SNAPSHOT_MAGIC_V1: &[u8; 8] = b"RAWFSMS1";

/// Where table rows are written: a snapshot buffer or the digest's hasher.
trait Sink {
    fn put(&mut self, b: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// FNV-1a 64: a fixed, documented hash, so digests compare across processes and builds.
struct Digest(fnv::FnvHasher);

impl Sink for Digest {
    fn put(&mut self, b: &[u8]) {
        std::hash::Hasher::write(&mut self.0, b);
    }
}

fn put_bytes(out: &mut impl Sink, b: &[u8]) {
    out.put(&(b.len() as u32).to_le_bytes());
    out.put(b);
}

fn dump<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
    name: &str,
    out: &mut impl Sink,
) -> Result<(), StoreError> {
    let table = txn.open_table(def)?;
    put_bytes(out, name.as_bytes());
    out.put(&table.len()?.to_le_bytes());
    for item in table.iter()? {
        let (k, v) = item?;
        put_bytes(out, K::as_bytes(&k.value()).as_ref());
        put_bytes(out, V::as_bytes(&v.value()).as_ref());
    }
    Ok(())
}

/// A bounds-checked reader over a snapshot buffer.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn corrupt(reason: &str) -> StoreError {
        StoreError::Corrupt {
            what: "snapshot",
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.b.len() < n {
            return Err(Self::corrupt("truncated"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StoreError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

fn load<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &WriteTransaction,
    def: TableDefinition<K, V>,
    name: &str,
    cur: &mut Cursor<'_>,
) -> Result<(), StoreError> {
    if cur.bytes()? != name.as_bytes() {
        return Err(Cursor::corrupt("tables out of order"));
    }
    let mut table = txn.open_table(def)?;
    table.retain(|_, _| false)?;
    let rows = cur.u64()?;
    for _ in 0..rows {
        let k = cur.bytes()?;
        let v = cur.bytes()?;
        table.insert(K::from_bytes(k), V::from_bytes(v))?;
    }
    Ok(())
}

/// Calls `$f!(def, "name")` for every table of snapshot format 1, so that dump, load and
/// the digest cannot miss one.
macro_rules! for_tables {
    ($f:ident) => {
        $f!(INODES, "inodes");
        $f!(DIRENTS, "dirents");
        $f!(DIR_ORDER, "dir_order");
        $f!(XATTRS, "xattrs");
        $f!(SYMLINKS, "symlinks");
        $f!(CHUNKS, "chunks");
        $f!(CHUNK_OWNER, "chunk_owner");
        $f!(OPENS, "opens");
        $f!(SESSIONS, "sessions");
        $f!(ORPHANS, "orphans");
        $f!(COUNTERS, "counters");
        $f!(SERVERS, "servers");
        $f!(DELETIONS, "deletions");
    };
}

/// The tables snapshot format 2 adds after those of [`for_tables`]. The request table is
/// state (a replica restored from a snapshot must still recognise a retried request);
/// `applied` is bookkeeping, left out of the digest.
macro_rules! for_tables_v2 {
    ($f:ident) => {
        $f!(REQUESTS, "requests");
        $f!(REQUEST_AGES, "request_ages");
        $f!(APPLIED, "applied");
    };
}

/// The tables snapshot format 3 adds after those of [`for_tables_v2`].
macro_rules! for_tables_v3 {
    ($f:ident) => {
        $f!(CHUNK_REFS, "chunk_refs");
    };
}

/// The tables snapshot format 4 adds after those of [`for_tables_v3`].
macro_rules! for_tables_v4 {
    ($f:ident) => {
        $f!(DELEGATIONS, "delegations");
    };
}

/// The tables snapshot format 5 adds after those of [`for_tables_v4`].
macro_rules! for_tables_v5 {
    ($f:ident) => {
        $f!(LOCKS, "locks");
    };
}

/// The tables snapshot format 6 adds after those of [`for_tables_v5`].
macro_rules! for_tables_v6 {
    ($f:ident) => {
        $f!(LOCK_HOLDERS, "lock_holders");
    };
}

impl Store {
    /// A consistent copy of every table (after making the state durable).
    pub fn snapshot(&self) -> Result<Vec<u8>, StoreError> {
        self.dirty.store(true, Ordering::SeqCst);
        self.flush_durable()?;
        let txn = self.begin_read()?;
        let mut out = SNAPSHOT_MAGIC.to_vec();
        macro_rules! dump_one {
            ($def:expr, $name:expr) => {
                dump(&txn, $def, $name, &mut out)?;
            };
        }
        for_tables!(dump_one);
        for_tables_v2!(dump_one);
        for_tables_v3!(dump_one);
        for_tables_v4!(dump_one);
        for_tables_v5!(dump_one);
        for_tables_v6!(dump_one);
        match txn.open_table(REPL)?.get(REPL_KEY)? {
            Some(g) => put_bytes(&mut out, g.value()),
            None => out.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
        Ok(out)
    }

    /// Replaces every table with the snapshot's rows, durably.
    pub fn restore(&self, snapshot: &[u8]) -> Result<(), StoreError> {
        let mut cur = Cursor { b: snapshot };
        let version = match cur.take(SNAPSHOT_MAGIC.len())? {
            m if m == SNAPSHOT_MAGIC => 6,
            m if m == SNAPSHOT_MAGIC_V5 => 5,
            m if m == SNAPSHOT_MAGIC_V4 => 4,
            m if m == SNAPSHOT_MAGIC_V3 => 3,
            m if m == SNAPSHOT_MAGIC_V2 => 2,
            m if m == SNAPSHOT_MAGIC_V1 => 1,
            _ => return Err(Cursor::corrupt("bad magic")),
        };
        self.commit_deferred()?;
        let txn = self.db.begin_write()?;
        macro_rules! load_one {
            ($def:expr, $name:expr) => {
                load(&txn, $def, $name, &mut cur)?;
            };
        }
        macro_rules! clear_one {
            ($def:expr, $name:expr) => {
                txn.open_table($def)?.retain(|_, _| false)?;
            };
        }
        for_tables!(load_one);
        if version >= 2 {
            for_tables_v2!(load_one);
        } else {
            for_tables_v2!(clear_one);
        }
        if version >= 3 {
            for_tables_v3!(load_one);
        } else {
            for_tables_v3!(clear_one);
        }
        if version >= 4 {
            for_tables_v4!(load_one);
        } else {
            for_tables_v4!(clear_one);
        }
        if version >= 5 {
            for_tables_v5!(load_one);
        } else {
            for_tables_v5!(clear_one);
        }
        if version >= 6 {
            for_tables_v6!(load_one);
        } else {
            for_tables_v6!(clear_one);
        }
        {
            let mut repl = txn.open_table(REPL)?;
            repl.retain(|_, _| false)?;
            let n = cur.u32()?;
            if n != u32::MAX {
                let blob = cur.take(n as usize)?;
                repl.insert(REPL_KEY, blob)?;
            }
        }
        if !cur.b.is_empty() {
            return Err(Cursor::corrupt("trailing bytes"));
        }
        txn.commit()?;
        self.dirty.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// `(applied index, digest)`: a hash of every state table (all but `applied` and the
    /// replication blob) and the index of the last entry applied to it, from one read
    /// transaction, so the two belong together.
    pub fn digest(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.begin_read()?;
        let mut h = Digest(fnv::FnvHasher::default());
        macro_rules! hash_one {
            ($def:expr, $name:expr) => {
                dump(&txn, $def, $name, &mut h)?;
            };
        }
        for_tables!(hash_one);
        hash_one!(REQUESTS, "requests");
        hash_one!(REQUEST_AGES, "request_ages");
        for_tables_v3!(hash_one);
        for_tables_v4!(hash_one);
        for_tables_v5!(hash_one);
        for_tables_v6!(hash_one);
        let applied = txn
            .open_table(APPLIED)?
            .get(APPLIED_INDEX)?
            .map(|g| g.value())
            .unwrap_or(0);
        Ok((applied, std::hash::Hasher::finish(&h.0)))
    }
}
