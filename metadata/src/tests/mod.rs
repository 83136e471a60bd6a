//! State machine tests: commands go through `StateMachine::apply` exactly as the log
//! delivers them, on a real redb file in a temporary directory.

mod classes;
mod delegation;
mod ec_write;
mod erasure;
mod healing;
mod locks;
mod posix;
mod requests;
mod shares;
mod state;

use rawfs_metadata_api::*;
use rawfs_replication::{Entry, StateMachine};
use serde_bytes::ByteBuf;

use crate::commands::{decode_reply, Command, Reply};
use crate::machine::MetaStateMachine;
use crate::queries;

pub(super) struct H {
    pub(super) sm: MetaStateMachine,
    dir: tempfile::TempDir,
    index: u64,
    clock: i64,
}

pub(super) const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};

pub(super) fn n(s: &str) -> Name {
    ByteBuf::from(s.as_bytes().to_vec())
}

/// A snapshot (`read_only`) or clone of `origin` named `name` in the root directory.
pub(super) fn snapshot(
    h: &mut H,
    origin: Ino,
    name: &str,
    read_only: bool,
) -> rawfs_metadata_api::MetaResult<rawfs_metadata_api::Attr> {
    let now = h.now();
    h.apply(crate::commands::Command::Snapshot {
        origin,
        parent: rawfs_metadata_api::ROOT_INO,
        name: n(name),
        read_only,
        label: n("snapshot:test"),
        now,
    })?
    .into_attr()
}

pub(super) fn open_sm(dir: &std::path::Path) -> MetaStateMachine {
    MetaStateMachine::open(&dir.join("meta.redb"), 8 << 20).unwrap()
}

impl H {
    pub(super) fn new() -> H {
        let dir = tempfile::tempdir().unwrap();
        let mut h = H {
            sm: open_sm(dir.path()),
            dir,
            index: 0,
            clock: 1_000,
        };
        let now = h.now();
        h.apply(Command::Init { now }).unwrap();
        h
    }

    /// A harness over an existing state machine whose last applied entry is `index`.
    pub(super) fn from_sm(sm: MetaStateMachine, dir: tempfile::TempDir, index: u64) -> H {
        H {
            sm,
            dir,
            index,
            clock: 1_000_000,
        }
    }

    pub(super) fn reopen(self) -> H {
        let H {
            sm,
            dir,
            index,
            clock,
        } = self;
        drop(sm);
        H {
            sm: open_sm(dir.path()),
            dir,
            index,
            clock,
        }
    }

    pub(super) fn now(&mut self) -> Timespec {
        self.clock += 1;
        Timespec {
            sec: self.clock,
            nsec: 7,
        }
    }

    pub(super) fn apply(&mut self, cmd: Command) -> MetaResult<Reply> {
        self.index += 1;
        let bytes = cmd.encode().unwrap();
        let e = Entry {
            index: self.index,
            term: 3,
            command: Some(&bytes),
        };
        let out = self.sm.apply(&[e], b"repl").unwrap();
        decode_reply(&out[0]).unwrap()
    }

    pub(super) fn mknod(
        &mut self,
        parent: Ino,
        name: &str,
        kind: FileKind,
        perm: u32,
    ) -> MetaResult<Attr> {
        let now = self.now();
        self.apply(Command::Mknod {
            parent,
            name: n(name),
            node: NewNode {
                kind,
                perm,
                rdev: 0,
                exclusive: true,
            },
            caller: ME,
            now,
        })?
        .into_attr()
    }

    pub(super) fn mkdir(&mut self, parent: Ino, name: &str) -> Attr {
        self.mknod(parent, name, FileKind::Dir, 0o755).unwrap()
    }

    pub(super) fn create(&mut self, parent: Ino, name: &str) -> Attr {
        self.mknod(parent, name, FileKind::File, 0o644).unwrap()
    }

    pub(super) fn getattr(&self, ino: Ino) -> MetaResult<Attr> {
        self.sm.read(|rt| queries::getattr(rt, ino))
    }

    pub(super) fn lookup(&self, parent: Ino, name: &str) -> MetaResult<Attr> {
        self.sm
            .read(|rt| queries::lookup(rt, parent, name.as_bytes()))
    }

    pub(super) fn unlink(&mut self, parent: Ino, name: &str) -> MetaResult<()> {
        let now = self.now();
        self.apply(Command::Unlink {
            parent,
            name: n(name),
            now,
        })?
        .into_unit()
    }

    pub(super) fn rmdir(&mut self, parent: Ino, name: &str) -> MetaResult<()> {
        let now = self.now();
        self.apply(Command::Rmdir {
            parent,
            name: n(name),
            now,
        })?
        .into_unit()
    }

    pub(super) fn rename(
        &mut self,
        p: Ino,
        a: &str,
        np: Ino,
        b: &str,
        flags: RenameFlags,
    ) -> MetaResult<()> {
        let now = self.now();
        self.apply(Command::Rename {
            parent: p,
            name: n(a),
            newparent: np,
            newname: n(b),
            flags,
            now,
        })?
        .into_unit()
    }

    pub(super) fn names(&self, dir: Ino) -> Vec<String> {
        self.sm
            .read(|rt| queries::readdir(rt, dir, 0, 4096))
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name.into_vec()).unwrap())
            .collect()
    }

    pub(super) fn register(&mut self, ids: &[u64]) {
        for &id in ids {
            self.apply(Command::RegisterServer {
                id,
                data_addr: format!("127.0.0.1:{}", 9000 + id),
                control_addr: String::new(),
            })
            .unwrap();
        }
    }

    pub(super) fn allocate(
        &mut self,
        ino: Ino,
        index: u64,
        servers: &[u64],
    ) -> MetaResult<ChunkLoc> {
        self.apply(Command::AllocateChunk {
            ino,
            index,
            servers: servers.to_vec(),
        })?
        .into_chunk()
    }

    pub(super) fn deletions(&self, server: u64) -> Vec<ChunkId> {
        self.sm
            .read(|rt| queries::pending_deletes(rt, server))
            .unwrap()
    }
}

/// Rewrites a snapshot of the current format (5) as format 1 wrote it: the tables formats 2
/// to 5 added (the last six) left out.
pub(super) fn to_format_1(snap: &[u8]) -> Vec<u8> {
    fn u32_at(b: &[u8], pos: &mut usize) -> usize {
        let v = u32::from_le_bytes(b[*pos..*pos + 4].try_into().unwrap());
        *pos += 4;
        v as usize
    }
    const V1_TABLES: usize = 13;
    let mut out = b"RAWFSMS1".to_vec();
    let mut pos = 8;
    for table in 0..V1_TABLES + 7 {
        let start = pos;
        pos += u32_at(snap, &mut pos);
        let rows = u64::from_le_bytes(snap[pos..pos + 8].try_into().unwrap());
        pos += 8;
        for _ in 0..2 * rows {
            pos += u32_at(snap, &mut pos);
        }
        if table < V1_TABLES {
            out.extend_from_slice(&snap[start..pos]);
        }
    }
    out.extend_from_slice(&snap[pos..]);
    out
}
