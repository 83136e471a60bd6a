//! Storage classes: inheritance, `set_class`, the virtual xattr and `cold_chunks`.

use rawfs_metadata_api::*;
use serde::{Deserialize, Serialize};

use super::{n, snapshot, H};
use crate::classes;
use crate::commands::Command;
use crate::queries;

fn set_class(h: &mut H, ino: Ino, class: StorageClass) -> MetaResult<()> {
    let now = h.now();
    h.apply(classes::set_class_command(ino, class, now))?
        .into_unit()
}

fn class(h: &H, ino: Ino) -> MetaResult<StorageClass> {
    h.sm.read(|rt| classes::get_class(rt, ino))
}

fn setxattr(h: &mut H, ino: Ino, name: &str, value: &[u8], mode: XattrMode) -> MetaResult<()> {
    let now = h.now();
    h.apply(Command::SetXattr {
        ino,
        name: n(name),
        value: serde_bytes::ByteBuf::from(value.to_vec()),
        mode,
        now,
    })?
    .into_unit()
}

fn getxattr(h: &H, ino: Ino, name: &str) -> MetaResult<Vec<u8>> {
    h.sm.read(|rt| queries::getxattr(rt, ino, name.as_bytes()))
        .map(|v| v.into_vec())
}

fn removexattr(h: &mut H, ino: Ino, name: &str) -> MetaResult<()> {
    let now = h.now();
    h.apply(Command::RemoveXattr {
        ino,
        name: n(name),
        now,
    })?
    .into_unit()
}

fn symlink(h: &mut H, parent: Ino, name: &str) -> Attr {
    let now = h.now();
    h.apply(Command::Symlink {
        parent,
        name: n(name),
        target: n("/elsewhere"),
        caller: super::ME,
        now,
    })
    .unwrap()
    .into_attr()
    .unwrap()
}

