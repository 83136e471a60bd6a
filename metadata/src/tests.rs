//! State machine tests: commands go through `StateMachine::apply` exactly as the log
//! delivers them, on a real redb file in a temporary directory.

use rawfs_metadata_api::*;
use rawfs_replication::{Entry, StateMachine};
use serde_bytes::ByteBuf;

use crate::commands::{decode_reply, Command, Reply};
use crate::machine::MetaStateMachine;
use crate::queries;

struct H {
    sm: MetaStateMachine,
    dir: tempfile::TempDir,
    index: u64,
    clock: i64,
}

const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};

fn n(s: &str) -> Name {
    ByteBuf::from(s.as_bytes().to_vec())
}

fn open_sm(dir: &std::path::Path) -> MetaStateMachine {
    MetaStateMachine::open(&dir.join("meta.redb"), 8 << 20).unwrap()
}

impl H {
    fn new() -> H {
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

    fn reopen(self) -> H {
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

    fn now(&mut self) -> Timespec {
        self.clock += 1;
        Timespec {
            sec: self.clock,
            nsec: 7,
        }
    }

    fn apply(&mut self, cmd: Command) -> MetaResult<Reply> {
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

    fn mknod(&mut self, parent: Ino, name: &str, kind: FileKind, perm: u32) -> MetaResult<Attr> {
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

    fn mkdir(&mut self, parent: Ino, name: &str) -> Attr {
        self.mknod(parent, name, FileKind::Dir, 0o755).unwrap()
    }

    fn create(&mut self, parent: Ino, name: &str) -> Attr {
        self.mknod(parent, name, FileKind::File, 0o644).unwrap()
    }

    fn getattr(&self, ino: Ino) -> MetaResult<Attr> {
        self.sm.read(|rt| queries::getattr(rt, ino))
    }

    fn lookup(&self, parent: Ino, name: &str) -> MetaResult<Attr> {
        self.sm
            .read(|rt| queries::lookup(rt, parent, name.as_bytes()))
    }

    fn unlink(&mut self, parent: Ino, name: &str) -> MetaResult<()> {
        let now = self.now();
        self.apply(Command::Unlink {
            parent,
            name: n(name),
            now,
        })?
        .into_unit()
    }

    fn rmdir(&mut self, parent: Ino, name: &str) -> MetaResult<()> {
        let now = self.now();
        self.apply(Command::Rmdir {
            parent,
            name: n(name),
            now,
        })?
        .into_unit()
    }

    fn rename(&mut self, p: Ino, a: &str, np: Ino, b: &str, flags: RenameFlags) -> MetaResult<()> {
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

    fn names(&self, dir: Ino) -> Vec<String> {
        self.sm
            .read(|rt| queries::readdir(rt, dir, 0, 4096))
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name.into_vec()).unwrap())
            .collect()
    }

    fn register(&mut self, ids: &[u64]) {
        for &id in ids {
            self.apply(Command::RegisterServer {
                id,
                data_addr: format!("127.0.0.1:{}", 9000 + id),
                control_addr: String::new(),
            })
            .unwrap();
        }
    }

    fn allocate(&mut self, ino: Ino, index: u64, servers: &[u64]) -> MetaResult<ChunkLoc> {
        self.apply(Command::AllocateChunk {
            ino,
            index,
            servers: servers.to_vec(),
        })?
        .into_chunk()
    }

    fn deletions(&self, server: u64) -> Vec<ChunkId> {
        self.sm
            .read(|rt| queries::pending_deletes(rt, server))
            .unwrap()
    }
}

#[test]
fn mknod_makes_every_kind_with_posix_link_counts() {
    let mut h = H::new();
    let root0 = h.getattr(ROOT_INO).unwrap();
    assert_eq!(root0.nlink, 2);
    let d = h.mkdir(ROOT_INO, "d");
    assert_eq!(
        (d.kind, d.nlink, d.uid, d.gid),
        (FileKind::Dir, 2, 1000, 1000)
    );
    let root = h.getattr(ROOT_INO).unwrap();
    assert_eq!(root.nlink, 3, "a subdirectory adds a link to its parent");
    assert!(root.mtime > root0.mtime && root.ctime == root.mtime);
    for (name, kind) in [
        ("f", FileKind::File),
        ("p", FileKind::Fifo),
        ("s", FileKind::Socket),
        ("c", FileKind::CharDevice),
        ("b", FileKind::BlockDevice),
    ] {
        let a = h.mknod(d.ino, name, kind, 0o640).unwrap();
        assert_eq!((a.kind, a.nlink, a.perm), (kind, 1, 0o640));
    }
    assert_eq!(h.getattr(d.ino).unwrap().nlink, 2, "files add no links");
    assert_eq!(
        h.mknod(d.ino, "f", FileKind::File, 0o644),
        Err(MetaError::Exists)
    );
    let long = "x".repeat(256);
    assert_eq!(
        h.mknod(d.ino, &long, FileKind::File, 0o644),
        Err(MetaError::NameTooLong)
    );
    assert!(h
        .mknod(d.ino, &"y".repeat(255), FileKind::File, 0o644)
        .is_ok());
    assert_eq!(h.lookup(d.ino, &long), Err(MetaError::NameTooLong));
    let f = h.lookup(d.ino, "f").unwrap();
    assert_eq!(
        h.mknod(f.ino, "x", FileKind::File, 0o644),
        Err(MetaError::NotDir)
    );
    // A non-exclusive create of an existing name returns the existing inode.
    let now = h.now();
    let again = h
        .apply(Command::Mknod {
            parent: d.ino,
            name: n("f"),
            node: NewNode {
                kind: FileKind::File,
                perm: 0o600,
                rdev: 0,
                exclusive: false,
            },
            caller: ME,
            now,
        })
        .unwrap()
        .into_attr()
        .unwrap();
    assert_eq!(again.ino, f.ino);
    let c = h.lookup(d.ino, "c").unwrap();
    assert_eq!(c.rdev, 0);
}

#[test]
fn setgid_directory_passes_its_group_down() {
    let mut h = H::new();
    let d = h.mkdir(ROOT_INO, "shared");
    let now = h.now();
    h.apply(Command::SetAttr {
        ino: d.ino,
        set: SetAttr {
            gid: Some(50),
            perm: Some(0o2775),
            ..Default::default()
        },
        now,
    })
    .unwrap();
    let f = h.create(d.ino, "f");
    assert_eq!(f.gid, 50);
    assert_eq!(f.perm & 0o2000, 0);
    let sub = h.mkdir(d.ino, "sub");
    assert_eq!(sub.gid, 50);
    assert_ne!(sub.perm & 0o2000, 0, "new directories keep setgid");
    let plain = h.create(ROOT_INO, "plain");
    assert_eq!(plain.gid, ME.gid);
}

#[test]
fn unlink_and_rmdir_follow_posix_errors() {
    let mut h = H::new();
    let d = h.mkdir(ROOT_INO, "d");
    h.create(d.ino, "f");
    assert_eq!(h.rmdir(ROOT_INO, "d"), Err(MetaError::NotEmpty));
    assert_eq!(h.unlink(ROOT_INO, "d"), Err(MetaError::IsDir));
    assert_eq!(h.rmdir(d.ino, "f"), Err(MetaError::NotDir));
    assert_eq!(h.unlink(d.ino, "nope"), Err(MetaError::NotFound));
    h.unlink(d.ino, "f").unwrap();
    assert_eq!(h.lookup(d.ino, "f"), Err(MetaError::NotFound));
    h.rmdir(ROOT_INO, "d").unwrap();
    assert_eq!(h.getattr(d.ino), Err(MetaError::NotFound));
    assert_eq!(h.getattr(ROOT_INO).unwrap().nlink, 2);
    let fs = h.sm.read(queries::files).unwrap();
    assert_eq!(fs, 1, "only the root is left");
}

#[test]
fn rename_replaces_and_refuses_like_linux() {
    let mut h = H::new();
    let none = RenameFlags::default();
    let a = h.mkdir(ROOT_INO, "a");
    let b = h.mkdir(ROOT_INO, "b");
    let f = h.create(a.ino, "f");
    let g = h.create(b.ino, "g");
    // File over file: the target inode goes away.
    h.rename(a.ino, "f", b.ino, "g", none).unwrap();
    assert_eq!(h.lookup(b.ino, "g").unwrap().ino, f.ino);
    assert_eq!(h.getattr(g.ino), Err(MetaError::NotFound));
    let pa = h.getattr(a.ino).unwrap();
    let pb = h.getattr(b.ino).unwrap();
    assert_eq!(pa.mtime, pa.ctime);
    assert_eq!(pa.mtime, pb.mtime, "both parents change in one step");
    assert_eq!(h.getattr(f.ino).unwrap().ctime, pa.ctime);
    // Kind mismatches and non-empty targets.
    let sub = h.mkdir(a.ino, "sub");
    assert_eq!(
        h.rename(a.ino, "sub", b.ino, "g", none),
        Err(MetaError::NotDir)
    );
    assert_eq!(
        h.rename(b.ino, "g", a.ino, "sub", none),
        Err(MetaError::IsDir)
    );
    h.create(sub.ino, "inner");
    let e = h.mkdir(b.ino, "empty");
    assert_eq!(
        h.rename(b.ino, "empty", a.ino, "sub", none),
        Err(MetaError::NotEmpty)
    );
    // A directory into its own subtree.
    assert!(matches!(
        h.rename(ROOT_INO, "a", sub.ino, "x", none),
        Err(MetaError::Invalid { .. })
    ));
    assert!(matches!(
        h.rename(ROOT_INO, "a", a.ino, "x", none),
        Err(MetaError::Invalid { .. })
    ));
    // Directory over an empty directory, across parents: link counts move.
    assert_eq!(h.getattr(a.ino).unwrap().nlink, 3);
    assert_eq!(h.getattr(b.ino).unwrap().nlink, 3);
    h.rename(a.ino, "sub", b.ino, "empty", none).unwrap();
    assert_eq!(h.getattr(e.ino), Err(MetaError::NotFound));
    assert_eq!(h.getattr(a.ino).unwrap().nlink, 2);
    assert_eq!(h.getattr(b.ino).unwrap().nlink, 3);
    assert_eq!(h.lookup(b.ino, "empty").unwrap().ino, sub.ino);
    assert_eq!(h.names(b.ino), vec!["g", "empty"]);
    // NOREPLACE.
    let noreplace = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    assert_eq!(
        h.rename(b.ino, "g", b.ino, "empty", noreplace),
        Err(MetaError::Exists)
    );
    h.rename(b.ino, "g", a.ino, "moved", noreplace).unwrap();
    // Same inode under two names: nothing happens.
    let now = h.now();
    h.apply(Command::Link {
        ino: f.ino,
        newparent: a.ino,
        newname: n("hard"),
        now,
    })
    .unwrap();
    h.rename(a.ino, "moved", a.ino, "hard", none).unwrap();
    assert_eq!(h.names(a.ino), vec!["moved", "hard"]);
    assert_eq!(h.getattr(f.ino).unwrap().nlink, 2);
}

#[test]
fn rename_exchange_swaps_a_file_and_a_directory() {
    let mut h = H::new();
    let a = h.mkdir(ROOT_INO, "a");
    let b = h.mkdir(ROOT_INO, "b");
    let f = h.create(a.ino, "x");
    let d = h.mkdir(b.ino, "y");
    let ex = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    assert_eq!(
        h.rename(a.ino, "x", b.ino, "missing", ex),
        Err(MetaError::NotFound)
    );
    h.rename(a.ino, "x", b.ino, "y", ex).unwrap();
    assert_eq!(h.lookup(a.ino, "x").unwrap().ino, d.ino);
    assert_eq!(h.lookup(b.ino, "y").unwrap().ino, f.ino);
    assert_eq!(h.getattr(a.ino).unwrap().nlink, 3, "a gained the directory");
    assert_eq!(h.getattr(b.ino).unwrap().nlink, 2);
    // The moved directory's parent is now a: moving a into it must be refused.
    assert!(matches!(
        h.rename(ROOT_INO, "a", d.ino, "loop", RenameFlags::default()),
        Err(MetaError::Invalid { .. })
    ));
    let both = RenameFlags {
        noreplace: true,
        exchange: true,
    };
    assert!(matches!(
        h.rename(a.ino, "x", b.ino, "y", both),
        Err(MetaError::Invalid { .. })
    ));
}

#[test]
fn hard_links_count_and_refuse_directories() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f");
    let d = h.mkdir(ROOT_INO, "d");
    let now = h.now();
    let l = h
        .apply(Command::Link {
            ino: f.ino,
            newparent: d.ino,
            newname: n("l"),
            now,
        })
        .unwrap()
        .into_attr()
        .unwrap();
    assert_eq!(l.nlink, 2);
    let now = h.now();
    assert_eq!(
        h.apply(Command::Link {
            ino: d.ino,
            newparent: ROOT_INO,
            newname: n("dl"),
            now,
        }),
        Err(MetaError::NotPermitted)
    );
    h.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(h.lookup(d.ino, "l").unwrap().nlink, 1);
}

#[test]
fn orphan_lives_until_last_release_even_across_reopen() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let f = h.create(ROOT_INO, "f");
    let loc = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    h.apply(Command::Open {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    h.apply(Command::Open {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    h.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(h.getattr(f.ino).unwrap().nlink, 0);
    assert!(h.deletions(1).is_empty(), "chunks stay while open");
    let mut h = h.reopen();
    assert_eq!(
        h.getattr(f.ino).unwrap().nlink,
        0,
        "orphan survives restart"
    );
    h.apply(Command::Release {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    assert!(h.getattr(f.ino).is_ok(), "one open left");
    h.apply(Command::Release {
        ino: f.ino,
        session: 7,
    })
    .unwrap();
    assert_eq!(h.getattr(f.ino), Err(MetaError::NotFound));
    for s in 1..=3 {
        assert_eq!(h.deletions(s), vec![loc.chunk]);
    }
    // end_session frees every orphan the session held.
    let g = h.create(ROOT_INO, "g");
    h.apply(Command::Open {
        ino: g.ino,
        session: 9,
    })
    .unwrap();
    h.unlink(ROOT_INO, "g").unwrap();
    assert!(h.getattr(g.ino).is_ok());
    h.apply(Command::EndSession { session: 9 }).unwrap();
    assert_eq!(h.getattr(g.ino), Err(MetaError::NotFound));
}

#[test]
fn readdir_cookies_survive_concurrent_changes() {
    let mut h = H::new();
    let d = h.mkdir(ROOT_INO, "d");
    for i in 0..10 {
        h.create(d.ino, &format!("f{i}"));
    }
    let page = |h: &H, cookie| {
        h.sm.read(|rt| queries::readdir(rt, d.ino, cookie, 3))
            .unwrap()
    };
    let p1 = page(&h, 0);
    assert_eq!(p1.len(), 3);
    let cookie = p1[2].cookie;
    // Entries before and after the cookie change between pages.
    h.unlink(d.ino, "f0").unwrap();
    h.unlink(d.ino, "f5").unwrap();
    h.create(d.ino, "new");
    let mut seen: Vec<String> = p1
        .iter()
        .map(|e| String::from_utf8(e.name.to_vec()).unwrap())
        .collect();
    let mut c = cookie;
    loop {
        let p = page(&h, c);
        if p.is_empty() {
            break;
        }
        c = p.last().unwrap().cookie;
        seen.extend(
            p.iter()
                .map(|e| String::from_utf8(e.name.to_vec()).unwrap()),
        );
    }
    let want: Vec<String> = ["f0", "f1", "f2", "f3", "f4", "f6", "f7", "f8", "f9", "new"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(
        seen, want,
        "no entry twice, none skipped, deleted ones gone"
    );
    let full = page(&h, 0);
    assert_eq!(
        full[0].attr.kind,
        FileKind::File,
        "entries carry attributes"
    );
}

#[test]
fn truncate_releases_whole_chunks_past_the_end() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let f = h.create(ROOT_INO, "f");
    let c: Vec<ChunkLoc> = (0..3)
        .map(|i| h.allocate(f.ino, i, &[1, 2, 3]).unwrap())
        .collect();
    assert_eq!(c[0].term, 3, "locations carry the entry's term");
    assert_eq!(c[1].replicas[0].data_addr, "127.0.0.1:9001");
    let now = h.now();
    let a = h
        .apply(Command::CommitWrite {
            ino: f.ino,
            end: 3 * CHUNK_SIZE,
            stored_delta: (3 * CHUNK_SIZE) as i64,
            now,
        })
        .unwrap()
        .into_attr()
        .unwrap();
    assert_eq!(a.size, 3 * CHUNK_SIZE);
    let now = h.now();
    let t = h
        .apply(Command::SetAttr {
            ino: f.ino,
            set: SetAttr {
                size: Some(CHUNK_SIZE + 10),
                ..Default::default()
            },
            now,
        })
        .unwrap()
        .into_attr()
        .unwrap();
    assert_eq!(t.size, CHUNK_SIZE + 10);
    assert_eq!(t.mtime, now);
    let left =
        h.sm.read(|rt| queries::chunks(rt, f.ino, 0, 100, 1))
            .unwrap();
    assert_eq!(left.iter().map(|l| l.index).collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(h.deletions(2), vec![c[2].chunk]);
    // Punching chunk 0 leaves a hole.
    let now = h.now();
    h.apply(Command::ReleaseChunks {
        ino: f.ino,
        first: 0,
        count: 1,
        now,
    })
    .unwrap();
    let left =
        h.sm.read(|rt| queries::chunks(rt, f.ino, 0, u64::MAX, 1))
            .unwrap();
    assert_eq!(left.iter().map(|l| l.index).collect::<Vec<_>>(), vec![1]);
    let d = h.mkdir(ROOT_INO, "d");
    assert_eq!(h.allocate(d.ino, 0, &[1]), Err(MetaError::IsDir));
    assert!(matches!(
        h.allocate(f.ino, 5, &[]),
        Err(MetaError::NoSpace { .. })
    ));
}

#[test]
fn xattrs_honour_create_and_replace() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f");
    let set = |h: &mut H, name: &str, v: &str, mode| {
        let now = h.now();
        h.apply(Command::SetXattr {
            ino: f.ino,
            name: n(name),
            value: ByteBuf::from(v.as_bytes().to_vec()),
            mode,
            now,
        })
        .and_then(Reply::into_unit)
    };
    assert_eq!(
        set(&mut h, "user.a", "1", XattrMode::Replace),
        Err(MetaError::NoAttr)
    );
    set(&mut h, "user.a", "1", XattrMode::Create).unwrap();
    assert_eq!(
        set(&mut h, "user.a", "2", XattrMode::Create),
        Err(MetaError::Exists)
    );
    set(&mut h, "user.a", "3", XattrMode::Replace).unwrap();
    set(&mut h, "user.b", "", XattrMode::Any).unwrap();
    let v =
        h.sm.read(|rt| queries::getxattr(rt, f.ino, b"user.a"))
            .unwrap();
    assert_eq!(v.as_slice(), b"3");
    let names = h.sm.read(|rt| queries::listxattr(rt, f.ino)).unwrap();
    assert_eq!(names, vec![n("user.a"), n("user.b")]);
    let now = h.now();
    h.apply(Command::RemoveXattr {
        ino: f.ino,
        name: n("user.a"),
        now,
    })
    .unwrap();
    assert_eq!(
        h.sm.read(|rt| queries::getxattr(rt, f.ino, b"user.a")),
        Err(MetaError::NoAttr)
    );
}

#[test]
fn drop_replica_bumps_version_only_when_expected() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let f = h.create(ROOT_INO, "f");
    let loc = h.allocate(f.ino, 0, &[1, 2, 3]).unwrap();
    let drop = |h: &mut H, v, s| {
        h.apply(Command::DropReplica {
            chunk: loc.chunk,
            expected_version: v,
            server: s,
        })
        .unwrap()
        .into_chunk()
        .unwrap()
    };
    let l2 = drop(&mut h, 1, 2);
    assert_eq!(l2.version, 2);
    assert_eq!(
        l2.replicas.iter().map(|r| r.server).collect::<Vec<_>>(),
        vec![1, 3]
    );
    assert_eq!(h.deletions(2), vec![loc.chunk]);
    // A stale expectation changes nothing.
    let same = drop(&mut h, 1, 3);
    assert_eq!(same, l2);
    let l3 = drop(&mut h, 2, 3);
    assert_eq!((l3.version, l3.replicas.len()), (3, 1));
    let last = drop(&mut h, 3, 1);
    assert_eq!(last, l3, "the last replica is kept");
    // Inventory: the dropped server's copy, unknown ids below the counter go; others stay.
    let inv = [(loc.chunk, 1), (999_999, 1), (loc.chunk + 50, 1)];
    let del =
        h.sm.read(|rt| queries::inventory_deletes(rt, 2, &inv))
            .unwrap();
    assert_eq!(del, vec![loc.chunk]);
    let del1 =
        h.sm.read(|rt| queries::inventory_deletes(rt, 1, &[(loc.chunk, 1)]))
            .unwrap();
    assert!(del1.is_empty(), "a listed replica is kept");
    h.apply(Command::AckDeletes {
        server: 2,
        chunks: vec![loc.chunk],
    })
    .unwrap();
    assert!(h.deletions(2).is_empty());
}

#[test]
fn snapshot_restores_everything_and_garbage_is_refused() {
    let mut h = H::new();
    h.register(&[1]);
    let d = h.mkdir(ROOT_INO, "d");
    let f = h.create(d.ino, "f");
    h.allocate(f.ino, 0, &[1]).unwrap();
    let snap = h.sm.snapshot().unwrap();
    let other = tempfile::tempdir().unwrap();
    let sm2 = open_sm(other.path());
    assert!(sm2.restore(b"garbage").is_err());
    assert!(sm2.restore(&snap[..snap.len() - 3]).is_err());
    sm2.restore(&snap).unwrap();
    assert_eq!(
        sm2.replication_state().unwrap().as_deref(),
        Some(&b"repl"[..])
    );
    let got = sm2.read(|rt| queries::lookup(rt, d.ino, b"f")).unwrap();
    assert_eq!(got, h.getattr(f.ino).unwrap());
    let chunks = sm2.read(|rt| queries::chunks(rt, f.ino, 0, 1, 0)).unwrap();
    assert_eq!(chunks[0].replicas[0].data_addr, "127.0.0.1:9001");
}

#[test]
fn bad_commands_are_refused_without_stopping_the_batch() {
    let h = H::new();
    let good = Command::Init {
        now: Timespec::default(),
    }
    .encode()
    .unwrap();
    let entries = [
        Entry {
            index: 10,
            term: 1,
            command: Some(&[1, 2, 3]),
        },
        Entry {
            index: 11,
            term: 1,
            command: None,
        },
        Entry {
            index: 12,
            term: 1,
            command: Some(&good),
        },
    ];
    let out = h.sm.apply(&entries, b"s").unwrap();
    assert!(matches!(
        decode_reply(&out[0]).unwrap(),
        Err(MetaError::Invalid { .. })
    ));
    assert!(out[1].is_empty());
    assert_eq!(decode_reply(&out[2]).unwrap(), Ok(Reply::Unit));
}

#[test]
#[ignore]
fn apply_speed() {
    let mut h = H::new();
    let d = h.mkdir(ROOT_INO, "d");
    let start = std::time::Instant::now();
    for i in 0..20_000 {
        h.create(d.ino, &format!("file-{i}"));
        if i % 1000 == 999 {
            h.sm.store().flush_durable().unwrap();
        }
        if i % 5000 == 4999 {
            println!("{i}: {:.0}/s", i as f64 / start.elapsed().as_secs_f64());
        }
    }
    println!(
        "20000 applies: {:.0}/s",
        20_000.0 / start.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore]
fn txn_speed() {
    let h = H::new();
    let start = std::time::Instant::now();
    for i in 0..5_000u64 {
        let e = Entry {
            index: i,
            term: 1,
            command: None,
        };
        h.sm.apply(&[e], b"x").unwrap();
    }
    println!(
        "5000 empty applies: {:.0}/s",
        5_000.0 / start.elapsed().as_secs_f64()
    );
    let start = std::time::Instant::now();
    for i in 0..5_000u64 {
        let e = Entry {
            index: i,
            term: 1,
            command: None,
        };
        h.sm.apply(&[e], b"x").unwrap();
        if i % 500 == 0 {
            h.sm.store().flush_durable().unwrap();
        }
    }
    println!(
        "5000 empty applies with flushes: {:.0}/s",
        5_000.0 / start.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore]
fn batch_speed() {
    let mut h = H::new();
    let d = h.mkdir(ROOT_INO, "d");
    let cmds: Vec<Vec<u8>> = (0..20_000)
        .map(|i| {
            Command::Mknod {
                parent: d.ino,
                name: n(&format!("file-{i}")),
                node: NewNode {
                    kind: FileKind::File,
                    perm: 0o644,
                    rdev: 0,
                    exclusive: true,
                },
                caller: ME,
                now: Timespec::default(),
            }
            .encode()
            .unwrap()
        })
        .collect();
    let start = std::time::Instant::now();
    for chunk in cmds.chunks(100) {
        let entries: Vec<Entry> = chunk
            .iter()
            .map(|c| Entry {
                index: 1,
                term: 1,
                command: Some(c),
            })
            .collect();
        h.sm.apply(&entries, b"x").unwrap();
    }
    println!(
        "20000 creates in batches of 100: {:.0}/s",
        20_000.0 / start.elapsed().as_secs_f64()
    );
}