fn is_invalid(r: MetaResult<impl std::fmt::Debug>) -> String {
    match r {
        Err(MetaError::Invalid { reason }) => reason,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn new_inodes_inherit_their_directory_class_but_links_and_renames_keep_theirs() {
    let mut h = H::new();
    let before = h.create(ROOT_INO, "before");
    let d = h.mkdir(ROOT_INO, "d");
    set_class(&mut h, d.ino, StorageClass::Cold).unwrap();
    let f = h.create(d.ino, "f");
    let sub = h.mkdir(d.ino, "sub");
    let deep = h.create(sub.ino, "deep");
    let l = symlink(&mut h, d.ino, "l");
    let fifo = h.mknod(d.ino, "p", FileKind::Fifo, 0o644).unwrap();
    for ino in [f.ino, sub.ino, deep.ino, l.ino, fifo.ino] {
        assert_eq!(class(&h, ino).unwrap(), StorageClass::Cold, "ino {ino}");
    }
    // The root and what was made before are untouched.
    assert_eq!(class(&h, ROOT_INO).unwrap(), StorageClass::Auto);
    assert_eq!(class(&h, before.ino).unwrap(), StorageClass::Auto);
    // A hard link or a rename into the cold directory keeps the inode's class.
    let now = h.now();
    h.apply(Command::Link {
        ino: before.ino,
        newparent: d.ino,
        newname: n("linked"),
        now,
    })
    .unwrap();
    h.rename(ROOT_INO, "before", d.ino, "moved", RenameFlags::default())
        .unwrap();
    assert_eq!(class(&h, before.ino).unwrap(), StorageClass::Auto);
    // Changing the directory later does not touch existing children.
    set_class(&mut h, d.ino, StorageClass::Hot).unwrap();
    assert_eq!(class(&h, f.ino).unwrap(), StorageClass::Cold);
    let g = h.create(d.ino, "g");
    assert_eq!(class(&h, g.ino).unwrap(), StorageClass::Hot);
}

#[test]
fn set_class_bumps_ctime_survives_reopen_and_refuses_other_kinds() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f");
    assert_eq!(class(&h, f.ino).unwrap(), StorageClass::Auto);
    set_class(&mut h, f.ino, StorageClass::Hot).unwrap();
    let now = h.now();
    let a =
        h.sm.read(|rt| Ok(crate::store::inode(&rt.inodes, f.ino)?.ctime))
            .unwrap();
    assert!(a > f.ctime && a < now, "ctime bumped by set_class");
    let h2 = h.reopen();
    assert_eq!(class(&h2, f.ino).unwrap(), StorageClass::Hot);
    let mut h = h2;
    let l = symlink(&mut h, ROOT_INO, "l");
    let reason = is_invalid(set_class(&mut h, l.ino, StorageClass::Cold));
    assert!(reason.contains("regular file or a directory"), "{reason}");
    assert_eq!(class(&h, l.ino).unwrap(), StorageClass::Auto);
    assert_eq!(
        set_class(&mut h, 999, StorageClass::Cold),
        Err(MetaError::NotFound)
    );
    assert_eq!(class(&h, 999), Err(MetaError::NotFound));
}

#[test]
fn class_xattr_shows_sets_and_resets_the_class() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f");
    assert_eq!(getxattr(&h, f.ino, CLASS_XATTR).unwrap(), b"auto");
    setxattr(&mut h, f.ino, CLASS_XATTR, b"cold", XattrMode::Any).unwrap();
    assert_eq!(class(&h, f.ino).unwrap(), StorageClass::Cold);
    assert_eq!(getxattr(&h, f.ino, CLASS_XATTR).unwrap(), b"cold");
    // Always present: REPLACE works, CREATE is refused.
    setxattr(&mut h, f.ino, CLASS_XATTR, b"hot", XattrMode::Replace).unwrap();
    assert_eq!(getxattr(&h, f.ino, CLASS_XATTR).unwrap(), b"hot");
    assert_eq!(
        setxattr(&mut h, f.ino, CLASS_XATTR, b"cold", XattrMode::Create),
        Err(MetaError::Exists)
    );
    // A trailing NUL (as C strings are often sent) is accepted.
    setxattr(&mut h, f.ino, CLASS_XATTR, b"cold\0", XattrMode::Any).unwrap();
    assert_eq!(class(&h, f.ino).unwrap(), StorageClass::Cold);
    for bad in [&b"warm"[..], &b""[..], &b"COLD"[..], &[0xff, 0xfe][..]] {
        let reason = is_invalid(setxattr(&mut h, f.ino, CLASS_XATTR, bad, XattrMode::Any));
        assert!(reason.contains("hot, cold or auto"), "{reason}");
    }
    assert_eq!(class(&h, f.ino).unwrap(), StorageClass::Cold, "unchanged");
    removexattr(&mut h, f.ino, CLASS_XATTR).unwrap();
    assert_eq!(class(&h, f.ino).unwrap(), StorageClass::Auto);
    assert_eq!(getxattr(&h, f.ino, CLASS_XATTR).unwrap(), b"auto");
    // Directories too; other kinds are refused, but still show their class.
    setxattr(&mut h, ROOT_INO, CLASS_XATTR, b"hot", XattrMode::Any).unwrap();
    assert_eq!(class(&h, ROOT_INO).unwrap(), StorageClass::Hot);
    let l = symlink(&mut h, ROOT_INO, "l");
    assert_eq!(getxattr(&h, l.ino, CLASS_XATTR).unwrap(), b"hot");
    is_invalid(setxattr(
        &mut h,
        l.ino,
        CLASS_XATTR,
        b"cold",
        XattrMode::Any,
    ));
    is_invalid(removexattr(&mut h, l.ino, CLASS_XATTR));
    assert_eq!(getxattr(&h, 999, CLASS_XATTR), Err(MetaError::NotFound));
}

#[test]
fn class_xattr_is_never_stored_nor_listed() {
    let mut h = H::new();
    let f = h.create(ROOT_INO, "f");
    setxattr(&mut h, f.ino, "user.note", b"x", XattrMode::Any).unwrap();
    setxattr(&mut h, f.ino, CLASS_XATTR, b"cold", XattrMode::Any).unwrap();
    let listed = h.sm.read(|rt| queries::listxattr(rt, f.ino)).unwrap();
    assert_eq!(listed, vec![n("user.note")]);
    let stored =
        h.sm.read(|rt| Ok(rt.xattrs.get((f.ino, CLASS_XATTR.as_bytes()))?.is_some()))
            .unwrap();
    assert!(!stored, "the class lives in the inode record");
    // Removing it is not an error although no row exists; other xattrs are untouched.
    removexattr(&mut h, f.ino, CLASS_XATTR).unwrap();
    assert_eq!(getxattr(&h, f.ino, "user.note").unwrap(), b"x");
}

/// The inode record as written before storage classes existed.
#[derive(Serialize, Deserialize)]
struct InodeRecV0 {
    kind: FileKind,
    perm: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u64,
    rdev: u32,
    atime: Timespec,
    mtime: Timespec,
    ctime: Timespec,
    crtime: Timespec,
    stored: u64,
    parent: Ino,
    last_seq: u64,
    snapshot_of: Option<Ino>,
}

#[test]
fn inode_records_without_a_class_decode_as_auto() {
    let t = Timespec { sec: 5, nsec: 6 };
    let old = InodeRecV0 {
        kind: FileKind::File,
        perm: 0o644,
        uid: 1,
        gid: 2,
        nlink: 1,
        size: 10,
        rdev: 0,
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        stored: 10,
        parent: 0,
        last_seq: 0,
        snapshot_of: Some(7),
    };
    let bytes = crate::store::encode("inode", &old).unwrap();
    let rec: crate::store::InodeRec = crate::store::decode("inode", &bytes).unwrap();
    assert_eq!(rec.class, StorageClass::Auto);
    assert_eq!((rec.size, rec.snapshot_of), (10, Some(7)));
    let mut cold = rec.clone();
    cold.class = StorageClass::Cold;
    let back: crate::store::InodeRec =
        crate::store::decode("inode", &crate::store::encode("inode", &cold).unwrap()).unwrap();
    assert_eq!(back, cold);
}

/// A file `name` in `parent` with `chunks` chunks on servers 1..3 and `size` bytes.
fn file(h: &mut H, parent: Ino, name: &str, chunks: u64, size: u64) -> Attr {
    let f = h.create(parent, name);
    for i in 0..chunks {
        h.allocate(f.ino, i, &[1, 2, 3]).unwrap();
    }
    let now = h.now();
    h.apply(Command::CommitWrite {
        ino: f.ino,
        end: size,
        stored_delta: size as i64,
        now,
    })
    .unwrap()
    .into_attr()
    .unwrap()
}

fn cold(h: &H, after: (Ino, u64), quiet_ms: u64, limit: u32, now: Timespec) -> ColdPage {
    h.sm.read(|rt| classes::cold_chunks(rt, after, quiet_ms, limit, now))
        .unwrap()
}

fn keys(page: &ColdPage) -> Vec<(Ino, u64)> {
    page.chunks.iter().map(|c| (c.ino, c.index)).collect()
}

#[test]
fn cold_chunks_lists_cold_files_and_quiet_auto_files_but_never_hot_ones() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let (hot_dir, cold_dir) = (h.mkdir(ROOT_INO, "hot"), h.mkdir(ROOT_INO, "cold"));
    set_class(&mut h, hot_dir.ino, StorageClass::Hot).unwrap();
    set_class(&mut h, cold_dir.ino, StorageClass::Cold).unwrap();
    let c = file(&mut h, cold_dir.ino, "c", 2, CHUNK_SIZE + 10);
    let a = file(&mut h, ROOT_INO, "a", 1, 100);
    let x = file(&mut h, hot_dir.ino, "x", 1, 100);
    let now = h.now();
    let page = cold(&h, (0, 0), 0, 100, now);
    assert_eq!(keys(&page), vec![(c.ino, 0), (c.ino, 1), (a.ino, 0)]);
    assert_eq!(page.next, None);
    let lengths: Vec<u64> = page.chunks.iter().map(|c| c.length).collect();
    assert_eq!(lengths, vec![CHUNK_SIZE, 10, 100]);
    let locs = h.sm.read(|rt| queries::chunks(rt, c.ino, 0, 2, 3)).unwrap();
    assert_eq!(page.chunks[1].chunk, locs[1].chunk);
    assert_eq!(page.chunks[1].version, locs[1].version);
    // An hour of quiet: the auto file (written a few seconds ago) is not due; cold always is.
    let page = cold(&h, (0, 0), 3_600_000, 100, now);
    assert_eq!(keys(&page), vec![(c.ino, 0), (c.ino, 1)]);
    // Exactly at the quiet period's end it is due, a second before it is not.
    let due = Timespec {
        sec: a.mtime.sec + 60,
        nsec: a.mtime.nsec,
    };
    assert!(keys(&cold(&h, (0, 0), 60_000, 100, due)).contains(&(a.ino, 0)));
    let early = Timespec {
        sec: due.sec - 1,
        ..due
    };
    assert!(!keys(&cold(&h, (0, 0), 60_000, 100, early)).contains(&(a.ino, 0)));
    // Hot files never, even when quiet for ever; nor once the auto file turns hot.
    set_class(&mut h, a.ino, StorageClass::Hot).unwrap();
    let now = h.now();
    let page = cold(&h, (0, 0), 0, 100, now);
    assert!(!keys(&page).iter().any(|k| k.0 == x.ino || k.0 == a.ino));
}

#[test]
fn cold_chunks_pages_in_order_without_gaps() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    let d = h.mkdir(ROOT_INO, "d");
    set_class(&mut h, d.ino, StorageClass::Cold).unwrap();
    let f = file(&mut h, d.ino, "f", 3, 3 * CHUNK_SIZE);
    let hot = file(&mut h, ROOT_INO, "hot", 2, 2 * CHUNK_SIZE);
    set_class(&mut h, hot.ino, StorageClass::Hot).unwrap();
    let g = file(&mut h, d.ino, "g", 2, 2 * CHUNK_SIZE);
    let now = h.now();
    let mut seen = Vec::new();
    let mut after = (0, 0);
    let mut pages = 0;
    loop {
        let page = cold(&h, after, 0, 2, now);
        assert!(page.chunks.len() <= 2);
        seen.extend(keys(&page));
        pages += 1;
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    let want = vec![(f.ino, 0), (f.ino, 1), (f.ino, 2), (g.ino, 0), (g.ino, 1)];
    assert_eq!(seen, want);
    assert_eq!(pages, 3);
    // Starting inside a file, and past the end.
    assert_eq!(keys(&cold(&h, (f.ino, 1), 0, 100, now)), want[2..].to_vec());
    assert!(cold(&h, (u64::MAX, u64::MAX), 0, 100, now)
        .chunks
        .is_empty());
    // The limit is capped, and zero still makes progress.
    assert_eq!(cold(&h, (0, 0), 0, 0, now).chunks.len(), 1);
}

#[test]
fn cold_chunks_skips_shared_chunks_and_pending_copies() {
    let mut h = H::new();
    h.register(&[1, 2, 3]);
    set_class(&mut h, ROOT_INO, StorageClass::Cold).unwrap();
    let f = file(&mut h, ROOT_INO, "f", 2, 2 * CHUNK_SIZE);
    let other = file(&mut h, ROOT_INO, "other", 1, 10);
    let s = snapshot(&mut h, f.ino, "s", true).unwrap();
    assert_eq!(
        class(&h, s.ino).unwrap(),
        StorageClass::Cold,
        "the origin's"
    );
    // Both of f's chunks are now shared with the snapshot: neither side lists them.
    let now = h.now();
    assert_eq!(keys(&cold(&h, (0, 0), 0, 100, now)), vec![(other.ino, 0)]);
    // A copy-on-write of chunk 0 gives f a private chunk, listed once the copy is done.
    let locs = h.sm.read(|rt| queries::chunks(rt, f.ino, 0, 2, 3)).unwrap();
    let c = h
        .apply(Command::CowChunk {
            ino: f.ino,
            index: 0,
            chunk: locs[0].chunk,
        })
        .unwrap()
        .into_cow()
        .unwrap();
    let now = h.now();
    assert_eq!(keys(&cold(&h, (0, 0), 0, 100, now)), vec![(other.ino, 0)]);
    h.apply(Command::CowDone {
        ino: f.ino,
        index: 0,
        chunk: c.loc.chunk,
        failed: vec![],
    })
    .unwrap();
    let now = h.now();
    let page = cold(&h, (0, 0), 0, 100, now);
    assert_eq!(keys(&page), vec![(f.ino, 0), (other.ino, 0)]);
    assert_eq!(page.chunks[0].chunk, c.loc.chunk);
}

#[test]
fn cold_chunks_lists_abandoned_conversions_again_but_skips_erasure_coded_chunks() {
    let mut h = H::new();
    h.register(&[1, 2, 3, 4, 5, 6]);
    set_class(&mut h, ROOT_INO, StorageClass::Cold).unwrap();
    let f = file(&mut h, ROOT_INO, "f", 2, 2 * CHUNK_SIZE);
    let now = h.now();
    let page = cold(&h, (0, 0), 0, 100, now);
    assert_eq!(keys(&page), vec![(f.ino, 0), (f.ino, 1)]);
    let c = page.chunks[0].clone();
    let plan = h
        .apply(Command::EcPrepare {
            ino: f.ino,
            index: 0,
            chunk: c.chunk,
            version: c.version,
            servers: vec![1, 2, 3, 4, 5, 6],
        })
        .unwrap()
        .into_plan()
        .unwrap();
    let now = h.now();
    let again = cold(&h, (0, 0), 0, 100, now);
    assert_eq!(
        keys(&again),
        vec![(f.ino, 0), (f.ino, 1)],
        "a conversion still marked when the healer lists is retried"
    );
    assert_eq!(again.chunks[0].version, plan.loc.version);
    h.apply(Command::EcCommit {
        ino: f.ino,
        index: 0,
        chunk: c.chunk,
        version: plan.loc.version,
        length: c.length,
        term: plan.loc.term,
    })
    .unwrap()
    .into_chunk()
    .unwrap();
    let now = h.now();
    assert_eq!(
        keys(&cold(&h, (0, 0), 0, 100, now)),
        vec![(f.ino, 1)],
        "erasure coded"
    );
    // Once the file is hot, its erasure-coded chunk is due for replicas, the other for nothing.
    set_class(&mut h, f.ino, StorageClass::Hot).unwrap();
    let now = h.now();
    let page = cold(&h, (0, 0), 0, 100, now);
    assert_eq!(keys(&page), vec![(f.ino, 0)]);
    assert!(page.chunks[0].to_replicas);
    assert_eq!(page.chunks[0].chunk, c.chunk);
}
